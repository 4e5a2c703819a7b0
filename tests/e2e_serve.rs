//! End to end across real processes: `stral serve` spawning `stral worker` ranks on
//! loopback, real gRPC, the real tokenizer, HTTP from a raw client.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{next_data, open_stream, synth_model, Server};
use coordinator::detok::{Detokenizer, DetokenizerConfig};
use coordinator::prompt::encode_fim;
use coordinator::tokenizer::Tokenizer;
use serde_json::{json, Value};
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-e2e-model");
        let _ = std::fs::remove_dir_all(&dir);
        synth_model(&dir, "hf");
        dir
    })
}

const PREFIX: &str = "def fibonacci(n):\n    ";
const SUFFIX: &str = "\n\nprint(fibonacci(10))\n";

fn fim(max_tokens: u32) -> Value {
    json!({"model": "codestral-latest", "prompt": PREFIX, "suffix": SUFFIX, "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens})
}

#[test]
fn greedy_fim_is_identical_for_tp_1_2_4_and_matches_the_in_process_reference() {
    let tok = Tokenizer::codestral().unwrap();
    let prompt = encode_fim(&tok, PREFIX, SUFFIX).unwrap();
    let ckpt = Checkpoint::open(model_dir()).unwrap();
    let mut group = LocalTpGroup::load(&ckpt, 1, 8, 16).unwrap();
    let (ids, _) = group.generate_greedy(&prompt, 12, 16).unwrap();
    // EOS is banned by min_tokens on the server; the reference must not have picked it either.
    assert!(
        !ids.contains(&2),
        "reference generated EOS; pick another seed"
    );
    // The FIM endpoint keeps the first token's leading space (it is real code text).
    let mut detok = Detokenizer::new(
        tok.clone(),
        DetokenizerConfig {
            stop: vec![],
            strip_leading_space: false,
        },
    );
    let mut expected: String = ids.iter().map(|&id| detok.push(id).text).collect();
    expected.push_str(&detok.finish().text);
    assert_eq!(expected.trim_start(), tok.decode(&ids).trim_start());
    for tp in [1, 2, 4] {
        let server = Server::start(model_dir(), tp, &[]);
        let (status, body) = server.post("/v1/fim/completions", &fim(12));
        assert_eq!(status, 200, "TP={tp}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"].as_str().unwrap(),
            expected,
            "TP={tp}"
        );
        assert_eq!(body["usage"]["completion_tokens"], 12);
        assert_eq!(
            body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            prompt.len()
        );
    }
}

#[test]
fn many_concurrent_requests_complete_with_the_right_token_counts_and_free_every_block() {
    let server = Server::start(model_dir(), 2, &[]);
    let port = server.port;
    let handles: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let n = 1 + (i * 7) % 16;
                let prefix = "x = 1\n".repeat(1 + i % 9);
                let body = json!({"model": "codestral-latest", "prompt": prefix, "suffix": "", "temperature": 0.8, "random_seed": i,
                                  "max_tokens": n, "min_tokens": n});
                let (status, text) = common::http(port, "POST", "/v1/fim/completions", Some(&body.to_string()), &[]).unwrap();
                let v: Value = serde_json::from_str(&text).unwrap();
                (n, status, v)
            })
        })
        .collect();
    for h in handles {
        let (n, status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64().unwrap(),
            n as u64,
            "{v}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    assert_eq!(server.metric("stral_kv_blocks_used"), 0.0);
    assert_eq!(server.metric("stral_requests_running"), 0.0);
}

#[test]
fn clients_that_disconnect_mid_stream_free_their_blocks() {
    let server = Server::start(model_dir(), 2, &[]);
    let mut body = fim(400);
    body["stream"] = json!(true);
    let mut conns = Vec::new();
    for _ in 0..6 {
        let (sock, mut reader) = open_stream(server.port, "/v1/fim/completions", &body);
        for _ in 0..3 {
            assert!(next_data(&mut reader).is_some());
        }
        conns.push((sock, reader));
    }
    assert!(server.metric("stral_kv_blocks_used") > 0.0);
    drop(conns);
    let t = Instant::now();
    while server.metric("stral_kv_blocks_used") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "blocks still held 5 s after the clients left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("stral_requests_running"), 0.0);
    assert!(server.metric("stral_requests_aborted_total") >= 6.0);
}

#[test]
fn a_killed_worker_fails_in_flight_requests_fast_and_the_server_recovers() {
    // Recovery off: today's fail-fast behaviour (tests/recovery.rs covers it on).
    let server = Server::start(model_dir(), 2, &["--recovery-timeout", "0"]);
    let mut body = fim(3000);
    body["stream"] = json!(true);
    let (_sock, mut reader) = open_stream(server.port, "/v1/fim/completions", &body);
    for _ in 0..3 {
        assert!(next_data(&mut reader).is_some());
    }
    let pids = server.worker_pids();
    assert_eq!(
        pids.len(),
        2,
        "expected two worker processes, found {pids:?}"
    );
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &pids[1].to_string()])
        .status()
        .unwrap();
    // The stream must end with an error event within 2 s.
    let mut saw_error = false;
    while let Some(d) = next_data(&mut reader) {
        if d.contains("\"error\"") {
            saw_error = true;
        }
        if d == "[DONE]" {
            break;
        }
    }
    let waited = killed.elapsed();
    assert!(
        saw_error,
        "the in-flight stream ended without an error event"
    );
    assert!(
        waited < Duration::from_secs(2),
        "in-flight request failed only after {waited:?}"
    );
    // The group comes back and serves again.
    server.wait_ready(Duration::from_secs(60));
    let (status, v) = server.post("/v1/fim/completions", &fim(4));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(server.metric("stral_kv_blocks_used"), 0.0);
}
