//! Front-end cost of the HTTP API, with workers that skip the math
//! (`--worker-backend null`), so what is left is the coordinator and the HTTP layer.
//!
//! 1. **Added latency per request.** The same FIM request (max_tokens = 1) two ways,
//!    in interleaved pairs so both see the same machine state: (a) through the engine
//!    called directly in this process (`EngineHandle::submit`, pre-tokenized prompt, wait
//!    for `Finished`) over its own null worker; (b) over HTTP — `POST
//!    /v1/fim/completions`, non-streaming, on one keep-alive loopback connection — to a
//!    `stral serve` with the same settings and its own null worker. Both are
//!    client-observed wall times; (b) − (a) is what the HTTP layer adds: parsing,
//!    validation, tokenization, detokenization, JSON rendering, hyper and the loopback
//!    TCP round trip. Reported per path, and as percentiles of the per-pair difference.
//! 2. **Streamed tokens/s.** 256 clients stream FIM completions of 30,000 tokens from the
//!    same server; the SSE `data:` events the clients received in a steady window with
//!    all 256 running, divided by the window.
//!
//! Everything (clients, coordinator, worker) shares the machine's cores.
//! Run: `cargo build --release --bin stral && cargo run --release --example frontend_bench`
//! (optionally pass the path of the `stral` binary). Prints Markdown tables.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::engine::grpc::{GrpcExecutor, GrpcGroupConfig};
use coordinator::engine::{run_engine, EngineConfig, EngineEvent, GenerateRequest};
use coordinator::launch::{LocalWorkers, LocalWorkersConfig};
use coordinator::prompt::encode_fim;
use coordinator::tokenizer::{Tokenizer, EOS};

mod common;
use common::{get, metric, start_null_server, wait_running};

const TP: usize = 1;
const LATENCY_REQUESTS: usize = 5000;
const WARMUP: usize = 100;
const STREAMS: usize = 256;
const PREFIX: &str = "def fibonacci(n):\n    ";
const SUFFIX: &str = "\n\nprint(fibonacci(10))\n";

/// p50, p90, p99 and mean of microsecond samples.
fn percentiles(mut v: Vec<f64>) -> [f64; 4] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [
        at(0.5),
        at(0.9),
        at(0.99),
        v.iter().sum::<f64>() / v.len() as f64,
    ]
}

/// (a): the engine in this process over its own null worker.
struct DirectEngine {
    rt: tokio::runtime::Runtime,
    engine: coordinator::engine::EngineHandle,
    workers: Option<LocalWorkers>,
    prompt: Vec<u32>,
}

