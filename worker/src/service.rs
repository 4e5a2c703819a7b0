//! The gRPC `Worker` service (`proto/worker.proto`): one tensor-parallel rank as a
//! process, driven by the coordinator over a bidirectional stream of step plans.
//!
//! Owns this rank's compute — the [`CpuModel`] (weights + KV cache), for device
//! `cuda[:K]` a [`crate::cuda::CudaModel`] (set up by [`crate::cuda::init`]), or for
//! device `sim:<gpu>` a [`StepTimeModel`] and no weights at all — its [`Collective`] with the
//! other ranks, and a mirror of every live sequence's block table, cached-token
//! count and sampler. `Init` replaces all of it; `Steps` executes plans in arrival
//! order, on the runtime thread itself in `stral worker` (one thread reads a plan,
//! runs it and writes the result) or on a blocking thread where a runtime is shared.
//!
//! Invariants:
//! - A plan is checked completely (ids, positions, block ranges and coverage,
//!   vocabulary, sampling parameters) before anything runs. A rejected plan answers
//!   an error and changes nothing: no block appended, no sequence freed or reset, no
//!   collective entered. The checks depend only on the plan, the mirrored state and
//!   the model, which are the same on every rank, so all ranks reject the same plans
//!   without talking to each other (the coordinator must keep block ids below the
//!   smallest `num_kv_blocks` of the group).
//! - A failure after the checks (a dead or hung peer, a panic) leaves the group out
//!   of step: the worker then answers every plan with that error and reports
//!   `ok = false` in `Health` until the next `Init`.
//! - Every plan gets exactly one `StepResult`, with its step number, on every rank.
//! - Devices "null" and "sim:<gpu>" check and mirror plans exactly as "cpu" does but
//!   run no forward pass; rank 0 answers pseudo-tokens. A sim rank then sleeps until
//!   the step's modelled GPU time has passed since the step began, reports the
//!   modelled KV capacity as `num_kv_blocks`, and joins no collective (the all-reduce
//!   cost is in the model); its `Health` detail says its times are modelled.
//!
//! Costs per step besides the forward pass: O(Σ block-table lengths) to build the
//! attention metadata, O(vocab) per sampled sequence on rank 0 (rows sampled in
//! parallel); in `stral worker` no thread hand-off.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::v1::collective_bootstrap::Kind;
use proto::v1::worker_server::{Worker, WorkerServer};
use proto::v1::{
    HealthReply, HealthRequest, InitReply, InitRequest, ModelFacts, SampledToken, ScheduledSeq,
    StepPlan, StepResult, TokenLogprob,
};
use rand::Rng;
use rayon::prelude::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, SoloCollective};
use crate::model::{CpuModel, RankWeights, SeqChunk, ShardSpec, StepInput};
use crate::sampler::{SamplingParams, SeqSampler, EOS_TOKEN_ID};
use crate::sim::{self, SeqWork, SimDevice, StepTimeModel};
use crate::tcp_collective::{TcpCollective, TcpGroup};
use crate::{ModelConfig, WorkerError};

/// How a worker process serves (the `stral worker` flags map onto this).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `host:port` the gRPC server listens on (port 0 picks one; it is logged).
    pub listen: String,
    /// Compute threads for the forward pass; `None` = one per core.
    pub threads: Option<usize>,
    /// How long `Init` waits for the other ranks to join the collective.
    pub collective_connect_timeout: Duration,
    /// How long a collective waits for a peer's data before the group is declared
    /// broken (a hung peer); a peer that dies is detected at once.
    pub collective_op_timeout: Duration,
    /// The device this process was started for (`stral worker --backend`, e.g. "cpu",
    /// "null", "sim:h100"): an Init with device "" gets it, an Init asking for another
    /// device is refused. `None` serves whatever each Init asks for.
    pub backend: Option<String>,
    /// Run each step on the runtime thread that read its plan, blocking that thread
    /// until the step is done. Only for a runtime that serves this one rank and
    /// nothing else (`stral worker`'s single-threaded runtime): reading a plan,
    /// running it and writing its result then never cross a thread. Two in-process
    /// ranks on one such runtime would deadlock in their first collective.
    pub inline_steps: bool,
    /// The shared token every RPC must carry (`--worker-token-file`); required when
    /// `listen` is not loopback (see [`crate::auth`]).
    pub token: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            threads: None,
            collective_connect_timeout: Duration::from_secs(20),
            collective_op_timeout: Duration::from_secs(60),
            backend: None,
            inline_steps: false,
            token: None,
        }
    }
}

