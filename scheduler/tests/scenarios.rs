//! How the scheduler behaves, one situation per test, driven the way the engine loop
//! drives it: `schedule(now)`, (the workers compute), `update(plan, sampled, stopped)`.

use scheduler::{
    FinishReason, Priority, ScheduledSeq, Scheduler, SchedulerConfig, SchedulerError, SeqId,
    StepPlan, NULL_BLOCK,
};

/// The token a test "model" samples for `seq` as its `n`-th generated token.
fn token_for(seq: SeqId, n: usize) -> u32 {
    1_000 + seq as u32 * 100 + n as u32
}

/// Samples every entry that asks for it, stops nothing; returns what ended.
fn step(
    sched: &mut Scheduler,
    now: u64,
    generated: &mut std::collections::HashMap<SeqId, usize>,
) -> (StepPlan, Vec<(SeqId, FinishReason)>) {
    let plan = sched.schedule(now);
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| {
            let n = generated.entry(s.seq_id).or_default();
            *n += 1;
            (s.seq_id, token_for(s.seq_id, *n - 1))
        })
        .collect();
    let finished = sched.update(&plan, &sampled, &[]);
    (plan, finished)
}

fn entry(plan: &StepPlan, id: SeqId) -> Option<&ScheduledSeq> {
    plan.seqs.iter().find(|s| s.seq_id == id)
}

fn config(num_blocks: usize, block_size: usize, budget: usize) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks,
        block_size,
        max_num_batched_tokens: budget,
        ..SchedulerConfig::default()
    }
}

#[test]
fn keystroke_session_reuses_every_full_block_of_the_previous_prompt() {
    // An IDE sends one completion request per keystroke; each prompt is the previous
    // one plus a few tokens, and the stale request is aborted.
    let mut sched = Scheduler::new(config(64, 16, 8192)).unwrap();
    let mut generated = Default::default();
    let mut prompt: Vec<u32> = (0..100).collect();
    sched
        .add(0, prompt.clone(), 16, Priority::Interactive, 0)
        .unwrap();
    let (plan, _) = step(&mut sched, 0, &mut generated);
    assert_eq!(
        (plan.seqs[0].position, plan.seqs[0].num_tokens()),
        (0, 100),
        "cold start computes everything"
    );

    for keystroke in 1..=20u64 {
        let now = keystroke * 80_000;
        let previous_len = prompt.len();
        let previous_table = sched.block_table(keystroke - 1).unwrap().to_vec();
        assert!(sched.abort(keystroke - 1));
        prompt.extend([7, 8, 9]);
        sched
            .add(keystroke, prompt.clone(), 16, Priority::Interactive, now)
            .unwrap();

        let (plan, _) = step(&mut sched, now, &mut generated);
        assert_eq!(
            plan.freed,
            vec![keystroke - 1],
            "workers drop the stale request"
        );
        let e = entry(&plan, keystroke).unwrap();
        let reused = previous_len / 16;
        assert!(e.reset);
        assert_eq!(
            e.position,
            reused * 16,
            "every full block of the previous prompt is skipped"
        );
        assert_eq!(
            plan.new_blocks(e)[..reused],
            previous_table[..reused],
            "and they are the same blocks"
        );
        assert_eq!(plan.tokens(e), &prompt[reused * 16..]);
    }
    let c = sched.counters();
    assert!(c.prefix_hit_rate() > 0.8, "{c:?}");
}

