//! Org-wide operation: per-key and per-team rate limits and token quotas, usage
//! accounting, upstream fallback, and model aliases with sticky A/B splits.
//!
//! [`Ops`] sits in front of the generation endpoints as one middleware ([`gate`]):
//! it authenticates the key (by SHA-256 digest, [`keys`]), buffers the body (≤ the API's
//! body limit) to read `model` and `max_tokens`, picks the backend (alias arm, then the
//! fallback policy), and either runs the local handler or forwards upstream
//! ([`fallback`]). Local requests are admitted by the handler itself once it knows the
//! prompt's token count: it calls [`admit_current`], which reads this request's
//! [`Call`] from a task-local set by the gate, and the returned [`Admission`] lives in
//! the response stream, charging generated tokens as they stream ([`limits`]).
//!
//! Fallback policy, in order: the key's rule (`always`/`never`); no worker group ready;
//! the expected queue wait (mean step time × (waiting + 1), counted only when a queue
//! exists) plus one step would exceed `--fallback-ttft-budget-ms`. A local request that
//! fails before sending anything (503, or an SSE stream whose first event is an error)
//! is retried upstream, so losing the workers is invisible to clients. Every response
//! carries `x-stral-served-by: local|fallback`.
//!
//! Invariants: the key file is swapped atomically on reload (SIGHUP, or a changed
//! modification time seen by the poll every `reload_poll`); accounts and usage survive a
//! reload by key digest / team name, so nothing in flight is dropped or double-counted.
//! Cost per local request: one SHA-256, one map probe, one `serde_json` pass over the body
//! to peek two fields, two mutex acquisitions to admit and two per generated token
//! (benches/RESULTS.md).

pub mod fallback;
pub mod keys;
pub mod limits;
pub mod routing;
pub mod usage;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::EngineHandle;
use crate::http::{AppError, AppState, MAX_BODY_BYTES};
use fallback::{Upstream, UpstreamClient, UsageScanner};
use keys::{FallbackRule, KeyDigest, KeySet, KeySpec};
use limits::{Account, Permit, RateHeaders, Rejection};
use routing::{ModelRoute, Target};
use usage::Usage;

/// Errors that stop the ops layer from starting (or a reload from applying).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("--served-model-name {0}")]
    Alias(String),
    #[error("--fallback-url {0}")]
    Fallback(String),
    #[error("--fallback-ca-file {0}")]
    FallbackCa(String),
}

/// Settings of the ops layer.
#[derive(Clone, Debug)]
pub struct OpsConfig {
    /// The key file (TOML, or YAML for `.yaml`/`.yml`; see [`keys`]); reloaded on SIGHUP
    /// and when it changes.
    pub key_file: Option<PathBuf>,
    /// Plain keys (`--api-key`, `--api-key-file`): unlimited, team "default".
    pub plain_keys: Vec<String>,
    /// Base URL of the fallback upstream (`http[s]://host[:port][/v1]`).
    pub fallback_url: Option<String>,
    /// PEM CA certificates trusted for `https://` upstreams besides the webpki roots.
    pub fallback_ca_file: Option<PathBuf>,
    /// Bearer key sent to the fallback upstream.
    pub fallback_api_key: Option<String>,
    /// Spill to the fallback when the expected time to first token exceeds this.
    pub fallback_ttft_budget: Option<Duration>,
    /// The engine's `max_num_seqs` (a full running set means a queue).
    pub max_num_seqs: usize,
    /// `NAME=SPEC` aliases ([`routing`]).
    pub aliases: Vec<String>,
    /// Add a `key` label (the key's name) to the usage series.
    pub metrics_key_label: bool,
    /// How often the key file's modification time is checked; `Duration::ZERO`: never
    /// (reload on SIGHUP only).
    pub reload_poll: Duration,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            key_file: None,
            plain_keys: Vec::new(),
            fallback_url: None,
            fallback_ca_file: None,
            fallback_api_key: None,
            fallback_ttft_budget: None,
            max_num_seqs: 256,
            aliases: Vec::new(),
            metrics_key_label: false,
            reload_poll: Duration::from_secs(1),
        }
    }
}

