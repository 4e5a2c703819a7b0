//! The HTTP API (ARCHITECTURE §7): Mistral's FIM and chat endpoints, OpenAI's chat and
//! legacy completions, models, health, readiness, metrics and the OpenAPI document.
//!
//! Handlers parse and validate ([`schema`]), build the prompt (`crate::prompt`),
//! submit to the engine, and render either one JSON response or an SSE stream of
//! chunks ending with `data: [DONE]`. All failures are [`AppError`]s rendered in one
//! place. Invariant: the engine request lives exactly as long as its HTTP response —
//! a client that disconnects drops the response, which drops the request stream, which
//! aborts the sequence. Cost per token: one detokenizer push and, when streaming, one
//! JSON chunk.

mod logprobs;
pub mod schema;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::stream::{self, Stream};
use serde_json::{json, Value};

pub use crate::error::{AppError, MAX_BODY_BYTES};
use schema::{ChatRequest, CompletionRequest, FimRequest, Generation, PromptField};

use crate::detok::{Detokenizer, DetokenizerConfig};
use crate::engine::draft::DraftSource;
use crate::engine::{
    EngineEvent, EngineHandle, FinishReason, GenerateRequest, Priority, RequestStream,
};
use crate::error::FailedBeforeServing;
use crate::metrics::Metrics;
use crate::ops::{Admission, Caller, Ticket};
use crate::prompt::{encode_chat, encode_fim};
use crate::tokenizer::{Tokenizer, EOS};
use logprobs::LoggedToken;

/// Model names served when none are configured: Mistral-configured IDE clients send these.
pub const DEFAULT_MODEL_NAMES: [&str; 3] = ["codestral-latest", "codestral-2405", "stral"];

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Settings of the HTTP layer.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Names accepted in `model` (first one is reported in responses' `model` echo only
    /// when the request's name is accepted: responses echo the request's name).
    pub served_model_names: Vec<String>,
    /// Bearer keys; empty disables authentication.
    pub api_keys: Vec<String>,
    /// Put `/metrics` behind the API keys too.
    pub protect_metrics: bool,
    /// Key file limits, usage, fallback and aliases (`crate::ops`); `None`: plain keys only.
    pub ops: Option<Arc<crate::ops::Ops>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            served_model_names: DEFAULT_MODEL_NAMES.iter().map(|s| s.to_string()).collect(),
            api_keys: Vec::new(),
            protect_metrics: false,
            ops: None,
        }
    }
}

