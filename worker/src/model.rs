//! The Mistral forward pass on CPU over a paged KV cache, for one tensor-parallel
//! rank (the reference backend). Activations, accumulation and the KV cache are f32;
//! linear weights, the embedding and `lm_head` are stored as the [`WeightFormat`] the
//! rank was loaded with chooses (f32, bf16, int8 with one f32 scale per output row, or
//! Q8_0 blocks), so a decode step reads 4, 2, 1 or 34/32 bytes per weight. Norm
//! weights stay f32. A fused matrix (`wq|wk|wv`, `w1|w3`) has one format: under
//! [`WeightFormat::AsStored`] the most precise of its parts' (f32 > bf16 > Q8_0 > int8).
//!
//! Sharding (Megatron): `wq|wk|wv` fused and split by heads, `w1|w3` fused and split
//! by rows (column-parallel); `wo` and `w2` split by columns (row-parallel) and
//! followed by an all-reduce; the embedding is replicated; `lm_head` is
//! vocab-parallel and its logits are gathered on rank 0.
//!
//! A step is a batch of sequences, each contributing any number of new tokens
//! (prefill chunks and decodes mixed); [`StepInput`] carries the tokens, the
//! per-step attention metadata computed once and reused by every layer, and the rows
//! that need logits. Costs per step: `2·params/TP` FLOPs per token plus attention;
//! two all-reduces of `[n_tokens, dim]` per layer and one gather of the logits rows.

use indicatif::{ProgressBar, ProgressStyle};
use kernels::quant::{self, QMatrix, WeightDtype};
use kernels::reference::{self as ops, AttnMeta, KvLayout};

use std::ops::Range;

use crate::checkpoint::{Checkpoint, Param};
use crate::collective::Collective;
use crate::config::ModelConfig;
use crate::WorkerError;

/// Which slice of the model a rank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub tp: usize,
    pub rank: usize,
}

impl Default for ShardSpec {
    fn default() -> Self {
        Self { tp: 1, rank: 0 }
    }
}

/// Per-rank sizes derived from the config and the shard (CPU and CUDA models).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Local {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) ffn: usize,
    pub(crate) vocab: usize,
}

impl Local {
    pub(crate) fn new(cfg: &ModelConfig, shard: ShardSpec) -> Self {
        Self {
            heads: cfg.n_heads / shard.tp,
            kv_heads: cfg.n_kv_heads / shard.tp,
            ffn: cfg.hidden_dim / shard.tp,
            vocab: cfg.vocab_size / shard.tp,
        }
    }
}

/// How a CPU rank chooses the stored format of each matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Every matrix converted to this dtype at load.
    All(WeightDtype),
    /// Each matrix as the checkpoint stores its parts ([`Checkpoint::native_dtype`]);
    /// a fused matrix takes the most precise of its parts' formats.
    AsStored,
}

impl From<WeightDtype> for WeightFormat {
    fn from(d: WeightDtype) -> Self {
        Self::All(d)
    }
}

impl WeightFormat {
    /// The dtype of the matrix the parameters `parts` are fused into.
    pub fn dtype_of(self, ckpt: &Checkpoint, parts: &[Param]) -> Result<WeightDtype, WorkerError> {
        let precision = |d: WeightDtype| match d {
            WeightDtype::Int8 => 0,
            WeightDtype::Q8_0 => 1,
            WeightDtype::Bf16 => 2,
            WeightDtype::F32 => 3,
        };
        match self {
            Self::All(d) => Ok(d),
            Self::AsStored => {
                let mut best = WeightDtype::Int8;
                for &p in parts {
                    let d = ckpt.native_dtype(p)?;
                    if precision(d) > precision(best) {
                        best = d;
                    }
                }
                Ok(best)
            }
        }
    }

