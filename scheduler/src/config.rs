//! Scheduler settings: plain data with defaults; the CLI and the worker group's
//! reported facts (block count, block size, context, window) map onto it.
//!
//! Also the step cost model ([`StepCost`]): the coefficients a worker group measures,
//! passed in as plain numbers, and the `auto` rule for the step-time target (a
//! prefill allowance per step, [`StepCost::auto_prefill_ms`]).
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

/// The `auto` prefill allowance ([`StepCost::auto_prefill_ms`]): each step's prefill
/// chunks may take as long as a prefill of this many tokens from position 0, on top
/// of the step's decodes. 512 is the chunk size chunked-prefill schedulers
/// (Sarathi-Serve, vLLM's latency setting) use to keep decodes flowing; with the time
/// model a chunk deep in a long prompt (more context to read) gets fewer tokens.
/// Measured against `llama-server` on 2 cores (benches/RESULTS.md): 16 prompts of 512
/// at once, mean TTFT 2.5 s uncapped, 0.84–0.98 s with a ~300 ms step (≈ this
/// allowance on that box), throughput unchanged.
pub const AUTO_PREFILL_TOKENS: usize = 512;

/// The `auto` allowance is also at least this many times the step's fixed cost, so
/// cutting a long prompt into chunks costs at most ~1/this of its prefill time in
/// extra steps (a GPU's `fixed_ms` is a larger share of a 512-token chunk than a
/// CPU's: 10.7 of 35 ms for Codestral-22B on an H100 in the sim, 5.8 of 277 ms for the
/// tiny model on 2 cores).
pub const AUTO_PREFILL_FIXED_FACTOR: f64 = 10.0;

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

    /// The `auto` rule for `max_prefill_ms`: the predicted time of a chunk of
    /// [`AUTO_PREFILL_TOKENS`] tokens at position 0 (no `fixed_ms`: the step pays that
    /// once, with or without prefill), and at least [`AUTO_PREFILL_FIXED_FACTOR`] ×
    /// `fixed_ms`. Unlike a step-time target it does not depend on how many decodes
    /// run: a step is its decodes plus this much prefill, so a busy group still admits
    /// and a quiet one prefills a burst shortest-first in chunks.
    pub fn auto_prefill_ms(&self) -> f64 {
        self.entry_ms(0, AUTO_PREFILL_TOKENS)
            .max(AUTO_PREFILL_FIXED_FACTOR * self.fixed_ms)
    }

    /// Most of `n` tokens a chunk at `position` may take so that its
    /// [`StepCost::entry_ms`] stays within `room` ms (0 when none fit).
    pub fn tokens_within(&self, room: f64, position: usize, n: usize) -> usize {
        let per_token = self.per_token_ms + self.per_context_token_ms;
        let room_for_tokens = room - self.per_context_token_ms * position as f64;
        let mut fits = if room_for_tokens < 0.0 {
            0
        } else if per_token <= 0.0 {
            n
        } else {
            // The nudge keeps an exact fit (room = entry_ms(position, m)) from rounding
            // down to m − 1; the loop below takes back any overshoot.
            ((room_for_tokens / per_token + 1e-9).floor() as usize).min(n)
        };
        // Rounding: the floor may overshoot by one ulp's worth.
        while fits > 0 && self.entry_ms(position, fits) > room {
            fits -= 1;
        }
        fits
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
    /// Prefill-time allowance in ms: the prefill chunks of one step together are
    /// capped so that their predicted time ([`StepCost::entry_ms`], decodes and
    /// `fixed_ms` not counted) stays within it — `--max-step-ms auto`
    /// ([`StepCost::auto_prefill_ms`]). Same first-chunk minimum as `max_step_ms`;
    /// both may be set. Ignored without `step_cost`.
    pub max_prefill_ms: Option<f64>,
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
            max_prefill_ms: None,
        }
    }
}

impl SchedulerConfig {
    /// The step cost model and target when both are set: the step-time cap is on.
    pub fn step_cap(&self) -> Option<(StepCost, f64)> {
        Some((self.step_cost?, self.max_step_ms?))
    }

    /// The step cost model and prefill allowance when both are set.
    pub fn prefill_cap(&self) -> Option<(StepCost, f64)> {
        Some((self.step_cost?, self.max_prefill_ms?))
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
        if self
            .max_prefill_ms
            .is_some_and(|ms| !(ms.is_finite() && ms > 0.0))
        {
            return fail("max_prefill_ms must be a positive number of milliseconds");
        }
        Ok(())
    }
}
