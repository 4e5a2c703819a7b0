//! Property tests of the whole scheduler: seeded random runs of 1,600 operations
//! (64 cases: 102,400 operations) — add, schedule + update, abort, preempt, abort
//! between schedule and update, time passing — over random small configurations
//! (tiny pools, budgets down to 1 token, sliding windows), then a drain.
//!
//! After every operation: free + referenced blocks = total; each block's reference
//! count equals the number of block tables holding it; free-listed blocks have count
//! 0 and appear once, uncached ones first; the counters agree.
//! For every plan: budget and `max_num_seqs` respected; tokens and positions are those
//! of the request; a mirror of the workers (block tables built only from plan diffs,
//! plus the KV contents of every slot) agrees with the scheduler's tables, and every
//! KV slot a step reads holds exactly the prefix of the sequence reading it — which
//! catches a wrong prefix-cache hit, a block freed while still used, or a stale table.
//! For every update: the sequences that end are exactly those expected, with the
//! right reason.
//!
//! Speculative steps: before each step a third of the running sequences propose
//! random drafts; a plan's drafts are a prefix of the proposal, only on decodes, and
//! fit `max_tokens` and the token limit; the step then accepts a random number of
//! them (sometimes followed by a stray token the scheduler must ignore). The KV
//! written at rejected positions is garbage to the model, so the read check above
//! catches any rollback that keeps a rejected position as computed, and the mirror
//! (which applies `truncated`) catches a table not cut back. At the end: every request ended and every block is free — also under
//! a step-time cap, so nothing starves.
//!
//! Half the cases run with a step cost model and a `max_step_ms` cap or a
//! `max_prefill_ms` allowance (often binding): a plan with any prefill chunk is
//! predicted within the cap (its prefill chunks within the allowance), unless its only
//! prefill chunk is a minimum one (at most a block). Every plan admits in prefill order: an
//! admitted request ranks (aged class, re-admission first, shortest prompt first when
//! on, arrival, id) before every request left waiting.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed};
use scheduler::{
    BlockId, FinishReason, Priority, Scheduler, SchedulerConfig, SchedulerError, SeqId, StepCost,
    StepPlan, NULL_BLOCK,
};

const OPS_PER_CASE: usize = 1600;
const CASES: u32 = 64;
/// A tiny vocabulary, so that prompts and generated tokens share prefixes often.
const VOCAB: u32 = 4;
const MAX_PROMPT: usize = 120;

#[derive(Clone, Debug)]
struct Params {
    num_blocks: usize,
    block_size: usize,
    budget: usize,
    max_seqs: usize,
    max_model_len: usize,
    max_waiting: usize,
    window: Option<usize>,
    aging_interval_us: u64,
    shortest_prefill_first: bool,
    /// `(fixed, per token, per context token, max step)`, ms.
    cost: Option<(f64, f64, f64, f64)>,
    /// The last `cost` number is a prefill allowance (`max_prefill_ms`), not a step
    /// cap.
    prefill_allowance: bool,
}

fn params() -> impl Strategy<Value = Params> {
    (
        (4usize..48, 1usize..=6, 1usize..48, 1usize..=8),
        (
            8usize..160,
            1usize..16,
            prop::option::weighted(0.3, 1usize..40),
            1u64..3000,
        ),
        (
            any::<bool>(),
            prop::option::of((0u32..8, 1u32..16, 0u32..4, 0u32..40)),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (num_blocks, block_size, budget, max_seqs),
                (max_model_len, max_waiting, window, aging_interval_us),
                (shortest_prefill_first, cost, prefill_allowance),
            )| Params {
                num_blocks,
                block_size,
                budget,
                max_seqs,
                max_model_len,
                max_waiting,
                window,
                aging_interval_us,
                shortest_prefill_first,
                // Quarter-ms units; the cap ranges from below `fixed` (only minimum
                // chunks run) to a few dozen tokens.
                cost: cost.map(|(f, t, c, m)| {
                    let (f, t, c, m) = (f64::from(f), f64::from(t), f64::from(c), f64::from(m));
                    (f / 4.0, t / 4.0, c / 64.0, (f + m) / 4.0 + 0.5)
                }),
                prefill_allowance,
            },
        )
}