#[test]
fn a_long_prompt_is_chunked_and_decodes_keep_running_every_step() {
    let budget = 64;
    let mut sched = Scheduler::new(config(256, 16, budget)).unwrap();
    let mut generated = Default::default();
    sched
        .add(1, vec![1; 10], 100, Priority::Interactive, 0)
        .unwrap();
    sched
        .add(2, vec![2; 10], 100, Priority::Interactive, 0)
        .unwrap();
    step(&mut sched, 0, &mut generated);

    sched
        .add(3, (0..1000).collect(), 4, Priority::Interactive, 1)
        .unwrap();
    let mut prefilled = 0;
    let mut steps = 0;
    while prefilled < 1000 {
        let (plan, _) = step(&mut sched, 2 + steps, &mut generated);
        steps += 1;
        assert!(plan.num_tokens() <= budget);
        for decode in [1, 2] {
            assert_eq!(
                entry(&plan, decode).unwrap().num_tokens(),
                1,
                "decode {decode} runs in step {steps}"
            );
        }
        assert_eq!(
            plan.seqs[2].seq_id, 3,
            "decodes first, then the prefill chunk"
        );
        let chunk = entry(&plan, 3).unwrap();
        assert_eq!(chunk.position, prefilled);
        assert_eq!(chunk.num_tokens(), (budget - 2).min(1000 - prefilled));
        prefilled += chunk.num_tokens();
        assert_eq!(
            chunk.sample,
            prefilled == 1000,
            "only the last chunk samples"
        );
    }
    assert_eq!(steps, 1000u64.div_ceil(62));
}

#[test]
fn a_high_priority_arrival_preempts_a_low_priority_sequence_which_later_finishes_whole() {
    // 12 usable blocks of 4 tokens: room for 48 tokens.
    let mut sched = Scheduler::new(config(13, 4, 64)).unwrap();
    let mut generated = std::collections::HashMap::new();
    let batch_prompt: Vec<u32> = (0..16).collect();
    sched
        .add(10, batch_prompt.clone(), 20, Priority::Batch, 0)
        .unwrap();
    for now in 0..8 {
        step(&mut sched, now, &mut generated);
    }
    assert_eq!(
        sched.block_table(10).unwrap().len(),
        6,
        "8 tokens generated, 23 computed: 6 blocks"
    );

    // An interactive request needs 8 blocks; only 6 are free.
    sched
        .add(20, vec![5; 30], 2, Priority::Interactive, 8)
        .unwrap();
    let (plan, _) = step(&mut sched, 8, &mut generated);
    assert_eq!(
        plan.freed,
        vec![10],
        "the batch sequence is preempted by recompute"
    );
    assert!(entry(&plan, 10).is_none());
    let e = entry(&plan, 20).unwrap();
    assert!(e.reset && e.sample && e.num_tokens() == 30);
    assert_eq!(sched.block_table(10), Some(&[][..]), "its blocks are freed");
    assert_eq!(sched.counters().preemptions, 1);

    // The interactive request finishes; the batch one comes back and recomputes.
    let mut finished = Vec::new();
    let mut readmitted = None;
    for now in 9..100 {
        let (plan, done) = step(&mut sched, now, &mut generated);
        if let Some(e) = entry(&plan, 10).filter(|e| e.reset) {
            readmitted = Some((e.position, plan.tokens(e).to_vec()));
        }
        finished.extend(done);
        if !sched.has_work() {
            break;
        }
    }
    let (position, tokens) = readmitted.expect("the batch sequence is re-admitted");
    let expected: Vec<u32> = batch_prompt
        .iter()
        .copied()
        .chain((0..8).map(|n| token_for(10, n)))
        .collect();
    assert_eq!(
        tokens,
        expected[position..],
        "it recomputes its prompt and the 8 tokens it had"
    );
    assert_eq!(
        finished,
        vec![(20, FinishReason::Length), (10, FinishReason::Length)]
    );
    assert_eq!(
        generated[&10], 20,
        "the preempted sequence generated exactly max_tokens"
    );
    assert_eq!(sched.counters().blocks_free, 12);
}

#[test]
fn abort_frees_blocks_within_the_call_and_the_next_plan_tells_the_workers() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    sched.add(1, vec![3; 10], 5, Priority::Chat, 0).unwrap();
    sched.add(2, vec![4; 10], 5, Priority::Chat, 0).unwrap();
    let plan = sched.schedule(0);
    sched.update(&plan, &[(1, 9), (2, 9)], &[]);
    assert_eq!(sched.counters().blocks_used, 6);

    assert!(sched.abort(1));
    assert_eq!(sched.counters().blocks_used, 3, "freed at once");
    assert_eq!(sched.block_table(1), None);
    assert!(!sched.abort(1), "a second abort finds nothing");
    assert_eq!(sched.schedule(1).freed, vec![1]);
}