impl OpsConfig {
    /// Whether anything here needs the ops layer (otherwise the plain API runs).
    pub fn is_active(&self) -> bool {
        self.key_file.is_some() || self.fallback_url.is_some() || !self.aliases.is_empty()
    }
}

/// A configured key with its live accounts.
#[derive(Debug)]
pub struct Principal {
    pub spec: KeySpec,
    account: Arc<Account>,
    team_account: Arc<Account>,
    usage: Arc<Usage>,
    team_usage: Arc<Usage>,
}

/// The authenticated caller of a request (`None`: authentication is off).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<Principal>>);

#[derive(Debug, Default)]
struct Table {
    by_digest: HashMap<KeyDigest, Arc<Principal>>,
}

struct AliasRoute {
    route: ModelRoute,
    /// The client for each `Url` arm (same index as `route.arms`).
    upstreams: Vec<Option<Upstream>>,
}

/// One key's or team's buckets and usage counters.
type Ledger = (Arc<Account>, Arc<Usage>);

/// The ops layer: keys, accounts, usage, fallback, aliases.
pub struct Ops {
    config: OpsConfig,
    table: RwLock<Arc<Table>>,
    /// Live state by key digest and by team name; survives reloads.
    accounts: Mutex<HashMap<KeyDigest, Ledger>>,
    teams: Mutex<BTreeMap<String, Ledger>>,
    fallback: Option<Upstream>,
    aliases: HashMap<String, AliasRoute>,
    served_local: AtomicU64,
    served_fallback: AtomicU64,
    fallback_reasons: Mutex<BTreeMap<&'static str, u64>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    anonymous: AtomicU64,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("config", &self.config).finish()
    }
}

const GENERATION_PATHS: [&str; 3] = [
    "/v1/fim/completions",
    "/v1/chat/completions",
    "/v1/completions",
];

/// Why a request went upstream (the `reason` label of `stral_fallback_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpillReason {
    Alias,
    KeyRule,
    NotReady,
    TtftBudget,
    LocalFailed,
}

impl SpillReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Alias => "alias",
            Self::KeyRule => "key_rule",
            Self::NotReady => "not_ready",
            Self::TtftBudget => "ttft_budget",
            Self::LocalFailed => "local_failed",
        }
    }
}

impl Ops {
    pub fn new(config: OpsConfig) -> Result<Arc<Self>, OpsError> {
        let client = UpstreamClient::new(config.fallback_ca_file.as_deref())?;
        let key = config.fallback_api_key.as_deref();
        let fallback = config
            .fallback_url
            .as_deref()
            .map(|u| Upstream::new(u, key, &client))
            .transpose()?;
        let mut aliases = HashMap::new();
        for spec in &config.aliases {
            let Some(route) = ModelRoute::parse(spec)? else {
                continue;
            };
            let mut upstreams = Vec::new();
            for arm in &route.arms {
                upstreams.push(match &arm.target {
                    Target::Url(u) => Some(Upstream::new(u, key, &client)?),
                    Target::Fallback if fallback.is_none() => {
                        return Err(OpsError::Alias(format!(
                            "'{spec}': the 'fallback' target needs --fallback-url"
                        )))
                    }
                    _ => None,
                });
            }
            aliases.insert(route.name.clone(), AliasRoute { route, upstreams });
        }
        let ops = Arc::new(Self {
            config,
            table: RwLock::new(Arc::new(Table::default())),
            accounts: Mutex::new(HashMap::new()),
            teams: Mutex::new(BTreeMap::new()),
            fallback,
            aliases,
            served_local: AtomicU64::new(0),
            served_fallback: AtomicU64::new(0),
            fallback_reasons: Mutex::new(BTreeMap::new()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            anonymous: AtomicU64::new(0),
        });
        ops.apply(ops.read_keys()?);
        Ok(ops)
    }

    /// The alias names (to accept as served model names).
    pub fn alias_names(&self) -> Vec<String> {
        self.aliases.keys().cloned().collect()
    }

    fn read_keys(&self) -> Result<KeySet, OpsError> {
        let set = match &self.config.key_file {
            Some(p) => KeySet::load(p)?,
            None => KeySet::default(),
        };
        Ok(set.with_plain_keys(&self.config.plain_keys))
    }

    /// Installs a key set, reusing the accounts and usage of keys and teams it keeps.
    fn apply(&self, set: KeySet) -> usize {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let mut teams = self.teams.lock().unwrap_or_else(|p| p.into_inner());
        for (name, (account, _)) in teams.iter() {
            account.set_limits(set.teams.get(name).copied().unwrap_or_default());
        }
        let mut by_digest = HashMap::with_capacity(set.keys.len());
        for spec in set.keys {
            let (team_account, team_usage) = teams
                .entry(spec.team.clone())
                .or_insert_with(|| {
                    let limits = set.teams.get(&spec.team).copied().unwrap_or_default();
                    (Account::new(limits), Arc::new(Usage::default()))
                })
                .clone();
            let (account, usage) = accounts
                .entry(spec.digest)
                .and_modify(|(a, _)| a.set_limits(spec.limits))
                .or_insert_with(|| (Account::new(spec.limits), Arc::new(Usage::default())))
                .clone();
            by_digest.insert(
                spec.digest,
                Arc::new(Principal {
                    spec,
                    account,
                    team_account,
                    usage,
                    team_usage,
                }),
            );
        }
        let n = by_digest.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Table { by_digest });
        n
    }

