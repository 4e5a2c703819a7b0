//! Load across real processes: 200 concurrent streaming clients against `stral serve
//! --worker-backend null` (real coordinator, scheduler, gRPC workers, tokenizer and SSE;
//! only the forward pass is skipped), 30% of them hanging up mid-stream. Every other
//! stream must finish with exactly its token count, and afterwards no KV block, running
//! or waiting sequence may be left (read from `/metrics`).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{next_data, open_stream, synth_model, Server};
use serde_json::{json, Value};

const CLIENTS: usize = 200;

/// Clients `i` with `i % 10 < 3` disconnect: 30%.
fn disconnects(i: usize) -> bool {
    i % 10 < 3
}

enum Outcome {
    /// Token chunks seen, and the final chunk's usage.completion_tokens.
    Completed {
        max_tokens: u64,
        chunks: u64,
        usage: u64,
        finish: String,
    },
    Disconnected,
}

fn client(port: u16, i: usize, start: &Barrier) -> Outcome {
    // Completing clients want 64..=160 tokens; disconnecting ones far more than they read.
    let max_tokens = if disconnects(i) {
        4000
    } else {
        64 + (i as u64 % 7) * 16
    };
    let body = json!({"model": "codestral-latest", "prompt": format!("def f{i}(x):\n    return x"),
                      "suffix": "", "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens,
                      "stream": true});
    start.wait();
    let (sock, mut reader) = open_stream(port, "/v1/fim/completions", &body);
    if disconnects(i) {
        for _ in 0..3 {
            assert!(
                next_data(&mut reader).is_some(),
                "client {i}: stream ended early"
            );
        }
        drop(reader);
        drop(sock);
        return Outcome::Disconnected;
    }
    let (mut chunks, mut usage, mut finish) = (0, None, None);
    loop {
        let data = next_data(&mut reader)
            .unwrap_or_else(|| panic!("client {i}: stream closed before [DONE]"));
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "client {i}: {v}");
        match v["choices"][0]["finish_reason"].as_str() {
            None => chunks += 1,
            Some(f) => {
                finish = Some(f.to_string());
                usage = v["usage"]["completion_tokens"].as_u64();
            }
        }
    }
    Outcome::Completed {
        max_tokens,
        chunks,
        usage: usage.unwrap_or_else(|| panic!("client {i}: no usage in the final chunk")),
        finish: finish.unwrap_or_else(|| panic!("client {i}: no finish_reason")),
    }
}

#[test]
fn two_hundred_streams_with_thirty_percent_hanging_up_complete_and_free_every_block() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-load-model");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "hf");
    let server = Server::start(&dir, 2, &["--worker-backend", "null"]);
    let port = server.port;
    let start = Arc::new(Barrier::new(CLIENTS));
    let t = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || client(port, i, &start))
        })
        .collect();
    let (mut completed, mut disconnected) = (0, 0);
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().unwrap() {
            Outcome::Completed {
                max_tokens,
                chunks,
                usage,
                finish,
            } => {
                assert_eq!(chunks, max_tokens, "client {i}: token chunks");
                assert_eq!(usage, max_tokens, "client {i}: usage.completion_tokens");
                assert_eq!(finish, "length", "client {i}");
                completed += 1;
            }
            Outcome::Disconnected => disconnected += 1,
        }
    }
    eprintln!(
        "{completed} streams completed, {disconnected} hung up, in {:?}",
        t.elapsed()
    );
    assert_eq!((completed, disconnected), (140, 60));
    // The hung-up sequences are aborted at the next step boundary; give it a moment.
    let t = Instant::now();
    while server.metric("stral_kv_blocks_used") > 0.0
        || server.metric("stral_requests_running") > 0.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "5 s after the last client: {} KV blocks used, {} running",
            server.metric("stral_kv_blocks_used"),
            server.metric("stral_requests_running")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("stral_requests_waiting"), 0.0);
    assert!(server.metric("stral_kv_blocks_total") > 0.0);
    assert!(server.metric("stral_requests_aborted_total") >= 60.0);
}

#[test]
fn clients_that_hang_up_on_non_streaming_requests_abort_their_sequences() {
    use std::io::Write;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-hangup-model");
    let _ = std::fs::remove_dir_all(&dir);
    synth_model(&dir, "hf");
    let server = Server::start(&dir, 1, &["--worker-backend", "null"]);
    // 30,000 tokens each: seconds of steps if nobody aborted them.
    let body =
        json!({"model": "codestral-latest", "prompt": "def f(x):", "suffix": "", "temperature": 0,
                      "max_tokens": 30000, "min_tokens": 30000})
        .to_string();
    let socks: Vec<_> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            write!(s, "POST /v1/fim/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    while server.metric("stral_requests_running") < 8.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "requests never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let generated = server.metric("stral_generation_tokens_total");
    assert!(server.metric("stral_kv_blocks_used") > 0.0);
    drop(socks);
    let t = Instant::now();
    while server.metric("stral_kv_blocks_used") > 0.0
        || server.metric("stral_requests_running") > 0.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "blocks still held 2 s after the clients hung up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.metric("stral_requests_aborted_total") >= 8.0);
    // Far fewer than the 240,000 tokens that finishing them would have taken.
    let after = server.metric("stral_generation_tokens_total");
    assert!(
        after < 120_000.0,
        "{generated} then {after} tokens generated"
    );
}
