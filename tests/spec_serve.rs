//! Speculative decoding end to end (issue #19): `stral serve` with prompt-lookup
//! drafts against the same server with `--speculative none`, real worker processes,
//! real gRPC and the real tokenizer. Greedy output must be token-identical (FIM and
//! chat, TP 1 and 2, with prefix-cache hits and chunked prefill in the same run), drafts
//! must actually have been accepted, a seeded sampled request must repeat itself, and
//! every KV block must be free afterwards.
//!
//! With a `prediction` (the plain greedy output, the same with every 10th token
//! changed, garbage): the output of chat, FIM and legacy completions equals the
//! request's own output with `"speculative": false` on the same server, stop strings
//! and `max_tokens` that a draft overshoots are honoured exactly, and the speculation
//! metrics count what the responses' usage counts. Concurrent speculating and plain
//! streams, some hung up mid-stream, with preemption and chunked prefill happening,
//! end with every block free.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{next_data, open_stream, synth_model, Server};
use coordinator::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-spec-model");
        let _ = std::fs::remove_dir_all(&dir);
        synth_model(&dir, "hf");
        dir
    })
}

/// Code that repeats itself, so that prompt lookup finds drafts.
const PREFIX: &str =
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    ";
const SUFFIX: &str = "\n\nprint(add(1, 2), sub(3, 4), mul(5, 6))\n";

fn requests() -> Vec<(&'static str, Value)> {
    let fim = json!({"model": "codestral-latest", "prompt": PREFIX, "suffix": SUFFIX, "temperature": 0,
                     "max_tokens": 48, "min_tokens": 48});
    let chat = json!({"model": "codestral-latest", "temperature": 0, "max_tokens": 40, "min_tokens": 40,
                      "messages": [{"role": "user", "content": format!("Repeat this code:\n{PREFIX}\n{PREFIX}")}]});
    // The FIM request twice: the second is served from the prefix cache.
    vec![
        ("/v1/fim/completions", fim.clone()),
        ("/v1/chat/completions", chat),
        ("/v1/fim/completions", fim),
    ]
}

