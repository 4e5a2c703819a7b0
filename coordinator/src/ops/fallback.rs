//! The upstream (fallback) client: forwards one API request to another Mistral/OpenAI
//! compatible endpoint and streams its response back unchanged.
//!
//! The request body is the client's, byte for byte (re-serialized only when an alias
//! renames the model); the client's credentials are never forwarded — the upstream sees
//! `--fallback-api-key`. The response body is streamed through frame by frame (no
//! buffering), so SSE arrives byte-identical; only the status and a few headers are
//! looked at. Errors are mapped: unreachable or 5xx upstream → 502, upstream refusing our
//! credentials → 502 (the client's key was fine), 429 and other 4xx pass through with
//! their body and `Retry-After`. Cost: one pooled keep-alive HTTP/1.1 connection per
//! concurrent request; per frame, one scan of its bytes for a `usage` object.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::OpsError;
use crate::http::AppError;

/// One upstream endpoint.
#[derive(Clone)]
pub struct Upstream {
    /// `http://host:port` plus an optional path prefix, no trailing slash.
    base: String,
    auth: Option<HeaderValue>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish()
    }
}

/// Headers copied from the upstream's response.
const PASSED_HEADERS: [&str; 10] = [
    "content-type",
    "content-length",
    "cache-control",
    "retry-after",
    "x-request-id",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-accel-buffering",
];

impl Upstream {
    pub fn new(url: &str, api_key: Option<&str>) -> Result<Self, OpsError> {
        let base = url.trim().trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            return Err(OpsError::Fallback(format!(
                "{base}: https upstreams are not supported (this build has no TLS client); put a TLS-terminating proxy on http:// in front"
            )));
        }
        let uri: Uri = base
            .parse()
            .map_err(|e| OpsError::Fallback(format!("{base} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(OpsError::Fallback(format!(
                "{base}: expected http://host:port[/prefix]"
            )));
        }
        let auth = api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {}", k.trim())))
            .transpose()
            .map_err(|_| {
                OpsError::Fallback("the fallback API key is not a valid header value".into())
            })?
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { base, auth, client })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The upstream URL for one of our paths: a base ending in `/v1` takes the path
    /// without its own `/v1`.
    fn url_for(&self, path: &str) -> String {
        match (self.base.strip_suffix("/v1"), path.strip_prefix("/v1")) {
            (Some(_), Some(rest)) => format!("{}{rest}", self.base),
            _ => format!("{}{path}", self.base),
        }
    }

    /// Sends `body` to `path` upstream; `on_frame` sees every body frame as it passes.
    pub async fn forward(
        &self,
        path: &str,
        body: Bytes,
        accept: Option<&HeaderValue>,
        mut on_frame: impl FnMut(&Bytes) + Send + 'static,
    ) -> Result<Response, AppError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.url_for(path))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(a) = &self.auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| AppError::Internal(format!("building the fallback request: {e}")))?;
        let resp = self.client.request(req).await.map_err(|e| {
            AppError::BadGateway(format!(
                "the fallback upstream {} is unreachable: {e}",
                self.base
            ))
        })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(AppError::BadGateway(format!(
                "the fallback upstream {} refused this server's credentials (HTTP {})",
                self.base,
                status.as_u16()
            )));
        }
        if status.is_server_error() {
            return Err(AppError::BadGateway(format!(
                "the fallback upstream {} failed (HTTP {})",
                self.base,
                status.as_u16()
            )));
        }
        let (parts, incoming) = resp.into_parts();
        let mut headers = HeaderMap::new();
        for name in PASSED_HEADERS {
            if let Some(v) = parts.headers.get(name) {
                headers.insert(HeaderName::from_static(name), v.clone());
            }
        }
        // `on_frame` (and what it owns) is dropped with the body: when the stream ends
        // or the client goes away.
        let frames = incoming.into_data_stream().map(move |frame| {
            if let Ok(f) = &frame {
                on_frame(f);
            }
            frame
        });
        let mut out = Response::new(Body::from_stream(frames));
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// Finds the last `"prompt_tokens": N` and `"completion_tokens": N` in a stream of
/// frames (the upstream's `usage`), across frame boundaries.
#[derive(Debug, Default)]
pub struct UsageScanner {
    tail: Vec<u8>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl UsageScanner {
    const KEEP: usize = 64;

    pub fn feed(&mut self, frame: &[u8]) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(frame);
        for (field, slot) in [
            (&b"\"prompt_tokens\""[..], &mut self.prompt_tokens),
            (&b"\"completion_tokens\""[..], &mut self.completion_tokens),
        ] {
            let mut from = 0;
            while let Some(i) = find(&buf[from..], field) {
                let mut j = from + i + field.len();
                while j < buf.len() && (buf[j] == b':' || buf[j] == b' ') {
                    j += 1;
                }
                let digits = buf[j..].iter().take_while(|b| b.is_ascii_digit()).count();
                // A number cut by the frame boundary is read again with the next frame.
                if digits > 0 && j + digits < buf.len() {
                    if let Ok(n) = std::str::from_utf8(&buf[j..j + digits])
                        .unwrap_or("")
                        .parse()
                    {
                        *slot = Some(n);
                    }
                }
                from = from + i + 1;
            }
        }
        let keep = buf.len().saturating_sub(Self::KEEP);
        self.tail = buf.split_off(keep);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_joins_v1_once() {
        let u = Upstream::new("http://h:1/v1/", None).unwrap();
        assert_eq!(
            u.url_for("/v1/chat/completions"),
            "http://h:1/v1/chat/completions"
        );
        let u = Upstream::new("http://h:1", None).unwrap();
        assert_eq!(
            u.url_for("/v1/fim/completions"),
            "http://h:1/v1/fim/completions"
        );
        assert!(Upstream::new("https://api.mistral.ai", None).is_err());
        assert!(Upstream::new("h:1", None).is_err());
    }

    #[test]
    fn usage_scanner_reads_numbers_split_across_frames() {
        let text = br#"data: {"choices":[],"usage":{"prompt_tokens":123,"completion_tokens":45,"total_tokens":168}}"#;
        for cut in 0..text.len() {
            let mut s = UsageScanner::default();
            s.feed(&text[..cut]);
            s.feed(&text[cut..]);
            s.feed(b"\n\ndata: [DONE]\n\n");
            assert_eq!(
                (s.prompt_tokens, s.completion_tokens),
                (Some(123), Some(45)),
                "cut {cut}"
            );
        }
    }
}
