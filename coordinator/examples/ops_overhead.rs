//! What the ops layer adds per request (benches/RESULTS.md, "Ops layer overhead").
//!
//! 1. The limiter: key lookup among 1,000 hashed keys, admission against the key's and its
//!    team's buckets, 64 generated tokens charged one by one, release — on one thread,
//!    and on two threads sharing one key and team (lock contention).
//! 2. The fallback proxy (when `STRAL_BIN` names a `stral` binary): a real upstream
//!    `stral serve --worker-backend null`, and a second one forwarding every request to it
//!    (`fallback = "always"`); the same non-streaming FIM request sent sequentially to
//!    each; the added latency is the difference of the percentiles.
//!
//! `cargo run --release -p coordinator --example ops_overhead` (+ `STRAL_BIN=...`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::ops::keys::{bearer, digest, lookup, KeySet};
use coordinator::ops::limits::{admit, Account, RateLimits};

fn limiter(threads: usize, iters: usize) -> f64 {
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!(
            "[[keys]]\nname = \"k{i}\"\nteam = \"t{}\"\nkey = \"sk-bench-{i:04}\"\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000000\ntokens_per_day = 1000000000000\nmax_concurrent = 1000\n",
            i % 10
        ));
    }
    let set = KeySet::parse(&text, "bench").unwrap();
    let team = Account::new(RateLimits {
        tokens_per_minute: Some(1 << 40),
        ..Default::default()
    });
    let table: HashMap<_, _> = set
        .keys
        .iter()
        .map(|k| (k.digest, Account::new(k.limits)))
        .collect();
    let table = Arc::new(table);
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("authorization", "Bearer sk-bench-0421".parse().unwrap());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (table, team, headers) = (table.clone(), team.clone(), headers.clone());
            s.spawn(move || {
                for _ in 0..iters {
                    let key = lookup(&table, bearer(&headers).unwrap()).unwrap();
                    let mut permit = admit(key, Some(&team), 500, 64).unwrap();
                    for _ in 0..64 {
                        permit.charge_generated(1);
                    }
                }
            });
        }
    });
    start.elapsed().as_secs_f64() * 1e6 / (iters * threads) as f64
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(bin: &str, port: u16, extra: &[&str]) -> Proc {
    let child = Proc(
        Command::new(bin)
            .args([
                "serve",
                "--worker-backend",
                "null",
                "--tp",
                "1",
                "--port",
                &port.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            if r.starts_with("HTTP/1.1 200") {
                return child;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("stral serve on {port} not ready");
}

/// Latencies (µs) of `n` sequential requests on one keep-alive connection.
fn latencies(port: u16, n: usize, key: &str) -> Vec<f64> {
    let body = r#"{"model":"codestral-latest","prompt":"def fib(n):","suffix":"\n","max_tokens":1,"temperature":0}"#;
    let req = format!("POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65536];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(req.as_bytes()).unwrap();
        let mut got = Vec::new();
        loop {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0, "connection closed");
            got.extend_from_slice(&buf[..k]);
            if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if got.len() >= h + 4 + len {
                    break;
                }
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let _ = digest("warm-up");
    for threads in [1, 2] {
        let us = limiter(threads, 200_000);
        println!("limiter: {threads} thread(s): {us:.2} µs per request (lookup + admit + 64 token charges + release)");
    }
    let Ok(bin) = std::env::var("STRAL_BIN") else {
        println!("fallback proxy: skipped (set STRAL_BIN to a stral binary)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("stral-ops-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nname = \"bench\"\nkey = \"sk-bench\"\nfallback = \"always\"\n",
    )
    .unwrap();
    let (up_port, front_port) = (free_port(), free_port());
    let _up = serve(&bin, up_port, &[]);
    let url = format!("http://127.0.0.1:{up_port}");
    let _front = serve(
        &bin,
        front_port,
        &[
            "--keys-config",
            keys.to_str().unwrap(),
            "--fallback-url",
            &url,
        ],
    );
    let n = 3000;
    // Interleave rounds so drift (other load on the machine) hits both sides alike.
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    latencies(up_port, 200, "x");
    latencies(front_port, 200, "sk-bench");
    for _ in 0..5 {
        direct.extend(latencies(up_port, n / 5, "x"));
        proxied.extend(latencies(front_port, n / 5, "sk-bench"));
    }
    for p in [0.5, 0.9, 0.99] {
        let (d, f) = (pct(&mut direct, p), pct(&mut proxied, p));
        println!(
            "fallback proxy: p{:.0}: direct {d:.0} µs, through the fallback {f:.0} µs, added {:.0} µs",
            p * 100.0,
            f - d
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
