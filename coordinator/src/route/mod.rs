//! `stral route`: an HTTP router in front of many `stral serve` replicas.
//!
//! Owns: choosing a replica per request ([`pick`]: prefix-cache affinity by rendezvous
//! hashing, bounded load), the replica list with health and load ([`fleet`]), the
//! forwarding itself (here) and the router's metrics ([`metrics`]). It holds no model
//! state: Kubernetes runs, restarts and scales the replicas; the router only chooses.
//!
//! Forwarding: the request body is read whole (at most [`MAX_BODY_BYTES`]), sent to
//! the chosen replica byte for byte with the client's headers (hop-by-hop ones
//! dropped; `Authorization` passes through, the replica checks it), and the response
//! is streamed back frame by frame, unchanged, with `x-stral-replica` added. Dropping
//! the client's connection drops the upstream one, which cancels the generation there.
//!
//! Invariants: a request is retried at most once, on another replica, and only when
//! nothing was sent to the client yet (connection refused or broken, no response
//! headers within `upstream_timeout`, garbage instead of HTTP, or a 503 from a
//! replica that is not ready or is draining). After the response headers went out
//! nothing is retried; a stream the upstream breaks ends with one SSE error event in
//! the API's JSON shape (non-SSE bodies are cut, so the client sees a truncated body).
//! Errors the router itself answers use the API's JSON error shape ([`AppError`]).
//! Cost per request: one JSON parse of the body (for the affinity key), O(replicas)
//! to choose, one pooled keep-alive connection to the replica.

pub mod fleet;
pub mod metrics;
pub mod pick;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::http::{AppError, MAX_BODY_BYTES};
use fleet::{Fleet, FleetTimings, Replica, ReplicaSource};
use metrics::RouteMetrics;
use pick::{affinity_key, choose, Choice, LoadLimits, Policy};

/// The plain-HTTP client shared by probes and forwarding (one connection pool).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How long opening a connection to a replica may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything `stral route` needs.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub listen: SocketAddr,
    pub source: ReplicaSource,
    pub policy: Policy,
    pub limits: LoadLimits,
    pub timings: FleetTimings,
    /// Longest wait for a replica's response headers (streams send theirs at once).
    pub upstream_timeout: Duration,
    /// Bytes of the prompt start hashed into the affinity key.
    pub affinity_prefix_bytes: usize,
    /// Time in-flight streams get to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            source: ReplicaSource::Static(Vec::new()),
            policy: Policy::Affinity,
            limits: LoadLimits::default(),
            timings: FleetTimings::default(),
            upstream_timeout: Duration::from_secs(300),
            affinity_prefix_bytes: 256,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Why the router could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Server(std::io::Error),
}

/// What every request handler shares.
pub struct RouteState {
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<RouteMetrics>,
    client: HttpClient,
    config: RouteConfig,
    turn: AtomicU64,
}

impl RouteState {
    pub fn new(config: RouteConfig) -> Arc<Self> {
        let urls = match &config.source {
            ReplicaSource::Static(u) => u.clone(),
            ReplicaSource::Dns(_) => Vec::new(),
        };
        Arc::new(Self {
            fleet: Arc::new(Fleet::new(&urls)),
            metrics: Arc::default(),
            client: http_client(),
            config,
            turn: AtomicU64::new(0),
        })
    }

    /// Starts the probe (and DNS) loop.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        tokio::spawn(self.fleet.clone().maintain(
            self.config.source.clone(),
            self.config.timings,
            self.client.clone(),
        ));
    }
}

fn http_client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(http)
}

/// The router's HTTP app: its own `/health`, `/ready`, `/metrics`; everything else
/// is forwarded.
pub fn router(state: Arc<RouteState>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(forward)
        .with_state(state)
}

/// Runs the router until SIGINT/SIGTERM, then lets in-flight streams finish for up
/// to `shutdown_grace`.
pub async fn run(config: RouteConfig) -> Result<(), RouteError> {
    if let ReplicaSource::Static(urls) = &config.source {
        if urls.is_empty() {
            return Err(RouteError::Config(
                "no replicas: give --replica URL (repeatable) or --replicas-dns NAME:PORT".into(),
            ));
        }
        if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
            return Err(RouteError::Config(format!(
                "--replica {bad}: expected a plain http:// base URL, e.g. http://10.0.0.5:8080"
            )));
        }
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RouteError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(RouteError::Server)?;
    let grace = config.shutdown_grace;
    let state = RouteState::new(config);
    state.spawn_maintenance();
    tracing::info!(%addr, policy = ?state.config.policy, source = ?state.config.source, "router listening");
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let served = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        crate::serve::shutdown_signal().await;
        tracing::info!(?grace, "shutdown requested: finishing in-flight requests");
        let _ = stopping.send(true);
    });
    tokio::select! {
        r = served => r.map_err(RouteError::Server),
        _ = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => Ok(()),
    }
}