    /// Re-reads the key file; on error the old keys stay in force.
    pub fn reload(&self) -> Result<usize, OpsError> {
        match self.read_keys() {
            Ok(set) => {
                let n = self.apply(set);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(keys = n, "key file reloaded");
                Ok(n)
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "key file reload failed; keeping the previous keys");
                Err(e)
            }
        }
    }

    /// Reloads the key file on SIGHUP and whenever its modification time changes (checked
    /// every `reload_poll`; never when that is zero). The SIGHUP handler is installed
    /// when this is called, before the returned future first runs, so a SIGHUP sent once
    /// the server is up cannot hit the default action (exit). Call within a tokio runtime.
    pub fn watch_key_file(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        #[cfg(unix)]
        let mut hup = self.config.key_file.as_ref().and_then(|_| {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no SIGHUP handler: the key file reloads on change only")
                })
                .ok()
        });
        async move {
            let Some(path) = self.config.key_file.clone() else {
                return;
            };
            let stamp = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut last: Option<SystemTime> = stamp(&path);
            let poll = self.config.reload_poll;
            loop {
                #[cfg(unix)]
                let signal = async {
                    match hup.as_mut() {
                        Some(s) => {
                            s.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let signal = std::future::pending::<()>();
                let tick = async {
                    if poll.is_zero() {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(poll).await
                    }
                };
                let forced = tokio::select! {
                    _ = signal => true,
                    _ = tick => false,
                };
                let now = stamp(&path);
                if forced || now != last {
                    last = now;
                    let _ = self.reload();
                }
            }
        }
    }

    fn authenticate(&self, headers: &axum::http::HeaderMap) -> Result<Caller, AppError> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        if table.by_digest.is_empty() {
            return Ok(Caller(None));
        }
        keys::bearer(headers)
            .and_then(|k| keys::lookup(&table.by_digest, k))
            .map(|p| Caller(Some(p.clone())))
            .ok_or(AppError::Unauthorized)
    }

    /// The backend for `model` and this caller: `(target, upstream model, alias index)`.
    fn route(
        &self,
        model: Option<&str>,
        caller: &Caller,
    ) -> (Target, Option<String>, Option<usize>) {
        let Some(alias) = model.and_then(|m| self.aliases.get(m)) else {
            return (Target::Local, None, None);
        };
        let sticky: KeyDigest = match &caller.0 {
            Some(p) => p.spec.digest,
            None => keys::digest(&self.anonymous.fetch_add(1, Ordering::Relaxed).to_string()),
        };
        let arm = alias.route.pick(&sticky);
        let index = alias.route.arms.iter().position(|a| std::ptr::eq(a, arm));
        (arm.target.clone(), arm.model.clone(), index)
    }

    /// Whether a request meant for the local group should go upstream instead.
    fn spill_reason(&self, engine: &EngineHandle, caller: &Caller) -> Option<SpillReason> {
        self.fallback.as_ref()?;
        let rule = caller
            .0
            .as_ref()
            .map(|p| p.spec.fallback)
            .unwrap_or_default();
        match rule {
            FallbackRule::Never => return None,
            FallbackRule::Always => return Some(SpillReason::KeyRule),
            FallbackRule::Auto => {}
        }
        if !engine.is_ready() {
            return Some(SpillReason::NotReady);
        }
        let budget = self.config.fallback_ttft_budget?;
        let stats = engine.stats();
        let step = stats.step_time.mean_seconds()?;
        let queued = stats.waiting > 0 || stats.running >= self.config.max_num_seqs;
        let queue_wait = if queued {
            step * (stats.waiting + 1) as f64
        } else {
            0.0
        };
        (queued && queue_wait + step > budget.as_secs_f64()).then_some(SpillReason::TtftBudget)
    }

    fn count_spill(&self, reason: SpillReason) {
        *self
            .fallback_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason.as_str())
            .or_default() += 1;
    }

    /// Admits one request for `caller` (`None`: no accounting).
    fn admit(
        &self,
        caller: &Caller,
        prompt: u64,
        reserve: u64,
        fallback: bool,
    ) -> Result<Option<Admission>, (AppError, RateHeaders)> {
        let Some(p) = &caller.0 else {
            return Ok(None);
        };
        match limits::admit(&p.account, Some(&p.team_account), prompt, reserve) {
            Ok(permit) => Ok(Some(Admission {
                permit,
                principal: p.clone(),
                arrival: Instant::now(),
                fallback,
                finished: false,
            })),
            Err(r) => {
                p.usage.rejected.fetch_add(1, Ordering::Relaxed);
                p.team_usage.rejected.fetch_add(1, Ordering::Relaxed);
                let headers = r.headers.clone();
                Err((rate_limited(&p.spec, r), headers))
            }
        }
    }

    /// Appends the ops series to a `/metrics` exposition.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP stral_served_total Generation requests by where they were served.\n# TYPE stral_served_total counter");
        let _ = writeln!(
            out,
            "stral_served_total{{backend=\"local\"}} {}\nstral_served_total{{backend=\"fallback\"}} {}",
            self.served_local.load(Ordering::Relaxed),
            self.served_fallback.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP stral_fallback_total Requests sent to an upstream, by reason.\n# TYPE stral_fallback_total counter");
        for (reason, n) in self
            .fallback_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "stral_fallback_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP stral_key_file_reloads_total Key file reloads, by outcome.\n# TYPE stral_key_file_reloads_total counter\nstral_key_file_reloads_total{{outcome=\"ok\"}} {}\nstral_key_file_reloads_total{{outcome=\"error\"}} {}",
            self.reloads.load(Ordering::Relaxed),
            self.reload_failures.load(Ordering::Relaxed)
        );
        if self.config.metrics_key_label {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
            let mut keys: Vec<_> = table.by_digest.values().cloned().collect();
            keys.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
            let series: Vec<(String, Arc<Usage>)> = keys
                .iter()
                .map(|p| {
                    (
                        usage::key_labels(&p.spec.team, &p.spec.name),
                        p.usage.clone(),
                    )
                })
                .collect();
            usage::render(out, series.iter().map(|(l, u)| (l.clone(), &**u)));
        } else {
            let teams: Vec<(String, Arc<Usage>)> = self
                .teams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(t, (_, u))| (usage::team_labels(t), u.clone()))
                .collect();
            usage::render(out, teams.iter().map(|(l, u)| (l.clone(), &**u)));
        }
    }

    /// The `/v1/usage` document: every key and team with usage, limits and what is left.
    fn usage_json(&self) -> Value {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut keys: Vec<_> = table.by_digest.values().cloned().collect();
        keys.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let keys: Vec<Value> = keys
            .iter()
            .map(|p| {
                let mut v = p.usage.json();
                v["name"] = json!(p.spec.name);
                v["team"] = json!(p.spec.team);
                v["limits"] = json!(p.spec.limits);
                v["remaining"] = remaining_json(&p.account);
                v
            })
            .collect();
        let teams: Vec<Value> = self
            .teams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, (account, usage))| {
                let mut v = usage.json();
                v["name"] = json!(name);
                v["limits"] = json!(account.limits());
                v["remaining"] = remaining_json(account);
                v
            })
            .collect();
        json!({
            "object": "usage",
            "served": {"local": self.served_local.load(Ordering::Relaxed), "fallback": self.served_fallback.load(Ordering::Relaxed)},
            "keys": keys,
            "teams": teams,
        })
    }
}

