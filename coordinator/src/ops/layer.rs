//! The ops layer's state: its settings, the key table, the upstreams and alias routes,
//! and the counters `/metrics` and `/v1/usage` report; and the decisions made per
//! request before anything runs (who calls, which backend, whether to spill upstream).
//!
//! The request path itself is in `gate` (local) and `forward` (upstream); the reports
//! are in `metrics_text` and `usage_json`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::accounts::Caller;
use super::error::OpsError;
use super::fallback::{Upstream, UpstreamClient};
use super::keys::{self, FallbackRule, KeyDigest, KeySet};
use super::routing::{ModelRoute, Target};
use super::table::KeyTable;
use crate::engine::EngineHandle;
use crate::error::AppError;

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
            max_num_seqs: scheduler::SchedulerConfig::default().max_num_seqs,
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

pub(super) struct AliasRoute {
    pub(super) route: ModelRoute,
    /// The client for each `Url` arm (same index as `route.arms`).
    pub(super) upstreams: Vec<Option<Upstream>>,
}

/// The ops layer: keys, accounts, usage, fallback, aliases.
pub struct Ops {
    pub(super) config: OpsConfig,
    pub(super) keys: KeyTable,
    pub(super) fallback: Option<Upstream>,
    pub(super) aliases: HashMap<String, AliasRoute>,
    pub(super) served_local: AtomicU64,
    pub(super) served_fallback: AtomicU64,
    pub(super) fallback_reasons: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) reloads: AtomicU64,
    pub(super) reload_failures: AtomicU64,
    anonymous: AtomicU64,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("config", &self.config).finish()
    }
}

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
            keys: KeyTable::default(),
            fallback,
            aliases,
            served_local: AtomicU64::new(0),
            served_fallback: AtomicU64::new(0),
            fallback_reasons: Mutex::new(BTreeMap::new()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            anonymous: AtomicU64::new(0),
        });
        ops.keys.install(ops.read_keys()?);
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

    /// Re-reads the key file; on error the old keys stay in force.
    pub fn reload(&self) -> Result<usize, OpsError> {
        match self.read_keys() {
            Ok(set) => {
                let n = self.keys.install(set);
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

    pub(super) fn authenticate(&self, headers: &axum::http::HeaderMap) -> Result<Caller, AppError> {
        self.keys.authenticate(headers)
    }

    /// The backend for `model` and this caller: `(target, upstream model, alias index)`.
    pub(super) fn route(
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
    pub(super) fn spill_reason(
        &self,
        engine: &EngineHandle,
        caller: &Caller,
    ) -> Option<SpillReason> {
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

    pub(super) fn count_spill(&self, reason: SpillReason) {
        *self
            .fallback_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason.as_str())
            .or_default() += 1;
    }
}
