//! The request queue and the batching policy: which sequences run in a step, how many
//! tokens each computes, which blocks they get, and who is preempted.
//!
//! Policy of [`Scheduler::schedule`], in order:
//! 1. release blocks that fell wholly outside the sliding window (if any);
//! 2. running decodes, highest priority first, one token each plus the drafts proposed
//!    by [`Scheduler::set_draft`] that fit (speculative decoding: budget, cap, free
//!    blocks, `max_tokens`; drafts never preempt);
//! 3. running prefills in prefill order (below), each a chunk of what remains of its
//!    prompt, as large as the remaining token budget and step-time cap allow (chunked
//!    prefill);
//! 4. unless step 2 or 3 had to preempt: waiting requests in prefill order, each
//!    reusing every leading block the prefix cache holds and computing a chunk of the
//!    rest, until budget, cap, sequence slots or blocks run out.
//!
//! Priority is the class (interactive < chat < batch), promoted by one class per
//! `aging_interval_us` of age, then arrival, then id: a total order, so scheduling is
//! deterministic. Prefill order is the aged class, then (waiting only) re-admissions
//! of preempted sequences before fresh requests, then — with `shortest_prefill_first`
//! — fewest prompt tokens left to compute, then arrival and id. A started prefill
//! (step 3) goes before a new admission (step 4): shortest-first does not interrupt
//! a chunked prompt already holding blocks.
//!
//! Step-time cap (`step_cost` and `max_step_ms` both set): every prefill chunk is cut
//! to what keeps the step's predicted time ([`crate::StepCost::plan_ms`]) within
//! `max_step_ms`; decodes are never cut. The prefill allowance (`max_prefill_ms`,
//! what `--max-step-ms auto` sets) cuts chunks the same way against the predicted
//! time of the step's prefill chunks alone. A step's first prefill chunk gets at least
//! `min(block_size, remaining)` tokens even over the cap, so prefill and admission
//! always progress (also when decodes alone exceed the cap). When a running sequence needs a block and none is free, the
//! lowest-priority newest running sequence is preempted by recompute (blocks freed,
//! tokens kept, back to the front of its class's queue); when that is the sequence
//! itself, it waits. A waiting request may preempt running ones only if they rank
//! strictly below it, and admission stops after such a preemption. Aging bounds how
//! long any request waits or keeps being preempted: nothing starves.
//!
//! Invariants: see the crate docs; in addition `running.len() <= max_num_seqs`, a
//! sequence is in exactly one of `running` and `waiting` (by its state), and every
//! slot listed there holds a sequence.
//!
//! Costs per step (measured by `benches/round.rs`): O(running) for decodes — a slot
//! access and a few vector pushes each, no hashing — plus a sort of `running` that is
//! linear when the order did not change, and a sort of the running prefills; in a step
//! that admits, a sort of the waiting queue (O(W log W)), then per admission one
//! prefix-cache lookup per full prompt block and an O(W) queue removal; in `update`, one hash lookup per sampled token only when tokens
//! come back out of plan order. `abort` and `preempt` are O(running + waiting) to find
//! the sequence and O(blocks) to free it.

use std::collections::VecDeque;

use crate::block_pool::{BlockId, BlockPool, PrefixLink, NO_LINK, NULL_BLOCK};
use crate::plan::{FinishReason, ScheduledSeq, StepPlan};
use crate::sequence::{SeqState, Sequence, Sequences};
use crate::{Priority, SchedulerConfig, SchedulerError, SeqId, StepCost};

/// Gauges and cumulative counts for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Allocatable KV blocks (the null block excluded).
    pub blocks_total: usize,
    /// Blocks no sequence holds, cached prefixes included (they are evictable).
    pub blocks_free: usize,
    /// Blocks held by at least one sequence.
    pub blocks_used: usize,
    /// Blocks the prefix cache names, free or in use.
    pub blocks_cached: usize,
    /// Sequences holding blocks.
    pub running: usize,
    /// Sequences waiting for admission (new or preempted).
    pub waiting: usize,
    /// Prompt tokens served by the prefix cache at admission, since start.
    pub prefix_hit_tokens: u64,
    /// Tokens looked up in the prefix cache at admission, since start.
    pub prefix_queried_tokens: u64,
    /// Preemptions since start.
    pub preemptions: u64,
}