    /// Bytes of weights one rank of `tp` holds (norms in f32), for memory checks
    /// before loading.
    pub fn rank_bytes(self, ckpt: &Checkpoint, tp: usize) -> Result<u64, WorkerError> {
        let cfg = &ckpt.config;
        let numel = |p: Param| p.shape(cfg).iter().product::<usize>() as f64;
        let mut groups: Vec<Vec<Param>> = vec![vec![Param::Embed], vec![Param::Output]];
        let mut norms = cfg.dim as f64;
        for i in 0..cfg.n_layers {
            groups.extend(layer_matrices(i));
            norms += 2.0 * cfg.dim as f64;
        }
        let mut bytes = 4.0 * norms;
        for g in &groups {
            let per = self.dtype_of(ckpt, g)?.bytes_per_weight();
            // The embedding is replicated; every other matrix is split over the ranks.
            let share = if g[0] == Param::Embed { 1.0 } else { tp as f64 };
            bytes += g.iter().map(|&p| numel(p)).sum::<f64>() * per / share;
        }
        Ok(bytes as u64)
    }
}

/// The parameters fused into each stored matrix of layer `i`, in [`PackedLayer`]
/// order: `wq|wk|wv`, `wo`, `w1|w3`, `w2`.
fn layer_matrices(i: usize) -> [Vec<Param>; 4] {
    [
        vec![Param::Wq(i), Param::Wk(i), Param::Wv(i)],
        vec![Param::Wo(i)],
        vec![Param::W1(i), Param::W3(i)],
        vec![Param::W2(i)],
    ]
}

/// One rank's layer `i`, packed for TP (fused `wq|wk|wv` rows and fused gate|up rows
/// of this rank's heads and FFN slice, this rank's columns of the row-parallel `wo`
/// and `w2`), with norms in f32 and matrices as `M`: f32 vectors ([`pack_layer`], what
/// the CUDA loader uploads) or the CPU's stored format ([`LayerWeights`]).
pub struct PackedLayer<M = Vec<f32>> {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// `[(heads + 2·kv_heads)·head_dim, dim]`: this rank's q, k and v rows.
    pub wqkv: M,
    /// `[dim, heads·head_dim]`: this rank's columns of `wo`.
    pub wo: M,
    /// `[2·ffn, dim]`: this rank's gate rows then up rows.
    pub w13: M,
    /// `[dim, ffn]`: this rank's columns of `w2`.
    pub w2: M,
}

/// One layer's weights for one CPU rank: norms in f32, matrices in the stored format.
pub type LayerWeights = PackedLayer<QMatrix>;

impl LayerWeights {
    /// Bytes this layer holds (matrices as stored, norms in f32).
    pub fn bytes(&self) -> usize {
        self.wqkv.bytes()
            + self.wo.bytes()
            + self.w13.bytes()
            + self.w2.bytes()
            + 4 * (self.attn_norm.len() + self.ffn_norm.len())
    }
}

