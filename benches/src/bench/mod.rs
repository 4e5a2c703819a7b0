//! `stral bench`: a load generator for any Mistral- or OpenAI-compatible server.
//!
//! Owns one benchmark invocation: probe the server, run the workload once per
//! concurrency level (one level, or a `sweep`), summarise each run
//! ([`report::RunReport`]), write the JSON and the plots. Metric definitions live in
//! [`metrics`]; request generation in [`workload`]; the HTTP client in [`client`].
//!
//! Load shapes:
//! - **closed loop** (`Load::Closed`): `concurrency` workers, each sending its next
//!   request as soon as the previous one ends. For the keystroke workload the workers are
//!   the simulated developers, and their keystrokes and think time pace them instead.
//! - **open loop** (`Load::Open`): Poisson arrivals at `rate` requests/s, independent of
//!   how fast the server answers (latency under a given offered load).
//!
//! A run stops sending when its duration is up or its request count is reached, then
//! waits for the requests in flight (they count). Invariants: `completed + cancelled +
//! failed = sent`; request `i`'s content depends only on the seed and `i`.
//!
//! Cost: the client side is one tokio task per request in flight plus one per worker or
//! developer; on a shared machine the client competes with the server for CPU, which the
//! report cannot see — run them on different machines for numbers that matter.

pub mod client;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use client::{Client, Endpoint};
use metrics::{Outcome, RequestRecord, Slo, TokenCountSource};
use report::{BenchReport, RunReport};
use workload::{KeystrokeSession, PoissonArrivals, RequestSpec, Workload};

/// Everything that can stop a benchmark before it reports.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad --url {0}")]
    BadUrl(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0} answered 401 Unauthorized: pass --api-key")]
    Unauthorized(String),
    #[error("--model not given and {0}/v1/models lists no model")]
    NoModel(String),
    #[error("{0}")]
    Config(String),
    #[error("all {sent} requests failed; first error: {first}")]
    AllFailed { sent: u64, first: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plotting {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
}

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Load {
    /// `concurrency` requests in flight (developers, for the keystroke workload).
    Closed { concurrency: usize },
    /// Poisson arrivals, `rate` requests per second.
    Open { rate: f64 },
}

/// Plot file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlotFormats {
    pub svg: bool,
    pub png: bool,
}

/// One `stral bench` invocation.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `http://host:port` of the server.
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub endpoint: Endpoint,
    /// `None`: the first model `/v1/models` lists.
    pub model: Option<String>,
    pub workload: Workload,
    pub load: Load,
    /// Closed-loop concurrency levels to run one after the other (overrides `load`).
    pub sweep_concurrency: Vec<usize>,
    /// Stop sending after this long (per run).
    pub duration: Option<Duration>,
    /// Stop sending after this many requests (per run).
    pub num_requests: Option<u64>,
    pub seed: u64,
    pub temperature: f32,
    pub slo: Slo,
    pub request_timeout: Duration,
    /// Live progress bar on stderr (drawn only on a terminal).
    pub progress: bool,
    pub json_out: Option<PathBuf>,
    pub plot_dir: Option<PathBuf>,
    pub plot_formats: PlotFormats,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            url: "http://127.0.0.1:8080".into(),
            api_key: None,
            endpoint: Endpoint::Fim,
            model: None,
            workload: Workload::Keystroke(Default::default()),
            load: Load::Closed { concurrency: 4 },
            sweep_concurrency: Vec::new(),
            duration: Some(Duration::from_secs(30)),
            num_requests: None,
            seed: 0,
            temperature: 0.0,
            slo: Slo::default(),
            request_timeout: Duration::from_secs(300),
            progress: true,
            json_out: None,
            plot_dir: None,
            plot_formats: PlotFormats {
                svg: true,
                png: true,
            },
        }
    }
}

