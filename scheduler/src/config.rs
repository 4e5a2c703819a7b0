//! Scheduler settings: plain data with defaults; the CLI and the worker group's
//! reported facts (block count, block size, context, window) map onto it.
//!
//! Also the step cost model ([`StepCost`]): the coefficients a worker group measures,
//! passed in as plain numbers, and the `auto` rule for the step-time target
//! ([`StepCost::auto_max_step_ms`]).
//!
//! Invariant: a [`crate::Scheduler`] is only built from a config that passed
//! [`SchedulerConfig::validate`].

use crate::SchedulerError;

/// Predicted wall time of one step, in milliseconds, from its shape alone:
///
/// `fixed_ms + per_token_ms × tokens + per_context_token_ms × context_tokens`
///
/// where `tokens` are the tokens the step computes (one per decode, the chunk length
/// per prefill chunk) and `context_tokens` sums, over the step's entries, the KV
/// positions the entry's attention reads: `position + num_tokens` (the sliding window
/// is ignored, which over-estimates long sequences: the cap stays conservative).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCost {
    pub fixed_ms: f64,
    pub per_token_ms: f64,
    pub per_context_token_ms: f64,
}

/// The `auto` step-time target is this many times a full decode-only step
/// ([`StepCost::auto_max_step_ms`]). A capped step spends its overhead (`fixed_ms`
/// and the decodes) and then `(factor − 1)×` that on prefill, so the cap only pays
/// beyond a factor of 2: below, a burst's prompts pay the overhead in more steps than
/// they save. Measured in `scheduler/tests/latency.rs` (16 prompts of 512 tokens at
/// once, 4 decodes running, 10 ms fixed cost, 0.12 ms per token): mean TTFT
/// 999 ms uncapped; 1,204 / 918 / 789 ms at factors 2 / 4 / 8, with the longest step
/// (what a running decode waits) 998 ms uncapped and 32 / 64 / 128 ms capped. 4 trades
/// a small TTFT gain for decodes that never wait more than about 4 decode steps.
pub const AUTO_STEP_FACTOR: f64 = 4.0;

impl StepCost {
    /// Predicted time of a step computing `tokens` tokens over `context_tokens` KV
    /// positions read.
    pub fn step_ms(&self, tokens: usize, context_tokens: usize) -> f64 {
        self.fixed_ms
            + self.per_token_ms * tokens as f64
            + self.per_context_token_ms * context_tokens as f64
    }

    /// Predicted time of one entry (its share, without `fixed_ms`): a chunk of `n`
    /// tokens starting at `position`.
    pub fn entry_ms(&self, position: usize, n: usize) -> f64 {
        self.per_token_ms * n as f64 + self.per_context_token_ms * (position + n) as f64
    }

    /// Predicted time of a plan: what [`SchedulerConfig::max_step_ms`] bounds.
    pub fn plan_ms(&self, plan: &crate::StepPlan) -> f64 {
        self.fixed_ms
            + plan
                .seqs
                .iter()
                .map(|s| self.entry_ms(s.position, s.num_tokens()))
                .sum::<f64>()
    }

    /// The `auto` rule for `max_step_ms`: [`AUTO_STEP_FACTOR`] × the predicted time of
    /// a decode-only step of `max_num_seqs` sequences, each reading `context_tokens`
    /// positions (the caller's typical context, e.g. `--max-model-len / 4` when it
    /// knows nothing better). Never below twice `fixed_ms` plus one token, so that a
    /// step always has room for prefill.
    ///
    /// The coordinator calls this for `--max-step-ms auto` with the group's measured
    /// (slowest rank's) coefficients.
    pub fn auto_max_step_ms(&self, max_num_seqs: usize, context_tokens: usize) -> f64 {
        let decode = self.step_ms(max_num_seqs, max_num_seqs.saturating_mul(context_tokens));
        (AUTO_STEP_FACTOR * decode).max(2.0 * self.fixed_ms + self.entry_ms(0, 1))
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if ok(self.fixed_ms) && ok(self.per_token_ms) && ok(self.per_context_token_ms) {
            Ok(())
        } else {
            Err(SchedulerError::InvalidConfig(
                "step cost coefficients must be finite and non-negative",
            ))
        }
    }
}

/// How the scheduler batches, admits and stores.
#[derive(Clone, Debug, PartialEq)]
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
    /// Within a (aged) priority class, prefills with the fewest prompt tokens left go
    /// first (shortest-remaining-prefill first); `false` is first-come first-served.
    /// Aging (`aging_interval_us`) still promotes a waiting request past every fresher
    /// one of its class, so a long prompt waits at most about one interval for shorter
    /// ones.
    pub shortest_prefill_first: bool,
    /// The measured step cost model; needed by `max_step_ms`.
    pub step_cost: Option<StepCost>,
    /// Step-time target in ms: prefill tokens added to a step are capped so that its
    /// predicted time ([`StepCost::plan_ms`]) stays within it. Running decodes are
    /// always scheduled (a step of decodes alone may exceed it); a step's first
    /// prefill chunk gets at least `min(block_size, remaining)` tokens even over the
    /// cap, so prefill and admission never stall.
    /// `max_num_batched_tokens` stays a hard cap. Ignored without `step_cost`.
    pub max_step_ms: Option<f64>,
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
            shortest_prefill_first: true,
            step_cost: None,
            max_step_ms: None,
        }
    }
}

impl SchedulerConfig {
    /// The step cost model and target when both are set: the step-time cap is on.
    pub fn step_cap(&self) -> Option<(StepCost, f64)> {
        Some((self.step_cost?, self.max_step_ms?))
    }

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
        if let Some(cost) = &self.step_cost {
            cost.validate()?;
        }
        if self
            .max_step_ms
            .is_some_and(|ms| !(ms.is_finite() && ms > 0.0))
        {
            return fail("max_step_ms must be a positive number of milliseconds");
        }
        Ok(())
    }
}