/// Serves the worker protocol on `config.listen` until SIGINT or SIGTERM, which end
/// it at once: open `Steps` streams are cut (the coordinator sees them close).
pub async fn run_worker(config: WorkerConfig) -> Result<(), WorkerError> {
    if let Some(n) = config.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| WorkerError::Config(format!("threads: {e}")))?;
    }
    crate::auth::check_listen(&config.listen, config.token.as_deref())?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| WorkerError::Serve(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    tracing::info!(%addr, "worker listening");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let auth = crate::auth::interceptor(config.token.as_deref().map(Arc::from));
    let service = tonic::service::interceptor::InterceptedService::new(
        WorkerService::new(config).into_server(),
        auth,
    );
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming);
    // Not a graceful shutdown: that would wait for the coordinator to close its
    // long-lived Steps stream.
    tokio::select! {
        served = server => served.map_err(|e| WorkerError::Serve(e.to_string())),
        () = shutdown_signal() => Ok(()),
    }
}

/// [`run_worker`] on a runtime of its own (for `stral worker`): one thread that moves
/// messages and runs the steps inline (`inline_steps`), so a step costs no thread
/// hand-off; Init still loads on a blocking thread. A step still running at shutdown
/// gets a second to finish.
pub fn run_worker_blocking(mut config: WorkerConfig) -> Result<(), WorkerError> {
    config.inline_steps = true;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("worker-rpc")
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Serve(format!("starting the runtime: {e}")))?;
    let served = runtime.block_on(run_worker(config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("worker shutting down");
}

/// The `Worker` gRPC service of one rank. Cheap to clone (shared state).
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Inner>,
}

struct Inner {
    config: WorkerConfig,
    /// Locked only on blocking threads (Init, steps).
    engine: Mutex<Option<Engine>>,
    /// What `Health` answers; never held across slow work.
    health: Mutex<HealthReply>,
    /// Incremented by every new `Steps` stream; older streams stop.
    stream_epoch: AtomicU64,
}

impl WorkerService {
    pub fn new(config: WorkerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                engine: Mutex::new(None),
                health: Mutex::new(HealthReply {
                    ok: true,
                    detail: "waiting for Init".into(),
                    ..Default::default()
                }),
                stream_epoch: AtomicU64::new(0),
            }),
        }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitReply>, Status> {
        let inner = self.inner.clone();
        let req = request.into_inner();
        tokio::task::spawn_blocking(move || inner.init(req))
            .await
            .map_err(|e| Status::internal(format!("Init failed unexpectedly: {e}")))?
            .map(Response::new)
            .map_err(to_status)
    }

    type StepsStream = ReceiverStream<Result<StepResult, Status>>;

    async fn steps(
        &self,
        request: Request<Streaming<StepPlan>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let mut plans = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let inner = self.inner.clone();
        let epoch = inner.stream_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::spawn(async move {
            loop {
                let plan = match plans.message().await {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "Steps stream ended");
                        break;
                    }
                };
                if inner.stream_epoch.load(Ordering::SeqCst) != epoch {
                    let _ = tx
                        .send(Err(Status::aborted(
                            "a newer Steps stream superseded this one",
                        )))
                        .await;
                    break;
                }
                let step = plan.step;
                let exec = inner.clone();
                // `stral worker`: inline on the one runtime thread. On a multi-threaded
                // runtime the step runs right here too (the runtime moves its other
                // tasks to another thread); elsewhere (e.g. single-threaded test runtimes
                // hosting several ranks) on a blocking thread.
                let result = if inner.config.inline_steps {
                    exec.execute(plan)
                } else if tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread
                {
                    tokio::task::block_in_place(move || exec.execute(plan))
                } else {
                    tokio::task::spawn_blocking(move || exec.execute(plan))
                        .await
                        .unwrap_or_else(|e| StepResult {
                            step,
                            error: format!("step failed unexpectedly: {e}"),
                            ..Default::default()
                        })
                };
                if tx.send(Ok(result)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(self.inner.health().clone()))
    }
}