fn remaining_json(account: &Account) -> Value {
    let (requests, tokens_minute, tokens_day, in_flight) = account.remaining();
    let floor = |x: Option<f64>| x.map(|v| v.max(0.0).floor() as u64);
    json!({"requests_per_minute": floor(requests), "tokens_per_minute": floor(tokens_minute), "tokens_per_day": floor(tokens_day), "in_flight": in_flight})
}

fn rate_limited(spec: &KeySpec, r: Rejection) -> AppError {
    let whose = match r.scope {
        "team" => format!("team '{}'", spec.team),
        _ => format!("key '{}'", spec.name),
    };
    let retry_after_s = r.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    AppError::RateLimited {
        message: format!(
            "rate limit reached for {whose}: {} = {}; retry after {retry_after_s} s",
            r.kind.as_str(),
            r.limit
        ),
        retry_after_s,
    }
}

/// One admitted request's accounting: charges as it streams; records usage when dropped.
#[derive(Debug)]
pub struct Admission {
    permit: Permit,
    principal: Arc<Principal>,
    arrival: Instant,
    fallback: bool,
    finished: bool,
}

impl Admission {
    /// Charges generated tokens (call as they stream).
    pub fn charge_generated(&mut self, n: u64) {
        self.permit.charge_generated(n);
    }