#[test]
fn a_plan_the_workers_rejected_is_dropped_after_aborting_its_sequences() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    sched.add(1, vec![3; 10], 5, Priority::Chat, 0).unwrap();
    sched.add(2, vec![4; 10], 5, Priority::Chat, 0).unwrap();
    let rejected = sched.schedule(0);
    for s in &rejected.seqs {
        assert!(sched.abort(s.seq_id));
    }
    assert_eq!(sched.counters().blocks_free, 31);
    let next = sched.schedule(1);
    assert!(next.seqs.is_empty());
    assert_eq!(
        next.freed,
        vec![1, 2],
        "workers drop whatever they kept of them"
    );
    assert!(!sched.has_work());
}

#[test]
fn a_request_aborted_while_waiting_never_reaches_the_workers() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    sched.add(1, vec![3; 10], 5, Priority::Chat, 0).unwrap();
    assert!(sched.abort(1));
    assert!(!sched.has_work());
    assert!(sched.schedule(0).is_empty());
}

#[test]
fn a_stop_reported_by_the_caller_ends_the_sequence() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    sched.add(1, vec![3; 10], 50, Priority::Chat, 0).unwrap();
    let plan = sched.schedule(0);
    assert_eq!(
        sched.update(&plan, &[(1, 2)], &[1]),
        vec![(1, FinishReason::Stopped)]
    );
    assert_eq!(sched.counters().blocks_used, 0);
    assert_eq!(sched.schedule(1).freed, vec![1]);
}

#[test]
fn length_ends_a_sequence_at_max_tokens() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    let mut generated = Default::default();
    sched.add(1, vec![3; 5], 3, Priority::Chat, 0).unwrap();
    let ends: Vec<_> = (0..3)
        .map(|now| step(&mut sched, now, &mut generated).1)
        .collect();
    assert_eq!(ends, vec![vec![], vec![], vec![(1, FinishReason::Length)]]);
}

#[test]
fn a_sampled_token_that_never_came_back_is_recomputed() {
    let mut sched = Scheduler::new(config(32, 4, 64)).unwrap();
    sched.add(1, vec![3; 6], 5, Priority::Chat, 0).unwrap();
    let plan = sched.schedule(0);
    assert!(sched.update(&plan, &[], &[]).is_empty());
    let plan = sched.schedule(1);
    assert_eq!(
        (
            plan.seqs[0].position,
            plan.tokens(&plan.seqs[0]),
            plan.seqs[0].sample
        ),
        (5, &[3][..], true)
    );
}

#[test]
fn interactive_goes_before_chat_before_batch_fifo_within_a_class() {
    // A budget of one prompt per step shows the admission order.
    let mut sched = Scheduler::new(config(64, 4, 8)).unwrap();
    sched.add(1, vec![1; 8], 1, Priority::Batch, 0).unwrap();
    sched.add(2, vec![1; 8], 1, Priority::Chat, 1).unwrap();
    sched
        .add(3, vec![2; 8], 1, Priority::Interactive, 2)
        .unwrap();
    sched
        .add(4, vec![3; 8], 1, Priority::Interactive, 3)
        .unwrap();
    let mut order = Vec::new();
    for now in 10..20 {
        let plan = sched.schedule(now);
        order.extend(plan.seqs.iter().filter(|s| s.reset).map(|s| s.seq_id));
        let sampled: Vec<_> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.seq_id, 0))
            .collect();
        sched.update(&plan, &sampled, &[]);
    }
    assert_eq!(order, vec![3, 4, 2, 1]);
}