impl BenchConfig {
    /// Rejects combinations that cannot run, with a message naming the flag.
    pub fn validate(&self) -> Result<(), BenchError> {
        let err = |m: &str| Err(BenchError::Config(m.to_string()));
        if self.duration.is_none() && self.num_requests.is_none() {
            return err("give --duration or --num-requests (or both) to bound the run");
        }
        if self.duration.is_some_and(|d| d.is_zero()) || self.num_requests == Some(0) {
            return err("--duration and --num-requests must be positive");
        }
        if let Workload::Keystroke(_) = self.workload {
            if !self.endpoint.takes_suffix() {
                return err(
                    "the keystroke workload sends FIM requests: use --endpoint fim or completions",
                );
            }
            if let Load::Open { .. } = self.load {
                return err("the keystroke workload is paced by its developers: use --concurrency N (developers), not --rate");
            }
        }
        if let Workload::Edit(_) = self.workload {
            if self.endpoint != Endpoint::Chat {
                return err("the edit workload sends chat requests: use --endpoint chat");
            }
        }
        match self.load {
            Load::Closed { concurrency: 0 } => return err("--concurrency must be at least 1"),
            Load::Open { rate } if !(rate > 0.0 && rate.is_finite()) => {
                return err("--rate must be a positive number of requests per second")
            }
            _ => {}
        }
        if self.sweep_concurrency.contains(&0) {
            return err("--sweep-concurrency levels must be at least 1");
        }
        Ok(())
    }

    /// The loads to run, in order.
    fn loads(&self) -> Vec<Load> {
        if self.sweep_concurrency.is_empty() {
            vec![self.load]
        } else {
            self.sweep_concurrency
                .iter()
                .map(|&c| Load::Closed { concurrency: c })
                .collect()
        }
    }
}