    /// Marks the request served (a request dropped unfinished with nothing generated is
    /// refunded: it failed before serving anything, and may be retried upstream).
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.finished && self.permit.generated_tokens() == 0 {
            self.permit.refund();
            return;
        }
        let seconds = self.arrival.elapsed().as_secs_f64();
        let (prompt, generated) = (self.permit.prompt_tokens(), self.permit.generated_tokens());
        for u in [&self.principal.usage, &self.principal.team_usage] {
            u.record(self.fallback, prompt, generated, seconds);
        }
    }
}

/// What the gate shares with the handler of one local request.
struct Call {
    ops: Arc<Ops>,
    caller: Caller,
    headers: Mutex<Option<RateHeaders>>,
}

tokio::task_local! {
    static CALL: Arc<Call>;
}

/// Admits the current local request (called by the handler once the prompt is
/// tokenized). `Ok(None)` when the ops layer is off or authentication is disabled.
pub fn admit_current(prompt_tokens: usize, max_tokens: u32) -> Result<Option<Admission>, AppError> {
    CALL.try_with(|call| {
        let result = call
            .ops
            .admit(&call.caller, prompt_tokens as u64, max_tokens as u64, false);
        let headers = match &result {
            Ok(Some(a)) => Some(a.permit.headers().clone()),
            Ok(None) => None,
            Err((_, h)) => Some(h.clone()),
        };
        *call.headers.lock().unwrap_or_else(|p| p.into_inner()) = headers;
        result.map_err(|(e, _)| e)
    })
    .unwrap_or(Ok(None))
}

#[derive(Default, Deserialize)]
struct Peek {
    model: Option<String>,
    max_tokens: Option<u64>,
}

