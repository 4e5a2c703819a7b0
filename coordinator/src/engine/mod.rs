//! The engine: the coordinator's step loop and the handle the HTTP layer talks to.
//!
//! The loop is three verbs (`schedule → execute → update`, STYLE.md): the
//! [`scheduler`] decides, an [`Executor`] runs the plan on every worker rank, and the
//! update hands sampled tokens to per-request channels. Commands (submit, abort) reach
//! the loop through one channel and are applied between steps, so the scheduler is
//! only ever touched by the loop task.
//!
//! Invariants: every admitted request receives exactly one final event (`Finished` or
//! `Failed`); a request whose reader is gone is aborted at the next step boundary and
//! its KV blocks are freed in that step; after a worker failure the scheduler is reset
//! (all blocks free), the worker group is re-initialized before anything new is
//! admitted, and the requests it held are recomputed on the new group from their prompt
//! and the tokens already sent, so their streams pause and continue (within
//! `recovery_timeout` and `max_restarts_per_request`; see `core.rs`).

mod api;
mod core;
pub mod draft;
pub mod executor;
pub mod grpc;
pub mod step_target;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

pub use api::{
    EngineError, EngineEvent, FinishReason, GenerateRequest, Priority, RequestId, RequestStream,
    SamplingParams, TokenEvent,
};
pub use core::{run_engine, EngineConfig, Speculative};
pub use executor::{ExecError, Executor, GroupFacts, StepOutput};
pub use step_target::StepTarget;

use crate::histogram::Histogram;

/// A snapshot of the engine's state for metrics and admission decisions.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub prefix_cache_hit_rate: f64,
    pub steps: u64,
    pub preemptions: u64,
    pub step_time: Arc<Histogram>,
    pub phases: Arc<StepPhases>,
    /// Worker groups brought back after a crash.
    pub worker_restarts: u64,
    /// Requests readmitted to a new group after a crash.
    pub requests_recovered: u64,
    /// Seconds from losing a group to the next one being up.
    pub recovery_time: Arc<Histogram>,
    /// The current group's step cost model (zeros before the first group and for
    /// one that measures none).
    pub step_cost: scheduler::StepCost,
    /// The step-time target the scheduler caps prefill with; `None`: no cap.
    pub max_step_ms: Option<f64>,
    /// The prefill allowance per step (`--max-step-ms auto`); `None`: none.
    pub max_prefill_ms: Option<f64>,
}

/// Where each step's wall time went (means are what matter: sum / count).
#[derive(Debug, Default)]
pub struct StepPhases {
    /// The engine's critical path: schedule + plan building + submit, and the update
    /// after the answers (the deliveries overlapped with the workers are not in it).
    pub engine: Histogram,
    /// The longest time a rank reported for the step (checks, forward pass, sampling).
    pub worker: Histogram,
    /// The rest: gRPC encode/decode, loopback or network, task wake-ups.
    pub transport: Histogram,
}

impl StepPhases {
    pub(crate) fn observe(&self, engine_us: u64, worker_us: u64, transport_us: u64) {
        self.engine.observe(engine_us as f64 / 1e6);
        self.worker.observe(worker_us as f64 / 1e6);
        self.transport.observe(transport_us as f64 / 1e6);
    }
}

pub(crate) enum Command {
    Submit {
        id: RequestId,
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
        ack: oneshot::Sender<Result<(), EngineError>>,
    },
    Abort(RequestId),
}

/// State shared between the handle(s) and the loop.
pub(crate) struct Shared {
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) stats: Mutex<EngineStats>,
    pub(crate) ready: AtomicBool,
    pub(crate) max_context: AtomicUsize,
    pub(crate) worker_restarts: AtomicU64,
    pub(crate) requests_recovered: AtomicU64,
    pub(crate) recovery_time: Arc<Histogram>,
    next_id: AtomicU64,
}

/// Cheap to clone; every clone talks to the same engine loop.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        step_time: Arc<Histogram>,
        phases: Arc<StepPhases>,
    ) -> Self {
        let recovery_time = Arc::new(Histogram::default());
        let stats = EngineStats {
            step_time,
            phases,
            recovery_time: recovery_time.clone(),
            ..Default::default()
        };
        Self {
            shared: Arc::new(Shared {
                commands,
                stats: Mutex::new(stats),
                ready: AtomicBool::new(false),
                max_context: AtomicUsize::new(0),
                worker_restarts: AtomicU64::new(0),
                requests_recovered: AtomicU64::new(0),
                recovery_time,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Submits a request; resolves once the engine admitted (or refused) it.
    pub async fn submit(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        let (ack, acked) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Submit {
                id,
                request,
                events,
                ack,
            })
            .map_err(|_| EngineError::ShuttingDown)?;
        acked.await.map_err(|_| EngineError::ShuttingDown)??;
        let commands = self.shared.commands.clone();
        Ok(RequestStream {
            id,
            rx,
            abort: Some(Arc::new(move |id| drop(commands.send(Command::Abort(id))))),
        })
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }

    /// Whether a worker group is loaded and serving.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// The model's context length (0 until the workers reported it).
    pub fn max_context(&self) -> usize {
        self.shared.max_context.load(Ordering::Acquire)
    }
}
