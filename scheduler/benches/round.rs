//! One engine round — `schedule()` then `update()` — at full batch: each plan runs
//! 256 sequences (252 decodes and 4 newly admitted requests, each reusing a 512-token
//! cached system prompt and prefilling its 64-token suffix) and leaves 50 waiting.
//! In `update` the 4 oldest sequences stop, and 4 new requests arrive (`add`, timed
//! too), so the state is the same from round to round. Goal (issue 4): ≤ 50 µs.

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use scheduler::{Priority, Scheduler, SchedulerConfig, SeqId};

const RUNNING: usize = 256;
const WAITING: usize = 50;
const TURNOVER: usize = 4;
const SYSTEM_PROMPT: usize = 512;
const SUFFIX: usize = 64;

/// A scheduler in steady state, and the ids in admission order.
struct Workload {
    sched: Scheduler,
    running: VecDeque<SeqId>,
    next_id: SeqId,
    now: u64,
}

impl Workload {
    fn new() -> Self {
        let config = SchedulerConfig {
            num_blocks: 24_576,
            max_waiting: RUNNING + WAITING,
            ..SchedulerConfig::default()
        };
        let mut w = Workload {
            sched: Scheduler::new(config).expect("valid config"),
            running: VecDeque::new(),
            next_id: 0,
            now: 0,
        };
        for _ in 0..RUNNING + WAITING {
            w.arrive();
        }
        // Fill the batch (admission is capped by max_num_seqs), then let it age.
        while w.running.len() < RUNNING || w.sched.counters().running < RUNNING {
            w.round(0);
        }
        for _ in 0..64 {
            w.round(TURNOVER);
        }
        w
    }

    fn arrive(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let prompt: Vec<u32> = (0..SYSTEM_PROMPT as u32)
            .chain((0..SUFFIX as u32).map(|t| t * 7 + id as u32))
            .collect();
        self.sched
            .add(id, prompt, 1 << 20, Priority::Interactive, self.now)
            .expect("admitted");
    }

    /// One engine step: `stop` oldest sequences end, as many new requests arrive.
    /// Returns how many sequences the plan ran.
    fn round(&mut self, stop: usize) -> usize {
        self.now += 15_000;
        let plan = self.sched.schedule(self.now);
        let sampled: Vec<(SeqId, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.seq_id, 13))
            .collect();
        self.running
            .extend(plan.seqs.iter().filter(|s| s.reset).map(|s| s.seq_id));
        let stopped: Vec<SeqId> = (0..stop).filter_map(|_| self.running.pop_front()).collect();
        let finished = self.sched.update(&plan, &sampled, &stopped);
        for _ in 0..finished.len() {
            self.arrive();
        }
        plan.seqs.len()
    }
}

fn bench_round(c: &mut Criterion) {
    let mut w = Workload::new();
    assert_eq!(w.round(TURNOVER), RUNNING);
    // Between rounds: 4 fewer running, 4 more waiting than while the plan runs.
    let between = (RUNNING - TURNOVER, WAITING + TURNOVER);
    let counters = w.sched.counters();
    assert_eq!((counters.running, counters.waiting), between);
    c.bench_function(
        "schedule+update, 256 running + 50 waiting, 4 admitted with prefix hits",
        |b| {
            b.iter(|| {
                w.round(TURNOVER);
                black_box(&w.sched);
            })
        },
    );
    let counters = w.sched.counters();
    assert_eq!((counters.running, counters.waiting), between);
    assert!(
        counters.prefix_hit_rate() > 0.8,
        "prefix hits: {counters:?}"
    );
}

criterion_group!(benches, bench_round);
criterion_main!(benches);
