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
use super::draft::{self, DraftSource, Drafter};
use super::executor::{ExecError, Executor, GroupFacts, PlannedSeq, Sampled, WorkPlan};
use super::step_target::StepTarget;
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
    /// How long a request may wait for a crashed worker group to come back before it
    /// fails with 503; zero fails in-flight requests at once (no recovery).
    pub recovery_timeout: Duration,
    /// A request that has lived through more worker-group crashes than this fails
    /// with 503 at the next one.
    pub max_restarts_per_request: u32,
    /// The step-time target; resolved into `scheduler.max_step_ms` with each worker
    /// group's step cost model when the group comes up (`scheduler.step_cost` and
    /// `scheduler.max_step_ms` themselves are overwritten then).
    pub max_step: StepTarget,
    /// Where drafts for speculative decoding come from.
    pub speculative: Speculative,
    /// Most draft tokens a sequence verifies per step (k adapts below it).
    pub num_speculative_tokens: usize,
}

/// The draft source of speculative decoding (ARCHITECTURE §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speculative {
    /// No drafts: one token per decode step.
    None,
    /// Prompt lookup: the sequence's own n-grams ([`super::draft::NgramIndex`]).
    #[default]
    Ngram,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            restart_backoff: Duration::from_millis(500),
            recovery_timeout: Duration::from_secs(30),
            max_restarts_per_request: 2,
            max_step: StepTarget::Auto,
            speculative: Speculative::default(),
            num_speculative_tokens: 8,
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
        in_flight: Vec::new(),
        held: Vec::new(),
        suspects: std::collections::VecDeque::new(),
        probation: None,
        lost_at: None,
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
    /// Every token sampled so far (EOS included), so that a crashed group's sequence
    /// can be recomputed from `prompt + output`.
    output: Vec<u32>,
    /// Worker-group crashes this request has lived through.
    crashes: u32,
    /// Crashed steps that held this sequence since its last successful step.
    crashed_steps: u32,
    /// When it lost its worker group, while waiting to be readmitted.
    lost_at: Option<Instant>,
    /// Prompt lookup over `prompt + output` and the prediction, when this request
    /// speculates.
    drafts: Option<Drafter>,
    /// The source of the draft proposed for the coming step.
    draft_source: DraftSource,
}

