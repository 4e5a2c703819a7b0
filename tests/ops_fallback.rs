//! Upstream fallback across real processes: a local `stral serve` whose `--fallback-url`
//! is a second real `stral serve` (through a recording TCP relay, so the test can see
//! the upstream's exact bytes). Covers: per-key `fallback = "always"` streaming
//! byte-identical to the upstream's own bytes, spill-over with a tiny TTFT budget and a
//! saturated queue, a sticky A/B alias, and killing the local workers without any
//! client-visible error. Then the same over TLS: an `https://` upstream whose
//! certificate is issued by a private CA made at test time (trusted through
//! `--fallback-ca-file`, refused with a 502 without it), behind a TLS-terminating relay
//! that records the upstream's plaintext bytes; and a bad CA file stopping startup.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{synth_model, Server};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP relay on loopback that records every byte the upstream sends back.
struct Relay {
    port: u16,
    recorded: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let rec = recorded.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out, rec) = (server, client, rec.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = s_in.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { port, recorded }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.recorded.lock().unwrap())
    }
}

/// A private CA and a server certificate it issued for `localhost` and 127.0.0.1.
struct TestPki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

impl TestPki {
    fn generate() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "stral test CA");
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut server =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        server
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();
        TestPki {
            ca_pem: ca_cert.pem(),
            server_chain: vec![server_cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
        }
    }
}

/// A TLS-terminating relay on loopback (tokio-rustls): decrypts, forwards the plaintext
/// to `upstream`, and records every byte the upstream sends back.
struct TlsRelay {
    port: u16,
    recorded: Arc<Mutex<Vec<u8>>>,
    failed_handshakes: Arc<AtomicUsize>,
}

impl TlsRelay {
    fn start(upstream: u16, pki: &TestPki) -> TlsRelay {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let (rec, failed) = (recorded.clone(), failed_handshakes.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, rec, failed) = (acceptor.clone(), rec.clone(), failed.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        let Ok(server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        else {
                            return;
                        };
                        let (mut c_in, mut c_out) = tokio::io::split(tls);
                        let (mut s_in, mut s_out) = server.into_split();
                        let up = async move {
                            let _ = tokio::io::copy(&mut c_in, &mut s_out).await;
                            let _ = s_out.shutdown().await;
                        };
                        let down = async move {
                            let mut buf = [0u8; 16384];
                            while let Ok(n @ 1..) = s_in.read(&mut buf).await {
                                rec.lock().unwrap().extend_from_slice(&buf[..n]);
                                if c_out.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = c_out.shutdown().await;
                        };
                        tokio::join!(up, down);
                    });
                }
            });
        });
        TlsRelay {
            port,
            recorded,
            failed_handshakes,
        }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.recorded.lock().unwrap())
    }
}

/// One HTTP/1.1 exchange: status, lower-cased head, de-chunked body bytes.
fn exchange(port: u16, path: &str, body: &Value, key: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, String, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let rest = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    (status, head, body)
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = s.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&s[..i]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&s[i + 2..i + 2 + n]);
        s = &s[i + 2 + n + 2..];
    }
    out
}

fn served_by(head: &str) -> &str {
    head.lines()
        .find_map(|l| l.strip_prefix("x-stral-served-by: "))
        .unwrap_or("")
        .trim()
}

fn metric(port: u16, series: &str) -> f64 {
    let (_, text) = common::http(port, "GET", "/metrics", None, &[]).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn fim(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "codestral-latest", "prompt": "def fib(n):", "suffix": "\n", "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": stream})
}

/// The SSE payload is well formed and error-free: `data:` events ending with `[DONE]`.
fn assert_clean_stream(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
}