#[derive(Clone, Debug)]
enum Op {
    /// A request arrives: `keep` tokens of an earlier prompt (if any) plus `extra`.
    Add {
        base: Option<Index>,
        keep: Index,
        extra: Vec<u32>,
        max_tokens: usize,
        priority: u8,
    },
    /// One engine step; `seed` decides the sampled tokens, stops and lost samples.
    Step {
        seed: u64,
    },
    Abort(Index),
    Preempt(Index),
    /// Schedule, abort one planned sequence (a client disconnect racing the step), update.
    AbortMidStep {
        victim: Index,
        seed: u64,
    },
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (proptest::option::of(any::<Index>()), any::<Index>(), prop::collection::vec(0..VOCAB, 0..12), 1usize..24, 0u8..3)
            .prop_map(|(base, keep, extra, max_tokens, priority)| Op::Add { base, keep, extra, max_tokens, priority }),
        6 => any::<u64>().prop_map(|seed| Op::Step { seed }),
        1 => any::<Index>().prop_map(Op::Abort),
        1 => any::<Index>().prop_map(Op::Preempt),
        1 => (any::<Index>(), any::<u64>()).prop_map(|(victim, seed)| Op::AbortMidStep { victim, seed }),
        1 => (0u64..5000).prop_map(Op::Tick),
    ]
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request as the test knows it: its tokens and, per position, an identity of the
/// whole prefix up to it (what the KV at that position depends on).
struct Req {
    tokens: Vec<u32>,
    content: Vec<u64>,
    prompt_len: usize,
    max_tokens: usize,
    priority: Priority,
    arrival: u64,
    /// Preempted at least once (re-admissions go first in their class).
    requeued: bool,
}

impl Req {
    fn new(prompt: &[u32], max_tokens: usize, priority: Priority, arrival: u64) -> Self {
        let mut req = Req {
            tokens: Vec::new(),
            content: Vec::new(),
            prompt_len: prompt.len(),
            max_tokens,
            priority,
            arrival,
            requeued: false,
        };
        for &t in prompt {
            req.push(t);
        }
        req
    }

