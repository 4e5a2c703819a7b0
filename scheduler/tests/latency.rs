//! Scheduling for latency: the step-time cap from a [`StepCost`] model and
//! shortest-remaining-prefill first, one situation per test, plus a step-level
//! simulation of a prompt burst that measures what they buy (time advances by each
//! plan's predicted cost; no clock is read).

use std::collections::HashMap;

use scheduler::{
    Priority, Scheduler, SchedulerConfig, SchedulerError, SeqId, StepCost, StepPlan,
    AUTO_PREFILL_FIXED_FACTOR, AUTO_PREFILL_TOKENS,
};

/// Roughly the 2-core CPU figures of issue #22 (about 0.12 ms per prefill token, a
/// 10 ms step floor), used as plain numbers.
const COST: StepCost = StepCost {
    fixed_ms: 10.0,
    per_token_ms: 0.12,
    per_context_token_ms: 0.0005,
};

fn config(max_step_ms: Option<f64>, shortest_prefill_first: bool) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks: 4096,
        block_size: 16,
        max_num_batched_tokens: 8192,
        max_num_seqs: 64,
        step_cost: Some(COST),
        max_step_ms,
        shortest_prefill_first,
        ..SchedulerConfig::default()
    }
}

/// Runs one step: every sampling entry gets token 7; returns the plan.
fn step(sched: &mut Scheduler, now: u64) -> StepPlan {
    let plan = sched.schedule(now);
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| (s.seq_id, 7))
        .collect();
    sched.update(&plan, &sampled, &[]);
    plan
}

fn prompt(id: SeqId, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| 100 + (id as u32) * 7919 + i as u32)
        .collect()
}

/// Adds sequences `0..n` (prompts of `len`, long outputs) and steps until all of them
/// decode; returns the next time.
fn running_decodes(sched: &mut Scheduler, n: SeqId, len: usize, max_tokens: usize) -> u64 {
    for id in 0..n {
        sched
            .add(id, prompt(id, len), max_tokens, Priority::Interactive, 0)
            .unwrap();
    }
    for now in 1..1000 {
        let plan = step(sched, now);
        if plan.seqs.len() == n as usize
            && plan.seqs.iter().all(|s| s.num_tokens() == 1 && !s.reset)
        {
            return now + 1;
        }
    }
    panic!("the decodes never started");
}

#[test]
fn the_cap_cuts_prefill_but_never_drops_a_decode() {
    // Decodes alone cost 10 + 4 × (0.12 + 0.0005 × ctx) ≈ 10.5 ms; the cap is 20 ms.
    let mut sched = Scheduler::new(config(Some(20.0), true)).unwrap();
    let now = running_decodes(&mut sched, 4, 32, 100);
    sched
        .add(10, prompt(10, 512), 4, Priority::Interactive, now)
        .unwrap();
    let plan = step(&mut sched, now);
    let decodes = plan.seqs.iter().filter(|s| s.num_tokens() == 1).count();
    assert_eq!(
        decodes, 4,
        "every running decode is scheduled: {:?}",
        plan.seqs
    );
    let chunk = plan
        .seqs
        .iter()
        .find(|s| s.seq_id == 10)
        .expect("a chunk")
        .num_tokens();
    assert!(chunk > 0 && chunk < 512, "the prompt is cut, got {chunk}");
    let ms = COST.plan_ms(&plan);
    assert!(ms <= 20.0, "predicted {ms} ms");
    // One more token would have crossed the cap: the cut is tight.
    assert!(ms + COST.entry_ms(0, 1) + COST.per_context_token_ms > 20.0 - 1e-9);
}

#[test]
fn decodes_over_the_cap_still_get_one_minimum_prefill_chunk_per_step() {
    // A cap below the decode-only step: all decodes run, plus one block of prefill.
    let mut sched = Scheduler::new(config(Some(10.1), true)).unwrap();
    let mut now = running_decodes(&mut sched, 4, 16, 20);
    sched
        .add(9, prompt(9, 64), 2, Priority::Interactive, now)
        .unwrap();
    let plan = step(&mut sched, now);
    assert_eq!(plan.seqs.len(), 5);
    assert!(plan.seqs[..4]
        .iter()
        .all(|s| s.num_tokens() == 1 && s.seq_id < 4));
    assert_eq!((plan.seqs[4].seq_id, plan.seqs[4].num_tokens()), (9, 16));
    now += 1;
    let mut first_token_of_9 = None;
    while sched.has_work() {
        let plan = step(&mut sched, now);
        if plan.seqs.iter().any(|s| s.seq_id == 9 && s.sample) && first_token_of_9.is_none() {
            first_token_of_9 = Some(now);
        }
        now += 1;
        assert!(now < 1000, "no progress");
    }
    assert!(
        first_token_of_9.is_some(),
        "the prompt finished its prefill"
    );
}

