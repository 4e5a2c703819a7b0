//! The scheduler: the pure, synchronous, deterministic brain of the coordinator.
//!
//! Owns (ARCHITECTURE §4): the paged KV block pool ([`BlockPool`]), the prefix cache
//! (in the pool, keyed by [`prefix_hash()`]), the request queue, the batching policy
//! (decodes first, then prefill chunks under a token budget and an optional step-time
//! cap from a [`StepCost`] model, shortest prefill first), priorities with aging,
//! and preemption by recompute. It performs no I/O and reads no clock: time is passed
//! in as monotonic microseconds. It depends on `std` and `thiserror` only.
//!
//! The engine loop drives it with three calls per step:
//! [`Scheduler::schedule`] → execute the [`StepPlan`] on every worker →
//! [`Scheduler::update`] with the sampled tokens. Between steps it accepts
//! [`Scheduler::add`], [`Scheduler::abort`] and [`Scheduler::preempt`].
//!
//! Ownership: the scheduler is the only owner of block tables. Workers mirror them
//! from each plan — drop the state of every id in [`StepPlan::freed`], then, per
//! [`ScheduledSeq`], start a fresh table when `reset` is set and append
//! [`StepPlan::new_blocks`]. The prefix cache describes what the workers' KV blocks
//! hold, so a worker group that lost its cache needs a new [`Scheduler`].
//!
//! Contract: one plan in flight — `update` with a plan before the next `schedule`.
//! A plan that was not executed may be dropped only after aborting or preempting each
//! of its sequences (both forget the tokens it claimed to compute).
//!
//! Invariants (property-tested after every operation of long random runs):
//! free blocks + referenced blocks = usable blocks; a block's reference count equals
//! the number of block tables holding it; a block on the free list has count 0; a plan
//! never exceeds `max_num_batched_tokens` tokens or `max_num_seqs` sequences; every
//! request ends (finished or aborted), and then every block is free.

mod block_pool;
mod config;
mod plan;
mod prefix_hash;
mod scheduler;
mod sequence;

pub use block_pool::{BlockId, BlockPool, PrefixLink, NO_LINK, NULL_BLOCK};
pub use config::{SchedulerConfig, StepCost, AUTO_PREFILL_FIXED_FACTOR, AUTO_PREFILL_TOKENS};
pub use plan::{FinishReason, ScheduledSeq, StepPlan};
pub use prefix_hash::{prefix_hash, ROOT_HASH};
pub use scheduler::{Counters, Scheduler};

/// Identifier of a sequence (one request), chosen by the caller.
pub type SeqId = u64;

/// Scheduling class: interactive (IDE completion) before chat before batch; within a
/// class shortest remaining prefill first (or FIFO), with aging across classes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    #[default]
    Interactive = 0,
    Chat = 1,
    Batch = 2,
}

/// Everything the scheduler refuses, each mapped to one HTTP status by the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The waiting queue is at `max_waiting` (HTTP 429 with `Retry-After`).
    #[error("the waiting queue is full; retry later")]
    QueueFull,
    /// The prompt plus one generated token can never fit the model context or the
    /// KV cache (HTTP 400).
    #[error("the prompt has {prompt_tokens} tokens but at most {limit} fit")]
    PromptTooLong { prompt_tokens: usize, limit: usize },
    /// A request needs at least one prompt token (HTTP 400).
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A request must allow at least one generated token (HTTP 400).
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// The id is already waiting or running (a caller bug).
    #[error("sequence {0} is already scheduled")]
    DuplicateSeq(SeqId),
    /// A [`SchedulerConfig`] field is out of range.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(&'static str),
}
