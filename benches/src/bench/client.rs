//! The HTTP side of `stral bench`: request bodies for the three endpoints, and one
//! streamed request timed chunk by chunk.
//!
//! A client for any Mistral- or OpenAI-compatible server (stral, vLLM, …): plain
//! HTTP/1.1 over hyper with a connection pool; requests always stream (SSE) and ask for
//! usage in the final chunk (`stream_options.include_usage`). `https://` URLs are not
//! supported (no TLS stack is built in): benchmark the server's own plain-HTTP port.
//!
//! Cancelling: dropping the future of [`Client::stream`] drops the response body, and
//! hyper closes that connection (an unfinished body is never returned to the pool), so
//! the server sees the disconnect — what an IDE plugin does to a stale completion.
//!
//! Cost per request: one JSON parse per SSE event; the events are scanned once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::metrics::{Outcome, PredictionTokens, RequestRecord, TokenCountSource};
use super::workload::RequestSpec;
use super::BenchError;

/// Which API a run calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/fim/completions` (Mistral): `prompt` + `suffix`.
    Fim,
    /// `POST /v1/chat/completions`: one user message.
    Chat,
    /// `POST /v1/completions` (OpenAI legacy): `prompt`, and `suffix` for FIM.
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Fim => "/v1/fim/completions",
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    /// Whether the endpoint takes a FIM suffix.
    pub fn takes_suffix(self) -> bool {
        !matches!(self, Endpoint::Chat)
    }

    /// The streaming request body for `spec`.
    pub fn body(self, model: &str, spec: &RequestSpec, temperature: f32) -> Value {
        let mut body = json!({
            "model": model,
            "max_tokens": spec.max_tokens,
            "temperature": temperature,
            "stream": true,
        });
        match self {
            Endpoint::Chat => {
                body["messages"] = json!([{"role": "user", "content": spec.prompt}]);
            }
            Endpoint::Fim | Endpoint::Completions => {
                body["prompt"] = json!(spec.prompt);
                if let Some(suffix) = &spec.suffix {
                    body["suffix"] = json!(suffix);
                }
            }
        }
        if self != Endpoint::Fim {
            // OpenAI-compatible servers send usage only when asked.
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(min) = spec.min_tokens {
            body["min_tokens"] = json!(min);
        }
        if let Some(predicted) = &spec.prediction {
            body["prediction"] = json!({"type": "content", "content": predicted});
        }
        body
    }
}