#[test]
fn aging_lets_an_old_batch_request_overtake_fresh_interactive_ones() {
    let aging = 1_000_000;
    let mut sched = Scheduler::new(SchedulerConfig {
        aging_interval_us: aging,
        ..config(64, 4, 8)
    })
    .unwrap();
    sched.add(1, vec![1; 8], 1, Priority::Batch, 0).unwrap();
    // Batch is two classes down; after 3 intervals it ranks above a fresh interactive.
    let now = 3 * aging;
    sched
        .add(2, vec![2; 8], 1, Priority::Interactive, now)
        .unwrap();
    let plan = sched.schedule(now);
    assert_eq!(
        plan.seqs.iter().map(|s| s.seq_id).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn admission_errors_map_to_429_and_400() {
    let mut sched = Scheduler::new(SchedulerConfig {
        max_waiting: 2,
        max_model_len: 100,
        ..config(64, 4, 8)
    })
    .unwrap();
    assert_eq!(
        sched.add(1, vec![0; 100], 10, Priority::Chat, 0),
        Err(SchedulerError::PromptTooLong {
            prompt_tokens: 100,
            limit: 99
        }),
        "a prompt needs room for one generated token"
    );
    sched.add(1, vec![0; 99], 10, Priority::Chat, 0).unwrap();
    sched.add(2, vec![0; 10], 10, Priority::Chat, 0).unwrap();
    assert_eq!(
        sched.add(3, vec![0; 10], 10, Priority::Chat, 0),
        Err(SchedulerError::QueueFull)
    );
    assert_eq!(
        sched.add(2, vec![0; 10], 10, Priority::Chat, 0),
        Err(SchedulerError::DuplicateSeq(2))
    );
    assert_eq!(
        sched.add(4, vec![], 10, Priority::Chat, 0),
        Err(SchedulerError::EmptyPrompt)
    );
    assert_eq!(
        sched.add(4, vec![1], 0, Priority::Chat, 0),
        Err(SchedulerError::ZeroMaxTokens)
    );
}

#[test]
fn a_prompt_longer_than_the_whole_kv_cache_is_rejected() {
    // 8 usable blocks of 4 tokens hold 32 tokens: 31 prompt tokens at most.
    let mut sched = Scheduler::new(config(9, 4, 64)).unwrap();
    assert_eq!(sched.token_limit(), 32);
    assert_eq!(
        sched.add(1, vec![0; 32], 1, Priority::Chat, 0),
        Err(SchedulerError::PromptTooLong {
            prompt_tokens: 32,
            limit: 31
        })
    );
    sched.add(1, vec![0; 31], 100, Priority::Chat, 0).unwrap();
    let mut generated = Default::default();
    let finished: Vec<_> = (0..3)
        .flat_map(|now| step(&mut sched, now, &mut generated).1)
        .collect();
    assert_eq!(
        finished,
        vec![(1, FinishReason::Length)],
        "max_tokens is clamped to what fits"
    );
}

#[test]
fn sliding_window_releases_blocks_wholly_outside_the_window() {
    let mut sched = Scheduler::new(SchedulerConfig {
        sliding_window: Some(8),
        ..config(64, 4, 16)
    })
    .unwrap();
    let mut generated = Default::default();
    sched
        .add(1, (0..40).collect(), 4, Priority::Chat, 0)
        .unwrap();
    for now in 0..4 {
        step(&mut sched, now, &mut generated);
    }
    // The prompt took 3 steps; the decode at position 40 read positions 33..=40.
    let table = sched.block_table(1).unwrap();
    assert_eq!(table.len(), 11);
    assert!(table[..8].iter().all(|&b| b == NULL_BLOCK), "{table:?}");
    assert!(table[8..].iter().all(|&b| b != NULL_BLOCK), "{table:?}");
    assert_eq!(sched.counters().blocks_used, 3);
}

#[test]
fn invalid_configs_are_refused() {
    for bad in [
        SchedulerConfig {
            num_blocks: 1,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            block_size: 0,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            max_num_batched_tokens: 0,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            max_num_seqs: 0,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            sliding_window: Some(0),
            ..SchedulerConfig::default()
        },
    ] {
        assert!(matches!(
            Scheduler::new(bad),
            Err(SchedulerError::InvalidConfig(_))
        ));
    }
}

#[test]
fn a_draft_is_verified_in_one_step_and_its_rejected_positions_are_rolled_back() {
    // Block size 4; a 6-token prompt decodes at position 6 with 5 drafts, which need
    // positions 6..12: blocks 1 and 2 (block 0 holds positions 0..4).
    let mut sched = Scheduler::new(config(16, 4, 64)).unwrap();
    sched
        .add(0, vec![9, 8, 7, 6, 5, 4], 32, Priority::Interactive, 0)
        .unwrap();
    let plan = sched.schedule(0);
    sched.update(&plan, &[(0, 3)], &[]);
    let free_before = sched.pool().num_free();
    assert!(sched.set_draft(0, &[10, 11, 12, 13, 14]));
    let plan = sched.schedule(1);
    let e = &plan.seqs[0];
    assert_eq!((e.position, e.num_tokens(), e.num_drafts()), (6, 6, 5));
    assert_eq!(plan.tokens(e), &[3]);
    assert_eq!(plan.drafts(e), &[10, 11, 12, 13, 14]);
    assert_eq!(
        sched.block_table(0).unwrap().len(),
        3,
        "blocks for every draft"
    );
    // Two drafts accepted, then the token that replaces the third; a stray token after
    // the mismatch is ignored.
    let finished = sched.update(&plan, &[(0, 10), (0, 11), (0, 99), (0, 13)], &[]);
    assert!(finished.is_empty());
    // Committed: 6 prompt + 3 + 10 + 11 have KV (positions 0..9), 99 waits at 9.
    assert_eq!(
        sched.block_table(0).unwrap().len(),
        3,
        "positions 0..9 need 3 blocks"
    );
    let plan = sched.schedule(2);
    assert_eq!(plan.truncated, vec![]);
    let e = &plan.seqs[0];
    assert_eq!((e.position, plan.tokens(e)), (9, &[99][..]));
    // Now every draft is rejected: the table is cut back to what position 10 needs.
    sched.update(&plan, &[(0, 5)], &[]);
    assert!(sched.set_draft(0, &[1, 2, 3, 4, 5, 6, 7, 8]));
    let plan = sched.schedule(3);
    assert_eq!(plan.seqs[0].num_drafts(), 8);
    assert_eq!(sched.block_table(0).unwrap().len(), 5, "positions 10..19");
    sched.update(&plan, &[(0, 42)], &[]);
    assert_eq!(sched.block_table(0).unwrap().len(), 3);
    assert_eq!(
        sched.pool().num_free(),
        free_before - 1,
        "one block more than before the drafts"
    );
    let plan = sched.schedule(4);
    assert_eq!(plan.truncated, vec![(0, 3)], "workers learn the cut");
    assert_eq!((plan.seqs[0].position, plan.seqs[0].num_drafts()), (11, 0));
}

#[test]
fn drafts_stop_at_max_tokens_and_leave_budget_for_other_decodes() {
    let mut sched = Scheduler::new(config(64, 4, 3)).unwrap();
    for id in 0..2 {
        sched.add(id, vec![1], 4, Priority::Interactive, 0).unwrap();
    }
    let plan = sched.schedule(0);
    sched.update(&plan, &[(0, 1), (1, 1)], &[]);
    sched.set_draft(0, &[5, 5, 5, 5, 5]);
    let plan = sched.schedule(1);
    // Budget 3: one token kept for sequence 1, so one draft for sequence 0.
    assert_eq!(
        plan.seqs.iter().map(|e| e.num_drafts()).collect::<Vec<_>>(),
        vec![1, 0]
    );
    sched.update(&plan, &[(0, 5), (0, 6), (1, 2)], &[]);
    // Sequence 0 generated 3 of 4: no draft fits, whatever the budget.
    sched.set_draft(0, &[7, 7]);
    let plan = sched.schedule(2);
    assert_eq!(entry(&plan, 0).unwrap().num_drafts(), 0);
    let finished = sched.update(&plan, &[(0, 7), (1, 3)], &[]);
    assert_eq!(finished, vec![(0, scheduler::FinishReason::Length)]);
}
