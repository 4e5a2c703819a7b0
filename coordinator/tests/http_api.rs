//! The HTTP API in process (`tower::ServiceExt::oneshot`) over a real engine driving a
//! real worker service through gRPC on loopback: response shapes, streaming, stop
//! strings, and every error path.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use coordinator::engine::{EngineEvent, EngineHandle, GenerateRequest, SamplingParams};
use coordinator::http::{router, AppState, HttpConfig};
use coordinator::metrics::Metrics;
use coordinator::prompt::encode_fim;
use coordinator::tokenizer::Tokenizer;
use http_body_util::BodyExt;
use scheduler::SchedulerConfig;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

struct Stack {
    app: axum::Router,
    engine: EngineHandle,
    tokenizer: Tokenizer,
}

async fn stack(http: HttpConfig, scheduler: SchedulerConfig) -> Stack {
    let engine = common::engine_over_loopback_worker(scheduler).await;
    let tokenizer = Tokenizer::codestral().unwrap();
    let state = AppState::new(
        engine.clone(),
        tokenizer.clone(),
        http,
        Arc::new(Metrics::default()),
    );
    Stack {
        app: router(state),
        engine,
        tokenizer,
    }
}

async fn default_stack() -> Stack {
    stack(HttpConfig::default(), SchedulerConfig::default()).await
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Body,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn post(app: &axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, text) = call(app, "POST", path, Body::from(body.to_string()), &[]).await;
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["object"], "error", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

const PREFIX: &str = "fn main() {\n    let x = ";
const SUFFIX: &str = ";\n    println!(\"{x}\");\n}\n";

fn fim_body(max_tokens: u32) -> Value {
    json!({"model": "codestral-latest", "prompt": PREFIX, "suffix": SUFFIX, "temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_fim_over_http_equals_the_engine_called_directly() {
    let s = default_stack().await;
    let (status, body) = post(&s.app, "/v1/fim/completions", fim_body(10)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "codestral-latest");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 10);
    let prompt = encode_fim(&s.tokenizer, PREFIX, SUFFIX).unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        prompt.len()
    );

    let mut stream = s
        .engine
        .submit(GenerateRequest {
            prompt,
            max_tokens: 10,
            sampling: SamplingParams {
                min_tokens: 10,
                ..Default::default()
            },
            stop_token_ids: vec![2],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            EngineEvent::Token(t) => ids.push(t.id),
            EngineEvent::Finished { .. } => break,
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    assert_eq!(ids.len(), 10);
    assert_eq!(
        body["choices"][0]["message"]["content"].as_str().unwrap(),
        s.tokenizer.decode(&ids)
    );
}

fn sse_payloads(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_concatenate_to_the_non_streamed_text_and_end_with_done() {
    let s = default_stack().await;
    let (_, full) = post(&s.app, "/v1/fim/completions", fim_body(12)).await;
    let mut body = fim_body(12);
    body["stream"] = json!(true);
    let (status, headers, text) = call(
        &s.app,
        "POST",
        "/v1/fim/completions",
        Body::from(body.to_string()),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 12);

    // OpenAI legacy completions with a suffix is FIM too: same text.
    let (status, legacy) = post(
        &s.app,
        "/v1/completions",
        json!({"model": "codestral-latest", "prompt": PREFIX, "suffix": SUFFIX, "temperature": 0, "max_tokens": 12, "min_tokens": 12}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{legacy}");
    assert_eq!(legacy["object"], "text_completion");
    assert_eq!(
        legacy["choices"][0]["text"],
        full["choices"][0]["message"]["content"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_text_before_it_with_finish_reason_stop() {
    let s = default_stack().await;
    let (_, full) = post(&s.app, "/v1/fim/completions", fim_body(16)).await;
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop on a piece from the middle of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short to cut: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut body = fim_body(16);
    body["stop"] = json!([stop]);
    let (status, v) = post(&s.app, "/v1/fim/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Ended by a stop string, before the engine's final event: the cache figure came
    // with the first token.
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_in_the_chat_shape_and_rejects_bad_conversations() {
    let s = default_stack().await;
    let (status, v) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"model": "codestral-2405", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a haiku about Rust."}], "max_tokens": 5, "min_tokens": 5, "temperature": 0.5, "random_seed": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let (status, v) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"model": "codestral-latest", "messages": [{"role": "tool", "content": "x"}]}),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, v) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"model": "codestral-latest", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}, {"role": "user", "content": "d"}]}),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, v) = post(
        &s.app,
        "/v1/chat/completions",
        json!({"model": "codestral-latest", "messages": []}),
    )
    .await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_json_error_and_the_server_keeps_serving() {
    let s = default_stack().await;
    let app = &s.app;
    let cases: Vec<(Body, StatusCode, &str)> = vec![
        (
            Body::from("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": 5}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(vec![b'{', b'"', 0xff, 0xfe, b'"', b'}']),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "gpt-4", "prompt": "x"}"#),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "temperature": 5}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "top_p": 0}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "max_tokens": 0}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "max_tokens": -3}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "n": 2}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(r#"{"model": "codestral-latest", "prompt": "x", "max_tokens": 100000}"#),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(format!(
                r#"{{"model": "codestral-latest", "prompt": "{}"}}"#,
                "word ".repeat(2000)
            )),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Body::from(vec![b' '; 5 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (body, want, code) in cases {
        let (status, _, text) = call(app, "POST", "/v1/fim/completions", body, &[]).await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_error(status, &v, want, code);
    }
    let (status, _, text) = call(app, "GET", "/v1/nope", Body::empty(), &[]).await;
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (status, _, _) = call(app, "GET", "/v1/fim/completions", Body::empty(), &[]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // Still serving.
    let (status, _) = post(app, "/v1/fim/completions", fim_body(2)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_v1_but_not_health_ready_or_metrics() {
    let s = stack(
        HttpConfig {
            api_keys: vec!["sekret".into()],
            ..Default::default()
        },
        SchedulerConfig::default(),
    )
    .await;
    let (status, headers, text) = call(&s.app, "GET", "/v1/models", Body::empty(), &[]).await;
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, _) = call(
        &s.app,
        "GET",
        "/v1/models",
        Body::empty(),
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, text) = call(
        &s.app,
        "GET",
        "/v1/models",
        Body::empty(),
        &[("authorization", "Bearer sekret")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"codestral-latest") && ids.contains(&"codestral-2405"),
        "{ids:?}"
    );
    for path in ["/health", "/ready", "/metrics"] {
        let (status, _, _) = call(&s.app, "GET", path, Body::empty(), &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = stack(
        HttpConfig::default(),
        SchedulerConfig {
            max_waiting: 0,
            ..Default::default()
        },
    )
    .await;
    let (status, headers, text) = call(
        &s.app,
        "POST",
        "/v1/fim/completions",
        Body::from(fim_body(2).to_string()),
        &[],
    )
    .await;
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "overloaded",
    );
    assert_eq!(headers["retry-after"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_requests_tokens_latencies_and_kv_usage() {
    let s = default_stack().await;
    let (status, _) = post(&s.app, "/v1/fim/completions", fim_body(3)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, text) = call(&s.app, "GET", "/metrics", Body::empty(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for needle in [
        "stral_requests_total{endpoint=\"fim\",status=\"200\"} 1",
        "stral_generation_tokens_total 3",
        "stral_kv_blocks_used 0",
        "stral_time_to_first_token_seconds_count 1",
        "stral_inter_token_latency_seconds_count 2",
        "stral_e2e_request_latency_seconds_count 1",
        "stral_step_duration_seconds_count",
        "stral_prefix_cache_hit_rate",
        "stral_ready 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let total: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("stral_kv_blocks_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(total > 0.0);
    // Every step's wall time is split into engine, worker and transport shares.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("missing {name}"))
            .parse()
            .unwrap()
    };
    let steps = value("stral_step_duration_seconds_count");
    assert!(steps >= 3.0, "{steps} steps for 3 tokens");
    for phase in ["engine", "worker", "transport"] {
        assert_eq!(value(&format!("stral_step_{phase}_seconds_count")), steps);
        assert!(
            value(&format!("stral_step_{phase}_seconds_sum")) > 0.0,
            "every phase takes time: the engine plans, the CPU forward pass runs, and each \
             step crosses real gRPC on loopback ({phase})"
        );
    }
    // Transport is the remainder of the wall time, so the phases summing to it says
    // nothing; what can fail: the engine's and the worker's own clocks fit inside the
    // step's wall time, and the steps fit inside the request, timed by the HTTP layer.
    let wall = value("stral_step_duration_seconds_sum");
    let measured = value("stral_step_engine_seconds_sum") + value("stral_step_worker_seconds_sum");
    assert!(
        measured <= wall + 1e-6 * steps,
        "engine + worker {measured} s > step wall time {wall} s"
    );
    // A step's wall time ends after the engine's bookkeeping that follows the
    // delivery of its tokens, and the engine thread can lose its core in between, so
    // the last step may outlast the request by a tail that no clock of ours bounds
    // (seen in CI on 2 busy cores: 61 µs, and once 18 µs beyond the engine's whole
    // measured share). Allowed: one mean step. Double-counted or idle-inclusive step
    // times would exceed the request by whole steps.
    let e2e = value("stral_e2e_request_latency_seconds_sum");
    let mean_step = wall / steps;
    assert!(
        wall <= e2e + mean_step,
        "steps took {wall} s within a {e2e} s request (one mean step: {mean_step} s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reports_its_prefix_cache_hit_in_usage_cached_tokens() {
    let s = default_stack().await;
    // Several full 16-token KV blocks of prompt, sent twice, streamed and not.
    let prompt = "fn f(x: u32) -> u32 {\n    x * 2\n}\n".repeat(8);
    let body = json!({"model": "codestral-latest", "prompt": prompt, "suffix": "", "temperature": 0, "max_tokens": 2, "min_tokens": 2});
    let (status, first) = post(&s.app, "/v1/fim/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 32, "{first}");
    assert_eq!(
        first["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{first}"
    );
    let (status, second) = post(&s.app, "/v1/fim/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached > 0 && cached < prompt_tokens && cached % 16 == 0,
        "cached {cached} of {prompt_tokens}: {second}"
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, _, text) = call(
        &s.app,
        "POST",
        "/v1/fim/completions",
        Body::from(streamed.to_string()),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let payloads = sse_payloads(&text);
    let last: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_restricts_model_to_the_served_names_and_documents_cached_tokens() {
    let s = stack(
        HttpConfig {
            served_model_names: vec!["my-model".into(), "codestral-latest".into()],
            ..Default::default()
        },
        SchedulerConfig::default(),
    )
    .await;
    let (status, headers, text) = call(&s.app, "GET", "/openapi.json", Body::empty(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = serde_json::from_str(&text).unwrap();
    for request in ["FimRequest", "ChatRequest", "CompletionRequest"] {
        assert_eq!(
            doc["components"]["schemas"][request]["allOf"][1]["properties"]["model"]["enum"],
            json!(["my-model", "codestral-latest"]),
            "{request}"
        );
    }
    assert_eq!(
        doc["components"]["schemas"]["Usage"]["properties"]["prompt_tokens_details"]["properties"]
            ["cached_tokens"]["type"],
        "integer"
    );
}

/// POSTs `body` with `"stream": true`; returns the JSON chunks before `[DONE]`.
async fn stream_chunks(app: &axum::Router, path: &str, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    let (status, _, text) = call(app, "POST", path, Body::from(body.to_string()), &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

/// Checks chat `logprobs.content` entries against `text` (greedy, `top` alternatives).
fn check_chat_logprobs(content: &[Value], text: &str, top: usize) {
    let tokens: String = content
        .iter()
        .map(|c| c["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, text, "chat logprob tokens concatenate to the text");
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|c| c["bytes"].as_array().unwrap().iter())
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(
        bytes,
        text.as_bytes(),
        "chat logprob bytes concatenate to the text"
    );
    for c in content {
        let alts = c["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), top, "{c}");
        let lp = c["logprob"].as_f64().expect("a computed logprob");
        let best = alts
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(lp, best, "greedy: the chosen token is the most likely: {c}");
        assert_eq!(c["token"], alts[0]["token"], "{c}");
        assert!(lp < 0.0, "a random model is never certain: {c}");
    }
}

/// Checks a legacy `logprobs` object against `text` (greedy); returns the next offset.
fn check_legacy_logprobs(lp: &Value, text: &str, first_offset: usize) -> usize {
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let chars: Vec<char> = text.chars().collect();
    let mut offset = first_offset;
    for (i, tok) in tokens.iter().enumerate() {
        assert_eq!(
            lp["text_offset"][i], offset,
            "offset of token {i} ({tok:?})"
        );
        let n = tok.chars().count();
        let at: String = chars[offset..offset + n].iter().collect();
        assert_eq!(&at, tok, "text_offset {offset} indexes token {i}");
        offset += n;
        let best = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64().unwrap(), best, "token {i}");
    }
    offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_tokens_concatenate_to_the_text_and_greedy_picks_the_top_alternative() {
    let s = default_stack().await;
    let n = 24;
    // Chat, non-streamed and streamed.
    let chat = json!({"model": "codestral-latest", "messages": [{"role": "user", "content": "Sort a list in Rust."}],
                      "temperature": 0, "max_tokens": n, "min_tokens": n, "logprobs": true, "top_logprobs": 4});
    let (status, body) = post(&s.app, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), n as usize);
    check_chat_logprobs(content, text, 4);
    let chunks = stream_chunks(&s.app, "/v1/chat/completions", chat).await;
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(
        &streamed, content,
        "streamed logprobs equal the non-streamed ones"
    );

    // Legacy completions: FIM (with a suffix) and a plain prefix, non-streamed and streamed.
    for suffix in [Some(SUFFIX), None] {
        let mut req = json!({"model": "codestral-latest", "prompt": PREFIX, "temperature": 0,
                             "max_tokens": n, "min_tokens": n, "logprobs": 3});
        if let Some(suffix) = suffix {
            req["suffix"] = json!(suffix);
        }
        let (status, body) = post(&s.app, "/v1/completions", req.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let text = body["choices"][0]["text"].as_str().unwrap();
        let lp = &body["choices"][0]["logprobs"];
        let tokens: String = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(
            tokens, text,
            "legacy tokens concatenate to the text ({suffix:?})"
        );
        assert_eq!(check_legacy_logprobs(lp, text, 0), text.chars().count());

        let chunks = stream_chunks(&s.app, "/v1/completions", req).await;
        let streamed_text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed_text, text);
        let mut offset = 0;
        for c in chunks
            .iter()
            .filter(|c| c["choices"][0]["logprobs"].is_object())
        {
            offset = check_legacy_logprobs(&c["choices"][0]["logprobs"], text, offset);
        }
        assert_eq!(
            offset,
            text.chars().count(),
            "streamed offsets run to the end"
        );
    }
}