#[test]
fn an_empty_step_always_takes_a_minimum_chunk() {
    // The cap is below the fixed cost: every step is over it, yet prefill progresses
    // one block (16 tokens) at a time.
    let mut sched = Scheduler::new(config(Some(1.0), true)).unwrap();
    sched
        .add(1, prompt(1, 40), 1, Priority::Interactive, 0)
        .unwrap();
    let sizes: Vec<usize> = (1..=3)
        .map(|now| step(&mut sched, now).seqs[0].num_tokens())
        .collect();
    assert_eq!(sizes, vec![16, 16, 8]);
    assert!(!sched.has_work() || sched.schedule(4).seqs.is_empty());
}

#[test]
fn max_num_batched_tokens_stays_a_hard_cap() {
    let mut sched = Scheduler::new(SchedulerConfig {
        max_num_batched_tokens: 64,
        ..config(Some(1e6), true)
    })
    .unwrap();
    sched
        .add(1, prompt(1, 500), 1, Priority::Interactive, 0)
        .unwrap();
    assert_eq!(sched.schedule(1).num_tokens(), 64);
}

#[test]
fn shortest_prompt_first_within_a_class_fim_still_before_chat() {
    // No cap; a budget of 64 tokens admits one prompt at a time, showing the order.
    let mut sched = Scheduler::new(SchedulerConfig {
        max_num_batched_tokens: 64,
        step_cost: None,
        ..config(None, true)
    })
    .unwrap();
    sched.add(1, prompt(1, 60), 1, Priority::Chat, 0).unwrap();
    sched.add(2, prompt(2, 8), 1, Priority::Chat, 1).unwrap();
    sched
        .add(3, prompt(3, 50), 1, Priority::Interactive, 2)
        .unwrap();
    sched
        .add(4, prompt(4, 40), 1, Priority::Interactive, 3)
        .unwrap();
    let mut order = Vec::new();
    for now in 10..20 {
        let plan = step(&mut sched, now);
        order.extend(plan.seqs.iter().filter(|s| s.reset).map(|s| s.seq_id));
    }
    // Interactive (40 before 50 — 50 gets the leftover 24 tokens of the first step),
    // then chat (8 before 60).
    assert_eq!(order, vec![4, 3, 2, 1]);

    let mut fifo = Scheduler::new(SchedulerConfig {
        max_num_batched_tokens: 64,
        step_cost: None,
        ..config(None, false)
    })
    .unwrap();
    fifo.add(1, prompt(1, 60), 1, Priority::Chat, 0).unwrap();
    fifo.add(2, prompt(2, 8), 1, Priority::Chat, 1).unwrap();
    let plan = step(&mut fifo, 10);
    assert_eq!(plan.seqs[0].seq_id, 1, "FIFO when shortest-first is off");
}

#[test]
fn aging_admits_a_long_prompt_despite_a_stream_of_short_ones() {
    // A 100-token prompt arrives every step (µs) and fills the step's 100-token budget;
    // the 150-token one (same class) is admitted once it has waited one aging interval.
    let aging = 50;
    let mut sched = Scheduler::new(SchedulerConfig {
        max_num_batched_tokens: 100,
        aging_interval_us: aging,
        step_cost: None,
        ..config(None, true)
    })
    .unwrap();
    sched
        .add(0, prompt(0, 150), 1, Priority::Interactive, 0)
        .unwrap();
    let mut admitted_at = None;
    for now in 0..200u64 {
        sched
            .add(
                1000 + now,
                prompt(1000 + now, 100),
                1,
                Priority::Interactive,
                now,
            )
            .unwrap();
        let plan = step(&mut sched, now);
        if plan.seqs.iter().any(|s| s.seq_id == 0 && s.reset) {
            admitted_at = Some(now);
            break;
        }
    }
    let at = admitted_at.expect("the long prompt is admitted");
    assert_eq!(at, aging, "admitted at {at}");
}