async fn ready(State(state): State<Arc<RouteState>>) -> Result<Json<Value>, AppError> {
    let fleet = state.fleet.snapshot();
    let up = fleet.iter().filter(|r| r.is_healthy()).count();
    if up > 0 {
        Ok(Json(
            json!({"status": "ready", "replicas_ready": up, "replicas": fleet.len()}),
        ))
    } else {
        Err(AppError::Unavailable(format!(
            "no replica is ready (0 of {})",
            fleet.len()
        )))
    }
}

async fn render_metrics(State(state): State<Arc<RouteState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.fleet.snapshot()),
    )
        .into_response()
}

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

fn end_to_end(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    headers
        .iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()) && *k != header::CONTENT_LENGTH)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// How one attempt on a replica failed before anything reached the client.
enum Failure {
    Connect(String),
    Timeout(Duration),
    Protocol(String),
    NotReady(Response),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol",
            Self::NotReady(_) => "not_ready",
        }
    }

    /// What the client gets when this was the last attempt.
    fn into_response(self, replica: &str) -> Response {
        match self {
            Self::NotReady(resp) => resp,
            Self::Connect(e) => {
                AppError::BadGateway(format!("replica {replica} could not be reached: {e}"))
                    .into_response()
            }
            Self::Protocol(e) => AppError::BadGateway(format!(
                "replica {replica} sent an invalid response or closed the connection: {e}"
            ))
            .into_response(),
            Self::Timeout(t) => {
                let mut body = AppError::BadGateway(String::new()).body();
                body["message"] = json!(format!("replica {replica} sent no response within {t:?}"));
                body["code"] = json!("gateway_timeout");
                (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
            }
        }
    }
}

/// Counts a request in flight on a replica until dropped (with the response body).
struct InFlight(Arc<Replica>);

impl InFlight {
    fn new(r: Arc<Replica>) -> Self {
        r.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(r)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn forward(State(state): State<Arc<RouteState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            state.metrics.count_request("none", 413);
            return AppError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            }
            .into_response();
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let key = match (state.config.policy, &parts.method) {
        (Policy::RoundRobin, _) => None,
        (policy, &Method::POST) => serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
            affinity_key(
                policy,
                parts.uri.path(),
                bearer(&parts.headers),
                &v,
                state.config.affinity_prefix_bytes,
            )
        }),
        _ => None,
    };
    let mut tried: Vec<u64> = Vec::new();
    let mut last: Option<(String, Failure)> = None;
    let turn = state.turn.fetch_add(1, Ordering::Relaxed);
    for attempt in 0..2 {
        let fleet = state.fleet.snapshot();
        let cands: Vec<_> = fleet.iter().map(|r| r.candidate()).collect();
        let exclude: Vec<usize> = (0..fleet.len())
            .filter(|i| tried.contains(&fleet[*i].id))
            .collect();
        let Some(choice) = choose(key, &cands, &state.config.limits, turn, &exclude) else {
            break;
        };
        if attempt == 0 {
            match choice {
                Choice::Affine(_) => state.metrics.affinity_hits.fetch_add(1, Ordering::Relaxed),
                Choice::Spilled(_) => state.metrics.spills.fetch_add(1, Ordering::Relaxed),
                Choice::Turn(_) => 0,
            };
        } else {
            state.metrics.retries.fetch_add(1, Ordering::Relaxed);
        }
        let replica = fleet[choice.index()].clone();
        tried.push(replica.id);
        match attempt_on(
            &state,
            &replica,
            &parts.method,
            &parts.headers,
            path_and_query,
            body.clone(),
        )
        .await
        {
            Ok(resp) => {
                state
                    .metrics
                    .count_request(&replica.url, resp.status().as_u16());
                return resp;
            }
            Err(f) => {
                state.metrics.count_error(&replica.url, f.kind());
                tracing::warn!(replica = %replica.url, attempt, kind = f.kind(), "upstream attempt failed before any byte reached the client");
                last = Some((replica.url.clone(), f));
            }
        }
    }
    let resp = match last {
        Some((url, f)) => {
            let r = f.into_response(&url);
            state.metrics.count_request(&url, r.status().as_u16());
            return r;
        }
        None => AppError::Unavailable("no replica is ready; retry shortly".into()).into_response(),
    };
    state.metrics.count_request("none", resp.status().as_u16());
    resp
}

