//! A tensor-parallel group whose ranks are threads of this process, sharing an
//! in-memory collective: the TP-invariance and checkpoint tests (`tests/model.rs`)
//! and the `cpu_speed` example run the real sharded math through it, without gRPC.
//!
//! Costs: one scoped thread per rank per step; the all-reduces are memcpy + sum.

use kernels::quant::WeightDtype;

use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, LocalCollective};
use crate::model::{CpuModel, RankWeights, SeqChunk, ShardSpec, StepInput, WeightFormat};
use crate::WorkerError;

/// `tp` ranks of one model, each with its own KV cache of `num_blocks` blocks.
pub struct LocalTpGroup {
    ranks: Vec<(CpuModel, LocalCollective)>,
    block_size: usize,
}

impl LocalTpGroup {
    pub fn load(
        ckpt: &Checkpoint,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, WorkerError> {
        Self::load_as(ckpt, tp, num_blocks, block_size, WeightDtype::F32)
    }

    /// [`LocalTpGroup::load`] with every rank's weights stored as `format` chooses (a
    /// [`WeightDtype`] for all, or [`WeightFormat::AsStored`]).
    pub fn load_as(
        ckpt: &Checkpoint,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
        format: impl Into<WeightFormat>,
    ) -> Result<Self, WorkerError> {
        let format = format.into();
        ckpt.config.check_tp(tp)?;
        let colls = LocalCollective::group(tp);
        let ranks = colls
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                Ok((
                    CpuModel::new(
                        RankWeights::load_as(ckpt, ShardSpec { tp, rank }, format, false)?,
                        num_blocks,
                        block_size,
                    ),
                    c,
                ))
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        Ok(Self { ranks, block_size })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn sliding_window(&self) -> Option<u32> {
        self.ranks[0].0.config().sliding_window
    }

    pub fn vocab_size(&self) -> usize {
        self.ranks[0].0.config().vocab_size
    }

    /// Runs one step on every rank; returns rank 0's logits.
    pub fn forward(&mut self, step: &StepInput) -> Result<Vec<f32>, WorkerError> {
        self.on_every_rank(|model, coll| model.forward(step, coll))
    }

    /// [`CpuModel::forward_argmax`] on every rank; returns rank 0's argmax ids.
    pub fn forward_argmax(&mut self, step: &StepInput) -> Result<Vec<u32>, WorkerError> {
        self.on_every_rank(|model, coll| model.forward_argmax(step, coll))
    }

    /// Runs `f` on every rank at once (threads; a single rank on the pool, see
    /// [`CpuModel::on_pool`]); returns rank 0's answer.
    fn on_every_rank<T: Send>(
        &mut self,
        f: impl Fn(&mut CpuModel, &mut dyn Collective) -> Result<Option<T>, WorkerError> + Sync,
    ) -> Result<T, WorkerError> {
        let none = || WorkerError::Collective("rank 0 returned nothing".into());
        if let [(model, coll)] = &mut self.ranks[..] {
            return CpuModel::on_pool(|| f(model, coll))?.ok_or_else(none);
        }
        let f = &f;
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|(model, coll)| s.spawn(move || f(model, coll as &mut dyn Collective)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread panicked"))
                .collect()
        });
        let mut answer = None;
        for r in results {
            if let Some(a) = r? {
                answer = Some(a);
            }
        }
        answer.ok_or_else(none)
    }

    /// Greedy decoding of one sequence occupying blocks `0, 1, 2, …`: the prompt is
    /// fed in chunks of `chunk` tokens, then `n_new` tokens are generated. Returns the
    /// generated ids and the logits of every sampled step.
    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        n_new: usize,
        chunk: usize,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>), WorkerError> {
        let total = prompt.len() + n_new;
        let table: Vec<u32> = (0..total.div_ceil(self.block_size) as u32).collect();
        let vocab = self.vocab_size();
        let mut cached = 0;
        let mut out = Vec::new();
        let mut all_logits = Vec::new();
        let mut pending: Vec<u32> = prompt.to_vec();
        while out.len() < n_new {
            let take = if cached < prompt.len() {
                chunk.min(prompt.len() - cached)
            } else {
                pending.len()
            };
            let tokens: Vec<u32> = pending.drain(..take).collect();
            let sample = cached + take >= prompt.len();
            let step = StepInput::build(
                self.block_size,
                self.sliding_window(),
                &[SeqChunk {
                    block_table: &table,
                    cached,
                    tokens: &tokens,
                    sample,
                }],
            );
            let logits = self.forward(&step)?;
            cached += take;
            if sample {
                let next = kernels::reference::argmax_rows(&logits, vocab)[0];
                out.push(next);
                pending.push(next);
                all_logits.push(logits);
            }
        }
        Ok((out, all_logits))
    }
}
