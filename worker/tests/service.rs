//! The gRPC worker service end to end, in one process: clients talk to services over
//! in-memory duplex transports; TP = 2 ranks are two services joined by the real TCP
//! collective on loopback. A small "coordinator" below builds plans the way the
//! engine loop does (chunked prefill, block-table diffs, freeing, preemption).

mod checkpoints;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoints::small_config;
use proto::v1::collective_bootstrap::Kind;
use proto::v1::worker_client::WorkerClient;
use proto::v1::{
    CollectiveBootstrap, HealthRequest, InitReply, InitRequest, SampledToken, SamplingParams,
    ScheduledSeq, StepPlan, StepResult, TcpPeers,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::CpuModel;
use worker::safetensors_io::StoredDtype;
use worker::service::{run_worker, WorkerConfig, WorkerService};
use worker::CheckpointFormat;

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: u32 = 64;
const CHUNK: usize = 5;

fn synth(dir: &Path) -> PathBuf {
    checkpoints::synth(
        dir,
        small_config(None),
        CheckpointFormat::Mistral,
        StoredDtype::F32,
        3,
    );
    dir.to_path_buf()
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13 + salt * 101) % 1024) as u32)
        .collect()
}

/// Greedy tokens of the in-process reference (TP = 1, ranks as threads).
fn reference(model: &Path, prompt: &[u32], n_new: usize) -> Vec<u32> {
    let ckpt = Checkpoint::open(model).unwrap();
    let mut g = LocalTpGroup::load(&ckpt, 1, NUM_BLOCKS as usize, BLOCK_SIZE).unwrap();
    g.generate_greedy(prompt, n_new, CHUNK).unwrap().0
}

