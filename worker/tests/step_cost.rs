//! The step cost model a worker reports at `Init` predicts its own steps: a real CPU
//! worker service (over gRPC, in-memory transport) is initialized on the embedded
//! tiny checkpoint, then runs real requests' steps of shapes unlike the profiling
//! ones (multi-sequence prefill, chunks deep in a prompt, decode batches of 3 and
//! 12); each shape runs 5 times and its median `StepResult.elapsed_us` is compared
//! with `fixed + per_token × tokens + per_context_token × context_tokens`.
//!
//! The bound is honest for a noisy 2-core machine shared with other builds: the
//! median relative error over the shapes is below 50 %, and no shape is off by more
//! than a factor of 3. Load from other processes can change between the profile and
//! the steps, so up to 3 attempts are made (each a fresh Init, hence a fresh
//! profile); every attempt's numbers are printed. Seen here: median errors of
//! 14–27 % on most attempts, one of 68 % while a build beside it changed phase.

mod common;

use std::time::Duration;

use proto::v1::worker_client::WorkerClient;
use proto::v1::{InitRequest, SamplingParams, ScheduledSeq, StepCostModel, StepPlan, StepResult};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;
use worker::embedded::ensure_embedded_model;
use worker::profile::median;
use worker::service::{WorkerConfig, WorkerService};

const BLOCK_SIZE: u32 = 16;
const REPS: usize = 5;
/// Attempts (each a fresh Init, so a fresh profile) before the test fails: another
/// process's load can change between the profile and the steps that follow it.
const ATTEMPTS: usize = 3;

/// One worker's step stream.
struct Steps {
    tx: mpsc::Sender<StepPlan>,
    rx: Streaming<StepResult>,
    step: u64,
}

impl Steps {
    async fn run(&mut self, seqs: Vec<ScheduledSeq>) -> StepResult {
        self.step += 1;
        let plan = StepPlan {
            truncated: Vec::new(),
            step: self.step,
            seqs,
            freed: Vec::new(),
        };
        self.tx.send(plan).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(60), self.rx.message())
            .await
            .expect("a step reply within a minute")
            .unwrap()
            .expect("the stream stays open");
        assert!(r.error.is_empty(), "{}", r.error);
        r
    }
}

/// A sequence of the test: its id, blocks and cached tokens.
struct Seq {
    id: u64,
    table: Vec<u32>,
    cached: usize,
}

/// Hands out block ids from 1 (block 0 is the null block).
struct Blocks(u32);

impl Blocks {
    fn take(&mut self, n: usize) -> Vec<u32> {
        let start = self.0;
        self.0 += n as u32;
        (start..self.0).collect()
    }
}

/// The entry scheduling `n` new tokens of `seq` (a fresh sequence when `cached` is 0,
/// restarted with `reset` so a shape can be repeated), growing its table.
fn entry(seq: &mut Seq, n: usize, blocks: &mut Blocks, fresh: bool) -> ScheduledSeq {
    if fresh {
        seq.cached = 0;
    }
    let need = (seq.cached + n).div_ceil(BLOCK_SIZE as usize);
    let have = if fresh { 0 } else { seq.table.len() };
    let new_blocks = if fresh {
        // Reuse the sequence's own blocks; take more only when it grows past them.
        if seq.table.len() < need {
            let extra = blocks.take(need - seq.table.len());
            seq.table.extend(extra);
        }
        // Blocks past `need` are dropped from the table (the test never reuses them).
        seq.table.truncate(need);
        seq.table.clone()
    } else {
        let extra = blocks.take(need.saturating_sub(have));
        seq.table.extend(&extra);
        extra
    };
    let e = ScheduledSeq {
        num_drafts: 0,
        seq_id: seq.id,
        tokens: (0..n)
            .map(|i| ((i * 31 + seq.id as usize * 977 + seq.cached) % 30000 + 1000) as u32)
            .collect(),
        position_start: seq.cached as u32,
        new_blocks,
        sample: true,
        sampling: fresh.then(SamplingParams::default),
        reset: fresh,
    };
    seq.cached += n;
    e
}