/// The ops middleware for `/v1/*` (and `/metrics` when protected).
pub async fn gate(state: Arc<AppState>, ops: Arc<Ops>, mut req: Request, next: Next) -> Response {
    let caller = match ops.authenticate(req.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let generation = req.method() == Method::POST && GENERATION_PATHS.contains(&req.uri().path());
    if !generation {
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let accept = req.headers().get(header::ACCEPT).cloned();
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return AppError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        }
        .into_response();
    };
    let peek: Peek = serde_json::from_slice(&bytes).unwrap_or_default();
    let (target, upstream_model, arm) = ops.route(peek.model.as_deref(), &caller);
    let forward = |target: Target, reason: SpillReason, bytes: Bytes| {
        let (ops, caller, path) = (ops.clone(), caller.clone(), path.clone());
        let (accept, upstream_model, model) =
            (accept.clone(), upstream_model.clone(), peek.model.clone());
        async move {
            let upstream = match (
                &target,
                model.as_deref().and_then(|m| ops.aliases.get(m)),
                arm,
            ) {
                (Target::Url(_), Some(alias), Some(i)) => alias.upstreams[i].as_ref(),
                _ => ops.fallback.as_ref(),
            };
            let Some(upstream) = upstream else {
                return AppError::Unavailable("no fallback upstream is configured".into())
                    .into_response();
            };
            ops.count_spill(reason);
            forward_upstream(
                &ops,
                upstream,
                &caller,
                &path,
                bytes,
                accept.as_ref(),
                upstream_model,
                peek.max_tokens,
            )
            .await
        }
    };
    if target != Target::Local {
        return forward(target, SpillReason::Alias, bytes).await;
    }
    if let Some(reason) = ops.spill_reason(&state.engine, &caller) {
        return forward(Target::Fallback, reason, bytes).await;
    }
    let call = Arc::new(Call {
        ops: ops.clone(),
        caller: caller.clone(),
        headers: Mutex::new(None),
    });
    let mut req = Request::from_parts(parts, Body::from(bytes.clone()));
    req.extensions_mut().insert(caller.clone());
    let resp = CALL.scope(call.clone(), next.run(req)).await;
    let may_retry = ops.fallback.is_some()
        && caller.0.as_ref().map(|p| p.spec.fallback) != Some(FallbackRule::Never);
    let mut resp = if may_retry {
        match failed_before_serving(resp).await {
            Ok(r) => r,
            Err(()) => return forward(Target::Fallback, SpillReason::LocalFailed, bytes).await,
        }
    } else {
        resp
    };
    if resp.status().is_success() {
        ops.served_local.fetch_add(1, Ordering::Relaxed);
    }
    let h = resp.headers_mut();
    h.insert("x-stral-served-by", HeaderValue::from_static("local"));
    if let Some(rate) = call
        .headers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        insert_rate_headers(h, &rate);
    }
    resp
}

/// `Err` when a local response failed before sending the client anything useful: a 503,
/// or an event stream whose first event is an error. Otherwise the response, intact.
async fn failed_before_serving(resp: Response) -> Result<Response, ()> {
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        return Err(());
    }
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !sse || !resp.status().is_success() {
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let first = loop {
        match body.frame().await {
            None => break None,
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => break Some(data),
                Err(_) => continue,
            },
        }
    };
    match first {
        Some(d) if d.starts_with(b"data: {\"error\"") => Err(()),
        first => {
            let head = futures::stream::iter(first.map(Ok::<_, axum::Error>));
            let rest = futures::StreamExt::map(body.into_data_stream(), |r| r);
            let joined = futures::StreamExt::chain(head, rest);
            Ok(Response::from_parts(parts, Body::from_stream(joined)))
        }
    }
}

fn insert_rate_headers(h: &mut axum::http::HeaderMap, rate: &RateHeaders) {
    for (kind, v) in [("requests", rate.requests), ("tokens", rate.tokens)] {
        let Some((limit, remaining, reset_s)) = v else {
            continue;
        };
        for (name, value) in [
            (format!("x-ratelimit-limit-{kind}"), limit.to_string()),
            (
                format!("x-ratelimit-remaining-{kind}"),
                remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{kind}"), reset_string(reset_s)),
        ] {
            if let (Ok(n), Ok(v)) = (
                axum::http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        }
    }
}

/// OpenAI's reset format: `1s`, `6m0s`, `250ms`.
fn reset_string(seconds: f64) -> String {
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0).ceil() as u64);
    }
    let s = seconds.ceil() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// Accounting of one forwarded request, settled when its response body is dropped.