fn test_config() -> WorkerConfig {
    WorkerConfig {
        collective_connect_timeout: Duration::from_secs(20),
        collective_op_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Loopback addresses that were free a moment ago.
fn free_addrs(n: usize) -> Vec<String> {
    let ls: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

fn init_request(model: &Path, tp: u32, rank: u32, peers: &[String], group_id: u64) -> InitRequest {
    let per_block =
        CpuModel::kv_bytes_per_block(&small_config(None), tp as usize, BLOCK_SIZE) as u64;
    InitRequest {
        model_path: model.display().to_string(),
        dtype: "f32".into(),
        device: "cpu".into(),
        tp_world_size: tp,
        rank,
        collective: (!peers.is_empty()).then(|| CollectiveBootstrap {
            kind: Some(Kind::Tcp(TcpPeers {
                peer_addrs: peers.to_vec(),
                listen_addr: String::new(),
                group_id,
            })),
        }),
        block_size: BLOCK_SIZE as u32,
        // Not a whole number of blocks: the remainder is unused.
        kv_cache_bytes: u64::from(NUM_BLOCKS) * per_block + per_block - 1,
        max_kv_blocks: None,
        // The coordinator's defaults.
        max_num_batched_tokens: 8192,
        max_num_seqs: 256,
        ..Default::default()
    }
}

/// Initializes every rank of a group concurrently (they bootstrap with each other).
async fn init_group(clients: &[WorkerClient<Channel>], model: &Path, group_id: u64) {
    let tp = clients.len() as u32;
    let peers = if tp > 1 {
        free_addrs(tp as usize)
    } else {
        Vec::new()
    };
    let calls: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(rank, c)| {
            let (mut c, req) = (
                c.clone(),
                init_request(model, tp, rank as u32, &peers, group_id),
            );
            tokio::spawn(async move { c.init(req).await })
        })
        .collect();
    for (rank, call) in calls.into_iter().enumerate() {
        let reply: InitReply = call.await.unwrap().unwrap().into_inner();
        assert_eq!(reply.num_kv_blocks, NUM_BLOCKS);
        assert_eq!((reply.rank, reply.tp_world_size), (rank as u32, tp));
        let facts = reply.model.unwrap();
        assert_eq!(
            (facts.vocab_size, facts.n_layers, facts.eos_token_id),
            (1024, 2, 2)
        );
        assert_eq!(facts.sliding_window, None);
    }
}

/// One open `Steps` stream per rank; every plan goes to all of them.
struct Group {
    streams: Vec<(mpsc::Sender<StepPlan>, Streaming<StepResult>)>,
    step: u64,
    /// Sequences that finished: freed with the next plan.
    freed: Vec<u64>,
}

impl Group {
    async fn open(clients: &mut [WorkerClient<Channel>]) -> Self {
        let mut streams = Vec::new();
        for c in clients {
            let (tx, rx) = mpsc::channel(4);
            let results = c.steps(ReceiverStream::new(rx)).await.unwrap().into_inner();
            streams.push((tx, results));
        }
        Self {
            streams,
            step: 0,
            freed: Vec::new(),
        }
    }

    /// Every rank's answer to `plan` (numbered here), each checked for its step number.
    async fn run_all(&mut self, mut plan: StepPlan) -> Vec<StepResult> {
        self.step += 1;
        plan.step = self.step;
        plan.freed.append(&mut self.freed);
        for (tx, _) in &self.streams {
            tx.send(plan.clone()).await.unwrap();
        }
        let mut out = Vec::new();
        for (_, rx) in &mut self.streams {
            let r = tokio::time::timeout(Duration::from_secs(60), rx.message())
                .await
                .expect("a step reply within a minute")
                .unwrap()
                .expect("the stream stays open");
            assert_eq!(r.step, self.step, "every rank answers with the plan's step");
            out.push(r);
        }
        out
    }

    /// Rank 0's answer; every rank must agree on success and only rank 0 samples.
    async fn run(&mut self, plan: StepPlan) -> StepResult {
        let mut all = self.run_all(plan).await;
        for (rank, r) in all.iter().enumerate() {
            assert_eq!(r.error, all[0].error, "rank {rank} disagrees");
            if rank > 0 {
                assert!(r.tokens.is_empty(), "rank {rank} sampled");
            }
        }
        all.swap_remove(0)
    }
}

/// A request as the coordinator sees it: what is known, what is cached, its blocks.
struct Req {
    id: u64,
    prompt: Vec<u32>,
    out: Vec<u32>,
    sampled: Vec<SampledToken>,
    n_new: usize,
    params: SamplingParams,
    cached: usize,
    table: Vec<u32>,
    announced: bool,
    reset: bool,
}

impl Req {
    fn new(id: u64, prompt: Vec<u32>, n_new: usize, params: SamplingParams) -> Self {
        Self {
            id,
            prompt,
            out: Vec::new(),
            sampled: Vec::new(),
            n_new,
            params,
            cached: 0,
            table: Vec::new(),
            announced: false,
            reset: false,
        }
    }

    fn done(&self) -> bool {
        self.out.len() >= self.n_new
    }

    /// This step's part: the next chunk of what is known but not cached, blocks for it.
    fn schedule(&mut self, free: &mut Vec<u32>) -> ScheduledSeq {
        let known = [&self.prompt[..], &self.out[..]].concat();
        let take = (known.len() - self.cached).min(CHUNK);
        let need = (self.cached + take).div_ceil(BLOCK_SIZE);
        let new_blocks: Vec<u32> = (self.table.len()..need)
            .map(|_| free.pop().expect("enough blocks"))
            .collect();
        self.table.extend(&new_blocks);
        let seq = ScheduledSeq {
            num_drafts: 0,
            seq_id: self.id,
            tokens: known[self.cached..self.cached + take].to_vec(),
            position_start: self.cached as u32,
            new_blocks,
            sample: self.cached + take == known.len(),
            sampling: (!self.announced).then(|| SamplingParams {
                generated_before: self.out.len() as u32,
                ..self.params.clone()
            }),
            reset: self.reset,
        };
        self.cached += take;
        self.announced = true;
        self.reset = false;
        seq
    }

    /// Preemption by recompute: the blocks go back, everything known is prefilled again.
    fn preempt(&mut self, free: &mut Vec<u32>) {
        free.append(&mut self.table);
        self.cached = 0;
        self.announced = false;
        self.reset = true;
    }
}

/// A free list that hands out block ids in a scrambled order.
fn free_list() -> Vec<u32> {
    (0..NUM_BLOCKS)
        .map(|i| (i * 37 + 11) % NUM_BLOCKS)
        .collect()
}

/// Runs `reqs` batched together until each has its tokens; finished ones are freed
/// with the next plan.
async fn generate(group: &mut Group, reqs: &mut [Req], free: &mut Vec<u32>) {
    while reqs.iter().any(|r| !r.done()) {
        let seqs: Vec<ScheduledSeq> = reqs
            .iter_mut()
            .filter(|r| !r.done())
            .map(|r| r.schedule(free))
            .collect();
        let want: Vec<u64> = seqs.iter().filter(|s| s.sample).map(|s| s.seq_id).collect();
        let res = group
            .run(StepPlan {
                truncated: Vec::new(),
                seqs,
                ..Default::default()
            })
            .await;
        assert_eq!(res.error, "", "step {}", res.step);
        let got: Vec<u64> = res.tokens.iter().map(|t| t.seq_id).collect();
        assert_eq!(got, want, "one token per sampled sequence, in plan order");
        let by_id: HashMap<u64, SampledToken> =
            res.tokens.into_iter().map(|t| (t.seq_id, t)).collect();
        for r in reqs.iter_mut() {
            if let Some(t) = by_id.get(&r.id) {
                r.out.push(t.token_id);
                r.sampled.push(t.clone());
                if r.done() {
                    group.freed.push(r.id);
                    free.append(&mut r.table);
                }
            }
        }
    }
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_over_grpc_equals_the_in_process_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![common::connect(WorkerService::new(test_config())).await];
    init_group(&clients, &model, 1).await;
    let mut group = Group::open(&mut clients).await;
    let mut free = free_list();
    let mut reqs = vec![
        Req::new(10, prompt(11, 0), 7, greedy()),
        Req::new(11, prompt(3, 1), 9, greedy()),
    ];
    generate(&mut group, &mut reqs, &mut free).await;
    for r in &reqs {
        assert_eq!(r.out, reference(&model, &r.prompt, r.n_new), "seq {}", r.id);
        assert!(r.sampled.iter().all(|t| t.logprob.is_none()));
    }
    assert_eq!(free.len(), NUM_BLOCKS as usize, "every block came back");
    // The same ids are reusable once freed.
    let mut again = vec![Req::new(10, prompt(6, 2), 3, greedy())];
    generate(&mut group, &mut again, &mut free).await;
    assert_eq!(again[0].out, reference(&model, &again[0].prompt, 3));
    let h = clients[0]
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(h.ok && h.initialized, "{h:?}");
    assert_eq!(h.num_kv_blocks, NUM_BLOCKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_over_the_tcp_collective_give_the_single_rank_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![
        common::connect(WorkerService::new(test_config())).await,
        common::connect(WorkerService::new(test_config())).await,
    ];
    init_group(&clients, &model, 2).await;
    let mut group = Group::open(&mut clients).await;
    let mut free = free_list();
    let mut reqs = vec![
        Req::new(1, prompt(9, 3), 8, greedy()),
        Req::new(2, prompt(14, 4), 5, greedy()),
    ];
    generate(&mut group, &mut reqs, &mut free).await;
    for r in &reqs {
        assert_eq!(r.out, reference(&model, &r.prompt, r.n_new), "seq {}", r.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_answer_errors_change_nothing_and_the_worker_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![common::connect(WorkerService::new(test_config())).await];
    let mut group = Group::open(&mut clients).await;
    let early = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![Req::new(1, prompt(3, 0), 1, greedy()).schedule(&mut free_list())],
            ..Default::default()
        })
        .await;
    assert!(early.error.contains("not initialized"), "{}", early.error);

    init_group(&clients, &model, 3).await;
    let mut free = free_list();
    // Sequence A runs its prompt up to its first token; then the bad plans come.
    let mut a = Req::new(7, prompt(8, 5), 6, greedy());
    while a.out.is_empty() {
        let seq = a.schedule(&mut free);
        let r = group
            .run(StepPlan {
                truncated: Vec::new(),
                seqs: vec![seq],
                ..Default::default()
            })
            .await;
        assert_eq!(r.error, "");
        a.out.extend(r.tokens.iter().map(|t| t.token_id));
    }
    let new_seq = |id: u64, tokens: Vec<u32>, blocks: Vec<u32>| ScheduledSeq {
        num_drafts: 0,
        seq_id: id,
        tokens,
        new_blocks: blocks,
        sample: true,
        sampling: Some(greedy()),
        ..Default::default()
    };
    let a_decode = ScheduledSeq {
        num_drafts: 0,
        seq_id: a.id,
        tokens: vec![*a.out.last().unwrap()],
        position_start: a.cached as u32,
        sample: true,
        new_blocks: if a.cached.is_multiple_of(BLOCK_SIZE) {
            vec![free[0]]
        } else {
            vec![]
        },
        ..Default::default()
    };
    let bad: Vec<(StepPlan, &str)> = vec![
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![ScheduledSeq {
                    num_drafts: 0,
                    sampling: None,
                    ..new_seq(99, vec![1], vec![free[0]])
                }],
                ..Default::default()
            },
            "no sampling params",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![new_seq(99, vec![1], vec![NUM_BLOCKS])],
                ..Default::default()
            },
            "outside the KV cache of 64 blocks",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![new_seq(99, vec![1024], vec![free[0]])],
                ..Default::default()
            },
            "outside the vocabulary",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![new_seq(99, vec![1; 9], vec![free[0]])],
                ..Default::default()
            },
            "hold 4 tokens but the step needs 9",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![new_seq(99, vec![], vec![free[0]])],
                ..Default::default()
            },
            "no new tokens",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![ScheduledSeq {
                    num_drafts: 0,
                    position_start: 32_768,
                    ..new_seq(99, vec![1], vec![free[0]])
                }],
                ..Default::default()
            },
            "exceeds the model's 32768",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![ScheduledSeq {
                    num_drafts: 0,
                    sampling: Some(SamplingParams {
                        temperature: -1.0,
                        ..greedy()
                    }),
                    ..new_seq(99, vec![1], vec![free[0]])
                }],
                ..Default::default()
            },
            "temperature",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![ScheduledSeq {
                    num_drafts: 0,
                    position_start: a.cached as u32 + 1,
                    ..a_decode.clone()
                }],
                ..Default::default()
            },
            "position_start",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![ScheduledSeq {
                    num_drafts: 0,
                    reset: true,
                    ..a_decode.clone()
                }],
                ..Default::default()
            },
            "no sampling params",
        ),
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![a_decode.clone(), a_decode.clone()],
                ..Default::default()
            },
            "scheduled twice",
        ),
        // A valid decode of A next to a bad sequence: A must not advance.
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![a_decode.clone(), new_seq(99, vec![5000], vec![])],
                ..Default::default()
            },
            "seq 99",
        ),
        // Freeing A next to a bad sequence: A must not be freed.
        (
            StepPlan {
                truncated: Vec::new(),
                seqs: vec![new_seq(99, vec![1], vec![NUM_BLOCKS + 5])],
                freed: vec![a.id],
                ..Default::default()
            },
            "outside the KV cache",
        ),
    ];
    for (plan, expect) in bad {
        let r = group.run(plan).await;
        assert!(
            r.error.contains(expect),
            "expected '{expect}', got '{}'",
            r.error
        );
        assert!(r.tokens.is_empty());
    }
    // Freeing an unknown id is a no-op; A continues exactly where it was.
    a.table.extend(&a_decode.new_blocks);
    free.retain(|b| !a_decode.new_blocks.contains(b));
    let r = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![a_decode.clone()],
            freed: vec![12345],
            ..Default::default()
        })
        .await;
    assert_eq!(r.error, "");
    a.cached += 1;
    a.out.push(r.tokens[0].token_id);
    generate(&mut group, std::slice::from_mut(&mut a), &mut free).await;
    assert_eq!(a.out, reference(&model, &a.prompt, 6));
    let h = clients[0]
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        h.ok && h.initialized,
        "bad plans do not break the worker: {h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_reports_logprobs_and_survives_preemption() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![common::connect(WorkerService::new(test_config())).await];
    init_group(&clients, &model, 4).await;
    let mut group = Group::open(&mut clients).await;
    let mut free = free_list();
    let params = SamplingParams {
        temperature: 1.5,
        top_p: 0.95,
        top_k: 50,
        seed: Some(1234),
        logprobs: Some(2),
        ..Default::default()
    };
    let p = prompt(7, 6);
    // Two sequences with the same seed in one batch draw the same tokens.
    let mut twins = vec![
        Req::new(1, p.clone(), 12, params.clone()),
        Req::new(2, p.clone(), 12, params.clone()),
    ];
    generate(&mut group, &mut twins, &mut free).await;
    assert_eq!(twins[0].out, twins[1].out);
    assert_ne!(
        twins[0].out,
        reference(&model, &p, 12),
        "at temperature 1.5 the draws are not the greedy path"
    );
    for t in &twins[0].sampled {
        let lp = t.logprob.expect("logprobs were asked for");
        assert_eq!(t.top_logprobs.len(), 2);
        assert!(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob);
        assert!(lp <= t.top_logprobs[0].logprob + 1e-6 && lp < 0.0);
    }
    // Preempted after 5 tokens and recomputed from prompt + output: same tokens.
    let mut pre = Req::new(3, p.clone(), 5, params.clone());
    generate(&mut group, std::slice::from_mut(&mut pre), &mut free).await;
    // Not finished after all: the worker keeps its state, and `reset` replaces it.
    group.freed.retain(|&id| id != pre.id);
    pre.preempt(&mut free);
    pre.n_new = 12;
    generate(&mut group, std::slice::from_mut(&mut pre), &mut free).await;
    assert_eq!(pre.out, twins[0].out);
    // Another seed, another path.
    let mut other = Req::new(
        4,
        p.clone(),
        12,
        SamplingParams {
            seed: Some(99),
            ..params
        },
    );
    generate(&mut group, std::slice::from_mut(&mut other), &mut free).await;
    assert_ne!(other.out, twins[0].out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_init_requests_are_refused_and_the_worker_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut c = common::connect(WorkerService::new(test_config())).await;
    let good = init_request(&model, 1, 0, &[], 0);
    let cases: Vec<(InitRequest, &str)> = vec![
        (
            InitRequest {
                model_path: tmp.path().join("nope").display().to_string(),
                ..good.clone()
            },
            "nope",
        ),
        (
            InitRequest {
                tp_world_size: 3,
                rank: 0,
                collective: Some(CollectiveBootstrap {
                    kind: Some(Kind::Tcp(TcpPeers {
                        peer_addrs: free_addrs(3),
                        ..Default::default()
                    })),
                }),
                ..good.clone()
            },
            "3",
        ),
        (
            InitRequest {
                rank: 1,
                ..good.clone()
            },
            "rank 1 is outside a TP group of 1",
        ),
        (
            InitRequest {
                tp_world_size: 2,
                ..good.clone()
            },
            "TCP peer addresses for all 2 ranks",
        ),
        (
            InitRequest {
                collective: Some(CollectiveBootstrap {
                    kind: Some(Kind::NcclUniqueId(vec![0; 128])),
                }),
                ..good.clone()
            },
            "NCCL",
        ),
        (
            InitRequest {
                device: "tpu".into(),
                ..good.clone()
            },
            "device 'tpu'",
        ),
        (
            InitRequest {
                kv_cache_bytes: 10,
                ..good.clone()
            },
            "holds no block",
        ),
        (
            InitRequest {
                kv_cache_bytes: 0,
                max_kv_blocks: None,
                ..good.clone()
            },
            "kv_cache_bytes or max_kv_blocks",
        ),
        (
            InitRequest {
                block_size: 0,
                ..good.clone()
            },
            "block_size",
        ),
        (
            InitRequest {
                max_num_batched_tokens: 0,
                ..good.clone()
            },
            "max_num_batched_tokens (0) and max_num_seqs (256) must both be > 0",
        ),
        (
            InitRequest {
                max_num_seqs: 0,
                ..good.clone()
            },
            "must both be > 0",
        ),
        // More KV cache than the machine holds: refused before anything is allocated.
        (
            InitRequest {
                kv_cache_bytes: 0,
                max_kv_blocks: Some(u32::MAX),
                ..good.clone()
            },
            "does not fit the",
        ),
        (
            InitRequest {
                kv_cache_bytes: u64::MAX,
                ..good.clone()
            },
            "does not fit the",
        ),
    ];
    for (req, expect) in cases {
        let e = c.init(req).await.unwrap_err();
        assert!(e.message().contains(expect), "expected '{expect}': {e:?}");
        let h = c.health(HealthRequest {}).await.unwrap().into_inner();
        assert!(!h.initialized && h.detail.contains("Init failed"), "{h:?}");
    }
    let capped = c
        .init(InitRequest {
            max_kv_blocks: Some(5),
            ..good
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capped.num_kv_blocks, 5, "the tighter limit wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_breaks_the_group_until_it_is_initialized_again() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![
        common::connect(WorkerService::new(test_config())).await,
        common::connect(WorkerService::new(test_config())).await,
    ];
    init_group(&clients, &model, 5).await;
    let mut group = Group::open(&mut clients).await;
    let mut free = free_list();
    let mut a = Req::new(1, prompt(6, 7), 2, greedy());
    generate(&mut group, std::slice::from_mut(&mut a), &mut free).await;

    // Rank 1 "dies": a failing re-Init drops its model and closes its connections.
    let mut bad = init_request(&model, 2, 1, &free_addrs(2), 5);
    bad.model_path = "/nonexistent".into();
    assert!(clients[1].init(bad).await.is_err());
    let mut b = Req::new(2, prompt(6, 8), 1, greedy());
    let t0 = std::time::Instant::now();
    let res = group
        .run_all(StepPlan {
            truncated: Vec::new(),
            seqs: vec![b.schedule(&mut free)],
            ..Default::default()
        })
        .await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(res[0].error.contains("rank 1"), "{}", res[0].error);
    assert!(res[1].error.contains("not initialized"), "{}", res[1].error);
    let h = clients[0]
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!h.ok && h.detail.contains("re-Init"), "{h:?}");
    let res = group.run_all(StepPlan::default()).await;
    assert!(res[0].error.contains("broken"), "{}", res[0].error);

    // A new group serves again, from scratch.
    init_group(&clients, &model, 6).await;
    let mut free = free_list();
    let mut c = Req::new(3, prompt(10, 9), 4, greedy());
    generate(&mut group, std::slice::from_mut(&mut c), &mut free).await;
    assert_eq!(c.out, reference(&model, &c.prompt, 4));
    let h = clients[0]
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(h.ok && h.initialized, "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_worker_serves_over_tcp() {
    let addr = free_addrs(1).remove(0);
    let server = tokio::spawn(run_worker(WorkerConfig {
        listen: addr.clone(),
        ..test_config()
    }));
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = WorkerClient::connect(format!("http://{addr}")).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = client
        .expect("the worker listens")
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(h.ok && !h.initialized, "{h:?}");
    assert!(!server.is_finished());
    server.abort();
}

/// A plan of one sequence `id` with `n` new tokens from position 0 and `blocks` new
/// blocks starting at block `first`.
fn fresh_seq(id: u64, n: usize, first: u32, blocks: u32) -> ScheduledSeq {
    ScheduledSeq {
        num_drafts: 0,
        seq_id: id,
        tokens: prompt(n, id as usize),
        position_start: 0,
        new_blocks: (first..first + blocks).collect(),
        sample: true,
        sampling: Some(greedy()),
        reset: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_are_bounded_by_the_sizes_init_set_and_the_worker_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth(tmp.path());
    let mut clients = vec![common::connect(WorkerService::new(test_config())).await];
    // Device "null" runs the same checks as "cpu" without the math, so a step of
    // 12000 tokens costs nothing but the plan.
    let big = InitRequest {
        device: "null".into(),
        kv_cache_bytes: 0,
        max_kv_blocks: Some(4096),
        max_num_batched_tokens: 12_000,
        max_num_seqs: 4,
        ..init_request(&model, 1, 0, &[], 0)
    };
    let reply = clients[0].init(big).await.unwrap().into_inner();
    assert_eq!(reply.num_kv_blocks, 4096);
    let mut group = Group::open(&mut clients).await;
    let bs = BLOCK_SIZE as u32;
    // Over the Init's budgets: 12001 tokens; 5 sequences; a block table longer than
    // the context needs. Each is an error that changes nothing.
    let over_tokens = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![fresh_seq(1, 12_000, 0, 3000), fresh_seq(2, 1, 3000, 1)],
            ..Default::default()
        })
        .await;
    assert!(
        over_tokens
            .error
            .contains("12001 new tokens exceed this worker's max_num_batched_tokens of 12000"),
        "{}",
        over_tokens.error
    );
    let over_seqs = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: (0..5).map(|i| fresh_seq(10 + i, 1, i as u32, 1)).collect(),
            ..Default::default()
        })
        .await;
    assert!(
        over_seqs
            .error
            .contains("5 sequences exceed this worker's max_num_seqs of 4"),
        "{}",
        over_seqs.error
    );
    // 4 tokens fit one block of 4; a table of 3 blocks is refused.
    let long_table = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![fresh_seq(20, 4, 0, 3)],
            ..Default::default()
        })
        .await;
    assert!(
        long_table
            .error
            .contains("3 blocks but a context of 4 tokens needs only 1"),
        "{}",
        long_table.error
    );
    assert!(long_table.tokens.is_empty());
    // A step of exactly the Init's budget is accepted, and the sequence continues
    // (nothing of the rejected plans was mirrored: seq 20 is new again).
    let full = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![fresh_seq(1, 12_000, 0, 12_000 / bs)],
            ..Default::default()
        })
        .await;
    assert_eq!(full.error, "");
    assert_eq!(full.tokens.len(), 1);
    let next = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![
                ScheduledSeq {
                    num_drafts: 0,
                    seq_id: 1,
                    // Null pseudo-tokens lie outside this small vocabulary.
                    tokens: vec![5],
                    position_start: 12_000,
                    new_blocks: vec![12_000 / bs],
                    sample: true,
                    sampling: None,
                    reset: false,
                },
                fresh_seq(20, 4, 3001, 1),
            ],
            ..Default::default()
        })
        .await;
    assert_eq!(next.error, "");
    assert_eq!(next.tokens.len(), 2);

    // The CPU backend (real math) under a small budget: over it is refused, at it runs.
    clients[0]
        .init(InitRequest {
            max_num_batched_tokens: 8,
            max_num_seqs: 2,
            ..init_request(&model, 1, 0, &[], 0)
        })
        .await
        .unwrap();
    let mut group = Group::open(&mut clients).await;
    let over = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![fresh_seq(1, 9, 0, 3)],
            ..Default::default()
        })
        .await;
    assert!(
        over.error.contains("max_num_batched_tokens of 8"),
        "{}",
        over.error
    );
    let ok = group
        .run(StepPlan {
            truncated: Vec::new(),
            seqs: vec![fresh_seq(1, 8, 0, 2)],
            ..Default::default()
        })
        .await;
    assert_eq!(ok.error, "");
    assert_eq!(
        ok.tokens[0].token_id,
        reference(&model, &prompt(8, 1), 1)[0],
        "the accepted step computes the reference's token"
    );
}
