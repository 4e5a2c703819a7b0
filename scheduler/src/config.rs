//! Scheduler settings: plain data with defaults; the CLI and the worker group's
//! reported facts (block count, block size, context, window) map onto it.
//!
//! Invariant: a [`crate::Scheduler`] is only built from a config that passed
//! [`SchedulerConfig::validate`].

use crate::SchedulerError;

/// How the scheduler batches, admits and stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV blocks in every worker's cache, the null block (id 0) included: the minimum
    /// the workers report.
    pub num_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Token budget of one step: decode tokens plus prefill-chunk tokens.
    pub max_num_batched_tokens: usize,
    /// Sequences in one step, which is also the most that run at once.
    pub max_num_seqs: usize,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_model_len: usize,
    /// Requests that may wait for admission; `add` beyond it answers
    /// [`SchedulerError::QueueFull`].
    pub max_waiting: usize,
    /// Sliding-window attention span in tokens (a query at position `p` reads
    /// positions `p + 1 - w ..= p`); `None` is full attention. Blocks wholly before
    /// every future query's window are released.
    pub sliding_window: Option<usize>,
    /// Microseconds of waiting that promote a request by one priority class, so that
    /// no class starves.
    pub aging_interval_us: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_blocks: 4096,
            block_size: 16,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            max_model_len: 32768,
            max_waiting: 1024,
            sliding_window: None,
            aging_interval_us: 5_000_000,
        }
    }
}

impl SchedulerConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let fail = |why| Err(SchedulerError::InvalidConfig(why));
        if self.num_blocks < 2 || self.num_blocks >= u32::MAX as usize {
            return fail("num_blocks must be in 2..u32::MAX (block 0 is the null block)");
        }
        if self.block_size == 0 {
            return fail("block_size must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return fail("max_num_batched_tokens must be at least 1");
        }
        if self.max_num_seqs == 0 {
            return fail("max_num_seqs must be at least 1");
        }
        if self.max_model_len < 2 {
            return fail("max_model_len must be at least 2 (one prompt and one generated token)");
        }
        if self.sliding_window == Some(0) {
            return fail("sliding_window must be at least 1 token");
        }
        if self.aging_interval_us == 0 {
            return fail("aging_interval_us must be at least 1");
        }
        Ok(())
    }
}