/// A slice of one parameter a rank reads.
#[derive(Clone, Debug)]
enum Slice {
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// Reads and packs layer `i` for `shard` (its [`Param::of_layer`] tensors): `read`
/// loads a slice of a parameter for the fused matrix whose parts are given, `stack`
/// appends rows to a fused matrix.
fn pack_layer_with<M>(
    ckpt: &Checkpoint,
    shard: ShardSpec,
    i: usize,
    read: impl Fn(Param, Slice, &[Param]) -> Result<M, WorkerError>,
    stack: impl Fn(&mut M, M) -> Result<(), WorkerError>,
) -> Result<PackedLayer<M>, WorkerError> {
    let cfg = &ckpt.config;
    let l = Local::new(cfg, shard);
    let (r, hd) = (shard.rank, cfg.head_dim);
    let [qkv, o, gate_up, down] = layer_matrices(i);
    let rows =
        |p: Param, per: usize, parts: &[Param]| read(p, Slice::Rows(r * per..(r + 1) * per), parts);
    let mut wqkv = rows(Param::Wq(i), l.heads * hd, &qkv)?;
    stack(&mut wqkv, rows(Param::Wk(i), l.kv_heads * hd, &qkv)?)?;
    stack(&mut wqkv, rows(Param::Wv(i), l.kv_heads * hd, &qkv)?)?;
    let mut w13 = rows(Param::W1(i), l.ffn, &gate_up)?;
    stack(&mut w13, rows(Param::W3(i), l.ffn, &gate_up)?)?;
    let cols =
        |p: Param, per: usize, parts: &[Param]| read(p, Slice::Cols(r * per..(r + 1) * per), parts);
    Ok(PackedLayer {
        attn_norm: ckpt.load_rows(Param::AttnNorm(i), 0..cfg.dim)?,
        ffn_norm: ckpt.load_rows(Param::FfnNorm(i), 0..cfg.dim)?,
        wqkv,
        wo: cols(Param::Wo(i), l.heads * hd, &o)?,
        w13,
        w2: cols(Param::W2(i), l.ffn, &down)?,
    })
}

/// Reads and packs layer `i` for `shard` in f32.
pub fn pack_layer(
    ckpt: &Checkpoint,
    shard: ShardSpec,
    i: usize,
) -> Result<PackedLayer, WorkerError> {
    pack_layer_with(
        ckpt,
        shard,
        i,
        |p, s, _| match s {
            Slice::Rows(r) => ckpt.load_rows(p, r),
            Slice::Cols(c) => ckpt.load_cols(p, c),
        },
        |m, rows| {
            m.extend(rows);
            Ok(())
        },
    )
}

/// Reads and packs layer `i` for `shard`, each matrix stored as `format` chooses.
fn load_layer(
    ckpt: &Checkpoint,
    shard: ShardSpec,
    i: usize,
    format: WeightFormat,
) -> Result<LayerWeights, WorkerError> {
    pack_layer_with(
        ckpt,
        shard,
        i,
        |p, s, parts| {
            let d = format.dtype_of(ckpt, parts)?;
            match s {
                Slice::Rows(r) => ckpt.load_rows_as(p, r, d),
                Slice::Cols(c) => ckpt.load_cols_as(p, c, d),
            }
        },
        |m, rows| m.append_rows(rows).map_err(WorkerError::Checkpoint),
    )
}

/// All weights of one rank.
pub struct RankWeights {
    pub config: ModelConfig,
    pub shard: ShardSpec,
    /// `[vocab, dim]`, replicated.
    pub embed: QMatrix,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `[vocab/tp, dim]`: this rank's vocabulary rows.
    pub lm_head: QMatrix,
}

impl RankWeights {
    /// Loads this rank's slices from a checkpoint in f32, in the internal RoPE
    /// convention. `progress` shows one tick per tensor.
    pub fn load(ckpt: &Checkpoint, shard: ShardSpec, progress: bool) -> Result<Self, WorkerError> {
        Self::load_as(ckpt, shard, WeightDtype::F32, progress)
    }