impl Counters {
    /// Fraction of looked-up tokens the prefix cache served (0 before any lookup).
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_queried_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_queried_tokens as f64
        }
    }
}

/// An admitted sequence as the step loop sees it, with its priority data inline so
/// that sorting needs no lookups.
#[derive(Clone, Copy, Debug)]
struct RunningSeq {
    slot: u32,
    id: SeqId,
    priority: Priority,
    arrival: u64,
    /// Index of its entry in the step being built, or [`NO_LINK`].
    plan_slot: u32,
}

/// Total scheduling order: smaller is served first, larger is preempted first.
type RankKey = (i64, u64, SeqId);

/// Order of prefills (module docs): aged class, fresh (not a re-admission), prompt
/// tokens left (0 without shortest-first), arrival, id. Smaller goes first.
type PrefillKey = (i64, bool, usize, u64, SeqId);

fn rank_key(
    priority: Priority,
    arrival: u64,
    id: SeqId,
    now: u64,
    aging_interval_us: u64,
) -> RankKey {
    let waited = now.saturating_sub(arrival);
    let promotions = if waited < aging_interval_us {
        0
    } else {
        (waited / aging_interval_us).min(i64::MAX as u64) as i64
    };
    (priority as i64 - promotions, arrival, id)
}

/// A step under construction.
struct StepBuilder {
    plan: StepPlan,
    /// Entries taken back because their sequence was preempted later in the step.
    withdrawn: Vec<u32>,
    budget: usize,
    scheduled: usize,
    preempted: bool,
    /// The step-time cap, if on, and the predicted time of the entries so far (ms,
    /// `fixed_ms` included).
    cap: Option<(StepCost, f64)>,
    predicted_ms: f64,
    /// The prefill allowance, if on, and the predicted time of the prefill chunks so
    /// far (ms; decodes — single sampled tokens — not counted).
    prefill_cap: Option<(StepCost, f64)>,
    prefill_ms: f64,
    /// Least chunk of a step's first prefill, even over the cap.
    min_chunk: usize,
    /// Prefill chunks added so far.
    prefills: usize,
}

impl StepBuilder {
    /// Tokens a prefill chunk at `position` with `remaining` tokens left may compute:
    /// within the token budget, the step-time cap and the prefill allowance; 0 when
    /// none leaves room (except a step's first chunk, see `min_chunk`).
    fn prefill_tokens(&self, position: usize, remaining: usize) -> usize {
        let mut fits = remaining.min(self.budget);
        let n = fits;
        if let Some((cost, max_ms)) = self.cap {
            fits = cost.tokens_within(max_ms - self.predicted_ms, position, fits);
        }
        if let Some((cost, max_ms)) = self.prefill_cap {
            fits = cost.tokens_within(max_ms - self.prefill_ms, position, fits);
        }
        if self.prefills == 0 {
            fits = fits.max(self.min_chunk.min(n));
        }
        fits
    }

    /// The predicted ms of an entry of `n` committed tokens and `drafts` draft tokens:
    /// (its step-cap share, its prefill share). A decode (one sampled committed token
    /// of a running sequence, not a new admission, with its drafts) has no prefill
    /// share.
    fn entry_ms(
        &self,
        position: usize,
        n: usize,
        drafts: usize,
        sample: bool,
        reset: bool,
    ) -> (f64, f64) {
        let all = n + drafts;
        let step = self
            .cap
            .map_or(0.0, |(cost, _)| cost.entry_ms(position, all));
        let decode = n == 1 && sample && !reset;
        let prefill = match self.prefill_cap {
            Some((cost, _)) if !decode => cost.entry_ms(position, all),
            _ => 0.0,
        };
        (step, prefill)
    }

