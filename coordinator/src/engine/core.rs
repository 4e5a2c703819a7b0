//! The engine loop (on its own thread): owns the scheduler and the executor; applies commands
//! between steps; `schedule → execute → update`; fans tokens out to requests.
//!
//! Costs per step, beyond the executor: one scheduler round (O(running) plus O(1) per
//! block), one outbox entry per sampled token and one channel send per step (the
//! relay task does the per-request sends), and a stats snapshot under a mutex. These
//! overlap the workers' compute of the next step (see
//! [`Engine::serve`]); the workers wait only for `update → schedule → submit`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::{Scheduler, SchedulerConfig, SchedulerError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::api::{EngineError, EngineEvent, FinishReason, GenerateRequest, RequestId, TokenEvent};
use super::executor::{ExecError, Executor, GroupFacts, Sampled, PlannedSeq, WorkPlan};
use super::{Command, EngineHandle, Shared, StepPhases};
use crate::histogram::Histogram;

/// Engine settings (the scheduler's own live in [`SchedulerConfig`]).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Scheduler settings; `num_blocks`/`block_size` are overwritten by what the
    /// workers report.
    pub scheduler: SchedulerConfig,
    /// Pause between attempts to (re)initialize a failed worker group.
    pub restart_backoff: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            restart_backoff: Duration::from_millis(500),
        }
    }
}

/// Starts the engine loop on a thread of its own, with a single-threaded tokio
/// runtime that also drives the executor's connections: a step's submit, the
/// workers' answers and the next schedule then never wait for another thread.
/// Events reach readers through an [`Outbox`]: one batch per step handed to a relay
/// task on the caller's runtime, which sends each event to its request's channel.
///
/// The returned task (on the caller's runtime) ends when the loop ends; aborting
/// it stops the loop at its next await, as does dropping every [`EngineHandle`].
pub fn run_engine<E: Executor>(
    executor: E,
    config: EngineConfig,
) -> (EngineHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let step_time = Arc::new(Histogram::default());
    let phases = Arc::new(StepPhases::default());
    let handle = EngineHandle::new(tx, step_time.clone(), phases.clone());
    let shared = handle.shared().clone();
    // Readers' wake-ups happen on the caller's runtime (cheap, local), not one
    // cross-thread wake-up per event from the engine thread.
    let (outbox_tx, mut outbox_rx) = mpsc::unbounded_channel::<Vec<Outgoing>>();
    tokio::spawn(async move {
        while let Some(batch) = outbox_rx.recv().await {
            for (to, ev) in batch {
                // A reader gone now is noticed (and its request stopped) next update.
                let _ = to.send(ev);
            }
        }
    });
    // The loop must not keep the command channel alive: it ends when every handle is gone.
    let mut engine = Engine {
        exec: executor,
        config,
        shared,
        rx,
        step_time,
        phases,
        requests: HashMap::new(),
        pending: Vec::new(),
        finished: Vec::new(),
        outbox: Outbox {
            batch: Vec::new(),
            relay: outbox_tx,
        },
        steps: 0,
    };
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime for the engine");
    std::thread::Builder::new()
        .name("stral-engine".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = engine.run() => {}
                    _ = cancel_rx => {}
                }
            });
            // Dropping the runtime closes the executor's connections.
            drop(runtime);
            let _ = done_tx.send(());
        })
        .expect("spawning the engine thread");
    let task = tokio::spawn(async move {
        // Aborting this task drops the sender, which stops the loop.
        let _cancel = cancel_tx;
        let _ = done_rx.await;
    });
    (handle, task)
}

/// An event and the channel of the request it is for.
type Outgoing = (mpsc::UnboundedSender<EngineEvent>, EngineEvent);

/// Every event to a reader leaves the engine through here, in order: queued with
/// [`push`](Outbox::push), handed over as one batch by [`flush`](Outbox::flush). One
/// relay task sends the batches on, so a request's events keep their order.
struct Outbox {
    batch: Vec<Outgoing>,
    relay: mpsc::UnboundedSender<Vec<Outgoing>>,
}