/// Shared state of every handler.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    pub config: HttpConfig,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown was requested: `/ready` answers 503 so that load balancers and
    /// `stral route` stop sending here while what is in flight finishes.
    pub draining: AtomicBool,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        config: HttpConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Arc::new(Self {
            engine,
            tokenizer,
            config,
            metrics,
            draining: AtomicBool::new(false),
            created,
            next_id: AtomicU64::new(1),
        })
    }

    fn check_model(&self, model: &str) -> Result<(), AppError> {
        if self.config.served_model_names.iter().any(|m| m == model) {
            Ok(())
        } else {
            Err(AppError::ModelNotFound(model.to_string()))
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        if self.config.api_keys.is_empty() {
            return true;
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        // Check every key in constant time so timing reveals neither which key nor how much matched.
        self.config.api_keys.iter().fold(false, |ok, k| {
            constant_time_eq(k.as_bytes(), given.trim().as_bytes()) | ok
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API router with its state.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/fim/completions", post(fim_completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/usage", get(usage_report))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let metrics = if state.config.protect_metrics {
        Router::new()
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
    } else {
        Router::new().route("/metrics", get(metrics))
    };
    Router::new()
        .merge(v1)
        .merge(metrics)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .fallback(|req: Request| async move {
            AppError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(ops) = state.config.ops.clone() {
        return crate::ops::gate(state.engine.clone(), ops, req, next).await;
    }
    if state.authorized(req.headers()) {
        next.run(req).await
    } else {
        AppError::Unauthorized.into_response()
    }
}

/// `GET /v1/usage`: per-key and per-team usage (admin keys only; `crate::ops`).
async fn usage_report(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<Value>, AppError> {
    crate::ops::usage_report(state.config.ops.as_deref(), caller.map(|Extension(c)| c)).map(Json)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Result<Json<Value>, AppError> {
    if state.draining.load(Ordering::Acquire) {
        Err(AppError::Unavailable(
            "draining: shutting down after the requests in flight".into(),
        ))
    } else if state.engine.is_ready() {
        Ok(Json(json!({"status": "ready"})))
    } else {
        Err(AppError::Unavailable("workers are not ready".into()))
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut body = state
        .metrics
        .render(&state.engine.stats(), state.engine.is_ready());
    if let Some(ops) = &state.config.ops {
        ops.render_metrics(&mut body);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn openapi(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(openapi_document(&state.config.served_model_names))
}

/// [`OPENAPI_JSON`] with each request's `model` restricted to the served names, so
/// generated clients and fuzzers (schemathesis) know which names reach a model.
pub fn openapi_document(served_model_names: &[String]) -> Value {
    let mut doc: Value =
        serde_json::from_str(OPENAPI_JSON).expect("openapi.json is valid JSON (a test parses it)");
    for request in ["FimRequest", "ChatRequest", "CompletionRequest"] {
        let model = &mut doc["components"]["schemas"][request]["allOf"][1]["properties"]["model"];
        if model.is_object() {
            model["enum"] = json!(served_model_names);
        }
    }
    doc
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let max_len = state.engine.max_context();
    let data: Vec<Value> = state
        .config
        .served_model_names
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": state.created, "owned_by": "stral", "max_model_len": max_len}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Response shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `chat.completion` / `chat.completion.chunk` (Mistral FIM and chat, OpenAI chat).
    Chat,
    /// `text_completion` (OpenAI legacy).
    Text,
}

/// Everything one generation needs after validation.
struct Job {
    shape: Shape,
    model: String,
    prompt: Vec<u32>,
    generation: Generation,
    strip_leading_space: bool,
}

/// The ops gate's admission ticket, when the request passed the gate (`crate::ops`).
type GateTicket = Option<Extension<Ticket>>;

/// Parses the body as JSON into `T`, turning every failure into a 400/413.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, AppError> {
    body.map(|Json(t)| t).map_err(AppError::from)
}

async fn fim_completions(
    State(state): State<Arc<AppState>>,
    ticket: GateTicket,
    body: Result<Json<FimRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let endpoint = "fim";
    let result = async {
        let req = parse(body)?;
        state.check_model(&req.model)?;
        let generation = req.sampling.validate(0.7, Priority::Interactive, None)?;
        let prompt = encode_fim(
            &state.tokenizer,
            &req.prompt,
            req.suffix.as_deref().unwrap_or(""),
        )?;
        Ok::<_, AppError>(Job {
            shape: Shape::Chat,
            model: req.model,
            prompt,
            generation,
            strip_leading_space: false,
        })
    }
    .await;
    respond(state, endpoint, ticket, result).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ticket: GateTicket,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let endpoint = "chat";
    let result = async {
        let req = parse(body)?;
        state.check_model(&req.model)?;
        // top_logprobs is range-checked even when logprobs is off (it is still bad input).
        let top = req
            .top_logprobs
            .map(|n| top_logprobs_count(Some(n)))
            .transpose()?;
        let logprobs = (req.logprobs == Some(true)).then(|| top.unwrap_or(0));
        let generation = req.sampling.validate(0.7, Priority::Chat, logprobs)?;
        let prompt = encode_chat(&state.tokenizer, &req.conversation()?)?;
        Ok::<_, AppError>(Job {
            shape: Shape::Chat,
            model: req.model,
            prompt,
            generation,
            strip_leading_space: true,
        })
    }
    .await;
    respond(state, endpoint, ticket, result).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ticket: GateTicket,
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let endpoint = "completions";
    let result = async {
        let req = parse(body)?;
        state.check_model(&req.model)?;
        if req.echo == Some(true) {
            return Err(AppError::bad_param("echo", "echo is not supported"));
        }
        if req.best_of.is_some_and(|b| b != 1) {
            return Err(AppError::bad_param(
                "best_of",
                "only best_of = 1 is supported",
            ));
        }
        let prompt_text = match req.prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(AppError::bad_param(
                    "prompt",
                    "exactly one prompt string is supported",
                ))
            }
        };
        let logprobs = req
            .logprobs
            .map(|n| top_logprobs_count(Some(n)))
            .transpose()?;
        // OpenAI's legacy default is 16 tokens.
        let mut sampling = req.sampling;
        if sampling.max_tokens.is_none() && sampling.max_completion_tokens.is_none() {
            sampling.max_tokens = Some(16);
        }
        let generation = sampling.validate(1.0, Priority::Interactive, logprobs)?;
        // With a suffix this is fill-in-the-middle; without, the prompt is a prefix to continue.
        let prompt = encode_fim(
            &state.tokenizer,
            &prompt_text,
            req.suffix.as_deref().unwrap_or(""),
        )?;
        Ok::<_, AppError>(Job {
            shape: Shape::Text,
            model: req.model,
            prompt,
            generation,
            strip_leading_space: false,
        })
    }
    .await;
    respond(state, endpoint, ticket, result).await
}

fn top_logprobs_count(n: Option<i64>) -> Result<u32, AppError> {
    match n.unwrap_or(0) {
        n @ 0..=20 => Ok(n as u32),
        n => Err(AppError::bad_param(
            "top_logprobs",
            format!("top_logprobs must be between 0 and 20, got {n}"),
        )),
    }
}

/// Runs a validated job (or renders its error) and counts the request.
async fn respond(
    state: Arc<AppState>,
    endpoint: &'static str,
    ticket: GateTicket,
    job: Result<Job, AppError>,
) -> Response {
    let resp = match job {
        Ok(job) => run(&state, ticket.map(|Extension(t)| t), job)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    };
    state
        .metrics
        .count_request(endpoint, resp.status().as_u16());
    resp
}

async fn run(
    state: &Arc<AppState>,
    ticket: Option<Ticket>,
    job: Job,
) -> Result<Response, AppError> {
    let arrival = Instant::now();
    let limit = state.engine.max_context();
    let room = limit.saturating_sub(job.prompt.len());
    if room == 0 {
        return Err(AppError::bad_param(
            "prompt",
            format!(
                "the prompt has {} tokens but the model's context is {limit} tokens",
                job.prompt.len()
            ),
        ));
    }
    let max_tokens = match job.generation.max_tokens {
        Some(m) if m as usize > room => {
            return Err(AppError::bad_param(
                "max_tokens",
                format!("prompt ({} tokens) + max_tokens ({m}) exceeds the model's context of {limit} tokens", job.prompt.len()),
            ))
        }
        Some(m) => m,
        None => room as u32,
    };
    let request = GenerateRequest {
        prompt: job.prompt.clone(),
        max_tokens,
        sampling: job.generation.sampling.clone(),
        priority: job.generation.priority,
        stop_token_ids: vec![EOS],
        // A request that opted out of speculation gets no drafts: its prediction is
        // not tokenized at all.
        prediction: job
            .generation
            .prediction
            .as_deref()
            .filter(|_| job.generation.speculative)
            .map(|text| state.tokenizer.encode(text))
            .transpose()
            .map_err(|e| AppError::bad_param("prediction", e.to_string()))?,
        no_speculation: !job.generation.speculative,
    };
    let admission = match ticket {
        Some(t) => t.admit(job.prompt.len(), max_tokens)?,
        None => None,
    };
    let stream = state.engine.submit(request).await?;
    state
        .metrics
        .prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    let id = format!(
        "cmpl-{:x}{:06x}",
        state.created,
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let detok = Detokenizer::new(
        state.tokenizer.clone(),
        DetokenizerConfig {
            stop: job.generation.stop.clone(),
            strip_leading_space: job.strip_leading_space,
        },
    );
    let run = Run {
        state: state.clone(),
        stream,
        detok,
        id,
        created,
        model: job.model,
        shape: job.shape,
        prompt_tokens: job.prompt.len() as u32,
        completion_tokens: 0,
        cached_tokens: None,
        accepted_prediction_tokens: 0,
        rejected_prediction_tokens: 0,
        draft: None,
        admission,
        logprobs: job.generation.sampling.logprobs.is_some(),
        text_offset: 0,
        arrival,
        last_token: None,
        done: false,
    };
    if job.generation.stream {
        Ok(stream_response(run, job.generation.include_usage_in_stream))
    } else {
        collect_response(run).await
    }
}

/// One request in flight on the HTTP side. Dropped unfinished = client gone.
struct Run {
    state: Arc<AppState>,
    stream: RequestStream,
    detok: Detokenizer,
    id: String,
    created: u64,
    model: String,
    shape: Shape,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// Prompt tokens the prefix cache served; known from the first token on.
    cached_tokens: Option<u32>,
    /// Draft tokens among the completion tokens, and those the verification rejected.
    accepted_prediction_tokens: u32,
    rejected_prediction_tokens: u32,
    /// The draft of the step whose tokens are being delivered: its source and the
    /// accepted drafts delivered so far (recorded in the metrics when it closes).
    draft: Option<(DraftSource, u32)>,
    /// Per-key accounting (`crate::ops`): generated tokens are charged as they stream.
    admission: Option<Admission>,
    logprobs: bool,
    /// Characters of text the legacy logprobs' `text_offset` has covered so far.
    text_offset: usize,
    arrival: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.close_draft(0);
        if !self.done {
            self.state.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one engine event means for the client.
enum Step {
    /// New text (possibly empty) for one token; the token's logprobs when asked for.
    Text {
        text: String,
        token: Option<LoggedToken>,
    },
    /// The end: the final text piece and why.
    End { text: String, reason: FinishReason },
}

impl Run {
    async fn step(&mut self) -> Result<Step, AppError> {
        match self.stream.next().await {
            Some(EngineEvent::Token(token)) => {
                let now = Instant::now();
                match self.last_token {
                    None => self
                        .state
                        .metrics
                        .ttft
                        .observe(now.duration_since(self.arrival).as_secs_f64()),
                    Some(t) => self
                        .state
                        .metrics
                        .itl
                        .observe(now.duration_since(t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.completion_tokens += 1;
                if token.cached_tokens.is_some() {
                    self.cached_tokens = token.cached_tokens;
                }
                self.accepted_prediction_tokens += u32::from(token.accepted_draft);
                self.rejected_prediction_tokens += token.rejected_drafts;
                if let Some(source) = token.draft_source {
                    let accepted = self.draft.get_or_insert((source, 0));
                    if token.accepted_draft {
                        accepted.1 += 1;
                    } else {
                        // The step's last token: its draft is complete.
                        self.close_draft(token.rejected_drafts);
                    }
                }
                if let Some(a) = &mut self.admission {
                    a.charge_generated(1);
                }
                self.state
                    .metrics
                    .generation_tokens
                    .fetch_add(1, Ordering::Relaxed);
                let logged = self.logprobs.then(|| LoggedToken::new(&self.detok, &token));
                let delta = self.detok.push(token.id);
                if delta.stop.is_some() {
                    // A stop string: end here; dropping the stream later aborts the sequence.
                    Ok(self.end(delta.text, FinishReason::Stopped))
                } else {
                    Ok(Step::Text {
                        text: delta.text,
                        token: logged,
                    })
                }
            }
            Some(EngineEvent::Finished {
                reason,
                cached_tokens,
            }) => {
                self.cached_tokens = Some(cached_tokens);
                let tail = self.detok.finish().text;
                Ok(self.end(tail, reason))
            }
            Some(EngineEvent::Failed(e)) => {
                self.done = true;
                Err(e.into())
            }
            None => {
                self.done = true;
                Err(AppError::Unavailable(
                    "the engine stopped before the request finished".into(),
                ))
            }
        }
    }

    /// Records the open draft in the metrics with the drafts rejected in its step
    /// (known only once the step's last token is delivered; a request that ends before
    /// it counts only the accepted drafts it delivered).
    fn close_draft(&mut self, rejected: u32) {
        if let Some((source, accepted)) = self.draft.take() {
            self.state.metrics.spec.record(source, accepted, rejected);
        }
    }

    fn end(&mut self, text: String, reason: FinishReason) -> Step {
        self.done = true;
        self.close_draft(0);
        if let Some(a) = &mut self.admission {
            a.finish();
        }
        self.state
            .metrics
            .e2e
            .observe(self.arrival.elapsed().as_secs_f64());
        Step::End { text, reason }
    }

    /// OpenAI's usage object; `prompt_tokens_details.cached_tokens` only when known;
    /// `completion_tokens_details` counts draft tokens (of any source) accepted among
    /// the completion tokens and rejected while producing them.
    fn usage(&self) -> Value {
        let mut usage = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens_details": {
                "accepted_prediction_tokens": self.accepted_prediction_tokens,
                "rejected_prediction_tokens": self.rejected_prediction_tokens,
            },
        });
        if let Some(cached) = self.cached_tokens {
            usage["prompt_tokens_details"] = json!({ "cached_tokens": cached });
        }
        usage
    }

    /// The `logprobs` value of a response or chunk holding `tokens`.
    fn logprobs_json(&mut self, tokens: &[LoggedToken]) -> Value {
        match self.shape {
            Shape::Chat => logprobs::chat(tokens),
            Shape::Text => logprobs::legacy(tokens, &mut self.text_offset),
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stopped => "stop",
        FinishReason::Length => "length",
    }
}

async fn collect_response(mut run: Run) -> Result<Response, AppError> {
    let mut text = String::new();
    let mut tokens: Vec<LoggedToken> = Vec::new();
    let reason = loop {
        match run.step().await? {
            Step::Text { text: t, token } => {
                text.push_str(&t);
                tokens.extend(token);
            }
            Step::End { text: t, reason } => {
                text.push_str(&t);
                break reason;
            }
        }
    };
    let finish = finish_str(reason);
    let logprobs = run.logprobs.then(|| run.logprobs_json(&tokens));
    let body = match run.shape {
        Shape::Chat => {
            json!({
                "id": run.id, "object": "chat.completion", "created": run.created, "model": run.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": null}, "finish_reason": finish, "logprobs": logprobs}],
                "usage": run.usage(),
            })
        }
        Shape::Text => {
            json!({
                "id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                "usage": run.usage(),
            })
        }
    };
    Ok(Json(body).into_response())
}

/// SSE state machine: chunks until the end, then the usage/finish chunk, then `[DONE]`.
enum SseState {
    Running(Box<Run>, bool),
    Done,
}

fn stream_response(run: Run, include_usage: bool) -> Response {
    let failed_early = FailedBeforeServing::default();
    let marker = failed_early.clone();
    let events = stream::unfold(
        SseState::Running(Box::new(run), include_usage),
        move |state| {
            let marker = marker.clone();
            async move {
                let SseState::Running(mut run, include_usage) = state else {
                    return None;
                };
                let (event, next) = match run.step().await {
                    Ok(Step::Text { text, token }) => {
                        let lp = token.map(|t| run.logprobs_json(std::slice::from_ref(&t)));
                        (
                            chunk(&run, &text, None, lp, false),
                            SseState::Running(run, include_usage),
                        )
                    }
                    Ok(Step::End { text, reason }) => {
                        let mut data = chunk(&run, &text, Some(reason), None, true);
                        if include_usage || run.shape == Shape::Chat {
                            data["usage"] = run.usage();
                        }
                        let done = stream::iter(vec![
                            Ok(Event::default().data(data.to_string())),
                            Ok(Event::default().data("[DONE]")),
                        ]);
                        return Some((done, SseState::Done));
                    }
                    Err(e) => {
                        // Nothing sent yet (no token event) → the ops gate may retry upstream.
                        if run.completion_tokens == 0 {
                            marker.mark();
                        }
                        // Headers are already sent: report the error in-band, then close.
                        let err = stream::iter(vec![
                            Ok(Event::default().data(json!({"error": e.body()}).to_string())),
                            Ok(Event::default().data("[DONE]")),
                        ]);
                        return Some((err, SseState::Done));
                    }
                };
                Some((
                    stream::iter(vec![Ok(Event::default().data(event.to_string()))]),
                    next,
                ))
            }
        },
    );
    let flat: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(futures::StreamExt::flatten(events));
    let mut resp = Sse::new(flat)
        .keep_alive(KeepAlive::default())
        .into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    resp.extensions_mut().insert(failed_early);
    resp
}

/// One SSE chunk's JSON.
fn chunk(
    run: &Run,
    text: &str,
    reason: Option<FinishReason>,
    logprobs: Option<Value>,
    last: bool,
) -> Value {
    let finish = reason.map(finish_str);
    match run.shape {
        Shape::Chat => {
            let first = run.completion_tokens <= 1 && !last;
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({"id": run.id, "object": "chat.completion.chunk", "created": run.created, "model": run.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})
        }
        Shape::Text => {
            json!({"id": run.id, "object": "text_completion", "created": run.created, "model": run.model,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
        }
    }
}
