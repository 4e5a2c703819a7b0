//! Speculative decoding end to end (issue #19): `stral serve` with prompt-lookup
//! drafts against the same server with `--speculative none`, real worker processes,
//! real gRPC and the real tokenizer. Greedy output must be token-identical (FIM and
//! chat, TP 1 and 2, with prefix-cache hits and chunked prefill in the same run), drafts
//! must actually have been accepted, a seeded sampled request must repeat itself, and
//! every KV block must be free afterwards.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{synth_model, Server};
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