/// What every backend's `Init` answers: its KV capacity and the model's facts.
pub(crate) fn init_reply(
    cfg: &ModelConfig,
    rank: usize,
    tp: usize,
    num_kv_blocks: u32,
    block_size: usize,
    kv_bytes_per_block: u64,
) -> InitReply {
    InitReply {
        num_kv_blocks,
        block_size: block_size as u32,
        kv_bytes_per_block,
        model: Some(ModelFacts {
            vocab_size: cfg.vocab_size as u32,
            n_layers: cfg.n_layers as u32,
            max_position_embeddings: cfg.max_position_embeddings as u32,
            sliding_window: cfg.sliding_window,
            eos_token_id: EOS_TOKEN_ID,
        }),
        rank: rank as u32,
        tp_world_size: tp as u32,
    }
}

fn to_status(e: WorkerError) -> Status {
    let msg = e.to_string();
    match e {
        WorkerError::Config(_) | WorkerError::Step(_) => Status::invalid_argument(msg),
        WorkerError::Io { .. } | WorkerError::Checkpoint(_) => Status::failed_precondition(msg),
        WorkerError::Collective(_) => Status::unavailable(msg),
        WorkerError::Serve(_) => Status::internal(msg),
    }
}

impl Inner {
    fn health(&self) -> std::sync::MutexGuard<'_, HealthReply> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Option<Engine>> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn init(&self, req: InitRequest) -> Result<InitReply, WorkerError> {
        let span = tracing::info_span!("init", rank = req.rank, tp = req.tp_world_size);
        let _enter = span.enter();
        let mut slot = self.engine();
        // Forget the old group first: its connections close, its memory returns.
        *slot = None;
        *self.health() = HealthReply {
            ok: true,
            detail: "initializing".into(),
            ..Default::default()
        };
        let result = self.load(&req);
        let mut health = self.health();
        match result {
            Ok((engine, reply)) => {
                *slot = Some(engine);
                *health = HealthReply {
                    ok: true,
                    initialized: true,
                    rank: reply.rank,
                    tp_world_size: reply.tp_world_size,
                    num_kv_blocks: reply.num_kv_blocks,
                    detail: slot.as_ref().map_or_else(String::new, Engine::describe),
                };
                tracing::info!(num_kv_blocks = reply.num_kv_blocks, "worker ready");
                Ok(reply)
            }
            Err(e) => {
                tracing::error!(error = %e, "Init failed");
                health.detail = format!("Init failed: {e}");
                Err(e)
            }
        }
    }

    fn load(&self, req: &InitRequest) -> Result<(Engine, InitReply), WorkerError> {
        let config_err = |m: String| Err(WorkerError::Config(m));
        let resolved;
        let req = match (&self.config.backend, req.device.as_str()) {
            (None, _) => req,
            (Some(b), d) if d == b.as_str() => req,
            (Some(b), "") => {
                resolved = InitRequest {
                    device: b.clone(),
                    ..req.clone()
                };
                &resolved
            }
            (Some(b), d) if crate::cuda::CudaDevice::for_worker(b, d)?.is_some() => {
                let dev = crate::cuda::CudaDevice::for_worker(b, d)?.expect("checked");
                resolved = InitRequest {
                    device: dev.device_string(),
                    ..req.clone()
                };
                &resolved
            }
            (Some(b), d) => {
                return config_err(format!(
                "device '{d}': this worker was started for device '{b}' (stral worker --backend)"
            ))
            }
        };
        if let Some(dev) = crate::cuda::CudaDevice::parse(&req.device)? {
            let (max_tokens, max_seqs) = scheduler_defaults();
            let c = crate::cuda::init::load(req, dev, max_tokens, max_seqs)?;
            let engine = Engine {
                cfg: c.cfg,
                compute: Compute::Cuda {
                    model: c.model,
                    coll: c.coll,
                },
                coll: Box::new(SoloCollective),
                rank: c.reply.rank,
                num_blocks: c.reply.num_kv_blocks as usize,
                block_size: c.reply.block_size as usize,
                seqs: HashMap::new(),
                failed: None,
            };
            return Ok((engine, c.reply));
        }
        if let Some(dev) = SimDevice::parse(&req.device)? {
            return load_sim(req, dev);
        }
        if !matches!(req.device.as_str(), "" | "cpu" | "null") {
            return config_err(format!(
                "device '{}': this worker runs on the CPU (device \"cpu\", \"null\" to skip the math, or \"sim:<gpu>\" to model a GPU)",
                req.device
            ));
        }
        if sim::is_synthetic(&req.model_path) {
            return config_err(format!(
                "model '{}' is a shape without weights: only a sim device (\"sim:<gpu>\") can serve it",
                req.model_path
            ));
        }
        // "null": plans are checked and mirrored as usual, but no forward pass runs and
        // rank 0 answers a fixed pseudo-token; this measures everything but the math.
        let null_compute = req.device == "null";
        if !matches!(req.dtype.as_str(), "" | "f32") {
            return config_err(format!(
                "dtype '{}': the CPU backend computes in f32",
                req.dtype
            ));
        }
        let (tp, rank, bs) = (
            req.tp_world_size as usize,
            req.rank as usize,
            req.block_size as usize,
        );
        if tp == 0 || rank >= tp {
            return config_err(format!("rank {rank} is outside a TP group of {tp}"));
        }
        if bs == 0 {
            return config_err("block_size must be > 0".into());
        }
        let tcp = match req.collective.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(Kind::NcclUniqueId(_)) => {
                return config_err(
                    "an NCCL bootstrap needs the CUDA backend; the CPU worker takes TCP peers"
                        .into(),
                )
            }
            Some(Kind::Tcp(t)) => Some(t),
            None => None,
        };
        if tp > 1 && tcp.is_none_or(|t| t.peer_addrs.len() != tp) {
            return config_err(format!(
                "TP = {tp} needs TCP peer addresses for all {tp} ranks, got {}",
                tcp.map_or(0, |t| t.peer_addrs.len())
            ));
        }

        let ckpt = Checkpoint::open(Path::new(&req.model_path))?;
        let cfg = ckpt.config.clone();
        cfg.check_tp(tp)?;
        let per_block = CpuModel::kv_bytes_per_block(&cfg, tp, bs) as u64;
        let by_budget = (req.kv_cache_bytes > 0).then(|| req.kv_cache_bytes / per_block);
        let blocks = match (by_budget, req.max_kv_blocks) {
            (Some(b), Some(m)) => b.min(u64::from(m)),
            (Some(b), None) => b,
            (None, Some(m)) => u64::from(m),
            (None, None) => return config_err("set kv_cache_bytes or max_kv_blocks".into()),
        }
        .min(u64::from(u32::MAX));
        if blocks == 0 {
            return config_err(format!(
                "a KV budget of {} bytes (max {:?} blocks) holds no block of {per_block} bytes",
                req.kv_cache_bytes, req.max_kv_blocks
            ));
        }
        tracing::info!(
            model = %req.model_path,
            format = ?ckpt.format,
            layers = cfg.n_layers,
            params = cfg.n_params(),
            "loading shard"
        );
        let t0 = Instant::now();
        let weights = RankWeights::load(&ckpt, ShardSpec { tp, rank }, false)?;
        tracing::info!(
            seconds = t0.elapsed().as_secs_f64(),
            kv_blocks = blocks,
            kv_bytes = blocks * per_block,
            "shard loaded; allocating the KV cache"
        );
        let model = CpuModel::new(weights, if null_compute { 1 } else { blocks as usize }, bs);
        let coll: Box<dyn Collective> = match tcp {
            Some(t) if tp > 1 => {
                tracing::info!(peers = ?t.peer_addrs, "joining the TCP collective");
                Box::new(TcpCollective::connect(&TcpGroup {
                    rank,
                    peers: t.peer_addrs.clone(),
                    listen: (!t.listen_addr.is_empty()).then(|| t.listen_addr.clone()),
                    group_id: t.group_id,
                    connect_timeout: self.config.collective_connect_timeout,
                    op_timeout: self.config.collective_op_timeout,
                })?)
            }
            _ => Box::new(SoloCollective),
        };
        let reply = init_reply(&cfg, rank, tp, blocks as u32, bs, per_block);
        let engine = Engine {
            cfg,
            compute: Compute::Cpu {
                model,
                skip_math: null_compute,
            },
            coll,
            rank: rank as u32,
            num_blocks: blocks as usize,
            block_size: bs,
            seqs: HashMap::new(),
            failed: None,
        };
        Ok((engine, reply))
    }

    /// Runs one plan; every outcome is a `StepResult`.
    fn execute(&self, plan: StepPlan) -> StepResult {
        let t0 = Instant::now();
        let span = tracing::debug_span!("step", step = plan.step, seqs = plan.seqs.len());
        let _enter = span.enter();
        let mut slot = self.engine();
        let (rank, outcome) = match slot.as_mut() {
            None => (
                self.health().rank,
                Err(WorkerError::Step("not initialized: call Init first".into())),
            ),
            Some(engine) => {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step(&plan)))
                    .unwrap_or_else(|_| {
                        engine.fail("a step panicked".into());
                        Err(WorkerError::Step(
                            "the step panicked; re-Init the group".into(),
                        ))
                    });
                if let Some(why) = &engine.failed {
                    let mut h = self.health();
                    if h.ok {
                        h.ok = false;
                        h.detail = format!("broken: {why}; re-Init the group");
                    }
                }
                (engine.rank, outcome)
            }
        };
        let (tokens, error) = match outcome {
            Ok(t) => (t, String::new()),
            Err(e) => {
                tracing::warn!(step = plan.step, error = %e, "plan rejected");
                (Vec::new(), e.to_string())
            }
        };
        StepResult {
            step: plan.step,
            rank,
            tokens,
            error,
            elapsed_us: t0.elapsed().as_micros() as u64,
        }
    }
}

