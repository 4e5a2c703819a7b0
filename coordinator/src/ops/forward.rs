//! Upstream forwarding: sends one generation request to its alias arm's URL or to the
//! fallback upstream, admitting and charging it like a local one.
//!
//! Invariant: a forwarded request that the upstream did not serve (an error or a non-2xx
//! status) is refunded; one that was served is charged the usage the upstream reported,
//! once, when its response body is dropped. Every response carries
//! `x-stral-served-by: fallback`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};

use super::accounts::{Admission, Caller};
use super::fallback::UsageScanner;
use super::layer::{Ops, SpillReason};
use super::routing::Target;
use crate::error::AppError;

/// Everything needed to send one request upstream, decided before its body is read.
pub(super) struct Forward {
    pub(super) ops: Arc<Ops>,
    pub(super) caller: Caller,
    pub(super) path: String,
    pub(super) accept: Option<HeaderValue>,
    /// The request's `model`, and the model name an alias arm sends instead.
    pub(super) model: Option<String>,
    pub(super) upstream_model: Option<String>,
    /// The alias arm chosen (index into the alias's upstreams).
    pub(super) arm: Option<usize>,
    pub(super) max_tokens: Option<u64>,
}

impl Forward {
    /// Sends `body` to `target` (an alias arm's URL, else the fallback upstream) and
    /// counts the spill under `reason`.
    pub(super) async fn send(&self, target: Target, reason: SpillReason, body: Bytes) -> Response {
        let ops = &self.ops;
        let alias = self.model.as_deref().and_then(|m| ops.aliases.get(m));
        let upstream = match (&target, alias, self.arm) {
            (Target::Url(_), Some(alias), Some(i)) => alias.upstreams[i].as_ref(),
            _ => ops.fallback.as_ref(),
        };
        let Some(upstream) = upstream else {
            return AppError::Unavailable("no fallback upstream is configured".into())
                .into_response();
        };
        ops.count_spill(reason);
        let admission = match self.caller.admit(0, self.max_tokens.unwrap_or(0), true) {
            Ok(a) => a,
            Err((e, headers)) => {
                let mut r = e.into_response();
                headers.insert_into(r.headers_mut());
                return r;
            }
        };
        let rate = admission.as_ref().map(Admission::rate_headers);
        let body = match &self.upstream_model {
            Some(model) => renamed_model(body, model),
            None => body,
        };
        let admission = Arc::new(Mutex::new(admission));
        let mut charge = UpstreamCharge {
            admission: admission.clone(),
            scanner: UsageScanner::default(),
        };
        let result = upstream
            .forward(&self.path, body, self.accept.as_ref(), move |frame| {
                charge.scanner.feed(frame)
            })
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
            rate.insert_into(h);
        }
        resp
    }
}

/// The body with its `model` replaced (unchanged when it is not a JSON object).
fn renamed_model(body: Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<Value>(&body) {
        Ok(mut v) if v.is_object() => {
            v["model"] = json!(model);
            Bytes::from(v.to_string())
        }
        _ => body,
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