impl DirectEngine {
    fn start(exe: &Path, model: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (engine, workers) = rt.block_on(async {
            let workers = LocalWorkers::start(LocalWorkersConfig {
                exe: exe.to_path_buf(),
                tp: TP,
                device: "cpu".into(),
            })
            .expect("start workers");
            let exec = GrpcExecutor::new(GrpcGroupConfig {
                workers: workers.grpc_addrs.clone(),
                token: Some(workers.token.clone()),
                model_path: model.to_string_lossy().into_owned(),
                device: "null".into(),
                kv_cache_bytes: 512 << 20,
                ..Default::default()
            });
            let (engine, _task) = run_engine(exec, EngineConfig::default());
            let t = Instant::now();
            while !engine.is_ready() {
                assert!(t.elapsed() < Duration::from_secs(120), "engine not ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (engine, workers)
        });
        let tok = Tokenizer::codestral().unwrap();
        let prompt = encode_fim(&tok, PREFIX, SUFFIX).unwrap();
        Self {
            rt,
            engine,
            workers: Some(workers),
            prompt,
        }
    }

    /// One request, submit to `Finished`, in microseconds.
    fn request(&self) -> f64 {
        self.rt.block_on(async {
            let t = Instant::now();
            let mut stream = self
                .engine
                .submit(GenerateRequest {
                    prompt: self.prompt.clone(),
                    max_tokens: 1,
                    stop_token_ids: vec![EOS],
                    ..Default::default()
                })
                .await
                .expect("submit");
            loop {
                match stream.next().await {
                    Some(EngineEvent::Finished { .. }) => break,
                    Some(EngineEvent::Token(_)) => {}
                    other => panic!("engine: {other:?}"),
                }
            }
            t.elapsed().as_secs_f64() * 1e6
        })
    }

    fn stop(mut self) {
        if let Some(w) = self.workers.take() {
            self.rt.block_on(w.shutdown());
        }
    }
}

/// (b): one keep-alive connection, non-streaming requests.
struct HttpClient {
    request: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: String,
}

impl HttpClient {
    fn connect(port: u16) -> Self {
        let body =
            serde_json::json!({"model": "codestral-latest", "prompt": PREFIX, "suffix": SUFFIX,
                                      "temperature": 0, "max_tokens": 1})
            .to_string();
        let request = format!("POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_nodelay(true).unwrap();
        Self {
            request,
            reader: BufReader::new(sock.try_clone().unwrap()),
            writer: sock,
            line: String::new(),
        }
    }

    /// One request, write to the last body byte, in microseconds.
    fn request(&mut self) -> f64 {
        let t = Instant::now();
        self.writer.write_all(self.request.as_bytes()).unwrap();
        let (mut len, mut status_ok) = (None, false);
        loop {
            self.line.clear();
            self.reader.read_line(&mut self.line).unwrap();
            if self.line.starts_with("HTTP/1.1 ") {
                status_ok = self.line.starts_with("HTTP/1.1 200");
            }
            if let Some(v) = self
                .line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
            {
                len = v.trim().parse::<usize>().ok();
            }
            if self.line == "\r\n" {
                break;
            }
        }
        let mut resp = vec![0; len.expect("content-length")];
        self.reader.read_exact(&mut resp).unwrap();
        assert!(status_ok, "{}", String::from_utf8_lossy(&resp));
        t.elapsed().as_secs_f64() * 1e6
    }
}

/// 256 streams; SSE `data:` events received per second in a steady window.
fn stream_throughput(port: u16) -> (f64, f64, u64) {
    let received = Arc::new(AtomicU64::new(0));
    for i in 0..STREAMS {
        let received = received.clone();
        std::thread::spawn(move || {
            common::stream_fim(port, i, || {
                received.fetch_add(1, Ordering::Relaxed);
            })
        });
    }
    wait_running(port, STREAMS);
    std::thread::sleep(Duration::from_millis(500));
    let (a, ga) = (
        received.load(Ordering::Relaxed),
        metric(
            &get(port, "/metrics").unwrap(),
            "stral_generation_tokens_total",
        ),
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (b, gb) = (
        received.load(Ordering::Relaxed),
        metric(
            &get(port, "/metrics").unwrap(),
            "stral_generation_tokens_total",
        ),
    );
    let dt = t0.elapsed().as_secs_f64();
    let running = metric(&get(port, "/metrics").unwrap(), "stral_requests_running");
    assert!(
        running >= STREAMS as f64,
        "only {running} of {STREAMS} still running: the window is not steady"
    );
    ((b - a) as f64 / dt, (gb - ga) / dt, b - a)
}

fn main() {
    let exe = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release/stral".into()),
    );
    let model = worker::embedded::ensure_embedded_model().expect("embedded model");
    let direct = DirectEngine::start(&exe, &model);
    let (mut server, port) = start_null_server(&exe, TP, Some(&model));
    let mut http = HttpClient::connect(port);
    let (mut a, mut b, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + LATENCY_REQUESTS {
        let (d, h) = (direct.request(), http.request());
        if i >= WARMUP {
            a.push(d);
            b.push(h);
            diff.push(h - d);
        }
    }
    direct.stop();
    println!("Added latency, FIM max_tokens=1, {LATENCY_REQUESTS} interleaved pairs, TP={TP}:\n");
    println!("| path | p50 (µs) | p90 (µs) | p99 (µs) | mean (µs) |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, p: [f64; 4]| {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            p[0], p[1], p[2], p[3]
        )
    };
    row("(a) engine called directly", percentiles(a));
    row("(b) HTTP, non-streaming, keep-alive", percentiles(b));
    row("(b) − (a), per pair", percentiles(diff));
    let (events_per_s, tokens_per_s, events) = stream_throughput(port);
    println!("\nStreaming, {STREAMS} concurrent FIM streams, 3 s steady window, TP={TP}:\n");
    println!("| SSE events received/s (clients) | tokens/s (server counter) | events in window |");
    println!("|---|---|---|");
    println!("| {events_per_s:.0} | {tokens_per_s:.0} | {events} |");
    let _ = server.kill();
    let _ = server.wait();
}