/// One rank's model, collective and mirrored sequences.
struct Engine {
    cfg: ModelConfig,
    compute: Compute,
    coll: Box<dyn Collective>,
    rank: u32,
    /// KV blocks the coordinator may use (the cache holds them, except in null and sim
    /// mode).
    num_blocks: usize,
    block_size: usize,
    seqs: HashMap<u64, SeqState>,
    /// Why this engine can no longer run steps (the group is out of step).
    failed: Option<String>,
}

/// What a worker mirrors of one sequence.
struct SeqState {
    block_table: Vec<u32>,
    /// Tokens in the KV cache.
    cached: usize,
    sampler: SeqSampler,
}

/// One scheduled sequence after its checks: what the step will run.
struct Checked<'a, 'p> {
    seq: &'p ScheduledSeq,
    /// The block table including this step's new blocks.
    block_table: Cow<'a, [u32]>,
    cached: usize,
    /// Set when the sequence starts (first appearance, reset, or freed and reused).
    fresh: Option<SeqSampler>,
}

/// What runs a step.
enum Compute {
    /// The CPU reference forward pass; `skip_math` for device "null".
    Cpu { model: CpuModel, skip_math: bool },
    /// The bf16 CUDA forward pass with its device-side collective.
    Cuda {
        model: Box<crate::cuda::CudaModel>,
        coll: crate::cuda::DeviceCollective,
    },
    /// No math, no weights: each step lasts its modelled GPU time.
    Sim {
        model: StepTimeModel,
        device: String,
    },
}

