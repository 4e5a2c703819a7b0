//! The engine's async API, as the HTTP layer sees it: submit a tokenized request,
//! receive a stream of events, abort at any time.
//!
//! Invariant: a [`RequestStream`] that is dropped before its request finished aborts
//! the request (a client disconnecting is a drop), so no sequence outlives its reader
//! and its KV blocks are freed within one step.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::draft::DraftSource;

/// Identifier of a request inside the engine.
pub type RequestId = u64;

/// Scheduling class (ARCHITECTURE §4) and why a request ended: the scheduler's own
/// types, so the engine passes them through without a mapping.
pub use scheduler::{FinishReason, Priority};

/// How rank 0 picks each token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: u32,
    /// Per-request seed; `None` lets the engine pick one.
    pub seed: Option<u64>,
    /// End-of-sequence tokens are banned until this many tokens were generated.
    pub min_tokens: u32,
    /// Return the chosen token's logprob and this many top alternatives.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            min_tokens: 0,
            logprobs: None,
        }
    }
}

/// A tokenized generation request.
#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (the caller resolves "rest of the context").
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub priority: Priority,
    /// Token ids that end the sequence (EOS), not emitted as text.
    pub stop_token_ids: Vec<u32>,
    /// The predicted output, tokenized: the sequence's draft source when speculating
    /// (`engine::draft::PredictionDraft`).
    pub prediction: Option<Vec<u32>>,
    /// The request opted out of speculative decoding (no drafts of any source).
    pub no_speculation: bool,
}

/// One sampled token with its optional log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    pub logprob: Option<f32>,
    /// `(token id, logprob)` of the most likely alternatives, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    /// On a request's first token only: prompt tokens the prefix cache served (also in
    /// `Finished`, which a request ended early by a stop string never reads).
    pub cached_tokens: Option<u32>,
    /// This token was a draft token the verification accepted.
    pub accepted_draft: bool,
    /// Draft tokens rejected in the step that produced this token (set on the step's
    /// last token of the sequence only).
    pub rejected_drafts: u32,
    /// Where the draft verified in the step that produced this token came from; `None`
    /// when the step verified no draft for the sequence.
    pub draft_source: Option<DraftSource>,
}

/// What a request's stream yields, in order: tokens, then exactly one of
/// `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    Finished {
        reason: FinishReason,
        /// Prompt tokens the prefix cache served.
        cached_tokens: u32,
    },
    Failed(EngineError),
}

/// Errors a request can meet; the HTTP layer maps each to a status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full (429, with Retry-After).
    #[error("the server is overloaded: {waiting} requests are waiting; retry later")]
    Overloaded { waiting: usize },
    /// The prompt (plus at least one generated token) can never fit (400).
    #[error("the prompt has {prompt_tokens} tokens but the model accepts at most {limit}")]
    PromptTooLong { prompt_tokens: usize, limit: usize },
    /// No worker group is ready (503).
    #[error("no workers are ready: {0}")]
    Unavailable(String),
    /// The request was invalid for the engine (400).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The engine is shutting down (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The worker group crashed every time it ran this request (500).
    #[error("the workers crashed running this request: {0}")]
    WorkerCrash(String),
}

/// The receiving end of one request. Dropping it before the end aborts the request.
pub struct RequestStream {
    pub id: RequestId,
    pub(crate) rx: mpsc::UnboundedReceiver<EngineEvent>,
    pub(crate) abort: Option<Arc<dyn Fn(RequestId) + Send + Sync>>,
}

impl RequestStream {
    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        let ev = self.rx.recv().await;
        if matches!(
            ev,
            Some(EngineEvent::Finished { .. } | EngineEvent::Failed(_)) | None
        ) {
            self.abort = None;
        }
        ev
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.take() {
            abort(self.id);
        }
    }
}
