//! Coordinator overhead per engine step: everything but the forward pass (scheduling,
//! plan encoding, gRPC to every rank, plan checks and block-table mirroring in the
//! workers, token fan-out, detokenization and SSE to the clients), measured with
//! `stral serve --worker-backend null` at 1, 64 and 256 concurrently streaming requests.
//!
//! Run: `cargo build --release && cargo run --release --example coordinator_overhead`
//! (optionally pass the path of the `stral` binary). Prints Markdown rows.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(port: u16, path: &str) -> Option<String> {
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

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn stream_one(port: u16, seed: usize) {
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
        line.clear();
    }
}

fn main() {
    let exe = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/stral".into());
    println!("| running sequences | TP | steps measured | mean step (µs) | steps/s |");
    println!("|---|---|---|---|---|");
    for n in [1usize, 64, 256] {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Command::new(&exe)
            .args([
                "serve",
                "--worker-backend",
                "null",
                "--tp",
                "2",
                "--port",
                &port.to_string(),
                // The null backend allocates no KV memory; this many blocks keeps
                // every stream resident through the window (no preemption).
                "--kv-cache-mib",
                "65536",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stral serve");
        let t = Instant::now();
        while get(port, "/ready").is_none() {
            assert!(t.elapsed() < Duration::from_secs(120), "server not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        for i in 0..n {
            std::thread::spawn(move || stream_one(port, i));
        }
        // Wait until all are running, then measure a steady window.
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
        std::thread::sleep(Duration::from_millis(500));
        let a = get(port, "/metrics").unwrap();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let b = get(port, "/metrics").unwrap();
        let dt = t0.elapsed().as_secs_f64();
        let running = metric(&b, "stral_requests_running");
        let steps = metric(&b, "stral_step_duration_seconds_count")
            - metric(&a, "stral_step_duration_seconds_count");
        let secs = metric(&b, "stral_step_duration_seconds_sum")
            - metric(&a, "stral_step_duration_seconds_sum");
        assert!(
            running >= n as f64,
            "only {running} of {n} still running: the window is not steady"
        );
        println!(
            "| {n} | 2 | {steps} | {:.0} | {:.0} |",
            secs / steps * 1e6,
            steps / dt
        );
        let _ = server.kill();
        let _ = server.wait();
    }
}