/// Init for a `sim:<gpu>` device: the model's shape only, the modelled KV capacity,
/// no collective.
fn load_sim(req: &InitRequest, dev: SimDevice) -> Result<(Engine, InitReply), WorkerError> {
    let (tp, rank, bs) = (
        req.tp_world_size as usize,
        req.rank as usize,
        req.block_size as usize,
    );
    if tp == 0 || rank >= tp {
        return Err(WorkerError::Config(format!(
            "rank {rank} is outside a TP group of {tp}"
        )));
    }
    if bs == 0 {
        return Err(WorkerError::Config("block_size must be > 0".into()));
    }
    if !matches!(req.dtype.as_str(), "" | "bf16") {
        return Err(WorkerError::Config(format!(
            "dtype '{}': the sim models bf16 serving",
            req.dtype
        )));
    }
    let cfg = sim::model_config(&req.model_path)?;
    let model = StepTimeModel::new(cfg.clone(), dev.gpu.spec(), tp)?;
    // The modelled GPU's memory sizes the cache; `kv_cache_bytes` is a CPU budget.
    let defaults = scheduler_defaults();
    let mut blocks =
        model.kv_capacity_blocks(bs, dev.memory_utilization, defaults.0, defaults.1)?;
    if let Some(m) = req.max_kv_blocks {
        blocks = blocks.min(u64::from(m));
    }
    let blocks = blocks.min(u64::from(u32::MAX));
    if blocks == 0 {
        return Err(WorkerError::Config("max_kv_blocks must be > 0".into()));
    }
    let device = dev.device_string();
    tracing::info!(
        %device,
        model = %req.model_path,
        tp,
        rank,
        kv_blocks = blocks,
        decode_step_us_batch1 = model.decode_step(1, 512).total_us,
        "sim worker: no weights loaded; step times are modelled, not measured"
    );
    let reply = init_reply(
        &cfg,
        rank,
        tp,
        blocks as u32,
        bs,
        model.kv_bytes_per_block(bs),
    );
    let engine = Engine {
        cfg,
        compute: Compute::Sim { model, device },
        coll: Box::new(SoloCollective),
        rank: rank as u32,
        num_blocks: blocks as usize,
        block_size: bs,
        seqs: HashMap::new(),
        failed: None,
    };
    Ok((engine, reply))
}

