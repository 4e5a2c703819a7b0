//! The upstream (fallback) client: forwards one API request to another Mistral/OpenAI
//! compatible endpoint, over `http://` or `https://`, and streams its response back
//! unchanged.
//!
//! The request body is the client's, byte for byte (re-serialized only when an alias
//! renames the model); the client's credentials are never forwarded — the upstream sees
//! `--fallback-api-key`. The response body is streamed through frame by frame (no
//! buffering), so SSE arrives byte-identical; only the status and a few headers are
//! looked at. Errors are mapped: unreachable or 5xx upstream, or one whose TLS
//! certificate is not trusted → 502, upstream refusing our credentials → 502 (the
//! client's key was fine), 429 and other 4xx pass through with their body and
//! `Retry-After`.
//!
//! TLS is rustls (the `ring` provider). Trusted roots: the Mozilla set compiled in from
//! `webpki-roots` (so `https://api.mistral.ai` works with no setup) plus the PEM
//! certificates of `--fallback-ca-file` (a private CA). One [`UpstreamClient`] — one
//! connection pool and one TLS configuration — is shared by every upstream. Cost: one
//! pooled keep-alive HTTP/1.1 connection per concurrent request (a TLS handshake only
//! when a new connection is opened); per frame, one scan of its bytes for a `usage`
//! object. A new connection gets [`CONNECT_LIMIT`] for the TCP connect and the TLS
//! handshake together, so an upstream that accepts and then stalls fails the request
//! with a 502 instead of holding it.

use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::error::OpsError;
use crate::error::AppError;

/// The HTTP and HTTPS client every upstream shares: one connection pool, one set of
/// trusted roots. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Timed<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    /// How many CA certificates `--fallback-ca-file` added (TLS errors hint by it).
    extra_roots: usize,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("extra_roots", &self.extra_roots)
            .finish()
    }
}

impl UpstreamClient {
    /// A client trusting the webpki (Mozilla) roots plus every certificate in the PEM
    /// file `ca_file`. Fails, naming the file, when it cannot be read or holds no
    /// usable CA certificate.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, OpsError> {
        Self::build(ca_file, CONNECT_LIMIT)
    }

    fn build(ca_file: Option<&Path>, connect_limit: Duration) -> Result<Self, OpsError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let extra = match ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        let extra_roots = extra.len();
        for (i, cert) in extra.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                OpsError::FallbackCa(format!(
                    "{}: certificate {} is not a usable CA certificate: {e}",
                    ca_file.map(|p| p.display().to_string()).unwrap_or_default(),
                    i + 1
                ))
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OpsError::FallbackCa(format!("TLS configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = Timed {
            inner: HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
            limit: connect_limit,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            client,
            extra_roots,
        })
    }
}

/// How long a new upstream connection may take: TCP connect and TLS handshake.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn StdError + Send + Sync>;

/// A connector with one deadline over everything it does to open a connection.
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    limit: Duration,
}

impl<C> tower_service::Service<Uri> for Timed<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (connect, limit) = (self.inner.call(uri), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, connect).await {
                Ok(done) => done.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {limit:?} (TCP connect and TLS handshake)"),
                )) as BoxError),
            }
        })
    }
}

