//! The ops middleware for `/v1/*` (and `/metrics` when protected): authenticates,
//! reads the body once (≤ [`MAX_BODY_BYTES`]) to peek `model` and `max_tokens`, picks
//! the backend, and either runs the local handler or forwards upstream.
//!
//! The local handler is handed a [`Ticket`] as a request extension; it admits the
//! request with it once it knows the prompt's token count. A local response that fails
//! before serving anything (a 503, or an event stream marked [`FailedBeforeServing`]
//! by its first event) is retried upstream when the caller's rule allows.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::Deserialize;

use super::accounts::{Admission, Caller};
use super::forward::Forward;
use super::keys::FallbackRule;
use super::layer::{Ops, SpillReason};
use super::limits::RateHeaders;
use super::routing::Target;
use crate::engine::EngineHandle;
use crate::error::{AppError, FailedBeforeServing, MAX_BODY_BYTES};

const GENERATION_PATHS: [&str; 3] = [
    "/v1/fim/completions",
    "/v1/chat/completions",
    "/v1/completions",
];

/// What the gate hands the handler of one local generation request (a request
/// extension): the caller to admit, and where the admission's rate headers are left
/// for the gate to put on the response.
#[derive(Clone, Debug)]
pub struct Ticket(Arc<TicketInner>);

#[derive(Debug)]
struct TicketInner {
    caller: Caller,
    headers: Mutex<Option<RateHeaders>>,
}

impl Ticket {
    fn new(caller: Caller) -> Self {
        Self(Arc::new(TicketInner {
            caller,
            headers: Mutex::new(None),
        }))
    }

    /// Admits the request (call once the prompt is tokenized). `Ok(None)` when
    /// authentication is off (no accounting).
    pub fn admit(
        &self,
        prompt_tokens: usize,
        max_tokens: u32,
    ) -> Result<Option<Admission>, AppError> {
        let result = self
            .0
            .caller
            .admit(prompt_tokens as u64, max_tokens as u64, false);
        let headers = match &result {
            Ok(Some(a)) => Some(a.rate_headers()),
            Ok(None) => None,
            Err((_, h)) => Some(h.clone()),
        };
        *self.0.headers.lock().unwrap_or_else(|p| p.into_inner()) = headers;
        result.map_err(|(e, _)| e)
    }

    fn take_headers(&self) -> Option<RateHeaders> {
        self.0
            .headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[derive(Default, Deserialize)]
struct Peek {
    model: Option<String>,
    max_tokens: Option<u64>,
}

/// The ops middleware. `engine` is asked whether the local group is ready and how long
/// its queue is (the fallback policy).
pub async fn gate(engine: EngineHandle, ops: Arc<Ops>, mut req: Request, next: Next) -> Response {
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
    let forward = Forward {
        ops: ops.clone(),
        caller: caller.clone(),
        path,
        accept,
        model: peek.model,
        upstream_model,
        arm,
        max_tokens: peek.max_tokens,
    };
    if target != Target::Local {
        return forward.send(target, SpillReason::Alias, bytes).await;
    }
    if let Some(reason) = ops.spill_reason(&engine, &caller) {
        return forward.send(Target::Fallback, reason, bytes).await;
    }
    let ticket = Ticket::new(caller.clone());
    let mut req = Request::from_parts(parts, Body::from(bytes.clone()));
    req.extensions_mut().insert(caller.clone());
    req.extensions_mut().insert(ticket.clone());
    let resp = next.run(req).await;
    let may_retry = ops.fallback.is_some()
        && caller.0.as_ref().map(|p| p.spec.fallback) != Some(FallbackRule::Never);
    let mut resp = if may_retry {
        match failed_before_serving(resp).await {
            Ok(r) => r,
            Err(()) => {
                return forward
                    .send(Target::Fallback, SpillReason::LocalFailed, bytes)
                    .await
            }
        }
    } else {
        resp
    };
    if resp.status().is_success() {
        ops.served_local.fetch_add(1, Ordering::Relaxed);
    }
    let h = resp.headers_mut();
    h.insert("x-stral-served-by", HeaderValue::from_static("local"));
    if let Some(rate) = ticket.take_headers() {
        rate.insert_into(h);
    }
    resp
}

/// `Err` when a local response failed before sending the client anything useful: a 503,
/// or an event stream whose first event is an error ([`FailedBeforeServing`], known once
/// its first frame arrived). Otherwise the response, intact.
async fn failed_before_serving(resp: Response) -> Result<Response, ()> {
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        return Err(());
    }
    let Some(marker) = resp.extensions().get::<FailedBeforeServing>().cloned() else {
        return Ok(resp);
    };
    if !resp.status().is_success() {
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
    if marker.is_marked() {
        return Err(());
    }
    let head = futures::stream::iter(first.map(Ok::<_, axum::Error>));
    let joined = futures::StreamExt::chain(head, body.into_data_stream());
    Ok(Response::from_parts(parts, Body::from_stream(joined)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn stream_response(
        frames: Vec<&'static [u8]>,
        marker: Option<FailedBeforeServing>,
    ) -> Response {
        let frames = futures::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, std::convert::Infallible>(Bytes::from_static(f))),
        );
        let mut resp = Response::new(Body::from_stream(frames));
        if let Some(m) = marker {
            resp.extensions_mut().insert(m);
        }
        resp
    }

    async fn body_of(resp: Response) -> Vec<u8> {
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn a_stream_marked_by_its_first_event_failed_before_serving() {
        let marker = FailedBeforeServing::default();
        marker.mark();
        let resp = stream_response(vec![b"data: {\"error\":{}}\n\n"], Some(marker));
        assert!(failed_before_serving(resp).await.is_err());
    }

    #[tokio::test]
    async fn an_unmarked_stream_comes_back_byte_for_byte() {
        let frames: Vec<&'static [u8]> = vec![b"data: {\"a\":1}\n\n", b"", b"data: [DONE]\n\n"];
        let resp = stream_response(frames, Some(FailedBeforeServing::default()));
        let resp = failed_before_serving(resp).await.expect("served");
        assert_eq!(body_of(resp).await, b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
    }

    #[tokio::test]
    async fn the_decision_reads_the_marker_not_the_text() {
        // Error-looking text without a marker (not an event stream of ours) is passed on.
        let resp = stream_response(vec![b"data: {\"error\":{}}\n\n"], None);
        let resp = failed_before_serving(resp).await.expect("passed through");
        assert_eq!(body_of(resp).await, b"data: {\"error\":{}}\n\n");
        // A 503 is a failure before serving, whatever its body.
        let mut resp = stream_response(vec![b"{}"], None);
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert!(failed_before_serving(resp).await.is_err());
    }
}