#[test]
fn fallback_upstream_serves_spills_splits_and_survives_dead_workers() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-ops-fallback-model");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "mistral");
    // The upstream wants its own key: forwarding the client's key would be refused.
    let upstream = Server::start(&dir, 1, &["--api-key", "upstream-secret"]);
    let relay = Relay::start(upstream.port);
    let mut keys = String::from(
        "[[keys]]\nname = \"plain\"\nkey = \"sk-plain\"\n\n[[keys]]\nname = \"spill\"\nkey = \"sk-spill\"\nfallback = \"always\"\n",
    );
    for i in 0..12 {
        keys.push_str(&format!(
            "\n[[keys]]\nname = \"k{i}\"\nteam = \"ab\"\nkey = \"sk-ab-{i}\"\n"
        ));
    }
    let key_file = dir.join("keys.toml");
    std::fs::write(&key_file, keys).unwrap();
    let fallback_url = format!("http://127.0.0.1:{}/v1", relay.port);
    let local = Server::start(
        &dir,
        1,
        &[
            "--keys-config",
            key_file.to_str().unwrap(),
            "--fallback-url",
            &fallback_url,
            "--fallback-api-key",
            "upstream-secret",
            "--fallback-ttft-budget-ms",
            "1",
            // Fail-fast on a worker crash, so step 5's dead workers show as failures
            // the fallback takes over (with recovery on, a request caught in a crash
            // waits for the restarted group instead: tests/recovery.rs).
            "--recovery-timeout",
            "0",
            "--max-num-seqs",
            "1",
            "--served-model-name",
            "codestral-latest",
            "--served-model-name",
            "ab=local@50,fallback#codestral-latest@50",
        ],
    );

    // 1. Idle local group: served locally even with a 1 ms budget (no queue to wait in).
    let (status, head, body) = exchange(
        local.port,
        "/v1/fim/completions",
        &fim(4, false),
        "sk-plain",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(served_by(&head), "local");

    // 2. A key whose rule is "always": streamed from the upstream byte for byte.
    relay.take();
    let (status, head, client_bytes) = exchange(
        local.port,
        "/v1/chat/completions",
        &json!({"model": "codestral-latest", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "stream": true, "temperature": 0}),
        "sk-spill",
    );
    assert_eq!(status, 200);
    assert_eq!(served_by(&head), "fallback");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let (up_status, _, upstream_bytes) = parse_response(&relay.take());
    assert_eq!(up_status, 200);
    assert_clean_stream(&client_bytes);
    assert_eq!(
        String::from_utf8_lossy(&client_bytes),
        String::from_utf8_lossy(&upstream_bytes),
        "the client must receive exactly the upstream's bytes"
    );

    // 3. Saturated queue (max_num_seqs = 1, one long stream running) + 1 ms budget → spill.
    let mut long = TcpStream::connect(("127.0.0.1", local.port)).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let long_body = fim(2000, true).to_string();
    write!(long, "POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-plain\r\nContent-Length: {}\r\n\r\n{long_body}", long_body.len()).unwrap();
    let mut reader = BufReader::new(long.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "long stream ended"
        );
    }
    let (status, head, body) = exchange(
        local.port,
        "/v1/fim/completions",
        &fim(4, false),
        "sk-plain",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        served_by(&head),
        "fallback",
        "a request behind a full running set must spill"
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    drop(reader);
    drop(long);
    assert!(metric(local.port, "stral_fallback_total{reason=\"ttft_budget\"}") >= 1.0);

    // 4. A/B alias: each key always lands on the same side, and both sides are used.
    let t = Instant::now();
    while metric(local.port, "stral_requests_running") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the aborted stream never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sides = Vec::new();
    for i in 0..12 {
        let key = format!("sk-ab-{i}");
        let mut body = fim(2, false);
        body["model"] = json!("ab");
        let seen: Vec<String> = (0..2)
            .map(|_| {
                let (status, head, b) = exchange(local.port, "/v1/fim/completions", &body, &key);
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
                served_by(&head).to_string()
            })
            .collect();
        assert_eq!(seen[0], seen[1], "key {i} switched sides");
        sides.push(seen[0].clone());
    }
    assert!(
        sides.iter().any(|s| s == "local") && sides.iter().any(|s| s == "fallback"),
        "{sides:?}"
    );

    // 5. Kill the local workers: every request is still answered, by the upstream.
    let pids = local.worker_pids();
    assert!(!pids.is_empty());
    for p in &pids {
        std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status()
            .unwrap();
    }
    for i in 0..6 {
        let stream = i % 2 == 1;
        let (status, head, body) = exchange(
            local.port,
            "/v1/fim/completions",
            &fim(3, stream),
            "sk-plain",
        );
        assert_eq!(
            status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        if i == 0 {
            assert_eq!(served_by(&head), "fallback", "first request after the kill");
        }
        if stream {
            assert_clean_stream(&body);
        } else {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 3);
        }
    }
    assert!(metric(local.port, "stral_served_total{backend=\"fallback\"}") >= 3.0);
}

/// The SSE events of a body with the per-response `id` and `created` removed: what two
/// runs of the same deterministic request must agree on.
fn events_without_ids(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| match serde_json::from_str::<Value>(d) {
            Ok(Value::Object(mut event)) => {
                event.remove("id");
                event.remove("created");
                Value::Object(event)
            }
            _ => json!(d),
        })
        .collect()
}