fn run(server: &Server) -> Vec<String> {
    requests()
        .into_iter()
        .map(|(path, body)| {
            let (status, v) = server.post(path, &body);
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn greedy_output_is_identical_with_prompt_lookup_on_and_off_for_tp_1_and_2() {
    // A small token budget: the prompts are prefilled in several chunks.
    let common_args = ["--max-num-batched-tokens", "32"];
    for tp in ["1", "2"] {
        let tp_n: usize = tp.parse().unwrap();
        let plain = Server::start(
            model_dir(),
            tp_n,
            &[&common_args[..], &["--speculative", "none"]].concat(),
        );
        let expected = run(&plain);
        assert_eq!(
            plain.metric("stral_spec_draft_tokens_total{source=\"ngram\"}"),
            0.0
        );
        drop(plain);
        let spec = Server::start(model_dir(), tp_n, &common_args);
        let got = run(&spec);
        assert_eq!(got, expected, "TP={tp}: speculation changed greedy output");
        let drafted = spec.metric("stral_spec_draft_tokens_total{source=\"ngram\"}");
        let accepted = spec.metric("stral_spec_accepted_tokens_total{source=\"ngram\"}");
        assert!(
            accepted > 0.0,
            "TP={tp}: no draft accepted ({drafted} drafted)"
        );
        assert_eq!(
            spec.metric("stral_spec_rejected_tokens_total{source=\"ngram\"}"),
            drafted - accepted
        );
        assert_eq!(spec.metric("stral_kv_blocks_used"), 0.0, "TP={tp}");
    }
}

#[test]
fn a_seeded_sampled_request_with_drafts_gives_the_same_text_twice() {
    let server = Server::start(model_dir(), 2, &[]);
    let body = json!({"model": "codestral-latest", "temperature": 0.01, "top_p": 0.9, "random_seed": 42,
                      "max_tokens": 40, "min_tokens": 40,
                      "messages": [{"role": "user", "content": format!("Repeat this code:\n{PREFIX}\n{PREFIX}")}]});
    let (s1, a) = server.post("/v1/chat/completions", &body);
    let (s2, b) = server.post("/v1/chat/completions", &body);
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    assert!(server.metric("stral_spec_draft_tokens_total{source=\"ngram\"}") > 0.0);
    assert_eq!(server.metric("stral_kv_blocks_used"), 0.0);
}

#[test]
fn a_prediction_of_the_wrong_shape_is_a_400_and_an_empty_one_is_fine() {
    let server = Server::start(model_dir(), 1, &[]);
    let base = json!({"model": "codestral-latest", "temperature": 0, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hi"}]});
    for bad in [
        json!("text"),
        json!({"type": "content", "content": 3}),
        json!({"type": "other", "content": "x"}),
    ] {
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/fim/completions",
        ] {
            let mut body = if path == "/v1/chat/completions" {
                base.clone()
            } else {
                json!({"model": "codestral-latest", "prompt": "def f(", "max_tokens": 4})
            };
            body["prediction"] = bad.clone();
            let (status, v) = server.post(path, &body);
            assert_eq!(status, 400, "{path} {bad}: {v}");
            assert_eq!(v["object"], "error", "{v}");
            assert_eq!(v["param"], "prediction", "{v}");
        }
    }
    for good in [
        json!({"type": "content", "content": ""}),
        json!({"type": "content", "content": [{"type": "text", "text": "def f(): pass"}]}),
    ] {
        let mut body = base.clone();
        body["prediction"] = good.clone();
        let (status, v) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{good}: {v}");
    }
    assert_eq!(server.metric("stral_kv_blocks_used"), 0.0);
}

/// What a request produced: compared between speculation on and off.
#[derive(Debug, PartialEq)]
struct Outcome {
    text: String,
    completion_tokens: u64,
    finish: String,
}

/// A response's outcome and its usage's accepted and rejected prediction tokens.
fn outcome(v: &Value) -> (Outcome, u64, u64) {
    let choice = &v["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"));
    let usage = &v["usage"];
    let details = &usage["completion_tokens_details"];
    (
        Outcome {
            text: text.to_owned(),
            completion_tokens: usage["completion_tokens"].as_u64().unwrap(),
            finish: choice["finish_reason"].as_str().unwrap().to_owned(),
        },
        details["accepted_prediction_tokens"].as_u64().unwrap(),
        details["rejected_prediction_tokens"].as_u64().unwrap(),
    )
}

/// Sums of the prediction tokens the responses' usage reported.
#[derive(Default)]
struct UsageTotals {
    accepted: u64,
    rejected: u64,
}

impl UsageTotals {
    /// Posts `body`; a 200 is required.
    fn post(&mut self, server: &Server, path: &str, body: &Value) -> (Outcome, u64) {
        let (status, v) = server.post(path, body);
        assert_eq!(status, 200, "{path}: {v}");
        let (o, accepted, rejected) = outcome(&v);
        self.accepted += accepted;
        self.rejected += rejected;
        (o, accepted)
    }
}

/// `text` re-tokenized with every 10th token replaced by another one.
fn every_10th_token_changed(tok: &Tokenizer, text: &str) -> String {
    let other = tok.encode("elephant").unwrap()[0];
    let mut ids = tok.encode(text).unwrap();
    for id in ids.iter_mut().skip(9).step_by(10) {
        *id = if *id == other { other + 1 } else { other };
    }
    tok.decode(&ids)
}

fn with(body: &Value, fields: Value) -> Value {
    let mut b = body.clone();
    for (k, v) in fields.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn prediction(text: &str) -> Value {
    json!({"type": "content", "content": text})
}

/// The three endpoints that take a `prediction` (FIM and legacy completions as a stral
/// extension), greedy and with a fixed length.
fn prediction_requests() -> Vec<(&'static str, Value)> {
    let base =
        json!({"model": "codestral-latest", "temperature": 0, "max_tokens": 64, "min_tokens": 64});
    vec![
        (
            "/v1/chat/completions",
            with(
                &base,
                json!({"messages": [{"role": "user", "content": format!("Rewrite this code:\n{PREFIX}")}]}),
            ),
        ),
        (
            "/v1/fim/completions",
            with(&base, json!({"prompt": PREFIX, "suffix": SUFFIX})),
        ),
        (
            "/v1/completions",
            with(&base, json!({"prompt": PREFIX, "suffix": SUFFIX})),
        ),
    ]
}

#[test]
fn greedy_output_with_a_prediction_is_identical_to_plain_decoding_and_stops_exactly() {
    let tok = Tokenizer::codestral().unwrap();
    for tp in [1, 2] {
        // A small token budget: the prompts are prefilled in several chunks.
        let server = Server::start(model_dir(), tp, &["--max-num-batched-tokens", "32"]);
        let mut usage = UsageTotals::default();
        let plain = |body: &Value| with(body, json!({"speculative": false}));
        for (path, body) in prediction_requests() {
            let (expected, _) = usage.post(&server, path, &plain(&body));
            assert_eq!(expected.completion_tokens, 64, "{path}");
            let garbage = "SELECT name FROM users WHERE id = 42;\n".repeat(8);
            let predictions = [
                ("exact", expected.text.clone()),
                (
                    "every 10th token changed",
                    every_10th_token_changed(&tok, &expected.text),
                ),
                ("garbage", garbage),
            ];
            for (what, predicted) in predictions {
                let (got, accepted) = usage.post(
                    &server,
                    path,
                    &with(&body, json!({"prediction": prediction(&predicted)})),
                );
                assert_eq!(got, expected, "TP={tp} {path}, prediction {what}");
                let wanted = match what {
                    "exact" => 32,
                    "every 10th token changed" => 20,
                    _ => 0,
                };
                assert!(
                    accepted >= wanted,
                    "TP={tp} {path}, prediction {what}: {accepted} drafts accepted, wanted {wanted}"
                );
            }
            // A draft that runs past a stop string or max_tokens: the output ends
            // exactly where plain decoding ends it.
            let chars: Vec<char> = expected.text.chars().collect();
            for at in [chars.len() / 4, chars.len() / 2, chars.len() * 3 / 4] {
                let stop: String = chars[at..at + 3].iter().collect();
                let stopped = with(&body, json!({"stop": [stop]}));
                let (want, _) = usage.post(&server, path, &plain(&stopped));
                assert_eq!(want.finish, "stop", "{path} stop {stop:?}");
                let (got, _) = usage.post(
                    &server,
                    path,
                    &with(&stopped, json!({"prediction": prediction(&expected.text)})),
                );
                assert_eq!(got, want, "TP={tp} {path}: stop {stop:?} with a prediction");
            }
            let short = with(&body, json!({"max_tokens": 13, "min_tokens": 13}));
            let (want, _) = usage.post(&server, path, &plain(&short));
            let (got, _) = usage.post(
                &server,
                path,
                &with(&short, json!({"prediction": prediction(&expected.text)})),
            );
            assert_eq!((got.completion_tokens, &got.finish[..]), (13, "length"));
            assert_eq!(got, want, "TP={tp} {path}: max_tokens 13 with a prediction");
        }
        // The metrics count the drafts the clients received, as usage does: none of
        // those accepted past a stop.
        let metric = |name: &str| {
            ["prediction", "ngram"]
                .map(|s| server.metric(&format!("{name}{{source=\"{s}\"}}")))
                .iter()
                .sum::<f64>()
        };
        assert_eq!(
            metric("stral_spec_accepted_tokens_total"),
            usage.accepted as f64,
            "TP={tp}: accepted drafts in /metrics vs in usage"
        );
        assert_eq!(
            metric("stral_spec_rejected_tokens_total"),
            usage.rejected as f64,
            "TP={tp}: rejected drafts in /metrics vs in usage"
        );
        assert_eq!(server.metric("stral_kv_blocks_used"), 0.0, "TP={tp}");
    }
}

/// What a streaming client saw.
enum Streamed {
    Completed(String),
    Disconnected,
}

/// Streams `body` from `path`, hanging up after three chunks when `hang_up`.
fn stream(port: u16, path: &str, body: &Value, hang_up: bool, start: &Barrier) -> Streamed {
    let body = with(body, json!({"stream": true}));
    start.wait();
    let (sock, mut reader) = open_stream(port, path, &body);
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(data) = next_data(&mut reader) {
        if data == "[DONE]" {
            return Streamed::Completed(text);
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        chunks += 1;
        if hang_up && chunks == 3 {
            drop(reader);
            drop(sock);
            return Streamed::Disconnected;
        }
    }
    panic!("stream closed before [DONE]: {text:?}");
}

#[test]
fn concurrent_speculating_and_plain_streams_with_disconnects_and_preemption_free_every_block() {
    // 24 blocks of 16 tokens for eight sequences of about 170 tokens: preemption. A
    // 64-token budget: chunked prefill of the 100-token prompts, and room for drafts
    // while a few sequences run.
    let server = Server::start(
        model_dir(),
        2,
        &["--num-kv-blocks", "24", "--max-num-batched-tokens", "64"],
    );
    const CLIENTS: usize = 8;
    let body = |i: usize| {
        json!({"model": "codestral-latest", "temperature": 0, "max_tokens": 64, "min_tokens": 64,
               "messages": [{"role": "user", "content": format!("Rewrite function {i}:\n{PREFIX}\n{PREFIX}")}]})
    };
    // Each client's greedy output, one at a time without drafts.
    let expected: Vec<String> = (0..CLIENTS)
        .map(|i| {
            let (status, v) = server.post(
                "/v1/chat/completions",
                &with(&body(i), json!({"speculative": false})),
            );
            assert_eq!(status, 200, "{v}");
            outcome(&v).0.text
        })
        .collect();
    let preempted_before = server.metric("stral_preemptions_total");
    let start = Arc::new(Barrier::new(CLIENTS));
    let port = server.port;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            // A third predict their output, a third opt out, a third use prompt lookup;
            // one in four hangs up.
            let extra = match i % 3 {
                0 => json!({"prediction": prediction(&expected[i])}),
                1 => json!({"speculative": false}),
                _ => json!({}),
            };
            let b = with(&body(i), extra);
            let start = start.clone();
            std::thread::spawn(move || stream(port, "/v1/chat/completions", &b, i % 4 == 3, &start))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        match c.join().unwrap() {
            Streamed::Completed(text) => assert_eq!(text, expected[i], "client {i}"),
            Streamed::Disconnected => assert_eq!(i % 4, 3),
        }
    }
    assert!(
        server.metric("stral_preemptions_total") > preempted_before,
        "no preemption happened"
    );
    assert!(server.metric("stral_spec_accepted_tokens_total{source=\"prediction\"}") > 0.0);
    let t = Instant::now();
    while server.metric("stral_kv_blocks_used") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "blocks still held 5 s after the last client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.metric("stral_requests_running"), 0.0);
    assert_eq!(server.metric("stral_requests_waiting"), 0.0);
}