fn predict(m: &StepCostModel, seqs: &[ScheduledSeq]) -> f64 {
    let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let context: usize = seqs
        .iter()
        .map(|s| s.position_start as usize + s.tokens.len())
        .sum();
    m.fixed_ms + m.per_token_ms * tokens as f64 + m.per_context_token_ms * context as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_workers_reported_step_cost_predicts_its_own_steps() {
    let model = ensure_embedded_model().unwrap();
    let mut client = common::connect(WorkerService::new(WorkerConfig::default())).await;
    let mut failures = Vec::new();
    for attempt in 1..=ATTEMPTS {
        match predict_own_steps(&mut client, &model).await {
            Ok(()) => return,
            Err(why) => {
                eprintln!("attempt {attempt}: {why}");
                failures.push(why);
            }
        }
    }
    panic!("no attempt within the bounds: {failures:?}");
}

/// One attempt: Init (which profiles), then the shapes; `Err` says which bound failed.
async fn predict_own_steps(
    client: &mut WorkerClient<Channel>,
    model: &std::path::Path,
) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let reply = client
        .init(InitRequest {
            model_path: model.display().to_string(),
            device: "cpu".into(),
            tp_world_size: 1,
            block_size: BLOCK_SIZE,
            max_kv_blocks: Some(1024),
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let init_s = t0.elapsed().as_secs_f64();
    let m = reply.step_cost.expect("a CPU worker reports its step cost");
    eprintln!("init {init_s:.2} s; step cost {m:?}");
    assert!(m.per_token_ms > 0.0, "{m:?}");
    assert!(m.fixed_ms >= 0.0 && m.per_context_token_ms >= 0.0, "{m:?}");
    assert!(m.shapes >= 4, "{m:?}");

    let (tx, rx) = mpsc::channel(4);
    let results = client
        .steps(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Steps {
        tx,
        rx: results,
        step: 0,
    };
    let mut blocks = Blocks(1);
    let mut seqs: Vec<Seq> = (1..=12)
        .map(|id| Seq {
            id,
            table: Vec::new(),
            cached: 0,
        })
        .collect();

    // (name, how to build the step) — each built and timed REPS times.
    type Build = fn(&mut [Seq], &mut Blocks) -> Vec<ScheduledSeq>;
    let shapes: [(&str, Build); 5] = [
        ("prefill 1×40", |s, b| vec![entry(&mut s[0], 40, b, true)]),
        ("prefill 3×12", |s, b| {
            s[..3].iter_mut().map(|q| entry(q, 12, b, true)).collect()
        }),
        ("chunk 24 after 200", |s, b| {
            // 200 tokens of prompt are "prefix-cached" (positions start past them).
            let q = &mut s[3];
            q.cached = 0;
            let mut e = entry(q, 224, b, true);
            e.tokens.drain(..200);
            e.position_start = 200;
            vec![e]
        }),
        ("decode 3 at 12–40", |s, b| {
            s[..3].iter_mut().map(|q| entry(q, 1, b, false)).collect()
        }),
        ("decode 12 at 224–300", |s, b| {
            s.iter_mut().map(|q| entry(q, 1, b, false)).collect()
        }),
    ];
    // Give the decoders of the last shape a context first: 300 tokens each, chunked.
    for q in seqs.iter_mut().skip(4) {
        let first = entry(q, 150, &mut blocks, true);
        steps.run(vec![first]).await;
        let second = entry(q, 150, &mut blocks, false);
        steps.run(vec![second]).await;
    }
    let mut errors = Vec::new();
    for (name, build) in shapes {
        let mut measured = Vec::new();
        let mut predicted = 0.0;
        for _ in 0..REPS {
            let plan = build(&mut seqs, &mut blocks);
            predicted = predict(&m, &plan);
            let r = steps.run(plan).await;
            measured.push(r.elapsed_us as f64 / 1e3);
        }
        let ms = median(&mut measured);
        let err = (predicted - ms).abs() / ms;
        eprintln!("{name}: measured {ms:.2} ms (median of {REPS}), predicted {predicted:.2} ms, error {:.0} %", err * 100.0);
        if !(predicted < 3.0 * ms && ms < 3.0 * predicted) {
            return Err(format!(
                "{name}: predicted {predicted:.2} ms, measured {ms:.2} ms"
            ));
        }
        errors.push(err);
    }
    let med = median(&mut errors);
    eprintln!("median relative error {:.0} %", med * 100.0);
    if med < 0.5 {
        Ok(())
    } else {
        Err(format!("median relative error {med:.2}"))
    }
}
