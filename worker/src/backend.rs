//! The [`Backend`] trait: what runs one step's forward pass on a rank, and the two
//! backends that live on the CPU — [`CpuBackend`] (the f32 reference model with its
//! collective) and [`NullBackend`] (device "null": no math at all).
//!
//! Owns: the contract between a [`crate::rank::Rank`] (which checks plans, mirrors
//! sequences and samples) and the code that computes. The CUDA backend is
//! [`crate::cuda::init::CudaBackend`], the sim backend [`crate::sim::SimBackend`];
//! [`crate::init`] picks one per `Init`. A backend never sees the proto types and
//! never owns sequence state: it gets a [`Step`] of already-checked chunks.
//!
//! Invariant: [`Backend::validate`] changes nothing, so a rejected step leaves the
//! rank as it was; an error from [`Backend::forward`] means the group may be out of
//! step (the rank then refuses every plan until the next `Init`).

use std::cell::OnceCell;
use std::time::Instant;

use crate::collective::Collective;
use crate::model::{CpuModel, SeqChunk, StepInput};
use crate::sim::step_time::SeqWork;
use crate::WorkerError;

/// One checked step as a backend sees it: the scheduled chunks in plan order, and
/// the attention input built from them on first use (null and sim never build it).
pub struct Step<'a> {
    pub chunks: Vec<SeqChunk<'a>>,
    pub block_size: usize,
    pub sliding_window: Option<u32>,
    /// When the step began (the sim's modelled time runs from here).
    pub started: Instant,
    /// Per chunk, the draft tokens at its end (speculative decoding); empty: none.
    pub drafts: Vec<usize>,
    /// Every sampled row only needs its first argmax (greedy, no logprobs, nothing
    /// banned): a backend may answer [`Logits::Argmax`] and skip moving logit rows.
    pub argmax_only: bool,
    input: OnceCell<StepInput>,
}

/// What rank 0 of a computing backend returns for a step.
#[derive(Debug)]
pub enum Logits {
    /// `[sampled rows, vocab]` f32 logits.
    Rows(Vec<f32>),
    /// The first argmax of every sampled row, in row order (an
    /// [`argmax_only`](Step::argmax_only) step).
    Argmax(Vec<u32>),
}

impl<'a> Step<'a> {
    pub fn new(
        chunks: Vec<SeqChunk<'a>>,
        block_size: usize,
        sliding_window: Option<u32>,
        started: Instant,
    ) -> Self {
        Self {
            chunks,
            block_size,
            sliding_window,
            started,
            drafts: Vec::new(),
            argmax_only: false,
            input: OnceCell::new(),
        }
    }

    /// The same step where chunk `i` ends in `drafts[i]` draft tokens, whose logits
    /// are wanted too.
    pub fn with_drafts(mut self, drafts: Vec<usize>) -> Self {
        self.drafts = drafts;
        self
    }

    /// The same step, marked [`argmax_only`](Self::argmax_only) or not.
    pub fn with_argmax_only(mut self, on: bool) -> Self {
        self.argmax_only = on;
        self
    }

    /// Whether any chunk carries drafts.
    pub fn has_drafts(&self) -> bool {
        self.drafts.iter().any(|&k| k > 0)
    }

    /// Tokens, attention metadata and logit rows (built once, O(Σ block-table lengths)).
    pub fn input(&self) -> &StepInput {
        self.input.get_or_init(|| {
            StepInput::build_speculative(
                self.block_size,
                self.sliding_window,
                &self.chunks,
                &self.drafts,
            )
        })
    }
}