    /// Adds an entry of `n` committed tokens at `position`, then the sequence's
    /// in-flight drafts.
    fn push(
        &mut self,
        seq: &Sequence,
        slot: u32,
        position: usize,
        n: usize,
        first_new_block: usize,
        reset: bool,
    ) -> u32 {
        let plan = &mut self.plan;
        let tokens_start = plan.tokens.len() as u32;
        plan.tokens
            .extend_from_slice(&seq.tokens[position..position + n]);
        let tokens_end = plan.tokens.len() as u32;
        plan.tokens.extend_from_slice(&seq.in_flight_drafts);
        let k = seq.in_flight_drafts.len();
        let blocks_start = plan.blocks.len() as u32;
        plan.blocks
            .extend_from_slice(&seq.table.blocks()[first_new_block..]);
        plan.seqs.push(ScheduledSeq {
            seq_id: seq.id,
            position,
            sample: position + n == seq.tokens.len(),
            reset,
            tokens: (tokens_start, tokens_end),
            drafts: (tokens_end, plan.tokens.len() as u32),
            new_blocks: (blocks_start, plan.blocks.len() as u32),
            slot,
        });
        self.budget -= n + k;
        self.scheduled += 1;
        let sample = position + n == seq.tokens.len();
        let (step_ms, prefill_ms) = self.entry_ms(position, n, k, sample, reset);
        self.predicted_ms += step_ms;
        self.prefill_ms += prefill_ms;
        (self.plan.seqs.len() - 1) as u32
    }

    /// Takes back the entry of a sequence preempted after it was scheduled.
    fn withdraw(&mut self, plan_slot: u32) {
        let entry = &self.plan.seqs[plan_slot as usize];
        let (position, n, drafts) = (entry.position, entry.num_tokens(), entry.num_drafts());
        let (sample, reset) = (entry.sample, entry.reset);
        self.budget += n;
        self.scheduled -= 1;
        let (step_ms, prefill_ms) = self.entry_ms(position, n - drafts, drafts, sample, reset);
        self.predicted_ms -= step_ms;
        self.prefill_ms -= prefill_ms;
        self.withdrawn.push(plan_slot);
    }

    fn finish(mut self) -> StepPlan {
        if !self.withdrawn.is_empty() {
            let mut i = 0;
            self.plan.seqs.retain(|_| {
                i += 1;
                !self.withdrawn.contains(&(i - 1))
            });
        }
        self.plan
    }
}