/// One try on `replica`: `Ok` once its response headers arrived (the body then streams
/// through), `Err` when nothing can have reached the client.
async fn attempt_on(
    state: &RouteState,
    replica: &Arc<Replica>,
    method: &Method,
    headers: &HeaderMap,
    path_and_query: &str,
    body: Bytes,
) -> Result<Response, Failure> {
    let mut up = axum::http::Request::builder()
        .method(method.clone())
        .uri(format!("{}{path_and_query}", replica.url));
    for (k, v) in end_to_end(headers) {
        up = up.header(k, v);
    }
    let up = up
        .body(Full::new(body))
        .map_err(|e| Failure::Protocol(e.to_string()))?;
    let guard = InFlight::new(replica.clone());
    let started = Instant::now();
    let limit = state.config.upstream_timeout;
    let resp = match tokio::time::timeout(limit, state.client.request(up)).await {
        Err(_) => return Err(Failure::Timeout(limit)),
        Ok(Err(e)) if e.is_connect() => {
            replica.set_healthy(false, "connection failed");
            return Err(Failure::Connect(source_chain(&e)));
        }
        Ok(Err(e)) => return Err(Failure::Protocol(source_chain(&e))),
        Ok(Ok(r)) => r,
    };
    state
        .metrics
        .observe_latency(&replica.url, started.elapsed().as_secs_f64());
    let (parts, incoming) = resp.into_parts();
    let mut out = Response::builder().status(parts.status);
    for (k, v) in parts
        .headers
        .iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
    {
        out = out.header(k, v);
    }
    out = out.header("x-stral-replica", replica.url.as_str());
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = if sse || parts.status != StatusCode::SERVICE_UNAVAILABLE {
        relay(
            incoming,
            guard,
            sse,
            replica.url.clone(),
            state.metrics.clone(),
        )
    } else {
        // A 503 (not ready, draining) is small: read it, so it can be retried elsewhere.
        let bytes = incoming
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let resp = out
            .body(Body::from(bytes))
            .map_err(|e| Failure::Protocol(e.to_string()))?;
        replica.set_healthy(false, "answered 503");
        return Err(Failure::NotReady(resp));
    };
    out.body(body).map_err(|e| Failure::Protocol(e.to_string()))
}

/// The upstream body, frame by frame. If the upstream breaks it mid-way: an SSE stream
/// ends with one error event (after a blank line, so a half-sent event cannot swallow
/// it); any other body ends with an error, which cuts the client's connection.
fn relay(
    incoming: hyper::body::Incoming,
    guard: InFlight,
    sse: bool,
    replica: String,
    metrics: Arc<RouteMetrics>,
) -> Body {
    struct Relay {
        data: http_body_util::BodyDataStream<hyper::body::Incoming>,
        _guard: InFlight,
        replica: String,
        metrics: Arc<RouteMetrics>,
        broken: bool,
    }
    let start = Relay {
        data: incoming.into_data_stream(),
        _guard: guard,
        replica,
        metrics,
        broken: false,
    };
    Body::from_stream(futures::stream::unfold(start, move |mut s| async move {
        if s.broken {
            return None;
        }
        match s.data.next().await? {
            Ok(bytes) => Some((Ok(bytes), s)),
            Err(e) => {
                s.broken = true;
                s.metrics.count_error(&s.replica, "stream");
                let msg = format!(
                    "replica {} broke the response mid-way: {}",
                    s.replica,
                    source_chain(&e)
                );
                tracing::warn!(replica = %s.replica, error = %msg, "upstream stream broken");
                let item = if sse {
                    let body = AppError::BadGateway(msg).body();
                    Ok(Bytes::from(format!("\n\ndata: {body}\n\n")))
                } else {
                    Err(std::io::Error::other(msg))
                };
                Some((item, s))
            }
        }
    }))
}

/// An error with its causes, `outer: inner: …` (hyper's own text is terse).
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}