/// The certificates of a PEM file (at least one).
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, OpsError> {
    let name = path.display();
    let bytes = std::fs::read(path).map_err(|e| OpsError::FallbackCa(format!("{name}: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OpsError::FallbackCa(format!("{name}: not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(OpsError::FallbackCa(format!(
            "{name}: no certificate found (expected PEM blocks '-----BEGIN CERTIFICATE-----')"
        )));
    }
    Ok(certs)
}

/// One upstream endpoint.
#[derive(Clone)]
pub struct Upstream {
    /// `http[s]://host[:port]` plus an optional path prefix, no trailing slash.
    base: String,
    auth: Option<HeaderValue>,
    client: UpstreamClient,
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
    /// An upstream at `url` (`http[s]://host[:port][/prefix]`) reached through `client`.
    pub fn new(
        url: &str,
        api_key: Option<&str>,
        client: &UpstreamClient,
    ) -> Result<Self, OpsError> {
        let base = url.trim().trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| OpsError::Fallback(format!("{base} is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(OpsError::Fallback(format!(
                "{base}: expected http[s]://host[:port][/prefix]"
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
        Ok(Self {
            base,
            auth,
            client: client.clone(),
        })
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
        let resp = self
            .client
            .client
            .request(req)
            .await
            .map_err(|e| self.request_failed(&e))?;
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

impl Upstream {
    /// The 502 for a request that got no response: names a refused TLS certificate
    /// and the flag that fixes it, else the whole cause chain.
    fn request_failed(&self, e: &hyper_util::client::legacy::Error) -> AppError {
        if let Some(tls) = causes(e).find_map(|c| c.downcast_ref::<rustls::Error>()) {
            let hint = match self.client.extra_roots {
                0 => "an upstream with a private CA needs --fallback-ca-file",
                _ => "its certificate does not chain to the webpki roots or --fallback-ca-file",
            };
            return AppError::BadGateway(format!(
                "the fallback upstream {} failed the TLS handshake: {tls} ({hint})",
                self.base
            ));
        }
        let chain: Vec<String> = causes(e).map(|c| c.to_string()).collect();
        AppError::BadGateway(format!(
            "the fallback upstream {} is unreachable: {}",
            self.base,
            chain.join(": ")
        ))
    }
}

/// An error and its causes, looking inside `io::Error`s (whose `source` skips the
/// error they wrap, which is where rustls puts its own).
fn causes<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
        None => e.source(),
    })
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

    fn client() -> UpstreamClient {
        UpstreamClient::new(None).unwrap()
    }

    #[test]
    fn url_joins_v1_once() {
        let u = Upstream::new("http://h:1/v1/", None, &client()).unwrap();
        assert_eq!(
            u.url_for("/v1/chat/completions"),
            "http://h:1/v1/chat/completions"
        );
        let u = Upstream::new("http://h:1", None, &client()).unwrap();
        assert_eq!(
            u.url_for("/v1/fim/completions"),
            "http://h:1/v1/fim/completions"
        );
    }

    #[test]
    fn accepts_http_and_https_upstreams_only() {
        let u = Upstream::new("https://api.mistral.ai/v1", None, &client()).unwrap();
        assert_eq!(
            u.url_for("/v1/fim/completions"),
            "https://api.mistral.ai/v1/fim/completions"
        );
        for bad in ["h:1", "ftp://h/v1", "https://", "not a url"] {
            let e = Upstream::new(bad, None, &client()).unwrap_err().to_string();
            assert!(e.starts_with("--fallback-url"), "{bad}: {e}");
        }
    }

    /// An upstream that accepts the TCP connection and never answers the TLS hello.
    #[tokio::test]
    async fn a_stalled_tls_handshake_is_a_prompt_502() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                open.push(sock);
            }
        });
        let limit = Duration::from_millis(300);
        let client = UpstreamClient::build(None, limit).unwrap();
        let up = Upstream::new(&format!("https://127.0.0.1:{port}/v1"), None, &client).unwrap();
        let t = std::time::Instant::now();
        let err = up
            .forward(
                "/v1/fim/completions",
                Bytes::from_static(b"{}"),
                None,
                |_| {},
            )
            .await
            .unwrap_err();
        let waited = t.elapsed();
        assert!(
            waited >= limit && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        match err {
            AppError::BadGateway(m) => {
                assert!(m.contains("no connection within 300ms"), "{m}");
                assert!(m.contains(&format!("https://127.0.0.1:{port}/v1")), "{m}");
            }
            other => panic!("expected a 502, got {other:?}"),
        }
        held.abort();
    }

    #[test]
    fn bad_ca_files_are_refused_with_the_file_named() {
        let dir = std::env::temp_dir().join(format!("stral-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage_der = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
        for (name, text, want) in [
            ("empty.pem", "", "no certificate found"),
            (
                "key-only.pem",
                "-----BEGIN PRIVATE KEY-----\nAAECAwQF\n-----END PRIVATE KEY-----\n",
                "no certificate found",
            ),
            (
                "cut.pem",
                "-----BEGIN CERTIFICATE-----\nAAECAwQF\n",
                "not a PEM file",
            ),
            (
                "garbage.pem",
                garbage_der,
                "certificate 1 is not a usable CA certificate",
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let e = UpstreamClient::new(Some(&path)).unwrap_err().to_string();
            assert!(e.starts_with("--fallback-ca-file "), "{e}");
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        let e = UpstreamClient::new(Some(&dir.join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.pem") && e.contains("No such file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