impl Outbox {
    fn push(&mut self, to: &mpsc::UnboundedSender<EngineEvent>, ev: EngineEvent) {
        self.batch.push((to.clone(), ev));
    }

    fn flush(&mut self) {
        if !self.batch.is_empty() {
            let capacity = self.batch.len();
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(capacity));
            // Fails only when the caller's runtime is gone, and its readers with it.
            let _ = self.relay.send(batch);
        }
    }
}

/// A request the engine is serving.
struct Live {
    events: mpsc::UnboundedSender<EngineEvent>,
    request: GenerateRequest,
    generated: u32,
    /// Prompt tokens the prefix cache served at first admission.
    cached: Option<u32>,
}

struct Engine<E: Executor> {
    exec: E,
    config: EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Command>,
    step_time: Arc<Histogram>,
    phases: Arc<StepPhases>,
    requests: HashMap<RequestId, Live>,
    /// Token events of the last step, not yet sent (see [`Engine::deliver`]).
    pending: Vec<(RequestId, EngineEvent)>,
    outbox: Outbox,
    /// Requests the last step finished, not yet told.
    finished: Vec<(RequestId, FinishReason)>,
    steps: u64,
}

/// Why serving stopped.
enum Stop {
    /// Every handle is gone.
    Closed,
    /// The worker group failed; re-initialize.
    WorkersLost(ExecError),
}