/// A pooled HTTP/1.1 client for one server.
#[derive(Clone)]
pub struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port` plus any path prefix, without a trailing slash.
    base: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Client {
    /// Checks the URL's shape (no network I/O).
    pub fn new(
        url: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Client, BenchError> {
        let base = url.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| BenchError::BadUrl(format!("{url}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(BenchError::BadUrl(format!(
                    "{url}: https is not supported (no TLS built in); use the server's plain http:// address"
                )))
            }
            _ => {
                return Err(BenchError::BadUrl(format!(
                    "{url}: expected http://HOST:PORT"
                )))
            }
        }
        if uri.authority().is_none() {
            return Err(BenchError::BadUrl(format!("{url}: no host")));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            http,
            base,
            api_key,
            timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.api_key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        b.body(Full::new(body)).expect("valid request parts")
    }

    /// `GET /v1/models`: proves the server answers, and names its first model. A server
    /// that answers anything at all is reachable; only a transport error is an error.
    pub async fn probe(&self) -> Result<Option<String>, BenchError> {
        let req = self.request(Method::GET, "/v1/models", Bytes::new());
        let resp = tokio::time::timeout(Duration::from_secs(15), self.http.request(req))
            .await
            .map_err(|_| BenchError::Unreachable {
                url: self.base.clone(),
                reason: "no answer within 15 s".into(),
            })?
            .map_err(|e| BenchError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED {
            return Err(BenchError::Unauthorized(self.base.clone()));
        }
        if !status.is_success() {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["data"][0]["id"].as_str().map(str::to_string)))
    }

    /// Sends one streaming request and times it. `run_start` is the run's time origin
    /// (for [`RequestRecord::sent_at`]). Never fails: problems become
    /// [`Outcome::Failed`].
    pub async fn stream(&self, path: &str, body: Bytes, run_start: Instant) -> RequestRecord {
        let t0 = Instant::now();
        let mut rec = RequestRecord {
            outcome: Outcome::Completed,
            sent_at: t0.duration_since(run_start).as_secs_f64(),
            ttft: None,
            e2e: 0.0,
            itl: Vec::new(),
            output_tokens: 0,
            prompt_tokens: None,
            cached_tokens: None,
            predicted: None,
            token_source: TokenCountSource::Chunks,
        };
        let result =
            match tokio::time::timeout(self.timeout, self.stream_inner(path, body, t0, &mut rec))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {:?}", self.timeout)),
            };
        rec.e2e = t0.elapsed().as_secs_f64();
        if let Err(e) = result {
            rec.outcome = Outcome::Failed(e);
        }
        rec
    }

    async fn stream_inner(
        &self,
        path: &str,
        body: Bytes,
        t0: Instant,
        rec: &mut RequestRecord,
    ) -> Result<(), String> {
        let mut req = self.request(Method::POST, path, body);
        req.headers_mut().insert(
            header::ACCEPT,
            header::HeaderValue::from_static("text/event-stream"),
        );
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| format!("connection: {}", error_chain(&e)))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                error_message(&bytes)
            ));
        }
        let mut sse = SseParser::default();
        let mut chunks = 0u64;
        let mut usage_tokens = None;
        let mut last: Option<Instant> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading stream: {}", error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for event in sse.push(&data) {
                if event == "[DONE]" {
                    rec.output_tokens = match usage_tokens {
                        Some(n) => {
                            rec.token_source = TokenCountSource::Usage;
                            n
                        }
                        None => chunks,
                    };
                    return Ok(());
                }
                let v: Value = serde_json::from_str(&event)
                    .map_err(|e| format!("bad SSE JSON ({e}): {}", truncate(&event, 120)))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("in-band error: {}", error_text(err)));
                }
                let choice = &v["choices"][0];
                let content = choice["delta"]["content"]
                    .as_str()
                    .or_else(|| choice["text"].as_str())
                    .unwrap_or("");
                if !content.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => rec.ttft = Some(now.duration_since(t0).as_secs_f64()),
                        Some(prev) => rec.itl.push(now.duration_since(prev).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks += 1;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    usage_tokens = u["completion_tokens"].as_u64().or(usage_tokens);
                    rec.prompt_tokens = u["prompt_tokens"].as_u64().or(rec.prompt_tokens);
                    rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .or(rec.cached_tokens);
                    let details = &u["completion_tokens_details"];
                    if let (Some(accepted), Some(rejected)) = (
                        details["accepted_prediction_tokens"].as_u64(),
                        details["rejected_prediction_tokens"].as_u64(),
                    ) {
                        rec.predicted = Some(PredictionTokens { accepted, rejected });
                    }
                }
            }
        }
        Err("stream ended without [DONE]".into())
    }
}

/// Splits a byte stream into SSE `data:` payloads (events end with a blank line; `\r`
/// is ignored; multi-line data is joined with `\n`).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&raw);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// The `message` of an API error body, or the body itself (shortened).
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => error_text(v.get("error").unwrap_or(&v)),
        Err(_) => truncate(&String::from_utf8_lossy(body), 200),
    }
}

fn error_text(v: &Value) -> String {
    match v.get("message").and_then(Value::as_str) {
        Some(m) => truncate(m, 200),
        None => truncate(&v.to_string(), 200),
    }
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// An error and its sources on one line ("client error (Connect): tcp connect error:
/// Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_events_crlf_and_done() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\r\n\r\ndata: [DO"), vec!["{\"a\":1}"]);
        assert_eq!(p.push(b"NE]\n\n: keep-alive\n\n"), vec!["[DONE]"]);
        assert_eq!(p.push(b"data:x\ndata:y\n\n"), vec!["x\ny"]);
    }

    #[test]
    fn bodies_follow_each_endpoint_shape() {
        let spec = RequestSpec {
            prompt: "def f(".into(),
            suffix: Some(")\n".into()),
            max_tokens: 8,
            min_tokens: Some(8),
            prediction: None,
        };
        let fim = Endpoint::Fim.body("m", &spec, 0.0);
        assert_eq!(fim["prompt"], "def f(");
        assert_eq!(fim["suffix"], ")\n");
        assert_eq!(fim["min_tokens"], 8);
        assert_eq!(fim["stream"], true);
        let chat = Endpoint::Chat.body("m", &spec, 0.0);
        assert_eq!(chat["messages"][0]["content"], "def f(");
        assert!(chat.get("suffix").is_none());
        assert_eq!(chat["stream_options"]["include_usage"], true);
        let legacy = Endpoint::Completions.body("m", &spec, 0.0);
        assert_eq!(legacy["suffix"], ")\n");
        assert!(chat.get("prediction").is_none());
        let edit = RequestSpec {
            prediction: Some("x = 1\n".into()),
            ..spec
        };
        assert_eq!(
            Endpoint::Chat.body("m", &edit, 0.0)["prediction"],
            json!({"type": "content", "content": "x = 1\n"})
        );
    }

    #[test]
    fn urls_are_checked_before_any_io() {
        let t = Duration::from_secs(1);
        assert!(Client::new("http://127.0.0.1:8080/", None, t).is_ok());
        assert!(matches!(
            Client::new("https://api.example.com", None, t),
            Err(BenchError::BadUrl(_))
        ));
        assert!(matches!(
            Client::new("127.0.0.1:8080", None, t),
            Err(BenchError::BadUrl(_))
        ));
        assert!(matches!(
            Client::new("not a url", None, t),
            Err(BenchError::BadUrl(_))
        ));
    }
}
