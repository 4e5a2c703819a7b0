//! The gRPC executor: one `Steps` stream per worker rank, the same plan sent to all,
//! every rank's answer awaited with a timeout, rank 0's tokens returned.
//!
//! Invariants: a step is complete only when every rank answered it with its step
//! number; a rank that closes its stream, errors, lags (wrong step number) or stays
//! silent past `step_timeout` makes the whole group `WorkerLost`, and the next
//! [`Executor::init`] rebuilds every connection from scratch (a new collective group
//! id, so a stale rank cannot rejoin). Cost: one protobuf encode per step per rank.

use std::time::Duration;

use futures::future::join_all;
use proto::v1 as pb;
use proto::v1::worker_client::WorkerClient;
use scheduler::SchedulerConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use super::executor::{ExecError, Executor, GroupFacts, Sampled, StepOutput, WorkPlan};

/// Where the ranks are and what they should load.
#[derive(Clone, Debug)]
pub struct GrpcGroupConfig {
    /// gRPC address of every rank's worker, in rank order (`host:port`).
    pub workers: Vec<String>,
    /// TCP collective address of every rank, in rank order (`host:port`). Empty:
    /// the workers run on this machine, and every Init picks fresh free loopback
    /// ports, so a port someone else took between picking and binding costs one
    /// retry instead of failing every retry on the same address.
    pub collective_peers: Vec<String>,
    /// Address each rank binds for the collective (empty: its peer address).
    pub collective_listen: Vec<String>,
    /// Checkpoint directory as the workers see it.
    pub model_path: String,
    pub device: String,
    /// Weight storage the workers load (`--dtype`); `""` or `"auto"` is the
    /// checkpoint's own where the backend supports it.
    pub dtype: String,
    /// When set (CUDA workers with NCCL), each group Init bootstraps the collective
    /// with a fresh NCCL unique id from this function instead of TCP peers; the
    /// process that made the id hosts NCCL's bootstrap root. Injected by the binary so
    /// this crate does not link CUDA libraries.
    pub nccl_unique_id: Option<fn() -> Result<Vec<u8>, String>>,
    pub block_size: u32,
    /// KV budget per rank in bytes.
    pub kv_cache_bytes: u64,
    pub max_kv_blocks: Option<u32>,
    /// The scheduler's step limits, sent in `Init` so workers size for them.
    pub max_num_batched_tokens: u32,
    pub max_num_seqs: u32,
    /// How long to keep trying to reach and initialize the workers.
    pub init_timeout: Duration,
    /// A rank that does not answer a step within this is considered lost.
    pub step_timeout: Duration,
    /// The shared worker token (`--worker-token-file`), sent with every call.
    pub token: Option<String>,
}

impl Default for GrpcGroupConfig {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            collective_peers: Vec::new(),
            collective_listen: Vec::new(),
            model_path: String::new(),
            device: "cpu".into(),
            dtype: String::new(),
            nccl_unique_id: None,
            block_size: 16,
            kv_cache_bytes: 1 << 30,
            max_kv_blocks: None,
            max_num_batched_tokens: SchedulerConfig::default().max_num_batched_tokens as u32,
            max_num_seqs: SchedulerConfig::default().max_num_seqs as u32,
            init_timeout: Duration::from_secs(120),
            step_timeout: Duration::from_secs(60),
            token: None,
        }
    }
}

struct RankStream {
    plans: mpsc::Sender<pb::StepPlan>,
    results: Streaming<pb::StepResult>,
}

/// A worker group reached over gRPC.
pub struct GrpcExecutor {
    config: GrpcGroupConfig,
    ranks: Vec<RankStream>,
    incarnation: u64,
    /// The step submitted and not yet collected.
    in_flight: Option<u64>,
}

impl GrpcExecutor {
    pub fn new(config: GrpcGroupConfig) -> Self {
        Self {
            config,
            ranks: Vec::new(),
            incarnation: 0,
            in_flight: None,
        }
    }