/// Blocks needed to hold `tokens` tokens.
fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// The scheduler: owns every sequence, block table and KV block.
#[derive(Clone, Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    /// Longest sequence that fits both the model and the KV cache.
    token_limit: usize,
    seqs: Sequences,
    /// Admitted sequences; sorted best first by `schedule` (removals between steps
    /// may disorder it).
    running: Vec<RunningSeq>,
    /// Slots of waiting sequences, one queue per class indexed by `Priority as usize`
    /// (admission order is the prefill order, not the queue order).
    waiting: [VecDeque<u32>; 3],
    /// Ids whose worker state must be dropped, announced by the next plan.
    pending_freed: Vec<SeqId>,
    /// Tables cut back by `update` (rejected drafts), announced by the next plan.
    pending_truncated: Vec<(SeqId, usize)>,
    prefix_hit_tokens: u64,
    prefix_queried_tokens: u64,
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler with every block free and no requests.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        let pool = BlockPool::new(config.num_blocks, config.block_size);
        let bs = config.block_size;
        let usable = pool.num_usable();
        // A sequence alone must always be able to get the blocks of its next step.
        let window_fits = config
            .sliding_window
            .is_some_and(|w| blocks_for(w + config.max_num_batched_tokens, bs) + 2 <= usable);
        let cache_tokens = if window_fits { usize::MAX } else { usable * bs };
        let token_limit = config.max_model_len.min(cache_tokens);
        if token_limit < 2 {
            return Err(SchedulerError::InvalidConfig(
                "the KV cache cannot hold two tokens",
            ));
        }
        Ok(Scheduler {
            pool,
            token_limit,
            seqs: Sequences::default(),
            running: Vec::with_capacity(config.max_num_seqs),
            waiting: Default::default(),
            pending_freed: Vec::new(),
            pending_truncated: Vec::new(),
            prefix_hit_tokens: 0,
            prefix_queried_tokens: 0,
            preemptions: 0,
            config,
        })
    }

    /// The settings this scheduler runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The block pool, for inspection.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Longest sequence (prompt plus generated tokens) that can run: `max_model_len`,
    /// or less when the whole KV cache holds fewer tokens.
    pub fn token_limit(&self) -> usize {
        self.token_limit
    }

    /// Queues a request. `now` is its arrival time (µs). `max_tokens` is clamped to
    /// what fits after the prompt.
    ///
    /// Errors: [`SchedulerError::PromptTooLong`] when the prompt plus one token can
    /// never fit, [`SchedulerError::QueueFull`] when `max_waiting` requests wait, and
    /// the input checks `EmptyPrompt`, `ZeroMaxTokens`, `DuplicateSeq`.
    pub fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        priority: Priority,
        now: u64,
    ) -> Result<(), SchedulerError> {
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens);
        }
        if prompt.len() >= self.token_limit {
            return Err(SchedulerError::PromptTooLong {
                prompt_tokens: prompt.len(),
                limit: self.token_limit - 1,
            });
        }
        if self.seqs.contains(id) {
            return Err(SchedulerError::DuplicateSeq(id));
        }
        if self.num_waiting() >= self.config.max_waiting {
            return Err(SchedulerError::QueueFull);
        }
        let max_tokens = max_tokens.min(self.token_limit - prompt.len());
        let slot = self.seqs.insert(Sequence::new(
            id,
            prompt,
            max_tokens,
            priority,
            now,
            self.config.block_size,
        ));
        self.waiting[priority as usize].push_back(slot);
        Ok(())
    }

    /// Ends a sequence in any state, freeing its blocks within the call. Returns
    /// whether the id was known. Workers learn it from the next plan's `freed`.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(slot) = self.seqs.slot_of(id) else {
            return false;
        };
        self.remove(slot);
        true
    }

    /// Preempts a running sequence by recompute: its blocks are freed now, its tokens
    /// kept, and it waits at the front of its class. Returns whether it was running.
    pub fn preempt(&mut self, id: SeqId) -> bool {
        let Some(pos) = self.running.iter().position(|r| r.id == id) else {
            return false;
        };
        let r = self.running.swap_remove(pos);
        if self.requeue(r) {
            self.pending_freed.push(id);
        }
        true
    }

    /// Proposes draft tokens to follow `id`'s last token in its next decode step
    /// (speculative decoding). The next `schedule` takes what fits — the step's token
    /// budget (keeping one token for every other running sequence), the step-time cap,
    /// free blocks (drafts never preempt), `max_tokens` and the token limit — and
    /// verifies it in one step; a sequence that is not decoding ignores it. Replaces
    /// an earlier proposal; returns whether `id` is running.
    pub fn set_draft(&mut self, id: SeqId, draft: &[u32]) -> bool {
        let Some(slot) = self.seqs.slot_of(id) else {
            return false;
        };
        let seq = self.seqs.get_mut(slot);
        seq.draft.clear();
        if seq.state != SeqState::Running {
            return false;
        }
        seq.draft.extend_from_slice(draft);
        true
    }

    /// Whether a `schedule` call would produce a non-empty plan.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || self.num_waiting() > 0 || !self.pending_freed.is_empty()
    }

    /// The block table of a sequence: empty while it waits; `None` for unknown ids.
    pub fn block_table(&self, id: SeqId) -> Option<&[BlockId]> {
        self.seqs
            .slot_of(id)
            .map(|slot| self.seqs.get(slot).table.blocks())
    }

    /// Gauges and counts for metrics.
    pub fn counters(&self) -> Counters {
        let free = self.pool.num_free();
        Counters {
            blocks_total: self.pool.num_usable(),
            blocks_free: free,
            blocks_used: self.pool.num_usable() - free,
            blocks_cached: self.pool.num_cached(),
            running: self.running.len(),
            waiting: self.num_waiting(),
            prefix_hit_tokens: self.prefix_hit_tokens,
            prefix_queried_tokens: self.prefix_queried_tokens,
            preemptions: self.preemptions,
        }
    }

    /// Plans one step at time `now` (µs). Sequences in the plan count as computed
    /// from here on: call [`Scheduler::update`] with this plan before the next
    /// `schedule` (a sequence whose sampled token has not come back is not scheduled).
    pub fn schedule(&mut self, now: u64) -> StepPlan {
        let mut step = StepBuilder {
            plan: StepPlan {
                seqs: Vec::with_capacity(self.running.len() + 8),
                freed: std::mem::take(&mut self.pending_freed),
                truncated: std::mem::take(&mut self.pending_truncated),
                tokens: Vec::with_capacity(self.running.len() + 64),
                blocks: Vec::new(),
            },
            withdrawn: Vec::new(),
            budget: self.config.max_num_batched_tokens,
            scheduled: 0,
            preempted: false,
            cap: self.config.step_cap(),
            predicted_ms: self.config.step_cap().map_or(0.0, |(c, _)| c.fixed_ms),
            prefill_cap: self.config.prefill_cap(),
            prefill_ms: 0.0,
            min_chunk: self.config.block_size,
            prefills: 0,
        };
        if let Some(window) = self.config.sliding_window {
            for r in &self.running {
                self.seqs
                    .get_mut(r.slot)
                    .release_outside_window(window, &mut self.pool);
            }
        }
        let aging = self.config.aging_interval_us;
        self.running
            .sort_by_key(|r| rank_key(r.priority, r.arrival, r.id, now, aging));
        for r in &mut self.running {
            r.plan_slot = NO_LINK;
        }
        self.schedule_running(&mut step, now);
        if !step.preempted {
            self.admit_waiting(&mut step, now);
        }
        step.finish()
    }

    /// Applies a step's results: registers the blocks it completed in the prefix
    /// cache, appends each sampled token (`(seq, token)`; at most one per entry with
    /// `sample`, fastest in plan order; an entry with drafts takes consecutive tokens
    /// while each but the last equals the draft at its place — the accepted drafts,
    /// then the token after them — and its table is cut back to what the committed
    /// tokens need, the cut announced in the next plan's `truncated`), ends the sequences in `stopped` (the caller
    /// saw a stop condition; any state) and those that reached their length. Returns
    /// the sequences that ended, each once; workers learn it from the next plan's
    /// `freed`.
    ///
    /// Tokens for ids that are not awaiting one (aborted meanwhile, unknown) are
    /// ignored. An entry with `sample` that gets no token recomputes its last position
    /// in the next step.
    pub fn update(
        &mut self,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
        stopped: &[SeqId],
    ) -> Vec<(SeqId, FinishReason)> {
        let bs = self.config.block_size;
        for entry in &plan.seqs {
            if let Some(seq) = self.seqs.running_mut(entry.slot, entry.seq_id) {
                let committed = entry.position + entry.num_tokens() - entry.num_drafts();
                seq.register_computed(committed / bs, &mut self.pool);
            }
        }
        let mut in_order = plan.seqs.iter().filter(|e| e.sample).peekable();
        for &(id, token) in sampled {
            let slot = match in_order.next_if(|e| e.seq_id == id) {
                Some(entry) => Some(entry.slot),
                None => self.seqs.slot_of(id),
            };
            if let Some(seq) = slot.and_then(|slot| self.seqs.running_mut(slot, id)) {
                // The first token, then more only while the previous one was the
                // draft at its place (an accepted draft).
                let got = seq.tokens.len() - seq.num_computed;
                let takes = got == 0
                    || seq
                        .in_flight_drafts
                        .get(got - 1)
                        .is_some_and(|&d| seq.tokens.last() == Some(&d));
                if takes {
                    seq.push_token(token, bs);
                }
            }
        }
        let mut finished = Vec::new();
        for &id in stopped {
            if let Some(slot) = self.seqs.slot_of(id) {
                self.remove(slot);
                finished.push((id, FinishReason::Stopped));
            }
        }
        for entry in plan.seqs.iter().filter(|e| e.sample) {
            let Some(seq) = self.seqs.running_mut(entry.slot, entry.seq_id) else {
                continue;
            };
            let speculated = !std::mem::take(&mut seq.in_flight_drafts).is_empty();
            let got = seq.tokens.len() - seq.num_computed;
            // Accepted drafts have their KV computed; the token after them has not.
            seq.num_computed = (seq.num_computed + got).max(1) - 1;
            if speculated {
                let keep = blocks_for(seq.num_computed + usize::from(got == 0), bs);
                if seq.table.len() > keep {
                    seq.table.truncate(keep, &mut self.pool);
                    self.pending_truncated.push((entry.seq_id, keep));
                }
                seq.register_computed(seq.num_computed / bs, &mut self.pool);
            }
            if got == 0 {
                continue;
            }
            if seq.generated() >= seq.max_tokens || seq.tokens.len() >= self.token_limit {
                self.remove(entry.slot);
                finished.push((entry.seq_id, FinishReason::Length));
            }
        }
        finished
    }

    fn num_waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    /// Removes the sequence in `slot` from its queue and the slab, frees its blocks,
    /// and schedules its worker state to be dropped.
    fn remove(&mut self, slot: u32) {
        let mut seq = self.seqs.remove(slot);
        match seq.state {
            SeqState::Running => {
                // Order is restored by the next `schedule`'s sort.
                let pos = self
                    .running
                    .iter()
                    .position(|r| r.slot == slot)
                    .expect("running sequence is listed");
                self.running.swap_remove(pos);
            }
            SeqState::Waiting => {
                unqueue(&mut self.waiting[seq.priority as usize], slot);
            }
        }
        seq.table.release_all(&mut self.pool);
        self.pending_truncated.retain(|&(id, _)| id != seq.id);
        if seq.on_workers {
            self.pending_freed.push(seq.id);
        }
    }

    /// Rewinds a running sequence (already taken out of `running`) and queues it at the
    /// front of its class. Returns whether workers held state for it.
    fn requeue(&mut self, r: RunningSeq) -> bool {
        let seq = self.seqs.get_mut(r.slot);
        seq.rewind(&mut self.pool);
        self.pending_truncated.retain(|&(id, _)| id != r.id);
        self.waiting[r.priority as usize].push_front(r.slot);
        self.preemptions += 1;
        std::mem::take(&mut seq.on_workers)
    }

    /// Preempts the lowest-ranked running sequence during a step.
    fn preempt_last(&mut self, step: &mut StepBuilder) {
        let r = self.running.pop().expect("a running sequence to preempt");
        if r.plan_slot != NO_LINK {
            step.withdraw(r.plan_slot);
        }
        if self.requeue(r) {
            step.plan.freed.push(r.id);
            step.plan.truncated.retain(|&(id, _)| id != r.id);
        }
        step.preempted = true;
    }

    /// Schedules running sequences: the decodes (one token left) in rank order, then
    /// the prefills (more left) in prefill order.
    fn schedule_running(&mut self, step: &mut StepBuilder, now: u64) {
        let max_seqs = self.config.max_num_seqs;
        let mut i = 0;
        while i < self.running.len() {
            if step.budget == 0 || step.scheduled == max_seqs {
                return;
            }
            self.schedule_one(i, true, step);
            i += 1;
        }
        let mut order: Vec<(PrefillKey, usize)> = self
            .running
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let seq = self.seqs.get(r.slot);
                (seq.tokens.len() - seq.num_computed > 1).then(|| (self.prefill_key(seq, now), i))
            })
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            if step.budget == 0 || step.scheduled == max_seqs {
                return;
            }
            // A preemption pops the tail: indices below it stay valid.
            if i < self.running.len() {
                self.schedule_one(i, false, step);
            }
        }
    }

    /// Schedules `running[i]` if it is a decode (`decodes`) or a prefill (otherwise).
    /// A sequence that needs blocks preempts from the tail of `running`, possibly
    /// itself, and then waits.
    fn schedule_one(&mut self, i: usize, decodes: bool, step: &mut StepBuilder) {
        let bs = self.config.block_size;
        let seq = self.seqs.get(self.running[i].slot);
        let remaining = seq.tokens.len() - seq.num_computed;
        if remaining == 0 || (remaining == 1) != decodes {
            return;
        }
        let n = if decodes {
            1
        } else {
            step.prefill_tokens(seq.num_computed, remaining)
        };
        if n == 0 {
            return;
        }
        let capacity = seq.table.len() * bs;
        let needed = if seq.num_computed + n <= capacity {
            0
        } else {
            blocks_for(seq.num_computed + n - capacity, bs)
        };
        while self.pool.num_free() < needed {
            self.preempt_last(step);
            if i >= self.running.len() {
                // It was the lowest-ranked itself: it waits.
                return;
            }
        }
        step.prefills += usize::from(!decodes);
        let k = if decodes {
            self.drafts_that_fit(i, step)
        } else {
            0
        };
        let seq = self.seqs.get_mut(self.running[i].slot);
        seq.in_flight_drafts = std::mem::take(&mut seq.draft);
        seq.in_flight_drafts.truncate(k);
        self.run_chunk(i, n, step);
    }

    /// How many of `running[i]`'s proposed drafts its decode may verify this step
    /// (see [`Scheduler::set_draft`]); its blocks for one token are already free.
    fn drafts_that_fit(&self, i: usize, step: &StepBuilder) -> usize {
        let bs = self.config.block_size;
        let seq = self.seqs.get(self.running[i].slot);
        if seq.draft.is_empty() {
            return 0;
        }
        let after = seq.num_computed + 1;
        let reserve = self.running.len() - i - 1;
        let room_in_blocks = (seq.table.len() + self.pool.num_free()) * bs - after;
        let mut k = seq
            .draft
            .len()
            .min(seq.max_tokens.saturating_sub(seq.generated() + 1))
            .min(self.token_limit.saturating_sub(seq.tokens.len() + 1))
            .min(step.budget.saturating_sub(1 + reserve))
            .min(room_in_blocks);
        if let Some((cost, max_ms)) = step.cap {
            let base = step.predicted_ms;
            while k > 0 && base + cost.entry_ms(seq.num_computed, 1 + k) > max_ms {
                k -= 1;
            }
        }
        k
    }

    /// Adds a chunk of `n` tokens of `running[i]` to the step, allocating its blocks
    /// (room was made).
    fn run_chunk(&mut self, i: usize, n: usize, step: &mut StepBuilder) {
        let r = &mut self.running[i];
        let seq = self.seqs.get_mut(r.slot);
        let position = seq.num_computed;
        let first_new = seq.table.len();
        let k = seq.in_flight_drafts.len();
        while seq.table.len() * self.config.block_size < position + n + k {
            seq.table.push(self.pool.allocate().expect("room was made"));
        }
        seq.num_computed += n;
        r.plan_slot = step.push(seq, r.slot, position, n, first_new, false);
    }

    fn waiting_rank(&self, slot: u32, now: u64) -> RankKey {
        let seq = self.seqs.get(slot);
        rank_key(
            seq.priority,
            seq.arrival,
            seq.id,
            now,
            self.config.aging_interval_us,
        )
    }

    fn prefill_key(&self, seq: &Sequence, now: u64) -> PrefillKey {
        let (class, arrival, id) = rank_key(
            seq.priority,
            seq.arrival,
            seq.id,
            now,
            self.config.aging_interval_us,
        );
        let fresh = !(seq.requeued && seq.state == SeqState::Waiting);
        let left = if self.config.shortest_prefill_first {
            seq.tokens.len() - seq.num_computed
        } else {
            0
        };
        (class, fresh, left, arrival, id)
    }

    /// Every waiting request, best first in prefill order.
    fn waiting_in_prefill_order(&self, now: u64) -> Vec<u32> {
        let mut order: Vec<(PrefillKey, u32)> = self
            .waiting
            .iter()
            .flatten()
            .map(|&slot| (self.prefill_key(self.seqs.get(slot), now), slot))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, slot)| slot).collect()
    }

    /// The leading blocks of `seq` the prefix cache holds — at most all but the last
    /// token, so that the step computes at least one — and the chain's link after them.
    fn cached_prefix(&self, seq: &Sequence) -> (Vec<BlockId>, PrefixLink) {
        let bs = self.config.block_size;
        let max_blocks = (seq.tokens.len() - 1) / bs;
        let mut parent = PrefixLink::ROOT;
        let mut hits = Vec::new();
        for (i, &hash) in seq.block_hashes.iter().take(max_blocks).enumerate() {
            let Some((block, link)) =
                self.pool
                    .lookup(parent, hash, &seq.tokens[i * bs..(i + 1) * bs])
            else {
                break;
            };
            hits.push(block);
            parent = link;
        }
        (hits, parent)
    }

    /// Admits waiting requests in rank order while budget, sequence slots and blocks
    /// last. Admitted sequences join `running` at the end of the step.
    fn admit_waiting(&mut self, step: &mut StepBuilder, now: u64) {
        let bs = self.config.block_size;
        let mut admitted = Vec::new();
        let max_seqs = self.config.max_num_seqs;
        if step.budget == 0 || self.running.len() >= max_seqs || self.num_waiting() == 0 {
            return;
        }
        for slot in self.waiting_in_prefill_order(now) {
            if step.budget == 0 || self.running.len() + admitted.len() >= max_seqs {
                break;
            }
            let rank = self.waiting_rank(slot, now);
            // Find the cached prefix and room for one chunk, preempting running
            // sequences that rank below this request if blocks run out.
            let mut preempted_for_it = false;
            let found = loop {
                let seq = self.seqs.get(slot);
                let (hits, parent) = self.cached_prefix(seq);
                let skipped = hits.len() * bs;
                let n = step.prefill_tokens(skipped, seq.tokens.len() - skipped);
                if n == 0 {
                    break None;
                }
                let keep_from = match self.config.sliding_window {
                    Some(w) => ((skipped + 1).saturating_sub(w) / bs).min(hits.len()),
                    None => 0,
                };
                let free_hits = hits[keep_from..]
                    .iter()
                    .filter(|&&b| self.pool.ref_count(b) == 0)
                    .count();
                let needed = blocks_for(skipped + n, bs) - hits.len() + free_hits;
                if self.pool.num_free() >= needed {
                    break Some((hits, parent, n, keep_from));
                }
                match self.running.last() {
                    Some(last)
                        if rank_key(
                            last.priority,
                            last.arrival,
                            last.id,
                            now,
                            self.config.aging_interval_us,
                        ) > rank =>
                    {
                        self.preempt_last(step);
                        preempted_for_it = true;
                    }
                    _ => break None,
                }
            };
            let Some((hits, parent, n, keep_from)) = found else {
                break;
            };
            let seq = self.seqs.get_mut(slot);
            unqueue(&mut self.waiting[seq.priority as usize], slot);
            let skipped = hits.len() * bs;
            for (j, &block) in hits.iter().enumerate() {
                if j < keep_from {
                    seq.table.push(NULL_BLOCK);
                } else {
                    self.pool.acquire(block);
                    seq.table.push(block);
                }
            }
            for _ in hits.len()..blocks_for(skipped + n, bs) {
                seq.table.push(self.pool.allocate().expect("room was made"));
            }
            seq.state = SeqState::Running;
            seq.on_workers = true;
            seq.num_computed = skipped + n;
            seq.num_registered = hits.len();
            seq.cache_parent = parent;
            seq.num_released = keep_from;
            self.prefix_hit_tokens += skipped as u64;
            self.prefix_queried_tokens += seq.tokens.len() as u64;
            let plan_slot = step.push(seq, slot, skipped, n, 0, true);
            step.prefills += 1;
            admitted.push(RunningSeq {
                slot,
                id: seq.id,
                priority: seq.priority,
                arrival: seq.arrival,
                plan_slot,
            });
            if preempted_for_it {
                break;
            }
        }
        self.running.extend(admitted);
    }
}

/// Takes `slot` out of its class's waiting queue, where it must be.
fn unqueue(queue: &mut VecDeque<u32>, slot: u32) {
    let pos = queue
        .iter()
        .position(|&w| w == slot)
        .expect("waiting sequence is queued");
    queue.remove(pos);
}