    /// [`RankWeights::load`] storing each matrix as `format` chooses (a
    /// [`WeightDtype`] for all of them, or as stored), converted one tensor at a time,
    /// so the peak is one f32 tensor above the stored size.
    pub fn load_as(
        ckpt: &Checkpoint,
        shard: ShardSpec,
        format: impl Into<WeightFormat>,
        progress: bool,
    ) -> Result<Self, WorkerError> {
        let format = format.into();
        let cfg = &ckpt.config;
        cfg.check_tp(shard.tp)?;
        if shard.rank >= shard.tp {
            return Err(WorkerError::Config(format!(
                "rank {} is outside a TP group of {}",
                shard.rank, shard.tp
            )));
        }
        let l = Local::new(cfg, shard);
        let r = shard.rank;
        let bar = if progress {
            ProgressBar::new(Param::all(cfg).len() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("loading rank {msg} [{bar:40}] {pos}/{len} tensors")
                .expect("template"),
        );
        bar.set_message(format!("{r}/{}", shard.tp));
        let matrix = |p: Param, rows: Range<usize>| {
            bar.inc(1);
            ckpt.load_rows_as(p, rows, format.dtype_of(ckpt, &[p])?)
        };
        let dim = cfg.dim;
        let embed = matrix(Param::Embed, 0..cfg.vocab_size)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        // Without a bar (a worker process), progress goes to the log, one line per layer.
        let started = std::time::Instant::now();
        let mut loaded_bytes = embed.bytes();
        for i in 0..cfg.n_layers {
            let w = load_layer(ckpt, shard, i, format)?;
            bar.inc(Param::of_layer(i).len() as u64);
            loaded_bytes += w.bytes();
            layers.push(w);
            if !progress {
                tracing::info!(
                    rank = r,
                    tp = shard.tp,
                    layer = i + 1,
                    of = cfg.n_layers,
                    mib = loaded_bytes >> 20,
                    seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "loading shard"
                );
            }
        }
        bar.inc(1);
        let norm = ckpt.load_rows(Param::Norm, 0..dim)?;
        let lm_head = matrix(Param::Output, r * l.vocab..(r + 1) * l.vocab)?;
        bar.finish_and_clear();
        Ok(Self {
            config: cfg.clone(),
            shard,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Bytes of weights this rank holds (what one decode step reads, plus the
    /// embedding rows it gathers).
    pub fn bytes(&self) -> usize {
        let layers: usize = self.layers.iter().map(LayerWeights::bytes).sum();
        self.embed.bytes() + layers + 4 * self.norm.len() + self.lm_head.bytes()
    }
}

/// One step's work for the model (identical on every rank).
#[derive(Clone, Debug, Default)]
pub struct StepInput {
    /// New token ids of every scheduled sequence, concatenated in sequence order.
    pub tokens: Vec<u32>,
    /// Attention metadata; `meta.q_indptr` splits `tokens` by sequence.
    pub meta: AttnMeta,
    /// Batch rows whose logits are wanted (typically each sequence's last row).
    pub logit_rows: Vec<u32>,
}

/// A rank's model state: weights plus its slice of the paged KV cache.
pub struct CpuModel {
    weights: RankWeights,
    local: Local,
    layout: KvLayout,
    /// Per layer: (K cache, V cache).
    kv: Vec<(Vec<f32>, Vec<f32>)>,
}

impl CpuModel {
    /// Allocates `num_blocks` KV blocks of `block_size` tokens for every layer.
    /// Panics where memory runs out; `Init` uses [`CpuModel::try_new`].
    pub fn new(weights: RankWeights, num_blocks: usize, block_size: usize) -> Self {
        Self::try_new(weights, num_blocks, block_size).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`CpuModel::new`], answering an error instead of aborting when the cache
    /// cannot be allocated.
    pub fn try_new(
        weights: RankWeights,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, WorkerError> {
        let cfg = &weights.config;
        let local = Local::new(cfg, weights.shard);
        let layout = KvLayout {
            num_blocks,
            n_kv_heads: local.kv_heads,
            block_size,
            head_dim: cfg.head_dim,
        };
        let zeros = || -> Result<Vec<f32>, WorkerError> {
            let mut v = Vec::new();
            v.try_reserve_exact(layout.len()).map_err(|e| {
                WorkerError::Config(format!(
                    "cannot allocate a KV cache of {num_blocks} blocks: {e}"
                ))
            })?;
            v.resize(layout.len(), 0.0);
            Ok(v)
        };
        let kv = (0..cfg.n_layers)
            .map(|_| Ok((zeros()?, zeros()?)))
            .collect::<Result<_, WorkerError>>()?;
        Ok(Self {
            weights,
            local,
            layout,
            kv,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    pub fn num_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    /// Bytes of KV cache one block takes on this rank (K and V, all layers, f32).
    pub fn kv_bytes_per_block(cfg: &ModelConfig, tp: usize, block_size: usize) -> usize {
        cfg.kv_bytes_per_block(tp, block_size, 4) as usize
    }

    /// Rejects a step this rank cannot execute, naming the problem.
    pub fn validate(&self, step: &StepInput) -> Result<(), WorkerError> {
        validate_step(&self.weights.config, self.layout, step)
    }

    /// Runs `step` (a forward pass) on a thread of rayon's pool, so the parallel loops of
    /// its GEMVs fork with work-stealing joins instead of each one parking the caller
    /// on a latch (a futex sleep and wake per loop, from a thread outside the pool).
    /// Only for a group of one: ranks that wait on each other in collectives must not
    /// run on one pool, where a rank waiting in a join could steal another rank's step
    /// and block it under itself.
    pub fn on_pool<T: Send>(step: impl FnOnce() -> T + Send) -> T {
        rayon::scope(|_| step())
    }

    /// Runs one step. Returns `[logit_rows.len(), vocab]` logits on rank 0, `None`
    /// on other ranks. Every rank of the group must run the same step.
    pub fn forward(
        &mut self,
        step: &StepInput,
        coll: &mut dyn Collective,
    ) -> Result<Option<Vec<f32>>, WorkerError> {
        let (local, m) = self.local_logits(step, coll)?;
        let (tp, vocab) = (coll.world_size(), self.local.vocab);
        let gathered = coll.gather(&local)?;
        Ok(gathered.map(|g| reorder_logits(&g, tp, m, vocab)))
    }

    /// [`Self::forward`] for a greedy step: rank 0 gets the first argmax of every
    /// logit row, and each rank sends 2 floats per row (its shard's maximum and where)
    /// instead of `vocab / tp` — equal to `argmax_rows` of `forward`'s logits.
    pub fn forward_argmax(
        &mut self,
        step: &StepInput,
        coll: &mut dyn Collective,
    ) -> Result<Option<Vec<u32>>, WorkerError> {
        let (local, m) = self.local_logits(step, coll)?;
        let (tp, vocab) = (coll.world_size(), self.local.vocab);
        let pairs = kernels::reference::argmax_pairs(&local, vocab);
        let gathered = coll.gather(&pairs)?;
        Ok(gathered.map(|g| combine_argmax_pairs(&g, tp, m, vocab)))
    }

    /// The step's layers and this rank's `lm_head` shard: `[m, vocab / tp]` logits of
    /// the `m` logit rows.
    fn local_logits(
        &mut self,
        step: &StepInput,
        coll: &mut dyn Collective,
    ) -> Result<(Vec<f32>, usize), WorkerError> {
        self.validate(step)?;
        let cfg = &self.weights.config;
        let (dim, hd, eps) = (cfg.dim, cfg.head_dim, cfg.norm_eps);
        let l = self.local;
        let n = step.tokens.len();
        let (qd, kvd) = (l.heads * hd, l.kv_heads * hd);
        let qkv_w = qd + 2 * kvd;
        let positions = step.meta.positions();
        let slots = step.meta.slot_mapping();

        let mut residual = vec![0f32; n * dim];
        quant::embedding(&step.tokens, &self.weights.embed, &mut residual);
        let mut normed = vec![0f32; n * dim];
        let mut qkv = vec![0f32; n * qkv_w];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut attn = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * dim];
        let mut gu = vec![0f32; n * 2 * l.ffn];
        let mut act = vec![0f32; n * l.ffn];
        for (i, lw) in self.weights.layers.iter().enumerate() {
            if i == 0 {
                ops::rms_norm(&residual, &lw.attn_norm, eps, dim, &mut normed);
            }
            quant::linear(&normed, &lw.wqkv, n, &mut qkv);
            for t in 0..n {
                let row = &qkv[t * qkv_w..(t + 1) * qkv_w];
                q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
                k[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                v[t * kvd..(t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
            }
            ops::rope(
                &mut q,
                &mut k,
                &positions,
                l.heads,
                l.kv_heads,
                hd,
                cfg.rope_theta,
            );
            let (kc, vc) = &mut self.kv[i];
            ops::reshape_and_cache(&k, &v, kc, vc, &slots, self.layout);
            ops::paged_attention(&q, kc, vc, &step.meta, l.heads, self.layout, &mut attn);
            quant::linear(&attn, &lw.wo, n, &mut proj);
            coll.all_reduce_sum(&mut proj)?;
            ops::fused_add_rms_norm(&mut residual, &proj, &lw.ffn_norm, eps, dim, &mut normed);
            quant::linear(&normed, &lw.w13, n, &mut gu);
            ops::swiglu(&gu, l.ffn, &mut act);
            quant::linear(&act, &lw.w2, n, &mut proj);
            coll.all_reduce_sum(&mut proj)?;
            let next_norm = self
                .weights
                .layers
                .get(i + 1)
                .map_or(&self.weights.norm, |nl| &nl.attn_norm);
            ops::fused_add_rms_norm(&mut residual, &proj, next_norm, eps, dim, &mut normed);
        }
        let m = step.logit_rows.len();
        let mut rows = Vec::with_capacity(m * dim);
        for &r in &step.logit_rows {
            rows.extend_from_slice(&normed[r as usize * dim..(r as usize + 1) * dim]);
        }
        let mut local_logits = vec![0f32; m * l.vocab];
        quant::linear(&rows, &self.weights.lm_head, m, &mut local_logits);
        Ok((local_logits, m))
    }
}

/// Gathered per-shard argmax pairs, `[tp][m][2]` (shard maximum, its index in the
/// shard, from [`kernels::reference::argmax_pairs`]) → each row's first argmax over
/// the whole vocabulary (the CPU and CUDA backends). Shard `r` holds ids
/// `r·local_vocab..(r+1)·local_vocab`, so keeping the earliest shard among equal
/// maxima gives the first maximum, as a scan of the whole row does. (A row holding
/// NaN may pick another index than that scan; neither is a meaningful token.)
pub fn combine_argmax_pairs(g: &[f32], tp: usize, m: usize, local_vocab: usize) -> Vec<u32> {
    debug_assert_eq!(g.len(), tp * m * 2);
    (0..m)
        .map(|row| {
            let pair = |r: usize| (g[(r * m + row) * 2], g[(r * m + row) * 2 + 1] as usize);
            let (mut best, mut at) = pair(0);
            for r in 1..tp {
                let (v, i) = pair(r);
                if v > best {
                    (best, at) = (v, r * local_vocab + i);
                }
            }
            at as u32
        })
        .collect()
}

/// Gathered vocab-parallel logits, `[tp][m][vocab/tp]` (rank-major) → `[m][vocab]`
/// (the CPU and CUDA backends).
pub fn reorder_logits(g: &[f32], tp: usize, m: usize, local_vocab: usize) -> Vec<f32> {
    if tp == 1 {
        return g.to_vec();
    }
    let vocab = tp * local_vocab;
    let mut logits = vec![0f32; m * vocab];
    for r in 0..tp {
        for row in 0..m {
            let src = &g[(r * m + row) * local_vocab..(r * m + row + 1) * local_vocab];
            logits[row * vocab + r * local_vocab..row * vocab + (r + 1) * local_vocab]
                .copy_from_slice(src);
        }
    }
    logits
}

/// Rejects a step a rank with this config and KV layout cannot execute, naming the
/// problem (shared by the CPU and CUDA backends).
pub fn validate_step(
    cfg: &ModelConfig,
    layout: KvLayout,
    step: &StepInput,
) -> Result<(), WorkerError> {
    let m = &step.meta;
    let n_seqs = m.ctx_lens.len();
    if m.block_size != layout.block_size {
        return Err(WorkerError::Step(format!(
            "block_size {} but the cache uses {}",
            m.block_size, layout.block_size
        )));
    }
    if m.q_indptr.len() != n_seqs + 1
        || m.q_indptr.first() != Some(&0)
        || m.q_indptr.windows(2).any(|w| w[0] > w[1])
    {
        return Err(WorkerError::Step(
            "q_indptr must start at 0, be non-decreasing and have one entry per sequence plus one"
                .into(),
        ));
    }
    if m.n_tokens() != step.tokens.len() {
        return Err(WorkerError::Step(format!(
            "{} tokens but q_indptr covers {}",
            step.tokens.len(),
            m.n_tokens()
        )));
    }
    if m.block_tables.len() != n_seqs * m.max_blocks {
        return Err(WorkerError::Step(
            "block_tables must be n_seqs × max_blocks".into(),
        ));
    }
    for s in 0..n_seqs {
        let q_len = m.q_indptr[s + 1] - m.q_indptr[s];
        let ctx = m.ctx_lens[s] as usize;
        if (q_len as usize) > ctx
            || ctx > m.max_blocks * m.block_size
            || ctx > cfg.max_position_embeddings
        {
            return Err(WorkerError::Step(format!("sequence {s}: context {ctx} with {q_len} new tokens does not fit its block table or the model context")));
        }
        let used = ctx.div_ceil(m.block_size);
        let first = (m.window_start(ctx as u32 - q_len) as usize) / m.block_size;
        if let Some(b) = m.block_tables[s * m.max_blocks..s * m.max_blocks + used][first..]
            .iter()
            .find(|&&b| b as usize >= layout.num_blocks)
        {
            return Err(WorkerError::Step(format!(
                "sequence {s}: block {b} is outside the cache of {} blocks",
                layout.num_blocks
            )));
        }
    }
    if let Some(t) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(WorkerError::Step(format!(
            "token id {t} is outside the vocabulary of {}",
            cfg.vocab_size
        )));
    }
    if let Some(r) = step
        .logit_rows
        .iter()
        .find(|&&r| r as usize >= step.tokens.len())
    {
        return Err(WorkerError::Step(format!(
            "logit row {r} is outside the batch of {} tokens",
            step.tokens.len()
        )));
    }
    Ok(())
}

/// One sequence's part of a step, for [`StepInput::build`].
#[derive(Clone, Debug)]
pub struct SeqChunk<'a> {
    /// The sequence's whole block table (it must cover `cached + tokens.len()`).
    pub block_table: &'a [u32],
    /// Tokens already in the cache before this step.
    pub cached: usize,
    /// New tokens this step (a prompt chunk, or the last sampled token).
    pub tokens: &'a [u32],
    /// Whether the last new token's logits are wanted.
    pub sample: bool,
}

impl StepInput {
    /// Builds a step (tokens, metadata, logit rows) from per-sequence chunks.
    pub fn build(block_size: usize, sliding_window: Option<u32>, chunks: &[SeqChunk<'_>]) -> Self {
        Self::build_speculative(block_size, sliding_window, chunks, &[])
    }

    /// [`StepInput::build`] where chunk `i` (with `sample`) ends in `drafts[i]` draft
    /// tokens (missing entries: 0): its logits are wanted at its last `1 + drafts[i]`
    /// positions, in position order (speculative verification in one pass).
    pub fn build_speculative(
        block_size: usize,
        sliding_window: Option<u32>,
        chunks: &[SeqChunk<'_>],
        drafts: &[usize],
    ) -> Self {
        let max_blocks = chunks
            .iter()
            .map(|c| c.block_table.len())
            .max()
            .unwrap_or(0);
        let mut s = StepInput {
            meta: AttnMeta {
                block_size,
                q_indptr: vec![0],
                max_blocks,
                sliding_window,
                ..Default::default()
            },
            ..Default::default()
        };
        for (i, c) in chunks.iter().enumerate() {
            s.tokens.extend_from_slice(c.tokens);
            s.meta.q_indptr.push(s.tokens.len() as u32);
            s.meta.ctx_lens.push((c.cached + c.tokens.len()) as u32);
            s.meta.block_tables.extend_from_slice(c.block_table);
            s.meta
                .block_tables
                .extend(std::iter::repeat_n(0, max_blocks - c.block_table.len()));
            if c.sample && !c.tokens.is_empty() {
                let rows = (1 + drafts.get(i).copied().unwrap_or(0)).min(c.tokens.len()) as u32;
                let end = s.tokens.len() as u32;
                s.logit_rows.extend(end - rows..end);
            }
        }
        s
    }
}