fn write_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        "[[keys]]\nname = \"spill\"\nkey = \"sk-spill\"\nfallback = \"always\"\n",
    )
    .unwrap();
    path
}

#[test]
fn https_upstream_with_a_private_ca_streams_byte_identical_and_is_refused_without_it() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-ops-https-model");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "mistral");
    let pki = TestPki::generate();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let upstream = Server::start(&dir, 1, &["--api-key", "upstream-secret"]);
    let relay = TlsRelay::start(upstream.port, &pki);
    let key_file = write_key_file(&dir);
    let fallback_url = format!("https://localhost:{}/v1", relay.port);
    let front_args = |ca: Option<&Path>| {
        let mut a = vec![
            "--keys-config".to_string(),
            key_file.display().to_string(),
            "--fallback-url".into(),
            fallback_url.clone(),
            "--fallback-api-key".into(),
            "upstream-secret".into(),
        ];
        if let Some(ca) = ca {
            a.extend(["--fallback-ca-file".into(), ca.display().to_string()]);
        }
        a
    };
    let args = front_args(Some(&ca_file));
    let front = Server::start(
        &dir,
        1,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Shorter than one KV block, so neither run reports cached prompt tokens.
    let chat = json!({"model": "codestral-latest", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "stream": true, "temperature": 0});

    // 1. Through the front, over TLS: the client gets exactly the upstream's bytes.
    relay.take();
    let (status, head, client_bytes) =
        exchange(front.port, "/v1/chat/completions", &chat, "sk-spill");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&client_bytes));
    assert_eq!(served_by(&head), "fallback");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert_clean_stream(&client_bytes);
    let (up_status, _, upstream_bytes) = parse_response(&relay.take());
    assert_eq!(up_status, 200);
    assert_eq!(
        String::from_utf8_lossy(&client_bytes),
        String::from_utf8_lossy(&upstream_bytes),
        "the client must receive exactly the bytes the upstream sent through TLS"
    );
    assert_eq!(relay.failed_handshakes.load(Ordering::SeqCst), 0);

    // 2. The same request straight to the upstream streams the same events (only the
    //    response id and timestamp differ between two runs).
    let (status, _, direct_bytes) = exchange(
        upstream.port,
        "/v1/chat/completions",
        &chat,
        "upstream-secret",
    );
    assert_eq!(status, 200);
    let (through, direct) = (
        events_without_ids(&client_bytes),
        events_without_ids(&direct_bytes),
    );
    assert!(through.len() > 3, "{through:?}");
    assert_eq!(through, direct);
    assert!(metric(front.port, "stral_served_total{backend=\"fallback\"}") >= 1.0);
    drop(front);

    // 3. Without --fallback-ca-file the private CA is not trusted: a prompt 502 in the
    //    API's error shape, naming the TLS failure and the flag; the server lives on.
    let args = front_args(None);
    let untrusting = Server::start(
        &dir,
        1,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let t = Instant::now();
    let (status, head, body) = exchange(untrusting.port, "/v1/chat/completions", &chat, "sk-spill");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(served_by(&head), "fallback");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "error");
    assert_eq!(v["type"], "upstream_error");
    assert_eq!(v["code"], "bad_gateway");
    let message = v["message"].as_str().unwrap();
    for part in [
        "TLS handshake",
        "invalid peer certificate",
        "--fallback-ca-file",
        &fallback_url,
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    // The client has its 502 once *it* rejected the certificate; the relay's side of the
    // handshake ends when the alert reaches it, a moment later.
    let t = Instant::now();
    while relay.failed_handshakes.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the relay never saw the refused handshake"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(relay.take().is_empty(), "nothing may reach the upstream");
    let (status, _) = common::http(untrusting.port, "GET", "/health", None, &[]).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_bad_fallback_ca_file_stops_startup_with_a_clear_error() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-ops-bad-ca");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "mistral");
    let not_pem = dir.join("not-a-cert.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    for (ca, want) in [
        (dir.join("missing.pem"), "No such file"),
        (not_pem, "no certificate found"),
    ] {
        let t = Instant::now();
        let out = std::process::Command::new(common::stral())
            .args([
                "serve",
                "--tp",
                "1",
                "--port",
                &common::free_port().to_string(),
            ])
            .arg("--model")
            .arg(&dir)
            .args([
                "--fallback-url",
                "https://localhost:1/v1",
                "--fallback-ca-file",
            ])
            .arg(&ca)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {}", ca.display());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "took {:?}",
            t.elapsed()
        );
        let expected = format!("--fallback-ca-file {}", ca.display());
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
    }
}
