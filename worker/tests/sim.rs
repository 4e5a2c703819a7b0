//! The sim backend through the real gRPC worker service (in-memory transport): it
//! loads no weights, reports the modelled KV capacity, checks and mirrors plans as the
//! CPU backend does, answers plausible tokens on rank 0 only, lasts at least the
//! modelled step time, and labels its times as modelled.

mod common;

use std::time::Instant;

use proto::v1::worker_client::WorkerClient;
use proto::v1::{
    HealthRequest, InitReply, InitRequest, SamplingParams, ScheduledSeq, StepPlan, StepResult,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use worker::service::{WorkerConfig, WorkerService};
use worker::sim::{GpuKind, SeqWork, StepTimeModel};
use worker::ModelConfig;

async fn connect() -> WorkerClient<Channel> {
    common::connect(WorkerService::new(WorkerConfig::default())).await
}

fn sim_init(model: &str, device: &str, tp: u32, rank: u32) -> InitRequest {
    InitRequest {
        model_path: model.into(),
        device: device.into(),
        tp_world_size: tp,
        rank,
        block_size: 16,
        // A CPU budget: the sim sizes its cache from the modelled GPU instead.
        kv_cache_bytes: 512 << 20,
        // The coordinator's defaults.
        max_num_batched_tokens: 8192,
        max_num_seqs: 256,
        ..Default::default()
    }
}

/// One rank's step stream.
struct Rank {
    tx: mpsc::Sender<StepPlan>,
    rx: tonic::Streaming<StepResult>,
}

impl Rank {
    async fn open(c: &mut WorkerClient<Channel>) -> Rank {
        let (tx, prx) = mpsc::channel(4);
        let rx = c
            .steps(ReceiverStream::new(prx))
            .await
            .unwrap()
            .into_inner();
        Rank { tx, rx }
    }

    async fn run(&mut self, plan: StepPlan) -> StepResult {
        self.tx.send(plan).await.unwrap();
        self.rx.message().await.unwrap().unwrap()
    }
}

fn seq(id: u64, tokens: Vec<u32>, position: u32, blocks: Vec<u32>, first: bool) -> ScheduledSeq {
    ScheduledSeq {
        num_drafts: 0,
        seq_id: id,
        tokens,
        position_start: position,
        new_blocks: blocks,
        sample: true,
        sampling: first.then(SamplingParams::default),
        reset: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sim_group_mirrors_plans_answers_on_rank_0_and_lasts_the_modelled_time() {
    let model = "synthetic:codestral-22b";
    let (mut c0, mut c1) = (connect().await, connect().await);
    let r0: InitReply = c0
        .init(sim_init(model, "sim:h100", 2, 0))
        .await
        .unwrap()
        .into_inner();
    let r1 = c1
        .init(sim_init(model, "sim:h100", 2, 1))
        .await
        .unwrap()
        .into_inner();
    let m = StepTimeModel::new(ModelConfig::codestral_22b(), GpuKind::H100.spec(), 2).unwrap();
    let capacity = m.kv_capacity_blocks(16, 0.9, 8192, 256).unwrap();
    assert_eq!(u64::from(r0.num_kv_blocks), capacity);
    assert_eq!(r1.num_kv_blocks, r0.num_kv_blocks);
    assert!(r0.num_kv_blocks > 20_000, "{r0:?}");
    assert_eq!(r0.kv_bytes_per_block, m.kv_bytes_per_block(16));
    let facts = r0.model.unwrap();
    assert_eq!(
        (
            facts.n_layers,
            facts.max_position_embeddings,
            facts.eos_token_id
        ),
        (56, 32768, 2)
    );
    let h = c0.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(h.initialized && h.detail.contains("modelled"), "{h:?}");

    let (mut s0, mut s1) = (Rank::open(&mut c0).await, Rank::open(&mut c1).await);
    // A 40-token prompt over three blocks, then decodes.
    let prompt: Vec<u32> = (0..40).map(|i| 1000 + i).collect();
    let mut plan = StepPlan {
        truncated: Vec::new(),
        step: 1,
        seqs: vec![seq(7, prompt, 0, vec![1, 2, 3], true)],
        freed: vec![],
    };
    let mut cached = 0u32;
    let mut last_token = 0u32;
    for step in 1..=6u64 {
        plan.step = step;
        let work: Vec<SeqWork> = plan
            .seqs
            .iter()
            .map(|s| SeqWork {
                new_tokens: s.tokens.len() as u32,
                cached: s.position_start,
                sample: s.sample,
            })
            .collect();
        let modelled_us = m.step(&work).total_us;
        let t = Instant::now();
        let (a, b) = tokio::join!(s0.run(plan.clone()), s1.run(plan.clone()));
        let wall = t.elapsed().as_secs_f64() * 1e6;
        assert!(a.error.is_empty() && b.error.is_empty(), "{a:?} {b:?}");
        assert_eq!((a.step, b.step, a.rank, b.rank), (step, step, 0, 1));
        // Every rank lasts at least the modelled time (both sleep in parallel).
        assert!(
            a.elapsed_us as f64 >= modelled_us - 1.0,
            "{a:?} vs {modelled_us}"
        );
        assert!(
            b.elapsed_us as f64 >= modelled_us - 1.0,
            "{b:?} vs {modelled_us}"
        );
        assert!(wall >= modelled_us);
        assert_eq!(a.tokens.len(), 1);
        assert!(b.tokens.is_empty(), "only rank 0 samples");
        let tok = a.tokens[0].token_id;
        assert!(
            (1000..31000).contains(&tok),
            "a plausible, non-control token: {tok}"
        );
        assert_ne!(tok, last_token);
        last_token = tok;
        cached += plan.seqs[0].tokens.len() as u32;
        plan.seqs = vec![seq(7, vec![tok], cached, vec![], false)];
        if cached % 16 == 0 {
            plan.seqs[0].new_blocks = vec![4 + cached / 16];
        }
    }
    // Checked like the CPU backend: a wrong position is refused on every rank and
    // changes nothing; the right one still runs afterwards.
    let bad = StepPlan {
        truncated: Vec::new(),
        step: 7,
        seqs: vec![seq(7, vec![1234], cached + 3, vec![], false)],
        freed: vec![],
    };
    let (a, b) = tokio::join!(s0.run(bad.clone()), s1.run(bad));
    assert!(a.error.contains("position_start") && b.error.contains("position_start"));
    let beyond = StepPlan {
        truncated: Vec::new(),
        step: 8,
        seqs: vec![seq(9, vec![5], 0, vec![r0.num_kv_blocks], true)],
        freed: vec![],
    };
    let a = s0.run(beyond).await;
    assert!(a.error.contains("outside the KV cache"), "{a:?}");
    let _ = s1
        .run(StepPlan {
            truncated: Vec::new(),
            step: 8,
            ..Default::default()
        })
        .await;
    let good = StepPlan {
        truncated: Vec::new(),
        step: 9,
        seqs: vec![seq(7, vec![1234], cached, vec![], false)],
        freed: vec![],
    };
    let (a, b) = tokio::join!(s0.run(good.clone()), s1.run(good));
    assert!(a.error.is_empty() && b.error.is_empty(), "{a:?} {b:?}");
}

/// The tiny model on the CPU is served by the cpu backend, whose times are measured;
/// on a sim device the same shape gets the modelled H100 time and the label, and no
/// weight file is opened (the directory holds none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_reads_only_the_config_and_labels_its_times_modelled() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("params.json"),
        ModelConfig::tiny().to_params_json(),
    )
    .unwrap();
    let path = dir.path().display().to_string();
    let mut c = connect().await;
    // The cpu backend needs weights; the directory has none.
    let e = c
        .init(InitRequest {
            device: "cpu".into(),
            ..sim_init(&path, "cpu", 1, 0)
        })
        .await
        .unwrap_err();
    assert!(!e.message().is_empty());
    // A weightless shape is refused by every backend but the sim.
    let e = c
        .init(sim_init("synthetic:tiny", "null", 1, 0))
        .await
        .unwrap_err();
    assert!(e.message().contains("only a sim device"), "{e:?}");
    // There is no CPU in the GPU table: CPU timings are never modelled.
    let e = c.init(sim_init(&path, "sim:cpu", 1, 0)).await.unwrap_err();
    assert!(e.message().contains("never modelled"), "{e:?}");
    let e = c.init(sim_init(&path, "sim:h100", 1, 0)).await;
    let reply = e.unwrap().into_inner();
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(
        h.detail.contains("sim:h100") && h.detail.contains("not measured"),
        "{h:?}"
    );
    let m = StepTimeModel::new(ModelConfig::tiny(), GpuKind::H100.spec(), 1).unwrap();
    assert_eq!(
        u64::from(reply.num_kv_blocks),
        m.kv_capacity_blocks(16, 0.9, 8192, 256).unwrap()
    );
    let mut s = Rank::open(&mut c).await;
    let prompt: Vec<u32> = (0..256).map(|i| 1000 + i).collect();
    let blocks: Vec<u32> = (1..=16).collect();
    let r = s
        .run(StepPlan {
            truncated: Vec::new(),
            step: 1,
            seqs: vec![seq(1, prompt, 0, blocks, true)],
            freed: vec![],
        })
        .await;
    assert!(r.error.is_empty(), "{r:?}");
    let modelled = m
        .step(&[SeqWork {
            new_tokens: 256,
            cached: 0,
            sample: true,
        }])
        .total_us;
    assert!(r.elapsed_us as f64 >= modelled - 1.0, "{r:?} vs {modelled}");
}

/// The sim reports a fit of its own model: decode steps and prefill chunks across the
/// range the scheduler uses are predicted within 35 % of the modelled time (the model
/// is a roofline, not a line, so the fit cannot be exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sim_worker_reports_a_linear_fit_of_its_modelled_step_time() {
    let mut c = connect().await;
    let r = c
        .init(sim_init("synthetic:codestral-22b", "sim:h100", 1, 0))
        .await
        .unwrap()
        .into_inner();
    let cost = r.step_cost.expect("a sim worker reports its step cost");
    eprintln!("sim:h100 codestral-22b TP 1: {cost:?}");
    assert!(cost.fixed_ms > 0.0 && cost.per_token_ms > 0.0, "{cost:?}");
    let m = StepTimeModel::new(ModelConfig::codestral_22b(), GpuKind::H100.spec(), 1).unwrap();
    for (seqs, cached, tokens) in [(64, 2048, 1), (256, 4096, 1), (1, 0, 2048), (1, 4096, 512)] {
        let work = vec![
            SeqWork {
                new_tokens: tokens,
                cached,
                sample: true,
            };
            seqs
        ];
        let modelled = m.step(&work).total_us / 1e3;
        let n = seqs as f64;
        let predicted = cost.fixed_ms
            + cost.per_token_ms * n * f64::from(tokens)
            + cost.per_context_token_ms * n * f64::from(cached + tokens);
        let err = (predicted - modelled).abs() / modelled;
        assert!(
            err < 0.35,
            "{seqs}×{tokens} at {cached}: fit {predicted:.1} ms, model {modelled:.1} ms"
        );
    }
}