#[test]
fn the_auto_rule_is_a_512_token_chunk_and_binds_on_top_of_the_decodes() {
    let allowance = COST.auto_prefill_ms();
    assert_eq!(AUTO_PREFILL_TOKENS, 512);
    // 512 × 0.1205 = 61.7 ms, below 10 × the 10 ms fixed cost: the floor rules.
    assert_eq!(allowance, AUTO_PREFILL_FIXED_FACTOR * COST.fixed_ms);
    let cheap_steps = StepCost {
        fixed_ms: 1.0,
        ..COST
    };
    assert!((cheap_steps.auto_prefill_ms() - 512.0 * (0.12 + 0.0005)).abs() < 1e-9);
    // 40 decodes running (context 512) and a 2,000-token prompt: the step holds every
    // decode plus a chunk whose own predicted time is within the allowance — the
    // decodes do not eat into it, and it is not exceeded.
    let mut sched = Scheduler::new(SchedulerConfig {
        max_step_ms: None,
        max_prefill_ms: Some(allowance),
        ..config(None, true)
    })
    .unwrap();
    let now = running_decodes(&mut sched, 40, 512, 1000);
    sched
        .add(500, prompt(500, 2000), 4, Priority::Interactive, now)
        .unwrap();
    let plan = step(&mut sched, now + 1);
    let decodes = plan.seqs.iter().filter(|s| s.seq_id < 40).count();
    assert_eq!(decodes, 40, "every decode is scheduled");
    let chunk = plan
        .seqs
        .iter()
        .find(|s| s.seq_id == 500)
        .expect("admitted");
    let chunk_ms = COST.entry_ms(chunk.position, chunk.num_tokens());
    assert!(chunk_ms <= allowance + 1e-9, "{chunk_ms} > {allowance}");
    assert!(
        COST.entry_ms(chunk.position, chunk.num_tokens() + 1) > allowance,
        "the chunk ({} tokens) stops where the allowance does",
        chunk.num_tokens()
    );
}

#[test]
fn bad_cost_numbers_are_refused() {
    for bad in [
        SchedulerConfig {
            max_step_ms: Some(0.0),
            ..config(None, true)
        },
        SchedulerConfig {
            max_step_ms: Some(f64::NAN),
            ..config(None, true)
        },
        SchedulerConfig {
            step_cost: Some(StepCost {
                per_token_ms: -1.0,
                ..COST
            }),
            ..config(Some(50.0), true)
        },
    ] {
        assert!(matches!(
            Scheduler::new(bad),
            Err(SchedulerError::InvalidConfig(_))
        ));
    }
}

/// Outcome of a simulated burst: mean over the burst's requests.
#[derive(Debug)]
struct Burst {
    mean_ttft_ms: f64,
    mean_first_token_step: f64,
    /// Longest step while the burst was in prefill: what the running decodes wait.
    max_step_ms: f64,
    total_ms: f64,
}

/// Four decodes run (context ≥ 512, long outputs); then `prompts` arrive at once.
/// Time advances by each plan's predicted cost.
fn burst(config: SchedulerConfig, prompts: &[usize]) -> Burst {
    let mut sched = Scheduler::new(config).unwrap();
    for id in 0..4 {
        sched
            .add(id, prompt(id, 512), 10_000, Priority::Interactive, 0)
            .unwrap();
    }
    // Until all four decode (a capped config prefills them over several steps).
    let mut setup = 0;
    while step(&mut sched, 0).seqs.iter().any(|s| s.num_tokens() > 1) {
        setup += 1;
        assert!(setup < 100);
    }
    let start_ms = 0.0;
    for (i, &len) in prompts.iter().enumerate() {
        let id = 100 + i as SeqId;
        sched
            .add(id, prompt(id, len), 8, Priority::Interactive, 1)
            .unwrap();
    }
    let mut first: HashMap<SeqId, (usize, f64)> = HashMap::new();
    let (mut now_ms, mut steps, mut max_step_ms) = (start_ms, 0usize, 0.0f64);
    while first.len() < prompts.len() {
        let plan = step(&mut sched, 2 + steps as u64);
        let ms = COST.plan_ms(&plan);
        now_ms += ms;
        steps += 1;
        max_step_ms = max_step_ms.max(ms);
        for s in plan.seqs.iter().filter(|s| s.sample && s.seq_id >= 100) {
            first.entry(s.seq_id).or_insert((steps, now_ms));
        }
        assert!(steps < 10_000);
    }
    let n = prompts.len() as f64;
    Burst {
        mean_ttft_ms: first.values().map(|v| v.1).sum::<f64>() / n,
        mean_first_token_step: first.values().map(|v| v.0 as f64).sum::<f64>() / n,
        max_step_ms,
        total_ms: now_ms,
    }
}

