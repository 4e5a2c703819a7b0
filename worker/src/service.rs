//! The gRPC `Worker` service (`proto/worker.proto`): one tensor-parallel rank as a
//! process, driven by the coordinator over a bidirectional stream of step plans.
//!
//! Owns only the adaptation to gRPC: the server and its shutdown, the one [`Rank`]
//! slot (replaced by every `Init`, built by [`crate::init`]), the `Health` answer,
//! and the `Steps` stream. `Steps` executes plans in arrival order, on the runtime
//! thread itself in `stral worker` (one thread reads a plan, runs it and writes the
//! result) or on a blocking thread where a runtime is shared. What a step checks
//! and runs is [`Rank::step`]'s.
//!
//! Invariants:
//! - Every plan gets exactly one `StepResult`, with its step number, on every rank;
//!   a rejected plan answers its error and the worker keeps serving.
//! - A failure after the checks (a dead or hung peer, a panic) leaves the group out
//!   of step: the worker then answers every plan with that error and reports
//!   `ok = false` in `Health` until the next `Init`.
//! - Devices "null" and "sim:<gpu>" check and mirror plans exactly as "cpu" does but
//!   run no forward pass; rank 0 answers pseudo-tokens; a sim rank's `Health` detail
//!   says its times are modelled.
//!
//! Costs per step besides [`Rank::step`]: in `stral worker` no thread hand-off.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::v1::worker_server::{Worker, WorkerServer};
use proto::v1::{HealthReply, HealthRequest, InitReply, InitRequest, StepPlan, StepResult};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::init::{self, InitOptions};
use crate::rank::Rank;
use crate::WorkerError;

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
    rank: Mutex<Option<Rank>>,
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
                rank: Mutex::new(None),
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

    fn rank(&self) -> std::sync::MutexGuard<'_, Option<Rank>> {
        self.rank.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn init(&self, req: InitRequest) -> Result<InitReply, WorkerError> {
        let span = tracing::info_span!("init", rank = req.rank, tp = req.tp_world_size);
        let _enter = span.enter();
        let mut slot = self.rank();
        // Forget the old group first: its connections close, its memory returns.
        *slot = None;
        *self.health() = HealthReply {
            ok: true,
            detail: "initializing".into(),
            ..Default::default()
        };
        let opts = InitOptions {
            backend: self.config.backend.clone(),
            collective_connect_timeout: self.config.collective_connect_timeout,
            collective_op_timeout: self.config.collective_op_timeout,
        };
        let result = init::init(&opts, &req);
        let mut health = self.health();
        match result {
            Ok((rank, reply)) => {
                *health = HealthReply {
                    ok: true,
                    initialized: true,
                    rank: reply.rank,
                    tp_world_size: reply.tp_world_size,
                    num_kv_blocks: reply.num_kv_blocks,
                    detail: rank.describe(),
                };
                *slot = Some(rank);
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

    /// Runs one plan; every outcome is a `StepResult`.
    fn execute(&self, plan: StepPlan) -> StepResult {
        let t0 = Instant::now();
        let span = tracing::debug_span!("step", step = plan.step, seqs = plan.seqs.len());
        let _enter = span.enter();
        let mut slot = self.rank();
        let (rank, outcome) = match slot.as_mut() {
            None => (
                self.health().rank,
                Err(WorkerError::Step("not initialized: call Init first".into())),
            ),
            Some(rank) => {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| rank.step(&plan)))
                    .unwrap_or_else(|_| {
                        rank.fail("a step panicked".into());
                        Err(WorkerError::Step(
                            "the step panicked; re-Init the group".into(),
                        ))
                    });
                if let Some(why) = rank.failed() {
                    let mut h = self.health();
                    if h.ok {
                        h.ok = false;
                        h.detail = format!("broken: {why}; re-Init the group");
                    }
                }
                (rank.rank(), outcome)
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