/// `max_num_batched_tokens` and `max_num_seqs` the coordinator uses by default; the
/// sim reserves activation memory for them (Init does not carry them).
fn scheduler_defaults() -> (usize, usize) {
    (8192, 256)
}

impl Engine {
    /// The `Health` detail of a ready engine.
    fn describe(&self) -> String {
        match &self.compute {
            Compute::Cpu {
                skip_math: false, ..
            } => "ready".into(),
            Compute::Cpu {
                skip_math: true, ..
            } => "ready (null: no math, pseudo-tokens)".into(),
            Compute::Sim { device, .. } => format!(
                "ready ({device}: step times are modelled for that GPU, not measured; pseudo-tokens)"
            ),
            Compute::Cuda { model, .. } => format!(
                "ready (cuda: {} KV tokens)",
                model.kv_tokens()
            ),
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(rank = self.rank, error = %why, "worker group broken");
        self.failed.get_or_insert(why);
    }

    fn step(&mut self, plan: &StepPlan) -> Result<Vec<SampledToken>, WorkerError> {
        if let Some(why) = &self.failed {
            return Err(WorkerError::Collective(format!(
                "the worker group is broken ({why}); re-Init it"
            )));
        }
        let started = Instant::now();
        let cfg = &self.cfg;
        let freed: HashSet<u64> = plan.freed.iter().copied().collect();
        let limits = Limits {
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            vocab: cfg.vocab_size,
            max_context: cfg.max_position_embeddings,
        };
        let checked = check_plan(&self.seqs, &freed, limits, plan)?;
        crate::fault::crash_if_fed(checked.iter().map(|c| c.seq.tokens.as_slice()));
        let vocab = cfg.vocab_size;
        let (logits, sim_deadline) = match &mut self.compute {
            Compute::Cpu {
                model,
                skip_math: false,
            } => {
                let chunks: Vec<SeqChunk<'_>> = checked
                    .iter()
                    .map(|c| SeqChunk {
                        block_table: &c.block_table,
                        cached: c.cached,
                        tokens: &c.seq.tokens,
                        sample: c.seq.sample,
                    })
                    .collect();
                let input = StepInput::build(self.block_size, cfg.sliding_window, &chunks);
                model.validate(&input)?;
                match model.forward(&input, self.coll.as_mut()) {
                    Ok(l) => (l, None),
                    Err(e) => {
                        self.fail(e.to_string());
                        return Err(e);
                    }
                }
            }
            Compute::Cpu { .. } => (None, None),
            Compute::Cuda { model, coll } => {
                let chunks: Vec<SeqChunk<'_>> = checked
                    .iter()
                    .map(|c| SeqChunk {
                        block_table: &c.block_table,
                        cached: c.cached,
                        tokens: &c.seq.tokens,
                        sample: c.seq.sample,
                    })
                    .collect();
                let input = StepInput::build(self.block_size, cfg.sliding_window, &chunks);
                model.validate(&input)?;
                match model.forward(&input, coll) {
                    Ok(l) => (l, None),
                    Err(e) => {
                        self.fail(e.to_string());
                        return Err(e);
                    }
                }
            }
            Compute::Sim { model, .. } => {
                let work: Vec<SeqWork> = checked
                    .iter()
                    .map(|c| SeqWork {
                        new_tokens: c.seq.tokens.len() as u32,
                        cached: c.cached as u32,
                        sample: c.seq.sample,
                    })
                    .collect();
                let us = model.step(&work).total_us;
                (None, Some(started + Duration::from_secs_f64(us * 1e-6)))
            }
        };
        // Commit: the plan ran, so its diffs become the mirrored state.
        let commits: Vec<_> = checked
            .into_iter()
            .map(|c| {
                let table = match (c.block_table, &c.fresh) {
                    (Cow::Owned(t), _) => Some(t),
                    (Cow::Borrowed(t), Some(_)) => Some(t.to_vec()),
                    (Cow::Borrowed(_), None) => None,
                };
                (c.seq, table, c.cached + c.seq.tokens.len(), c.fresh)
            })
            .collect();
        for id in &freed {
            self.seqs.remove(id);
        }
        let mut sampled = Vec::new();
        for (seq, table, cached, fresh) in commits {
            match fresh {
                Some(sampler) => {
                    self.seqs.insert(
                        seq.seq_id,
                        SeqState {
                            block_table: table.unwrap_or_default(),
                            cached,
                            sampler,
                        },
                    );
                }
                None => {
                    let st = self.seqs.get_mut(&seq.seq_id).expect("checked: known");
                    if let Some(t) = table {
                        st.block_table = t;
                    }
                    st.cached = cached;
                }
            }
            if seq.sample {
                sampled.push(seq.seq_id);
            }
        }
        let tokens = match logits {
            Some(logits) => sample_rows(&self.seqs, &sampled, &logits, vocab)?,
            None if self.rank == 0 => sampled
                .iter()
                .map(|id| SampledToken {
                    seq_id: *id,
                    token_id: sim::pseudo_token(*id, self.seqs[id].cached),
                    logprob: None,
                    top_logprobs: Vec::new(),
                })
                .collect(),
            None => Vec::new(),
        };
        for id in &sampled {
            if let Some(st) = self.seqs.get_mut(id) {
                st.sampler.advance();
            }
        }
        if let Some(deadline) = sim_deadline {
            sim::sleep_until(deadline);
        }
        Ok(tokens)
    }
}

/// Rank 0: one token per sampled sequence (rows of `logits`, in `ids` order), in
/// parallel; the samplers are not advanced.
fn sample_rows(
    seqs: &HashMap<u64, SeqState>,
    ids: &[u64],
    logits: &[f32],
    vocab: usize,
) -> Result<Vec<SampledToken>, WorkerError> {
    if logits.len() != ids.len() * vocab {
        return Err(WorkerError::Step(format!(
            "internal: {} logits for {} sampled sequences",
            logits.len(),
            ids.len()
        )));
    }
    Ok(ids
        .par_iter()
        .zip(logits.par_chunks(vocab))
        .map(|(id, row)| {
            let s = seqs[id].sampler.peek(row);
            SampledToken {
                seq_id: *id,
                token_id: s.token,
                logprob: s.logprob,
                top_logprobs: s
                    .top_logprobs
                    .into_iter()
                    .map(|(token_id, logprob)| TokenLogprob { token_id, logprob })
                    .collect(),
            }
        })
        .collect())
}

#[derive(Clone, Copy)]
struct Limits {
    num_blocks: usize,
    block_size: usize,
    vocab: usize,
    max_context: usize,
}

/// Checks every scheduled sequence against the mirrored state without changing it.
fn check_plan<'a, 'p: 'a>(
    seqs: &'a HashMap<u64, SeqState>,
    freed: &HashSet<u64>,
    lim: Limits,
    plan: &'p StepPlan,
) -> Result<Vec<Checked<'a, 'p>>, WorkerError> {
    let mut seen = HashSet::with_capacity(plan.seqs.len());
    let mut out = Vec::with_capacity(plan.seqs.len());
    for s in &plan.seqs {
        let id = s.seq_id;
        let err = |m: String| WorkerError::Step(format!("seq {id}: {m}"));
        if !seen.insert(id) {
            return Err(err("scheduled twice in one step".into()));
        }
        if s.tokens.is_empty() {
            return Err(err("no new tokens".into()));
        }
        if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= lim.vocab) {
            return Err(err(format!(
                "token id {t} is outside the vocabulary of {}",
                lim.vocab
            )));
        }
        if let Some(b) = s.new_blocks.iter().find(|&&b| b as usize >= lim.num_blocks) {
            return Err(err(format!(
                "block {b} is outside the KV cache of {} blocks",
                lim.num_blocks
            )));
        }
        let known = if s.reset || freed.contains(&id) {
            None
        } else {
            seqs.get(&id)
        };
        let checked = match known {
            Some(st) => {
                if s.position_start as usize != st.cached {
                    return Err(err(format!(
                        "position_start {} but the worker has {} tokens cached",
                        s.position_start, st.cached
                    )));
                }
                let block_table = if s.new_blocks.is_empty() {
                    Cow::Borrowed(&st.block_table[..])
                } else {
                    Cow::Owned([&st.block_table[..], &s.new_blocks[..]].concat())
                };
                Checked {
                    seq: s,
                    block_table,
                    cached: st.cached,
                    fresh: None,
                }
            }
            None => {
                let params = s.sampling.as_ref().ok_or_else(|| {
                    err("no sampling params (required on a sequence's first appearance and with reset)".into())
                })?;
                let sampler = SeqSampler::new(sampling_from_proto(params), lim.vocab)
                    .map_err(|e| err(e.to_string()))?;
                Checked {
                    seq: s,
                    block_table: Cow::Borrowed(&s.new_blocks[..]),
                    cached: s.position_start as usize,
                    fresh: Some(sampler),
                }
            }
        };
        let ctx = checked.cached + s.tokens.len();
        if ctx > lim.max_context {
            return Err(err(format!(
                "context {ctx} exceeds the model's {}",
                lim.max_context
            )));
        }
        if checked.block_table.len() * lim.block_size < ctx {
            return Err(err(format!(
                "its {} blocks hold {} tokens but the step needs {ctx}",
                checked.block_table.len(),
                checked.block_table.len() * lim.block_size
            )));
        }
        out.push(checked);
    }
    Ok(out)
}

fn sampling_from_proto(p: &proto::v1::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        top_k: p.top_k,
        seed: p.seed.unwrap_or_else(|| rand::rng().random()),
        min_tokens: p.min_tokens,
        stop_token_ids: p.stop_token_ids.clone(),
        logprobs: p.logprobs,
        generated_before: p.generated_before,
    }
}
