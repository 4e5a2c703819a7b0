//! What the engine asks of a worker group: initialize, then execute step plans.
//!
//! [`WorkPlan`] is the engine's form of a step (ARCHITECTURE §6): per scheduled
//! sequence its new tokens, start position, newly appended blocks, whether to sample,
//! and (on first appearance or after a reset) its sampling parameters; plus the
//! sequences whose state workers must drop. Implementations send the same plan to
//! every rank and return rank 0's sampled tokens.

use std::future::Future;

use super::api::SamplingParams;

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedSeq {
    pub seq_id: u64,
    /// New tokens, the `num_drafts` draft tokens last.
    pub tokens: Vec<u32>,
    /// Draft tokens at the end of `tokens`, verified by rank 0 (speculative decoding).
    pub num_drafts: u32,
    /// Tokens of this sequence already in the KV cache.
    pub position: u32,
    /// Block ids appended to the sequence's table this step.
    pub new_blocks: Vec<u32>,
    pub sample: bool,
    /// Forget any state of this id first (new sequence, or recompute after preemption).
    pub reset: bool,
    /// Present when `reset` is set.
    pub sampling: Option<SamplingParams>,
    /// Tokens generated so far (for the min_tokens ban after a recompute).
    pub generated: u32,
    /// Tokens banned until `generated >= min_tokens`; sent with `sampling` only.
    pub stop_token_ids: Vec<u32>,
}

/// One step for every rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkPlan {
    pub step: u64,
    pub seqs: Vec<PlannedSeq>,
    /// Sequences whose blocks were freed: workers drop their mirrored state.
    pub freed: Vec<u64>,
    /// Block tables cut back (rejected drafts): `(seq, blocks kept)`.
    pub truncated: Vec<(u64, u32)>,
}

/// A token sampled by rank 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub seq_id: u64,
    /// The token after the `accepted` drafts.
    pub token: u32,
    /// Drafts of the entry rank 0 accepted before `token`.
    pub accepted: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What the worker group reported at initialization.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupFacts {
    /// KV blocks every rank can hold (the minimum over ranks).
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_context: usize,
    pub sliding_window: Option<u32>,
    /// The group's step cost model: the slowest rank's, i.e. the largest of each
    /// coefficient over the ranks (the ranks run in lockstep, so a step lasts as long
    /// as its slowest rank; taking each maximum never predicts a step shorter than
    /// any rank's own model does). Zeros when the ranks measure none.
    pub step_cost: scheduler::StepCost,
}

/// Why a worker group failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExecError {
    /// A worker is gone or timed out: the group must be re-initialized.
    #[error("worker {rank} failed: {message}")]
    WorkerLost { rank: usize, message: String },
    /// Workers refused this plan (a bug on our side); the group is still usable.
    #[error("worker {rank} rejected step {step}: {message}")]
    Rejected {
        rank: usize,
        step: u64,
        message: String,
    },
    #[error("worker group initialization failed: {0}")]
    Init(String),
}

/// What a finished step returned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// Rank 0's sampled tokens, in plan order.
    pub sampled: Vec<Sampled>,
    /// The longest time any rank reported spending on the step itself (checks, forward
    /// pass, sampling), in microseconds; the rest of the step's wall time is the
    /// coordinator's and the transport's.
    pub worker_us: u64,
}

/// A tensor-parallel worker group.
///
/// A step is split in two so the engine can overlap its own bookkeeping with the
/// workers' compute: [`submit`](Executor::submit) hands the plan to every rank and
/// returns as soon as it is on its way; [`collect`](Executor::collect) waits for
/// every rank's answer. At most one step is in flight.
pub trait Executor: Send + 'static {
    /// (Re)initializes every rank: load weights, set up collectives, size the KV cache.
    fn init(&mut self) -> impl Future<Output = Result<GroupFacts, ExecError>> + Send;
    /// Sends one step's plan to every rank.
    fn submit(&mut self, plan: WorkPlan) -> impl Future<Output = Result<(), ExecError>> + Send;
    /// Waits for every rank's answer to the step in flight.
    fn collect(&mut self) -> impl Future<Output = Result<StepOutput, ExecError>> + Send;
}