/// What computes a rank's steps. Adding a backend: one file implementing this, one
/// line in [`crate::init`] that opens it.
pub trait Backend: Send {
    /// Rejects a step this backend cannot run (shape, sizes it was built for);
    /// changes nothing.
    fn validate(&self, step: &Step<'_>) -> Result<(), WorkerError>;

    /// Runs the forward pass of a validated step on this rank. Rank 0 of a backend
    /// that computes returns the sampled rows' logits, or (only for an
    /// [`argmax_only`](Step::argmax_only) step, and then optionally) their argmax;
    /// other ranks, and backends without math (rank 0 then answers pseudo-tokens),
    /// return `None`.
    fn forward(&mut self, step: &Step<'_>) -> Result<Option<Logits>, WorkerError>;

    /// The `Health` detail of a ready rank on this backend.
    fn describe(&self) -> String;

    /// This backend's own time for a step of `work`, in ms, when it has a model of
    /// it (sim: the modelled GPU; null: 0, no math). `None` (the default): the time is
    /// what running the step takes, and start-up profiling measures it.
    fn modelled_step_ms(&self, _work: &[SeqWork]) -> Option<f64> {
        None
    }
}

/// The CPU reference forward pass (f32) with its collective (in-process or TCP).
pub struct CpuBackend {
    pub model: CpuModel,
    pub coll: Box<dyn Collective>,
}

impl Backend for CpuBackend {
    fn validate(&self, step: &Step<'_>) -> Result<(), WorkerError> {
        self.model.validate(step.input())
    }

    fn forward(&mut self, step: &Step<'_>) -> Result<Option<Logits>, WorkerError> {
        let (input, model, coll) = (step.input(), &mut self.model, self.coll.as_mut());
        let (one, argmax_only) = (coll.world_size() == 1, step.argmax_only);
        let mut run = move || -> Result<Option<Logits>, WorkerError> {
            Ok(if argmax_only {
                model.forward_argmax(input, coll)?.map(Logits::Argmax)
            } else {
                model.forward(input, coll)?.map(Logits::Rows)
            })
        };
        // A group of one waits on no other rank, so it may run on the pool
        // (`CpuModel::on_pool`); ranks of a larger group may share this process (and
        // its pool), so they do not.
        match one {
            true => CpuModel::on_pool(run),
            false => run(),
        }
    }

    fn describe(&self) -> String {
        "ready".into()
    }
}

/// Device "null": plans are checked and mirrored as usual, but no forward pass runs
/// and rank 0 answers pseudo-tokens; this measures everything but the math.
pub struct NullBackend;

impl Backend for NullBackend {
    fn validate(&self, _: &Step<'_>) -> Result<(), WorkerError> {
        Ok(())
    }

    fn forward(&mut self, _: &Step<'_>) -> Result<Option<Logits>, WorkerError> {
        Ok(None)
    }

    fn describe(&self) -> String {
        "ready (null: no math, pseudo-tokens)".into()
    }

    fn modelled_step_ms(&self, _: &[SeqWork]) -> Option<f64> {
        Some(0.0)
    }
}

/// What `Init` checked once for every backend: the group and the step sizes.
#[derive(Clone, Copy, Debug)]
pub struct InitShape {
    pub tp: usize,
    pub rank: usize,
    /// Tokens per KV block (> 0).
    pub block_size: usize,
    /// Most new tokens in one step (> 0): sizes activations and scratch.
    pub max_tokens: usize,
    /// Most sequences in one step (> 0): sizes the logits buffers.
    pub max_seqs: usize,
}

impl InitShape {
    /// Checks what every backend needs of an `Init`: a rank inside its group, a
    /// block size, and step sizes (the coordinator's `max_num_batched_tokens` and
    /// `max_num_seqs`, both > 0).
    pub fn new(
        tp: usize,
        rank: usize,
        block_size: usize,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, WorkerError> {
        let bad = |m: String| Err(WorkerError::Config(m));
        if tp == 0 || rank >= tp {
            return bad(format!("rank {rank} is outside a TP group of {tp}"));
        }
        if block_size == 0 {
            return bad("block_size must be > 0".into());
        }
        if max_tokens == 0 || max_seqs == 0 {
            return bad(format!(
                "max_num_batched_tokens ({max_tokens}) and max_num_seqs ({max_seqs}) must both be > 0"
            ));
        }
        Ok(Self {
            tp,
            rank,
            block_size,
            max_tokens,
            max_seqs,
        })
    }
}

/// What opening a backend produced, for [`crate::init`] to build the rank and reply.
pub struct Opened {
    pub backend: Box<dyn Backend>,
    pub cfg: crate::ModelConfig,
    /// KV blocks the coordinator may use on this rank.
    pub num_blocks: u64,
    pub kv_bytes_per_block: u64,
}