    fn push(&mut self, token: u32) {
        let prev = self.content.last().copied().unwrap_or(1);
        self.tokens.push(token);
        self.content.push(splitmix(prev ^ u64::from(token)) | 1);
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One sequence as a worker mirrors it from plans alone.
struct WorkerSeq {
    table: Vec<BlockId>,
    computed: usize,
}

struct Harness {
    p: Params,
    sched: Scheduler,
    now: u64,
    next_id: SeqId,
    history: Vec<Vec<u32>>,
    live: BTreeMap<SeqId, Req>,
    workers: HashMap<SeqId, WorkerSeq>,
    /// KV slot contents, `block * block_size + offset`; 0 = never written.
    kv: Vec<u64>,
    admitted: usize,
    ended: usize,
}

impl Harness {
    fn new(p: Params) -> Self {
        let config = SchedulerConfig {
            num_blocks: p.num_blocks,
            block_size: p.block_size,
            max_num_batched_tokens: p.budget,
            max_num_seqs: p.max_seqs,
            max_model_len: p.max_model_len,
            max_waiting: p.max_waiting,
            sliding_window: p.window,
            aging_interval_us: p.aging_interval_us,
            shortest_prefill_first: p.shortest_prefill_first,
            step_cost: p.cost.map(|(f, t, c, _)| StepCost {
                fixed_ms: f,
                per_token_ms: t,
                per_context_token_ms: c,
            }),
            max_step_ms: p.cost.filter(|_| !p.prefill_allowance).map(|c| c.3),
            max_prefill_ms: p.cost.filter(|_| p.prefill_allowance).map(|c| c.3),
        };
        let sched = Scheduler::new(config).expect("every generated config is valid");
        let kv = vec![0; p.num_blocks * p.block_size];
        Harness {
            p,
            sched,
            now: 0,
            next_id: 0,
            history: Vec::new(),
            live: BTreeMap::new(),
            workers: HashMap::new(),
            kv,
            admitted: 0,
            ended: 0,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Add {
                base,
                keep,
                extra,
                max_tokens,
                priority,
            } => {
                let mut prompt = match base {
                    Some(i) if !self.history.is_empty() => {
                        let base = &self.history[i.index(self.history.len())];
                        base[..keep.index(base.len() + 1)].to_vec()
                    }
                    _ => Vec::new(),
                };
                prompt.extend(extra);
                prompt.truncate(MAX_PROMPT);
                self.add(
                    prompt,
                    *max_tokens,
                    [Priority::Interactive, Priority::Chat, Priority::Batch][*priority as usize],
                );
            }
            Op::Step { seed } => self.step(*seed, None),
            Op::Abort(i) => {
                if let Some(id) = self.pick_live(i) {
                    assert!(self.sched.abort(id));
                    self.end(id);
                }
            }
            Op::Preempt(i) => {
                if let Some(id) = self.pick_live(i) {
                    let running = !self.sched.block_table(id).unwrap().is_empty();
                    assert_eq!(
                        self.sched.preempt(id),
                        running,
                        "preempt answers whether {id} ran"
                    );
                    if running {
                        self.live.get_mut(&id).unwrap().requeued = true;
                    }
                }
            }
            Op::AbortMidStep { victim, seed } => self.step(*seed, Some(victim)),
            Op::Tick(dt) => self.now += dt,
        }
        self.check_blocks();
    }

    fn pick_live(&self, i: &Index) -> Option<SeqId> {
        (!self.live.is_empty()).then(|| *self.live.keys().nth(i.index(self.live.len())).unwrap())
    }

    fn end(&mut self, id: SeqId) {
        assert!(self.live.remove(&id).is_some());
        self.ended += 1;
    }

    fn add(&mut self, prompt: Vec<u32>, max_tokens: usize, priority: Priority) {
        let id = self.next_id;
        self.next_id += 1;
        let limit = self.sched.token_limit();
        let waiting = self.sched.counters().waiting;
        let expected = if prompt.is_empty() {
            Err(SchedulerError::EmptyPrompt)
        } else if prompt.len() >= limit {
            Err(SchedulerError::PromptTooLong {
                prompt_tokens: prompt.len(),
                limit: limit - 1,
            })
        } else if waiting >= self.p.max_waiting {
            Err(SchedulerError::QueueFull)
        } else {
            Ok(())
        };
        assert_eq!(
            self.sched
                .add(id, prompt.clone(), max_tokens, priority, self.now),
            expected
        );
        if expected.is_ok() {
            let max_tokens = max_tokens.min(limit - prompt.len());
            self.live
                .insert(id, Req::new(&prompt, max_tokens, priority, self.now));
            self.admitted += 1;
            if self.history.len() == 32 {
                self.history.remove(0);
            }
            self.history.push(prompt);
        }
    }

    fn window_start(&self, position: usize) -> usize {
        self.p
            .window
            .map_or(0, |w| (position + 1).saturating_sub(w))
    }

    fn step(&mut self, seed: u64, abort_victim: Option<&Index>) {
        self.now += 1;
        let mut proposed = HashMap::new();
        for &id in self.live.keys() {
            let r = splitmix(seed ^ id.wrapping_mul(0x51ed));
            if r % 3 != 0 || self.sched.block_table(id).unwrap().is_empty() {
                continue;
            }
            let draft: Vec<u32> = (0..(r >> 4) % 7)
                .map(|j| (splitmix(r ^ j) % u64::from(VOCAB)) as u32)
                .collect();
            assert!(self.sched.set_draft(id, &draft), "{id} runs");
            proposed.insert(id, draft);
        }
        let waiting_before: Vec<SeqId> = self
            .live
            .keys()
            .copied()
            .filter(|&id| self.sched.block_table(id).unwrap().is_empty())
            .collect();
        let plan = self.sched.schedule(self.now);
        self.check_step_cap(&plan);
        self.check_prefill_order(&plan, &waiting_before);
        self.check_plan(&plan, &proposed);
        if let Some(victim) = abort_victim.filter(|_| !plan.seqs.is_empty()) {
            let id = plan.seqs[victim.index(plan.seqs.len())].seq_id;
            assert!(self.sched.abort(id));
            self.end(id);
            self.check_blocks();
        }
        let limit = self.sched.token_limit();
        let mut sampled = Vec::new();
        let mut stopped = Vec::new();
        let mut expected = BTreeMap::new();
        for (k, entry) in plan.seqs.iter().filter(|e| e.sample).enumerate() {
            let r = splitmix(seed ^ k as u64);
            let id = entry.seq_id;
            let committed = entry.num_tokens() - entry.num_drafts();
            if r % 16 == 1 {
                // The token is lost: the sequence recomputes its last position.
                if self.live.contains_key(&id) {
                    self.workers.get_mut(&id).unwrap().computed = entry.position + committed - 1;
                }
                continue;
            }
            let drafts = plan.drafts(entry);
            let accepted = (r >> 40) as usize % (drafts.len() + 1);
            let mut tokens = drafts[..accepted].to_vec();
            tokens.push((r >> 8) as u32 % VOCAB);
            sampled.extend(tokens.iter().map(|&t| (id, t)));
            if accepted < drafts.len() && tokens[accepted] != drafts[accepted] && r & (1 << 50) != 0
            {
                // Past the first mismatch nothing more is taken.
                sampled.push((id, (r >> 20) as u32 % VOCAB));
            }
            let Some(req) = self.live.get_mut(&id) else {
                continue;
            };
            for &t in &tokens {
                req.push(t);
            }
            self.workers.get_mut(&id).unwrap().computed = entry.position + committed + accepted;
            if r.is_multiple_of(16) {
                stopped.push(id);
                expected.insert(id, FinishReason::Stopped);
            } else if req.generated() >= req.max_tokens || req.tokens.len() >= limit {
                expected.insert(id, FinishReason::Length);
            }
        }
        let finished = self.sched.update(&plan, &sampled, &stopped);
        let got: BTreeMap<_, _> = finished.iter().copied().collect();
        assert_eq!(
            got.len(),
            finished.len(),
            "a sequence ended twice: {finished:?}"
        );
        assert_eq!(got, expected);
        for id in expected.into_keys() {
            self.end(id);
        }
    }

    /// A plan with prefill chunks is predicted within `max_step_ms` (its prefill
    /// chunks within `max_prefill_ms`), or its only prefill chunk is a minimum one (at
    /// most a block). Decodes (one token, sampled, not new) are never cut, so they
    /// alone may exceed it.
    fn check_step_cap(&self, plan: &StepPlan) {
        let Some((fixed_ms, per_token_ms, per_context_token_ms, max_ms)) = self.p.cost else {
            return;
        };
        let cost = StepCost {
            fixed_ms,
            per_token_ms,
            per_context_token_ms,
        };
        let prefills: Vec<_> = plan
            .seqs
            .iter()
            .filter(|e| !(e.num_tokens() - e.num_drafts() == 1 && e.sample && !e.reset))
            .collect();
        if prefills.is_empty() {
            return;
        }
        let predicted = if self.p.prefill_allowance {
            prefills
                .iter()
                .map(|e| cost.entry_ms(e.position, e.num_tokens()))
                .sum()
        } else {
            cost.plan_ms(plan)
        };
        let lone_min_chunk = prefills.len() == 1 && prefills[0].num_tokens() <= self.p.block_size;
        assert!(
            predicted <= max_ms + 1e-9 || lone_min_chunk,
            "predicted {predicted} ms > cap {max_ms} ms: {:?}",
            plan.seqs
        );
    }

    /// The prefill-order key the scheduler documents, for a waiting request.
    fn prefill_key(&self, id: SeqId) -> (i64, bool, usize, u64, SeqId) {
        let r = &self.live[&id];
        let waited = self.now.saturating_sub(r.arrival);
        let class = r.priority as i64 - (waited / self.p.aging_interval_us) as i64;
        let left = if self.p.shortest_prefill_first {
            r.tokens.len()
        } else {
            0
        };
        (class, !r.requeued, left, r.arrival, id)
    }

    /// Every request admitted by `plan` ranks before every one still waiting.
    fn check_prefill_order(&mut self, plan: &StepPlan, waiting_before: &[SeqId]) {
        let admitted: Vec<SeqId> = plan
            .seqs
            .iter()
            .filter(|e| e.reset && waiting_before.contains(&e.seq_id))
            .map(|e| e.seq_id)
            .collect();
        if let Some(worst) = admitted.iter().map(|&id| self.prefill_key(id)).max() {
            for &id in waiting_before.iter().filter(|id| !admitted.contains(id)) {
                let left = self.prefill_key(id);
                assert!(worst < left, "admitted {worst:?} before waiting {left:?}");
            }
        }
        for id in &plan.freed {
            if let Some(r) = self.live.get_mut(id) {
                r.requeued = true;
            }
        }
    }

    /// Checks a plan against the request model and applies it to the workers' mirror.
    fn check_plan(&mut self, plan: &StepPlan, proposed: &HashMap<SeqId, Vec<u32>>) {
        let bs = self.p.block_size;
        assert!(plan.num_tokens() <= self.p.budget, "budget exceeded");
        assert!(plan.seqs.len() <= self.p.max_seqs, "max_num_seqs exceeded");
        let ids: HashSet<SeqId> = plan.seqs.iter().map(|e| e.seq_id).collect();
        assert_eq!(ids.len(), plan.seqs.len(), "a sequence twice in one plan");
        for id in &plan.freed {
            assert!(
                self.workers.remove(id).is_some(),
                "freed {id}, which workers do not hold"
            );
            assert!(!ids.contains(id) || plan.seqs.iter().any(|e| e.seq_id == *id && e.reset));
        }
        let limit = self.sched.token_limit();
        for &(id, len) in &plan.truncated {
            let w = self.workers.get_mut(&id).expect("truncated a held table");
            assert!(len < w.table.len(), "a cut shortens the table");
            w.table.truncate(len);
        }
        // Reads: every position a query attends to holds this sequence's prefix.
        for e in &plan.seqs {
            let req = self
                .live
                .get(&e.seq_id)
                .expect("only live sequences are scheduled");
            let n = e.num_tokens();
            let k = e.num_drafts();
            let committed = n - k;
            assert!(committed > 0);
            assert_eq!(
                plan.tokens(e),
                &req.tokens[e.position..e.position + committed]
            );
            assert_eq!(e.sample, e.position + committed == req.tokens.len());
            if k > 0 {
                assert!(
                    committed == 1 && e.sample && !e.reset,
                    "drafts only on decodes"
                );
                assert!(proposed[&e.seq_id].starts_with(plan.drafts(e)));
                assert!(
                    req.generated() + 1 + k <= req.max_tokens,
                    "drafts past max_tokens"
                );
                assert!(req.tokens.len() + 1 + k <= limit, "drafts past the limit");
            }
            if e.reset {
                let fresh = WorkerSeq {
                    table: plan.new_blocks(e).to_vec(),
                    computed: e.position,
                };
                assert!(
                    self.workers.insert(e.seq_id, fresh).is_none(),
                    "reset of a sequence workers hold"
                );
            } else {
                let w = self
                    .workers
                    .get_mut(&e.seq_id)
                    .expect("continuation of a sequence workers hold");
                assert_eq!(w.computed, e.position, "position of {}", e.seq_id);
                w.table.extend(plan.new_blocks(e));
            }
            let w = &self.workers[&e.seq_id];
            assert_eq!(
                w.table.len(),
                (e.position + n).div_ceil(bs),
                "table covers exactly the tokens"
            );
            for q in self.window_start(e.position)..e.position + n {
                assert_ne!(
                    w.table[q / bs],
                    NULL_BLOCK,
                    "position {q} of {} has no block",
                    e.seq_id
                );
            }
            for q in self.window_start(e.position)..e.position {
                let b = w.table[q / bs] as usize;
                assert_eq!(
                    self.kv[b * bs + q % bs],
                    req.content[q],
                    "KV of seq {} position {q} in block {b}",
                    e.seq_id
                );
            }
        }
        // Writes, after all reads (a block computed in a step is not readable by others
        // in the same step).
        let mut written = HashSet::new();
        for e in &plan.seqs {
            let req = &self.live[&e.seq_id];
            let w = self.workers.get_mut(&e.seq_id).unwrap();
            let committed = e.num_tokens() - e.num_drafts();
            // What the KV at a draft position would be if the draft were accepted.
            let mut content = req.content[..e.position + committed].to_vec();
            for &d in plan.drafts(e) {
                let prev = *content.last().unwrap();
                content.push(splitmix(prev ^ u64::from(d)) | 1);
            }
            for q in e.position..e.position + e.num_tokens() {
                let b = w.table[q / bs];
                let slot = b as usize * bs + q % bs;
                assert!(
                    written.insert(slot),
                    "two writes to block {b} slot {} in one step",
                    q % bs
                );
                if self.sched.pool().ref_count(b) > 1 {
                    assert_eq!(
                        self.kv[slot], content[q],
                        "a write changes shared block {b}"
                    );
                }
                self.kv[slot] = content[q];
            }
            w.computed = e.position + e.num_tokens();
        }
        // The mirror is the scheduler's tables, but for blocks released by the window.
        assert_eq!(self.workers.len(), self.sched.counters().running);
        for (id, w) in &self.workers {
            let table = self
                .sched
                .block_table(*id)
                .expect("mirrored sequences are known");
            assert_eq!(table.len(), w.table.len(), "table length of {id}");
            let window_start = self.window_start(w.computed);
            for (i, (&ours, &theirs)) in table.iter().zip(&w.table).enumerate() {
                assert!(
                    ours == theirs || (ours == NULL_BLOCK && (i + 1) * bs <= window_start),
                    "table of {id} differs at {i}: {table:?} vs mirror {:?}",
                    w.table
                );
            }
        }
    }

    /// The block accounting, recomputed from the tables of the live requests.
    fn check_blocks(&self) {
        let pool = self.sched.pool();
        let c = self.sched.counters();
        assert_eq!(c.running + c.waiting, self.live.len());
        let mut refs = vec![0u32; self.p.num_blocks];
        let mut running = 0;
        for id in self.live.keys() {
            let table = self
                .sched
                .block_table(*id)
                .expect("live requests are known");
            running += usize::from(!table.is_empty());
            for &b in table.iter().filter(|&&b| b != NULL_BLOCK) {
                refs[b as usize] += 1;
            }
        }
        assert_eq!(running, c.running);
        for (b, &tables) in refs.iter().enumerate().skip(1) {
            assert_eq!(
                pool.ref_count(b as BlockId),
                tables,
                "refcount of block {b} vs tables holding it"
            );
        }
        let mut on_free_list = vec![false; self.p.num_blocks];
        let mut cached_seen = false;
        for b in pool.free_blocks() {
            assert_ne!(b, NULL_BLOCK, "the null block is never free");
            assert!(
                !std::mem::replace(&mut on_free_list[b as usize], true),
                "block {b} twice on the free list"
            );
            assert_eq!(pool.ref_count(b), 0, "free-listed block {b} is referenced");
            if pool.is_cached(b) {
                cached_seen = true;
            } else {
                assert!(!cached_seen, "uncached free block {b} after a cached one");
            }
        }
        let free = on_free_list.iter().filter(|&&f| f).count();
        let used = refs.iter().filter(|&&r| r > 0).count();
        assert_eq!(free, pool.num_free());
        assert_eq!(
            free + used,
            self.p.num_blocks - 1,
            "free + referenced = total"
        );
        assert_eq!((c.blocks_free, c.blocks_used), (free, used));
    }

    /// Steps until nothing is left; every request must end, and every block be free.
    fn drain(&mut self) {
        let mut steps = 0u64;
        while self.sched.has_work() {
            self.step(splitmix(steps), None);
            self.check_blocks();
            steps += 1;
            assert!(
                steps < 200_000,
                "no progress: {} requests left",
                self.live.len()
            );
        }
        assert!(self.live.is_empty());
        assert_eq!(self.ended, self.admitted, "every request ended");
        assert!(
            self.workers.is_empty(),
            "workers were told to drop every sequence"
        );
        assert_eq!(
            self.sched.pool().num_free(),
            self.p.num_blocks - 1,
            "every block is free"
        );
    }
}

proptest! {
    #![proptest_config(Config { cases: CASES, rng_seed: RngSeed::Fixed(0x5c4e_d01e), ..Config::default() })]

    #[test]
    fn random_operation_sequences_keep_every_invariant(p in params(), ops in prop::collection::vec(op(), OPS_PER_CASE)) {
        let mut h = Harness::new(p);
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}