    async fn connect(
        addr: &str,
        token: Option<&str>,
        deadline: tokio::time::Instant,
    ) -> Result<WorkerClient<Channel>, ExecError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ExecError::Init(format!("bad worker address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2));
        // A worker counts as reached once it answers Health: a connection alone may still
        // belong to a process that is going away (e.g. one that just crashed).
        loop {
            let last = match endpoint.connect().await {
                Ok(ch) => {
                    let mut client = WorkerClient::new(ch).max_decoding_message_size(64 << 20);
                    let mut req = request(pb::HealthRequest {}, token)?;
                    req.set_timeout(Duration::from_secs(2));
                    match client.health(req).await {
                        Ok(_) => return Ok(client),
                        Err(s) if s.code() == tonic::Code::Unauthenticated => {
                            return Err(ExecError::Init(format!(
                                "worker {addr} refused the coordinator: {} (give `stral serve` and \
                                 every `stral worker` the same --worker-token-file)",
                                s.message()
                            )))
                        }
                        Err(s) => s.message().to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ExecError::Init(format!(
                    "cannot reach worker {addr}: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn lost(rank: usize, message: impl Into<String>) -> ExecError {
        ExecError::WorkerLost {
            rank,
            message: message.into(),
        }
    }
}

/// A request carrying the worker token, when there is one.
fn request<T>(message: T, token: Option<&str>) -> Result<tonic::Request<T>, ExecError> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        let value = t.parse().map_err(|_| {
            ExecError::Init("the worker token is not a valid gRPC metadata value".into())
        })?;
        req.metadata_mut().insert(proto::auth::TOKEN_HEADER, value);
    }
    Ok(req)
}

/// The group's step cost model from every rank's reply: each coefficient's maximum
/// (see [`GroupFacts::step_cost`]); a rank that reports none counts as zeros.
fn slowest_step_cost(replies: &[pb::InitReply]) -> scheduler::StepCost {
    replies.iter().filter_map(|r| r.step_cost.as_ref()).fold(
        scheduler::StepCost::default(),
        |acc, c| scheduler::StepCost {
            fixed_ms: acc.fixed_ms.max(c.fixed_ms),
            per_token_ms: acc.per_token_ms.max(c.per_token_ms),
            per_context_token_ms: acc.per_context_token_ms.max(c.per_context_token_ms),
        },
    )
}

impl Executor for GrpcExecutor {
    async fn init(&mut self) -> Result<GroupFacts, ExecError> {
        self.ranks.clear();
        self.in_flight = None;
        self.incarnation += 1;
        let cfg = &self.config;
        let tp = cfg.workers.len();
        if tp == 0 {
            return Err(ExecError::Init("no workers configured".into()));
        }
        let deadline = tokio::time::Instant::now() + cfg.init_timeout;
        let token = cfg.token.as_deref();
        let clients = join_all(
            cfg.workers
                .iter()
                .map(|a| Self::connect(a, token, deadline)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        let group_id = (std::process::id() as u64) << 32 | self.incarnation;
        let nccl_id = match cfg.nccl_unique_id {
            Some(make) if tp > 1 => {
                Some(make().map_err(|e| ExecError::Init(format!("NCCL bootstrap: {e}")))?)
            }
            _ => None,
        };
        let peers = if cfg.collective_peers.is_empty() && tp > 1 {
            crate::launch::free_addrs(tp)
                .map_err(|e| ExecError::Init(format!("picking loopback collective ports: {e}")))?
        } else {
            cfg.collective_peers.clone()
        };
        let inits = clients.iter().enumerate().map(|(rank, client)| {
            let mut client = client.clone();
            let request = pb::InitRequest {
                model_path: cfg.model_path.clone(),
                dtype: cfg.dtype.clone(),
                device: cfg.device.clone(),
                tp_world_size: tp as u32,
                rank: rank as u32,
                collective: (tp > 1).then(|| pb::CollectiveBootstrap {
                    kind: Some(match &nccl_id {
                        Some(id) => pb::collective_bootstrap::Kind::NcclUniqueId(id.clone()),
                        None => pb::collective_bootstrap::Kind::Tcp(pb::TcpPeers {
                            peer_addrs: peers.clone(),
                            listen_addr: cfg
                                .collective_listen
                                .get(rank)
                                .cloned()
                                .unwrap_or_default(),
                            group_id,
                        }),
                    }),
                }),
                block_size: cfg.block_size,
                kv_cache_bytes: cfg.kv_cache_bytes,
                max_kv_blocks: cfg.max_kv_blocks,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
            };
            async move {
                let mut req = self::request(request, token)?;
                req.set_timeout(cfg.init_timeout);
                client
                    .init(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| ExecError::Init(format!("rank {rank}: {}", s.message())))
            }
        });
        let replies = join_all(inits)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let model = replies[0]
            .model
            .clone()
            .ok_or_else(|| ExecError::Init("rank 0 reported no model facts".into()))?;
        let facts = GroupFacts {
            num_blocks: replies
                .iter()
                .map(|r| r.num_kv_blocks as usize)
                .min()
                .unwrap_or(0),
            block_size: replies[0].block_size as usize,
            max_context: model.max_position_embeddings as usize,
            sliding_window: model.sliding_window,
            step_cost: slowest_step_cost(&replies),
        };
        if facts.num_blocks < 2 {
            return Err(ExecError::Init(format!(
                "the KV budget gives only {} blocks per rank; raise it",
                facts.num_blocks
            )));
        }
        for (rank, mut client) in clients.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(4);
            let results = client
                .steps(self::request(ReceiverStream::new(rx), token)?)
                .await
                .map_err(|s| {
                    ExecError::Init(format!(
                        "rank {rank}: cannot open the step stream: {}",
                        s.message()
                    ))
                })?
                .into_inner();
            self.ranks.push(RankStream { plans: tx, results });
        }
        Ok(facts)
    }

    async fn submit(&mut self, plan: WorkPlan) -> Result<(), ExecError> {
        if self.ranks.is_empty() {
            return Err(Self::lost(0, "the group is not initialized"));
        }
        if let Some(step) = self.in_flight {
            return Err(Self::lost(
                0,
                format!("internal: step {step} is still in flight"),
            ));
        }
        self.in_flight = Some(plan.step);
        let msg = into_proto(plan);
        let last = self.ranks.len() - 1;
        // One clone per extra rank; the last rank takes the message itself.
        for (rank, r) in self.ranks.iter().enumerate().take(last) {
            r.plans
                .send(msg.clone())
                .await
                .map_err(|_| Self::lost(rank, "step stream closed"))?;
        }
        self.ranks[last]
            .plans
            .send(msg)
            .await
            .map_err(|_| Self::lost(last, "step stream closed"))
    }

    async fn collect(&mut self) -> Result<StepOutput, ExecError> {
        let Some(step) = self.in_flight.take() else {
            return Err(Self::lost(0, "internal: no step in flight"));
        };
        let timeout = self.config.step_timeout;
        let answers = join_all(
            self.ranks
                .iter_mut()
                .enumerate()
                .map(|(rank, r)| async move {
                    match tokio::time::timeout(timeout, r.results.message()).await {
                        Err(_) => Err(Self::lost(
                            rank,
                            format!("no answer to step {step} within {timeout:?}"),
                        )),
                        Ok(Err(status)) => Err(Self::lost(rank, status.message().to_string())),
                        Ok(Ok(None)) => Err(Self::lost(rank, "the worker closed its step stream")),
                        Ok(Ok(Some(res))) => Ok(res),
                    }
                }),
        )
        .await;
        let mut rank0 = None;
        let mut rejected = None;
        let mut worker_us = 0;
        for (rank, a) in answers.into_iter().enumerate() {
            let res = a?;
            if res.step != step {
                return Err(Self::lost(
                    rank,
                    format!("answered step {} to step {step}", res.step),
                ));
            }
            worker_us = worker_us.max(res.elapsed_us);
            if !res.error.is_empty() {
                rejected.get_or_insert(ExecError::Rejected {
                    rank,
                    step,
                    message: res.error.clone(),
                });
            }
            if rank == 0 {
                rank0 = Some(res);
            }
        }
        if let Some(e) = rejected {
            return Err(e);
        }
        let res = rank0.expect("rank 0 answered");
        let sampled = res
            .tokens
            .into_iter()
            .map(|t| Sampled {
                seq_id: t.seq_id,
                token: t.token_id,
                accepted: t.accepted,
                logprob: t.logprob,
                top_logprobs: t
                    .top_logprobs
                    .into_iter()
                    .map(|l| (l.token_id, l.logprob))
                    .collect(),
            })
            .collect();
        Ok(StepOutput { sampled, worker_us })
    }
}

fn into_proto(plan: WorkPlan) -> pb::StepPlan {
    pb::StepPlan {
        step: plan.step,
        freed: plan.freed,
        truncated: plan
            .truncated
            .into_iter()
            .map(|(seq_id, table_len)| pb::TableCut { seq_id, table_len })
            .collect(),
        seqs: plan
            .seqs
            .into_iter()
            .map(|s| pb::ScheduledSeq {
                seq_id: s.seq_id,
                tokens: s.tokens,
                num_drafts: s.num_drafts,
                position_start: s.position,
                new_blocks: s.new_blocks,
                sample: s.sample,
                reset: s.reset,
                sampling: s.sampling.map(|p| pb::SamplingParams {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: p.top_k,
                    seed: p.seed,
                    min_tokens: p.min_tokens,
                    stop_token_ids: s.stop_token_ids,
                    logprobs: p.logprobs,
                    generated_before: s.generated,
                }),
            })
            .collect(),
    }
}