impl Live {
    fn new(events: mpsc::UnboundedSender<EngineEvent>, request: GenerateRequest) -> Self {
        Self {
            events,
            request,
            generated: 0,
            cached: None,
            output: Vec::new(),
            crashes: 0,
            crashed_steps: 0,
            lost_at: None,
            drafts: None,
            draft_source: DraftSource::Ngram,
        }
    }
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
    /// Sequences of the step submitted last (what a crash is blamed on).
    in_flight: Vec<RequestId>,
    /// Requests whose worker group crashed, waiting for the next one (oldest first).
    held: Vec<RequestId>,
    /// Readmitted after a crash but held back: each was in a crashed step, so they
    /// return one at a time (see [`Engine::release_suspect`]).
    suspects: std::collections::VecDeque<RequestId>,
    /// The suspect readmitted last, until a step that holds it succeeds.
    probation: Option<RequestId>,
    /// When the worker group was lost, until a new one is up.
    lost_at: Option<Instant>,
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
            // Requests held from a crashed group bound how long one attempt may take.
            let deadline = self.held_deadline();
            let init = self.exec.init();
            let attempt = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), init).await,
                None => Ok(init.await),
            };
            let Ok(attempt) = attempt else {
                self.expire_held("the worker group is still initializing");
                continue;
            };
            let facts = match attempt {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "worker group initialization failed; retrying");
                    if self.refuse_while_down(&e.to_string()).await {
                        return;
                    }
                    self.expire_held(&e.to_string());
                    continue;
                }
            };
            let config = self.scheduler_config(&facts);
            tracing::info!(
                blocks = facts.num_blocks,
                block_size = facts.block_size,
                max_context = facts.max_context,
                step_cost_fixed_ms = facts.step_cost.fixed_ms,
                step_cost_per_token_ms = facts.step_cost.per_token_ms,
                step_cost_per_context_token_ms = facts.step_cost.per_context_token_ms,
                max_step_ms = ?config.max_step_ms,
                max_prefill_ms = ?config.max_prefill_ms,
                max_step = %self.config.max_step,
                "worker group ready"
            );
            {
                let mut st = self.shared.stats.lock().expect("stats lock");
                st.step_cost = facts.step_cost;
                st.max_step_ms = config.max_step_ms;
                st.max_prefill_ms = config.max_prefill_ms;
            }
            let mut sched = match Scheduler::new(config) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "the worker group's facts give an invalid scheduler configuration");
                    if self.refuse_while_down(&e.to_string()).await {
                        return;
                    }
                    self.expire_held(&e.to_string());
                    continue;
                }
            };
            self.shared
                .max_context
                .store(facts.max_context, Ordering::Release);
            self.readmit(&mut sched);
            self.shared.ready.store(true, Ordering::Release);
            let stop = self.serve(&mut sched).await;
            self.shared.ready.store(false, Ordering::Release);
            match stop {
                Stop::Closed => return,
                Stop::WorkersLost(e) => {
                    // What the last good step produced still reaches its readers.
                    self.deliver(&sched);
                    tracing::error!(error = %e, requests = self.requests.len(), "worker group lost; keeping its requests for the next group");
                    self.hold_after_crash(&e.to_string());
                    self.publish_stats(&sched);
                    self.outbox.flush();
                }
            }
        }
    }

    /// The scheduler for a new group: its facts over the configured settings, and
    /// the step-time target resolved with its cost model (no model: no cap).
    fn scheduler_config(&self, facts: &GroupFacts) -> SchedulerConfig {
        let base = &self.config.scheduler;
        let cost = facts.step_cost;
        let measured = cost != scheduler::StepCost::default();
        let caps = self.config.max_step.resolve(&cost);
        SchedulerConfig {
            num_blocks: facts.num_blocks,
            block_size: facts.block_size,
            max_model_len: facts.max_context,
            sliding_window: facts.sliding_window.map(|w| w as usize),
            step_cost: measured.then_some(cost),
            max_step_ms: caps.max_step_ms,
            max_prefill_ms: caps.max_prefill_ms,
            ..base.clone()
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
                Ok(Some(Command::Abort(id))) => {
                    // A held request whose client left: nothing of it is on a worker.
                    if self.requests.remove(&id).is_some() {
                        self.held.retain(|h| *h != id);
                    }
                }
            }
        }
    }

    /// After the group failed: every request is kept to be recomputed on the next
    /// group, unless recovery is off, it has lived through too many crashes (503), or it
    /// was in two crashed steps in a row with no good step between (500: it is what
    /// crashes the workers). Each held request's blocks went with the old scheduler.
    fn hold_after_crash(&mut self, why: &str) {
        let now = Instant::now();
        self.lost_at.get_or_insert(now);
        for id in std::mem::take(&mut self.in_flight) {
            if let Some(live) = self.requests.get_mut(&id) {
                live.crashed_steps += 1;
            }
        }
        let (max_restarts, recover) = (
            self.config.max_restarts_per_request,
            !self.config.recovery_timeout.is_zero(),
        );
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.sort_unstable();
        self.suspects.clear();
        self.probation = None;
        self.held.clear();
        for id in ids {
            let live = self.requests.get_mut(&id).expect("listed above");
            live.crashes += 1;
            live.lost_at.get_or_insert(now);
            let verdict = if live.crashed_steps >= 2 {
                Some(EngineError::WorkerCrash(format!(
                    "the worker group crashed in {} steps in a row that held this request, so                      it was not retried (last error: {why})",
                    live.crashed_steps
                )))
            } else if !recover || live.crashes > max_restarts {
                Some(EngineError::Unavailable(why.to_string()))
            } else {
                None
            };
            match verdict {
                Some(err) => {
                    let live = self.requests.remove(&id).expect("listed above");
                    self.outbox.push(&live.events, EngineEvent::Failed(err));
                }
                None => self.held.push(id),
            }
        }
    }

    /// When the first held request's recovery timeout runs out.
    fn held_deadline(&self) -> Option<Instant> {
        self.held
            .iter()
            .filter_map(|id| self.requests.get(id)?.lost_at)
            .min()
            .map(|t| t + self.config.recovery_timeout)
    }

    /// Between attempts to bring a group back: held requests past the recovery
    /// timeout, or whose client left, are dropped (the former with 503).
    fn expire_held(&mut self, why: &str) {
        let timeout = self.config.recovery_timeout;
        let requests = &mut self.requests;
        let outbox = &mut self.outbox;
        self.held.retain(|id| {
            let Some(live) = requests.get(id) else {
                return false;
            };
            let expired = live.lost_at.is_some_and(|t| t.elapsed() >= timeout);
            if expired || live.events.is_closed() {
                let live = requests.remove(id).expect("checked");
                if expired {
                    outbox.push(
                        &live.events,
                        EngineEvent::Failed(EngineError::Unavailable(format!(
                            "the worker group did not come back within {timeout:?}: {why}"
                        ))),
                    );
                }
                return false;
            }
            true
        });
        self.outbox.flush();
    }

    /// A new group is up: held requests return to the new scheduler as sequences to
    /// recompute (`prompt + output`, the rest of their token budget). Those that were
    /// in the crashed step are suspects and come back one at a time.
    fn readmit(&mut self, sched: &mut Scheduler) {
        if let Some(t) = self.lost_at.take() {
            self.shared.recovery_time.observe(t.elapsed().as_secs_f64());
            self.shared.worker_restarts.fetch_add(1, Ordering::Relaxed);
        }
        self.expire_held("it came back too late");
        for id in std::mem::take(&mut self.held) {
            let suspect = self.requests.get(&id).is_some_and(|l| l.crashed_steps > 0);
            if suspect {
                self.suspects.push_back(id);
            } else {
                self.resume(sched, id);
            }
        }
        self.release_suspect(sched);
        self.outbox.flush();
    }

    /// Puts one held request back into `sched`; returns whether it is there.
    fn resume(&mut self, sched: &mut Scheduler, id: RequestId) -> bool {
        let Some(live) = self.requests.get_mut(&id) else {
            return false;
        };
        live.lost_at = None;
        let mut tokens = live.request.prompt.clone();
        tokens.extend_from_slice(&live.output);
        let left = (live.request.max_tokens as usize).saturating_sub(live.output.len());
        let priority = live.request.priority;
        match sched.add(id, tokens, left.max(1), priority, self.now()) {
            Ok(()) => {
                self.shared
                    .requests_recovered
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                let err = map_admission(e, sched);
                let live = self.requests.remove(&id).expect("checked");
                self.outbox.push(&live.events, EngineEvent::Failed(err));
                false
            }
        }
    }

    /// Readmits the next suspect once the previous one has been through a good step, so
    /// a request that crashes the workers is alone among suspects in its next step.
    fn release_suspect(&mut self, sched: &mut Scheduler) {
        if self
            .probation
            .is_some_and(|id| self.requests.contains_key(&id))
        {
            return;
        }
        self.probation = None;
        while let Some(id) = self.suspects.pop_front() {
            if self.resume(sched, id) {
                self.probation = Some(id);
                return;
            }
        }
    }

    /// After a step that succeeded: its sequences are cleared of crash suspicion.
    fn clear_suspicion(&mut self, sched: &mut Scheduler) {
        for id in std::mem::take(&mut self.in_flight) {
            if let Some(live) = self.requests.get_mut(&id) {
                live.crashed_steps = 0;
            }
            if self.probation == Some(id) {
                self.probation = None;
            }
        }
        if !self.suspects.is_empty() {
            self.release_suspect(sched);
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
            self.propose_drafts(sched);
            let plan = sched.schedule(self.now());
            let work = self.work_plan(&plan);
            if work.seqs.is_empty() && work.freed.is_empty() && work.truncated.is_empty() {
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
            self.in_flight.clear();
            self.in_flight.extend(work.seqs.iter().map(|s| s.seq_id));
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
            self.clear_suspicion(sched);
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
                    let mut live = Live::new(events, request);
                    let k = self.config.num_speculative_tokens;
                    // Logprobs are reported for one token per step: no drafts then.
                    if self.config.speculative == Speculative::Ngram
                        && k > 0
                        && !live.request.no_speculation
                        && live.request.sampling.logprobs.is_none()
                    {
                        let r = &mut live.request;
                        live.drafts = Some(Drafter::new(&r.prompt, r.prediction.take(), k));
                    }
                    self.requests.insert(id, live);
                } else if admitted {
                    // The submitter is gone already.
                    sched.abort(id);
                }
            }
            Command::Abort(id) => {
                if self.requests.remove(&id).is_some() {
                    // A suspect not yet readmitted is not in the scheduler (a no-op there).
                    self.suspects.retain(|s| *s != id);
                    sched.abort(id);
                }
            }
        }
    }

    /// Proposes each speculating request's draft (prediction, else prompt lookup) for
    /// the next step, as long as its draft length affords (none when the batch is large).
    fn propose_drafts(&mut self, sched: &mut Scheduler) {
        let running = sched.counters().running;
        let budget = sched.config().max_num_batched_tokens;
        for (&id, live) in &mut self.requests {
            if let Some(drafter) = &live.drafts {
                let k = draft::affordable(drafter.length.get(), running, budget);
                if k > 0 {
                    let (tokens, source) = drafter.draft(k);
                    live.draft_source = source;
                    sched.set_draft(id, &tokens);
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
            truncated: plan
                .truncated
                .iter()
                .map(|&(id, len)| (id, len as u32))
                .collect(),
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
                tokens: [plan.tokens(s), plan.drafts(s)].concat(),
                num_drafts: s.num_drafts() as u32,
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
        let mut entries = plan.seqs.iter().filter(|e| e.sample).peekable();
        for mut s in sampled {
            let Some(live) = self.requests.get_mut(&s.seq_id) else {
                continue;
            };
            // The accepted drafts, then the token after them (logprobs are its own).
            let entry = entries
                .find(|e| e.seq_id == s.seq_id)
                .or_else(|| plan.seqs.iter().find(|e| e.seq_id == s.seq_id));
            let drafts = entry.map_or(&[][..], |e| plan.drafts(e));
            let accepted = &drafts[..(s.accepted as usize).min(drafts.len())];
            let last = accepted.len();
            if let Some(drafter) = &mut live.drafts {
                drafter.length.observe(drafts.len(), accepted.len());
            }
            let draft_source = (!drafts.is_empty()).then_some(live.draft_source);
            let rejected = (drafts.len() - accepted.len()) as u32;
            for (i, &token) in accepted.iter().chain([&s.token]).enumerate() {
                live.generated += 1;
                live.output.push(token);
                if let Some(drafter) = &mut live.drafts {
                    drafter.push(token);
                }
                tokens.push((s.seq_id, token));
                if live.request.stop_token_ids.contains(&token) || live.events.is_closed() {
                    stopped.push(s.seq_id);
                    break;
                }
                let (logprob, top_logprobs) = if i == last {
                    (s.logprob, std::mem::take(&mut s.top_logprobs))
                } else {
                    (None, Vec::new())
                };
                self.pending.push((
                    s.seq_id,
                    EngineEvent::Token(TokenEvent {
                        id: token,
                        logprob,
                        top_logprobs,
                        cached_tokens: (live.generated == 1).then(|| live.cached.unwrap_or(0)),
                        accepted_draft: i < last,
                        rejected_drafts: if i == last { rejected } else { 0 },
                        draft_source,
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
        st.worker_restarts = self.shared.worker_restarts.load(Ordering::Relaxed);
        st.requests_recovered = self.shared.requests_recovered.load(Ordering::Relaxed);
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
