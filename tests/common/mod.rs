//! Shared helpers for the multi-process tests: a real `stral serve` process on a free
//! loopback port, a small synthetic checkpoint, and a minimal HTTP client.
//!
//! Carried test binaries (the GPU machine runs them from another folder, see
//! `worker/scripts/device-run.sh`) must not depend on the build machine's paths, so
//! each compile-time path has a run-time override: `STRAL_BIN` for
//! `CARGO_BIN_EXE_stral`, `STRAL_TEST_TMPDIR` for `CARGO_TARGET_TMPDIR`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `stral` binary: `$STRAL_BIN`, else the one cargo built for this test.
pub fn stral() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("STRAL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_stral").to_string())
    })
}

/// A folder for test logs and models: `$STRAL_TEST_TMPDIR`, else cargo's.
pub fn tmpdir() -> PathBuf {
    let dir = std::env::var_os("STRAL_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small model with the real 32768 vocabulary that splits at TP = 1, 2, 4.
pub fn synth_model(dir: &Path, format: &str) {
    let out = Command::new(stral())
        .args([
            "synth", "--preset", "tiny", "--format", format, "--dtype", "bf16", "--seed", "3",
            "--out",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `stral serve` child process; killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    pub fn start(model: &Path, tp: usize, extra: &[&str]) -> Server {
        Self::start_on(free_port(), model, tp, extra, &[])
    }

    /// [`Server::start`] with extra environment variables (inherited by its workers).
    pub fn start_env(model: &Path, tp: usize, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_on(free_port(), model, tp, extra, env)
    }

    /// [`Server::start`] on a given port (e.g. to restart a replica where it was), with
    /// extra environment variables.
    pub fn start_on(
        port: u16,
        model: &Path,
        tp: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let log = tmpdir().join(format!("stral-serve-{port}.log"));
        let child = Command::new(stral())
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--tp",
                &tp.to_string(),
                "--model",
            ])
            .arg(model)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Server { child, port, log };
        s.wait_ready(Duration::from_secs(120));
        s
    }

    pub fn wait_ready(&self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok((200, _)) = http(self.port, "GET", "/ready", None, &[]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "server not ready after {limit:?}; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = http(self.port, "POST", path, Some(&body.to_string()), &[]).unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = http(self.port, "GET", "/metrics", None, &[]).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    /// Worker process ids (children of the server), from `/proc`.
    pub fn worker_pids(&self) -> Vec<u32> {
        let me = self.child.id();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let ppid: u32 = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid == me {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request (Connection: close); returns status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    http_with_head(port, method, path, body, headers).map(|(s, _, b)| (s, b))
}

/// [`http`], also returning the response head (status line and headers) as text.
pub fn http_with_head(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, head.to_string(), body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Opens a streaming request and returns a reader over the SSE `data:` lines.
pub fn open_stream(port: u16, path: &str, body: &Value) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    (&s).write_all(req.as_bytes()).unwrap();
    let reader = BufReader::new(s.try_clone().unwrap());
    (s, reader)
}

/// The next SSE `data:` payload (skipping chunk-size lines and blanks).
pub fn next_data(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(d) = line.trim_end().strip_prefix("data: ") {
            return Some(d.to_string());
        }
    }
}

/// A `stral route` child process in front of `replicas` (base URLs); killed on drop.
pub struct Router {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Router {
    /// Starts the router and waits for its `/health` (not for replicas to be ready).
    pub fn start(replicas: &[String], extra: &[&str]) -> Router {
        let port = free_port();
        let log =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("stral-route-{port}.log"));
        let mut cmd = Command::new(stral());
        cmd.args(["route", "--port", &port.to_string()]);
        for r in replicas {
            cmd.args(["--replica", r]);
        }
        let child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let r = Router { child, port, log };
        let t = Instant::now();
        while !matches!(http(port, "GET", "/health", None, &[]), Ok((200, _))) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "router did not start:\n{}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Waits until the router's `/ready` lists `n` ready replicas.
    pub fn wait_replicas_ready(&self, n: u64, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok((200, body)) = http(self.port, "GET", "/ready", None, &[]) {
                let v: Value = serde_json::from_str(&body).unwrap();
                if v["replicas_ready"].as_u64() == Some(n) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "router saw fewer than {n} ready replicas after {limit:?}:\n{}",
            self.log_text()
        );
    }

    /// One sample of the router's `/metrics`, e.g. `stral_route_replica_ready{replica="…"}`.
    pub fn sample(&self, series: &str) -> Option<f64> {
        let (_, text) = http(self.port, "GET", "/metrics", None, &[]).ok()?;
        metric_sample(&text, series)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name plus labels exactly as exposed) in a
/// Prometheus text exposition.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `stral bench` against `url` with `args`, and returns its JSON report.
pub fn run_bench(url: &str, args: &[&str]) -> Value {
    let out_file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "stral-bench-{}-{}.json",
        std::process::id(),
        free_port()
    ));
    let out = Command::new(stral())
        .args(["bench", "--url", url, "--json-out"])
        .arg(&out_file)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stral bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap()
}
