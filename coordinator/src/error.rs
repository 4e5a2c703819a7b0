//! The one error type of the API, its rendering, and the limits every layer applies
//! to a request before a handler sees it.
//!
//! Every failure a handler or the ops layer can meet becomes an [`AppError`];
//! `IntoResponse` renders the status code and the JSON body `{"object": "error",
//! "message", "type", "param", "code"}` (Mistral's shape, which the OpenAI SDK also
//! reads) in this one place. It lives at crate level, not in `http`, because `ops`
//! renders the same errors without depending on the handlers. [`FailedBeforeServing`]
//! is the typed signal from a streamed response to the ops gate that it failed before
//! the client got anything (so it may be retried upstream).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;
use crate::prompt::PromptError;
use crate::tokenizer::TokenizerError;

/// Largest request body accepted (413 above it), by the handlers and by the ops gate.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// A response extension set on every event stream: marked when the stream's first
/// event is an error, i.e. the request failed before the client was served anything.
/// Read by the ops gate once the first frame of the body arrived.
#[derive(Clone, Debug, Default)]
pub struct FailedBeforeServing(Arc<AtomicBool>);

impl FailedBeforeServing {
    /// Records that the stream failed before its first useful event.
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`mark`](Self::mark) was called.
    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// An API error: status, machine-readable type and code, human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("missing or invalid API key: send 'Authorization: Bearer <key>'")]
    Unauthorized,
    #[error("the model '{0}' does not exist; GET /v1/models lists the served names")]
    ModelNotFound(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    /// A per-key or per-team rate limit or quota (`crate::ops`).
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{0}")]
    Forbidden(String),
    /// The fallback upstream failed or could not be reached.
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest { .. } => ("invalid_request_error", "invalid_request"),
            Self::Unauthorized => ("authentication_error", "invalid_api_key"),
            Self::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            Self::RouteNotFound(_) => ("invalid_request_error", "not_found"),
            Self::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", "payload_too_large"),
            Self::Overloaded { .. } => ("rate_limit_error", "overloaded"),
            Self::RateLimited { .. } => ("rate_limit_error", "rate_limit_exceeded"),
            Self::Forbidden(_) => ("permission_error", "forbidden"),
            Self::BadGateway(_) => ("upstream_error", "bad_gateway"),
            Self::Unavailable(_) => ("service_unavailable", "unavailable"),
            Self::Internal(_) => ("internal_error", "internal_error"),
        }
    }

    /// The JSON body (also used for errors inside an SSE stream).
    pub fn body(&self) -> serde_json::Value {
        let (ty, code) = self.kind();
        let param = match self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        json!({"object": "error", "message": self.to_string(), "type": ty, "param": param, "code": code})
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Self::Overloaded { retry_after_s, .. } | Self::RateLimited { retry_after_s, .. } =
            &self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        if matches!(self, Self::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<EngineError> for AppError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { .. } => Self::Overloaded {
                message: e.to_string(),
                retry_after_s: 1,
            },
            EngineError::PromptTooLong { .. } => Self::bad_param("prompt", e.to_string()),
            EngineError::Invalid(m) => Self::bad_request(m),
            EngineError::Unavailable(_) | EngineError::ShuttingDown => {
                Self::Unavailable(e.to_string())
            }
            EngineError::WorkerCrash(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<TokenizerError> for AppError {
    fn from(e: TokenizerError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<PromptError> for AppError {
    fn from(e: PromptError) -> Self {
        if e.is_client_error() {
            Self::bad_request(e.to_string())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for AppError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        match r {
            J::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                }
            }
            J::MissingJsonContentType(_) => {
                Self::bad_request("expected a JSON body with 'Content-Type: application/json'")
            }
            other => Self::bad_request(format!("invalid JSON body: {}", other.body_text())),
        }
    }
}