struct UpstreamCharge {
    admission: Arc<Mutex<Option<Admission>>>,
    scanner: UsageScanner,
}

impl Drop for UpstreamCharge {
    fn drop(&mut self) {
        if let Some(mut a) = self
            .admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            a.permit
                .charge_prompt(self.scanner.prompt_tokens.unwrap_or(0));
            a.charge_generated(self.scanner.completion_tokens.unwrap_or(0));
            a.finish();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward_upstream(
    ops: &Arc<Ops>,
    upstream: &Upstream,
    caller: &Caller,
    path: &str,
    mut body: Bytes,
    accept: Option<&HeaderValue>,
    upstream_model: Option<String>,
    max_tokens: Option<u64>,
) -> Response {
    let admission = match ops.admit(caller, 0, max_tokens.unwrap_or(0), true) {
        Ok(a) => a,
        Err((e, headers)) => {
            let mut r = e.into_response();
            insert_rate_headers(r.headers_mut(), &headers);
            return r;
        }
    };
    let rate = admission.as_ref().map(|a| a.permit.headers().clone());
    if let Some(model) = upstream_model {
        if let Ok(mut v) = serde_json::from_slice::<Value>(&body) {
            v["model"] = json!(model);
            body = Bytes::from(v.to_string());
        }
    }
    let admission = Arc::new(Mutex::new(admission));
    let mut charge = UpstreamCharge {
        admission: admission.clone(),
        scanner: UsageScanner::default(),
    };
    let result = upstream
        .forward(path, body, accept, move |frame| charge.scanner.feed(frame))
        .await;
    let mut resp = match result {
        Ok(r) if r.status().is_success() => r,
        other => {
            // Not served upstream: give the request back to the caller's budget.
            if let Some(mut a) = admission.lock().unwrap_or_else(|p| p.into_inner()).take() {
                a.permit.refund();
            }
            match other {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        }
    };
    if resp.status().is_success() {
        ops.served_fallback.fetch_add(1, Ordering::Relaxed);
    }
    let h = resp.headers_mut();
    h.insert("x-stral-served-by", HeaderValue::from_static("fallback"));
    if let Some(rate) = rate {
        insert_rate_headers(h, &rate);
    }
    resp
}

/// `GET /v1/usage`: per-key and per-team usage (admin keys only).
pub async fn usage_report(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<Value>, AppError> {
    let Some(ops) = state.config.ops.as_ref() else {
        return Err(AppError::RouteNotFound(
            "GET /v1/usage (usage accounting needs --keys-config, --fallback-url or an alias)"
                .into(),
        ));
    };
    match caller.map(|Extension(c)| c) {
        Some(Caller(Some(p))) if p.spec.admin => {}
        Some(Caller(None)) => {}
        _ => {
            return Err(AppError::Forbidden(
                "GET /v1/usage needs an admin key (admin = true in the key file)".into(),
            ))
        }
    }
    Ok(Json(ops.usage_json()))
}

#[cfg(test)]
mod tests {
    use super::limits::Limits;
    use super::*;

    #[test]
    fn reset_strings_look_like_openais() {
        assert_eq!(reset_string(0.25), "250ms");
        assert_eq!(reset_string(1.0), "1s");
        assert_eq!(reset_string(360.0), "6m0s");
        assert_eq!(reset_string(3725.0), "1h2m5s");
    }

    #[test]
    fn limits_serialize_for_the_usage_document() {
        let v = json!(Limits {
            requests_per_minute: Some(3),
            ..Default::default()
        });
        assert_eq!(v["requests_per_minute"], 3);
        assert!(v["tokens_per_day"].is_null());
    }
}
