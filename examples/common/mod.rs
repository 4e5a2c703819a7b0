//! What the root examples share: a `stral serve` on the null worker backend, plain
//! HTTP/1.1 helpers, and a streaming FIM client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `stral serve --worker-backend null --tp {tp}` (on `model`, or the embedded
/// default) on a free loopback port and waits until it is ready.
pub fn start_null_server(exe: &Path, tp: usize, model: Option<&Path>) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--worker-backend", "null", "--tp", &tp.to_string()])
        .args([
            "--port",
            &port.to_string(),
            // The null backend allocates no KV memory; 64 GiB worth of blocks keeps
            // 256 streams of 30,000 tokens resident (no preemption in a window).
            "--kv-cache-mib",
            "65536",
        ]);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start stral serve");
    let t = Instant::now();
    while get(port, "/ready").is_none() {
        assert!(t.elapsed() < Duration::from_secs(120), "server not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

/// The whole response of `GET path` when it is a 200.
pub fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// An unlabelled sample from Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Streams one FIM completion of 30,000 tokens; `on_event` runs for every SSE `data:`
/// line. Returns when the stream ends.
pub fn stream_fim(port: u16, seed: usize, mut on_event: impl FnMut()) {
    let body = format!(
        r#"{{"model":"codestral-latest","prompt":"def f{seed}(x):","suffix":"","max_tokens":30000,"min_tokens":30000,"temperature":0,"stream":true}}"#
    );
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = write!(s, "POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        if line.starts_with("data: ") {
            on_event();
        }
        line.clear();
    }
}

/// Waits until the server runs at least `n` requests.
pub fn wait_running(port: u16, n: usize) {
    let t = Instant::now();
    while metric(
        &get(port, "/metrics").unwrap_or_default(),
        "stral_requests_running",
    ) < n as f64
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "requests never all ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