impl<E: Executor> Engine<E> {
    async fn run(&mut self) {
        loop {
            let facts = match self.exec.init().await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "worker group initialization failed; retrying");
                    if self.refuse_while_down(&e.to_string()).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::info!(
                blocks = facts.num_blocks,
                block_size = facts.block_size,
                max_context = facts.max_context,
                "worker group ready"
            );
            let mut sched = match Scheduler::new(self.scheduler_config(&facts)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "the worker group's facts give an invalid scheduler configuration");
                    if self.refuse_while_down(&e.to_string()).await {
                        return;
                    }
                    continue;
                }
            };
            self.shared
                .max_context
                .store(facts.max_context, Ordering::Release);
            self.shared.ready.store(true, Ordering::Release);
            let stop = self.serve(&mut sched).await;
            self.shared.ready.store(false, Ordering::Release);
            match stop {
                Stop::Closed => return,
                Stop::WorkersLost(e) => {
                    // What the last good step produced still reaches its readers.
                    self.deliver(&sched);
                    tracing::error!(error = %e, in_flight = self.requests.len(), "worker group lost; failing in-flight requests");
                    let msg = e.to_string();
                    for (_, live) in self.requests.drain() {
                        self.outbox.push(
                            &live.events,
                            EngineEvent::Failed(EngineError::Unavailable(msg.clone())),
                        );
                    }
                    self.publish_stats(&sched);
                    self.outbox.flush();
                }
            }
        }
    }

    fn scheduler_config(&self, facts: &GroupFacts) -> SchedulerConfig {
        SchedulerConfig {
            num_blocks: facts.num_blocks,
            block_size: facts.block_size,
            max_model_len: facts.max_context,
            sliding_window: facts.sliding_window.map(|w| w as usize),
            ..self.config.scheduler.clone()
        }
    }

    /// While no worker group is up, answer submits with 503 for one backoff period.
    /// Returns true when every handle is gone.
    async fn refuse_while_down(&mut self, why: &str) -> bool {
        let deadline = tokio::time::Instant::now() + self.config.restart_backoff;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(Command::Submit { ack, .. })) => {
                    let _ = ack.send(Err(EngineError::Unavailable(why.to_string())));
                }
                Ok(Some(Command::Abort(_))) => {}
            }
        }
    }

    /// The step loop. Overlap: once step k+1's plan is on its way to the workers, the
    /// engine delivers step k's tokens and final events and publishes its stats while
    /// the workers compute, so the workers wait only for `update → schedule → submit`.
    async fn serve(&mut self, sched: &mut Scheduler) -> Stop {
        loop {
            // Apply queued commands; when idle, wait for one.
            if !sched.has_work() {
                self.deliver(sched);
                match self.rx.recv().await {
                    Some(cmd) => self.apply(sched, cmd),
                    None => return Stop::Closed,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.apply(sched, cmd);
            }
            let started = Instant::now();
            let plan = sched.schedule(self.now());
            let work = self.work_plan(&plan);
            if work.seqs.is_empty() && work.freed.is_empty() {
                self.deliver(sched);
                // Nothing runnable right now (e.g. waiting for blocks): wait for a command
                // rather than spin.
                if let Ok(Some(cmd)) =
                    tokio::time::timeout(Duration::from_millis(5), self.rx.recv()).await
                {
                    self.apply(sched, cmd);
                }
                continue;
            }
            let submitted = self.exec.submit(work).await;
            let critical = started.elapsed();
            // The plan is only queued for the connection tasks of this runtime: let them
            // write it to the workers before the deliveries below.
            tokio::task::yield_now().await;
            // While the workers run this step: the previous step's deliveries.
            self.deliver(sched);
            let out = match submitted {
                Ok(()) => self.exec.collect().await,
                Err(e) => Err(e),
            };
            let out = match out {
                Ok(s) => s,
                Err(e @ ExecError::Rejected { .. }) => {
                    // A plan the workers cannot run is our bug: fail its sequences, keep serving.
                    tracing::error!(error = %e, "step rejected");
                    for s in &plan.seqs {
                        sched.abort(s.seq_id);
                        if let Some(live) = self.requests.remove(&s.seq_id) {
                            self.outbox.push(
                                &live.events,
                                EngineEvent::Failed(EngineError::Invalid(e.to_string())),
                            );
                        }
                    }
                    self.outbox.flush();
                    continue;
                }
                Err(e) => return Stop::WorkersLost(e),
            };
            let collected = Instant::now();
            self.update(sched, &plan, out.sampled);
            self.steps += 1;
            let wall = started.elapsed();
            self.step_time.observe(wall.as_secs_f64());
            // The engine's own share of the step: planning up to the submit, plus the
            // update after the answers; the workers' reported time is theirs, and the
            // rest is transport.
            let engine_us = (critical + collected.elapsed()).as_micros() as u64;
            self.phases.observe(
                engine_us,
                out.worker_us,
                (wall.as_micros() as u64).saturating_sub(engine_us + out.worker_us),
            );
        }
    }

    fn now(&self) -> u64 {
        // Scheduler time is monotonic microseconds since an arbitrary origin.
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_micros() as u64
    }

    fn apply(&mut self, sched: &mut Scheduler, cmd: Command) {
        match cmd {
            Command::Submit {
                id,
                request,
                events,
                ack,
            } => {
                let verdict = sched
                    .add(
                        id,
                        request.prompt.clone(),
                        request.max_tokens as usize,
                        request.priority,
                        self.now(),
                    )
                    .map_err(|e| map_admission(e, sched));
                let admitted = verdict.is_ok();
                if ack.send(verdict).is_ok() && admitted {
                    self.requests.insert(
                        id,
                        Live {
                            events,
                            request,
                            generated: 0,
                            cached: None,
                        },
                    );
                } else if admitted {
                    // The submitter is gone already.
                    sched.abort(id);
                }
            }
            Command::Abort(id) => {
                if self.requests.remove(&id).is_some() {
                    sched.abort(id);
                }
            }
        }
    }

    /// The scheduler's plan in the workers' terms, attaching sampling parameters to
    /// sequences workers do not know yet.
    fn work_plan(&mut self, plan: &scheduler::StepPlan) -> WorkPlan {
        let mut work = WorkPlan {
            step: self.steps,
            seqs: Vec::with_capacity(plan.seqs.len()),
            freed: plan.freed.clone(),
        };
        for s in &plan.seqs {
            let Some(live) = self.requests.get_mut(&s.seq_id) else {
                continue;
            };
            if s.reset && live.cached.is_none() {
                live.cached = Some(s.position as u32);
            }
            work.seqs.push(PlannedSeq {
                seq_id: s.seq_id,
                tokens: plan.tokens(s).to_vec(),
                position: s.position as u32,
                new_blocks: plan.new_blocks(s).to_vec(),
                sample: s.sample,
                reset: s.reset,
                sampling: s.reset.then(|| live.request.sampling.clone()),
                generated: live.generated,
                stop_token_ids: if s.reset {
                    live.request.stop_token_ids.clone()
                } else {
                    Vec::new()
                },
            });
        }
        work
    }

    /// Applies a step's sampled tokens to the scheduler. Token and final events are
    /// queued for [`deliver`](Self::deliver): a reader that is gone already counts as
    /// stopped here, so its blocks are freed in this update.
    fn update(&mut self, sched: &mut Scheduler, plan: &scheduler::StepPlan, sampled: Vec<Sampled>) {
        let mut tokens = Vec::with_capacity(sampled.len());
        let mut stopped = Vec::new();
        for s in sampled {
            let Some(live) = self.requests.get_mut(&s.seq_id) else {
                continue;
            };
            live.generated += 1;
            tokens.push((s.seq_id, s.token));
            if live.request.stop_token_ids.contains(&s.token) || live.events.is_closed() {
                stopped.push(s.seq_id);
            } else {
                self.pending.push((
                    s.seq_id,
                    EngineEvent::Token(TokenEvent {
                        id: s.token,
                        logprob: s.logprob,
                        top_logprobs: s.top_logprobs,
                        cached_tokens: (live.generated == 1).then(|| live.cached.unwrap_or(0)),
                    }),
                ));
            }
        }
        let finished = sched.update(plan, &tokens, &stopped);
        for (id, reason) in finished {
            self.finished.push((id, reason));
        }
    }

    /// Hands the queued token events and the final events to the outbox in one batch,
    /// after publishing the stats (so that a client that reads the metrics after its
    /// response sees its blocks already free).
    fn deliver(&mut self, sched: &Scheduler) {
        for (id, ev) in self.pending.drain(..) {
            if let Some(live) = self.requests.get(&id) {
                self.outbox.push(&live.events, ev);
            }
        }
        self.publish_stats(sched);
        for (id, reason) in self.finished.drain(..) {
            if let Some(live) = self.requests.remove(&id) {
                self.outbox.push(
                    &live.events,
                    EngineEvent::Finished {
                        reason,
                        cached_tokens: live.cached.unwrap_or(0),
                    },
                );
            }
        }
        // Stats before any event leaves: a client that reads the metrics after its
        // response sees its blocks already free.
        self.outbox.flush();
    }

    fn publish_stats(&self, sched: &Scheduler) {
        let c = sched.counters();
        let mut st = self.shared.stats.lock().expect("stats lock");
        st.waiting = c.waiting;
        st.running = c.running;
        st.kv_blocks_used = c.blocks_used;
        st.kv_blocks_total = c.blocks_total;
        st.prefix_cache_hit_rate = c.prefix_hit_rate();
        st.steps = self.steps;
        st.preemptions = c.preemptions;
    }
}

fn map_admission(e: SchedulerError, sched: &Scheduler) -> EngineError {
    match e {
        SchedulerError::QueueFull => EngineError::Overloaded {
            waiting: sched.counters().waiting,
        },
        SchedulerError::PromptTooLong {
            prompt_tokens,
            limit,
        } => EngineError::PromptTooLong {
            prompt_tokens,
            limit,
        },
        other => EngineError::Invalid(other.to_string()),
    }
}