#[test]
fn a_burst_of_sixteen_prompts_gets_first_tokens_sooner_with_the_cap() {
    let prompts = [512; 16];
    let without = burst(
        SchedulerConfig {
            step_cost: None,
            ..config(None, false)
        },
        &prompts,
    );
    eprintln!("16 x 512 burst, 4 decodes running (context 512)");
    eprintln!("  no cap, FIFO: {without:?}");
    // Caps relative to a full decode-only step at 16 sequences (context 513): the
    // auto rule is factor 4. The 16 new sequences decode too once they have a token,
    // so the step's overhead grows during the burst; a 10 ms fixed cost per step
    // makes small caps lose (more steps, each paying it).
    let decode_ms = COST.step_ms(16, 16 * 513);
    for factor in [2.0, 4.0, 8.0] {
        let cap = decode_ms * factor;
        let with = burst(config(Some(cap), true), &prompts);
        eprintln!("  cap {cap:.1} ms (decode step x {factor}) + SRPF: {with:?}");
        assert!(with.max_step_ms <= cap + 1e-9, "{with:?}");
        assert!(with.max_step_ms < without.max_step_ms / 7.0, "{with:?}");
        assert!(with.mean_first_token_step > without.mean_first_token_step);
        // The price: more steps, each paying the fixed cost, so the burst ends later.
        assert!(with.total_ms > without.total_ms, "{with:?}");
        if factor >= 4.0 {
            assert!(
                with.mean_ttft_ms < 0.95 * without.mean_ttft_ms,
                "mean TTFT {} vs {} ms",
                with.mean_ttft_ms,
                without.mean_ttft_ms
            );
        }
        if factor >= 8.0 {
            assert!(
                with.mean_ttft_ms < 0.85 * without.mean_ttft_ms,
                "mean TTFT {} vs {} ms",
                with.mean_ttft_ms,
                without.mean_ttft_ms
            );
        }
    }
}

#[test]
fn in_a_mixed_burst_shortest_first_cuts_mean_ttft() {
    // 8 long (2,048) and 8 short (128) prompts, interleaved in arrival order.
    let prompts: Vec<usize> = (0..16)
        .map(|i| if i % 2 == 0 { 2048 } else { 128 })
        .collect();
    let cap = 4.0 * COST.step_ms(16, 16 * 513);
    let fifo = burst(config(Some(cap), false), &prompts);
    let srpf = burst(config(Some(cap), true), &prompts);
    eprintln!("8 x 2048 + 8 x 128 burst, cap {cap:.1} ms");
    eprintln!("  cap, FIFO: {fifo:?}");
    eprintln!("  cap, SRPF: {srpf:?}");
    assert!(
        srpf.mean_ttft_ms < 0.8 * fifo.mean_ttft_ms,
        "mean TTFT {} vs {} ms",
        srpf.mean_ttft_ms,
        fifo.mean_ttft_ms
    );
}

#[test]
fn with_the_auto_allowance_a_burst_gets_first_tokens_sooner_and_decodes_keep_flowing() {
    let prompts = [512; 16];
    let without = burst(
        SchedulerConfig {
            step_cost: None,
            ..config(None, false)
        },
        &prompts,
    );
    let allowance = COST.auto_prefill_ms();
    let with = burst(
        SchedulerConfig {
            max_prefill_ms: Some(allowance),
            ..config(None, true)
        },
        &prompts,
    );
    eprintln!("16 x 512 burst, 4 decodes running: no cap {without:?}; auto allowance {allowance:.1} ms: {with:?}");
    // One 512-token prompt per step, shortest first: the i-th gets its first token
    // after about i steps instead of all after one long one.
    assert!(
        with.mean_ttft_ms < 0.75 * without.mean_ttft_ms,
        "mean TTFT {} vs {} ms",
        with.mean_ttft_ms,
        without.mean_ttft_ms
    );
    // A step is its decodes (at most 4 + 16) plus the allowance.
    let bound = COST.step_ms(20, 20 * 600) + allowance;
    assert!(with.max_step_ms <= bound, "{with:?} vs {bound}");
    assert!(with.max_step_ms < without.max_step_ms / 5.0, "{with:?}");
}