/// Runs the benchmark, writes `json_out` and the plots, and returns the report.
pub async fn run(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    config.validate()?;
    let client = Client::new(&config.url, config.api_key.clone(), config.request_timeout)?;
    let listed = client.probe().await?;
    let model = match (&config.model, listed) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m,
        (None, None) => return Err(BenchError::NoModel(client.base().to_string())),
    };
    let mut runs = Vec::new();
    for (level, load) in config.loads().into_iter().enumerate() {
        let records = run_once(config, &client, &model, load, level as u64).await;
        let run = RunReport::new(load, &records.records, records.duration_s, &config.slo);
        if run.completed == 0 && run.failed > 0 {
            let first = records
                .records
                .iter()
                .find_map(|r| match &r.outcome {
                    Outcome::Failed(e) => Some(e.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            return Err(BenchError::AllFailed {
                sent: run.sent,
                first,
            });
        }
        runs.push((run, records.records));
    }
    let report = BenchReport::new(config, &model, runs);
    if let Some(path) = &config.json_out {
        report.write_json(path)?;
    }
    if let Some(dir) = &config.plot_dir {
        plot::write_plots(&report, dir, config.plot_formats)?;
    }
    Ok(report)
}

/// The records of one run and its wall time (first send to last answer).
struct RunRecords {
    records: Vec<RequestRecord>,
    duration_s: f64,
}

/// State shared by the tasks of one run.
struct RunCtx {
    client: Client,
    endpoint: Endpoint,
    model: String,
    temperature: f32,
    start: Instant,
    deadline: Option<Instant>,
    num_requests: Option<u64>,
    tickets: AtomicU64,
    records: Mutex<Vec<RequestRecord>>,
    /// Completed, cancelled, failed so far (for the progress line).
    counts: [AtomicU64; 3],
    progress: ProgressBar,
}

impl RunCtx {
    /// Takes the next request index, or `None` when the run should stop sending.
    fn ticket(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.tickets.fetch_add(1, Ordering::Relaxed);
        match self.num_requests {
            Some(n) if i >= n => None,
            _ => Some(i),
        }
    }

    async fn send(&self, spec: &RequestSpec) -> RequestRecord {
        let body = self.endpoint.body(&self.model, spec, self.temperature);
        let bytes = Bytes::from(serde_json::to_vec(&body).expect("JSON body"));
        self.client
            .stream(self.endpoint.path(), bytes, self.start)
            .await
    }

    fn record(&self, r: RequestRecord) {
        let slot = match r.outcome {
            Outcome::Completed => 0,
            Outcome::Cancelled => 1,
            Outcome::Failed(_) => 2,
        };
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.records.lock().expect("records lock").push(r);
        let [done, cancelled, failed] = self.counts.each_ref().map(|c| c.load(Ordering::Relaxed));
        if self.num_requests.is_some() {
            self.progress.inc(1);
        }
        self.progress.set_message(format!(
            "completed {done}  cancelled {cancelled}  failed {failed}"
        ));
    }
}

/// One load level. Level `k` draws request (and developer) streams from `k << 32` on, so
/// the levels of a sweep send different prompts and none is served from the prefix cache
/// the previous level warmed.
async fn run_once(
    config: &BenchConfig,
    client: &Client,
    model: &str,
    load: Load,
    level: u64,
) -> RunRecords {
    let base = level << 32;
    let start = Instant::now();
    let progress = progress_bar(config, load);
    let ctx = Arc::new(RunCtx {
        client: client.clone(),
        endpoint: config.endpoint,
        model: model.to_string(),
        temperature: config.temperature,
        start,
        deadline: config.duration.map(|d| start + d),
        num_requests: config.num_requests,
        tickets: AtomicU64::new(0),
        records: Mutex::new(Vec::new()),
        counts: Default::default(),
        progress: progress.clone(),
    });
    let ticker = config
        .duration
        .filter(|_| config.num_requests.is_none())
        .map(|_| {
            let p = progress.clone();
            tokio::spawn(async move {
                loop {
                    p.set_position(start.elapsed().as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
    match (&config.workload, load) {
        (Workload::Keystroke(k), Load::Closed { concurrency }) => {
            let devs: Vec<_> = (0..concurrency as u64)
                .map(|d| {
                    let session = KeystrokeSession::new(k.clone(), config.seed, base + d);
                    tokio::spawn(developer(ctx.clone(), session))
                })
                .collect();
            for d in devs {
                let _ = d.await;
            }
        }
        (w, Load::Closed { concurrency }) => {
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (ctx, w, seed) = (ctx.clone(), w.clone(), config.seed);
                    tokio::spawn(async move {
                        while let Some(i) = ctx.ticket() {
                            let rec = ctx.send(&w.request(seed, base + i)).await;
                            ctx.record(rec);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        (w, Load::Open { rate }) => {
            let mut arrivals = PoissonArrivals::new(rate, config.seed);
            let mut next = start;
            let mut inflight = Vec::new();
            loop {
                tokio::time::sleep_until(next.into()).await;
                let Some(i) = ctx.ticket() else { break };
                let (ctx2, spec) = (ctx.clone(), w.request(config.seed, base + i));
                inflight.push(tokio::spawn(async move {
                    let rec = ctx2.send(&spec).await;
                    ctx2.record(rec);
                }));
                next += arrivals.next_gap();
            }
            for t in inflight {
                let _ = t.await;
            }
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
    }
    progress.finish_and_clear();
    let records = std::mem::take(&mut *ctx.records.lock().expect("records lock"));
    RunRecords {
        records,
        duration_s,
    }
}

/// One simulated developer: types, fires a FIM request every few keystrokes, and
/// cancels the previous one if it is still running (the connection is dropped). When
/// the run stops sending, the last request is left to finish.
async fn developer(ctx: Arc<RunCtx>, mut session: KeystrokeSession) {
    let mut inflight: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )> = None;
    loop {
        let (typing, spec) = session.next_request();
        tokio::time::sleep(typing).await;
        if ctx.ticket().is_none() {
            break;
        }
        if let Some((cancel, _)) = inflight.take() {
            // Err: it already finished and recorded itself.
            let _ = cancel.send(());
        }
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
        let ctx2 = ctx.clone();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let rec = tokio::select! {
                            rec = ctx2.send(&spec) => rec,
                            Ok(()) = cancel_rx => RequestRecord {
                                outcome: Outcome::Cancelled,
                                sent_at: t0.duration_since(ctx2.start).as_secs_f64(),
                                ttft: None,
                                e2e: t0.elapsed().as_secs_f64(),
                                itl: Vec::new(),
                                output_tokens: 0,
                                prompt_tokens: None,
                                cached_tokens: None,
            predicted: None,
                                token_source: TokenCountSource::Chunks,
                            },
                        };
            ctx2.record(rec);
        });
        inflight = Some((cancel_tx, task));
    }
    if let Some((_, task)) = inflight {
        let _ = task.await;
    }
}

fn progress_bar(config: &BenchConfig, load: Load) -> ProgressBar {
    let target = if config.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let label = match load {
        Load::Closed { concurrency } => format!("concurrency {concurrency}"),
        Load::Open { rate } => format!("rate {rate}/s"),
    };
    let (len, template) = match (config.num_requests, config.duration) {
        (Some(n), _) => (
            n,
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} requests  {msg}",
        ),
        (None, Some(d)) => (
            d.as_millis() as u64,
            "{prefix} [{elapsed_precise}] {bar:30} {percent}% of the duration  {msg}",
        ),
        (None, None) => (0, "{prefix} [{elapsed_precise}] {msg}"),
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(ProgressStyle::with_template(template).expect("valid progress template"));
    bar.set_prefix(label);
    bar
}
