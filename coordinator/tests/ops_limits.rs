//! The ops layer in process over the real stack (HTTP router → engine → a real worker
//! over loopback gRPC): per-key token budgets under concurrency, 429 shape and headers,
//! a client honouring `Retry-After`, live reload, usage report and metrics, and the
//! A/B split over 1,000 keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use coordinator::http::{router, AppState, HttpConfig};
use coordinator::metrics::Metrics;
use coordinator::ops::keys::digest;
use coordinator::ops::routing::{ModelRoute, Target};
use coordinator::ops::{Ops, OpsConfig};
use coordinator::tokenizer::Tokenizer;
use http_body_util::BodyExt;
use scheduler::SchedulerConfig;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

/// A real stack with the ops layer reading `keys` (TOML) from a file.
async fn stack(keys: &str) -> (axum::Router, Arc<Ops>, std::path::PathBuf) {
    let engine = common::engine_over_loopback_worker(SchedulerConfig::default()).await;
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ops-keys-{}-{}.toml",
        std::process::id(),
        digest(keys)[0]
    ));
    std::fs::write(&file, keys).unwrap();
    let ops = Ops::new(OpsConfig {
        key_file: Some(file.clone()),
        reload_poll: Duration::from_millis(50),
        ..Default::default()
    })
    .unwrap();
    let http = HttpConfig {
        ops: Some(ops.clone()),
        ..Default::default()
    };
    let state = AppState::new(
        engine,
        Tokenizer::codestral().unwrap(),
        http,
        Arc::new(Metrics::default()),
    );
    (router(state), ops, file)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: &str,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, v)
}

fn fim(max_tokens: u32, seed: u64) -> Value {
    json!({"model": "codestral-latest", "prompt": "def add(a, b):", "suffix": "\n", "max_tokens": max_tokens, "temperature": 0.8, "random_seed": seed})
}

fn used(v: &Value) -> u64 {
    v["usage"]["total_tokens"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_on_one_key_spend_exactly_the_token_budget() {
    const BUDGET: u64 = 400;
    let (app, _ops, _) = stack(&format!(
        r#"
[[keys]]
name = "capped"
key = "sk-capped"
tokens_per_day = {BUDGET}

[[keys]]
name = "other"
key = "sk-other"
"#
    ))
    .await;
    let (_, _, probe) = call(
        &app,
        "POST",
        "/v1/fim/completions",
        Some(fim(8, 0)),
        "sk-other",
    )
    .await;
    let one_request = used(&probe) + 1;
    let spent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let (app, spent, in_flight, refused) = (
            app.clone(),
            spent.clone(),
            in_flight.clone(),
            refused.clone(),
        );
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            for i in 0.. {
                assert!(
                    Instant::now() < deadline,
                    "client {c} never saw the budget end"
                );
                in_flight.fetch_add(1, Ordering::SeqCst);
                let (status, headers, v) = call(
                    &app,
                    "POST",
                    "/v1/fim/completions",
                    Some(fim(8, c * 1000 + i)),
                    "sk-capped",
                )
                .await;
                let others = in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
                match status {
                    StatusCode::OK => {
                        spent.fetch_add(used(&v), Ordering::SeqCst);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert_eq!(v["code"], "rate_limit_exceeded", "{v}");
                        assert_eq!(v["type"], "rate_limit_error");
                        assert!(v["message"].as_str().unwrap().contains("tokens_per_day"));
                        assert!(headers.contains_key("retry-after"));
                        refused.fetch_add(1, Ordering::SeqCst);
                        // Stop once nobody else holds a reservation that could come back.
                        if others == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    s => panic!("unexpected {s}: {v}"),
                }
            }
        }));
    }
    // Another key is not affected while the capped one is being drained.
    for i in 0..5 {
        let (status, _, _) = call(
            &app,
            "POST",
            "/v1/fim/completions",
            Some(fim(4, i)),
            "sk-other",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    for c in clients {
        c.await.unwrap();
    }
    let spent = spent.load(Ordering::SeqCst);
    assert!(refused.load(Ordering::SeqCst) >= 8);
    assert!(
        (BUDGET..=BUDGET + one_request).contains(&spent),
        "spent {spent} tokens of a {BUDGET}-token budget (one request is at most {one_request})"
    );
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/fim/completions",
        Some(fim(8, 9)),
        "sk-capped",
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/fim/completions",
        Some(fim(8, 9)),
        "sk-other",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_request_rate_a_client_honouring_retry_after_gets_through() {
    let (app, _ops, _) = stack(
        r#"
[[keys]]
name = "rpm"
key = "sk-rpm"
requests_per_minute = 60
"#,
    )
    .await;
    let mut last_remaining = 61;
    let first_429 = loop {
        let (status, headers, v) = call(
            &app,
            "POST",
            "/v1/fim/completions",
            Some(fim(1, 0)),
            "sk-rpm",
        )
        .await;
        assert_eq!(headers["x-ratelimit-limit-requests"], "60");
        if status == StatusCode::TOO_MANY_REQUESTS {
            break (headers, v);
        }
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(headers["x-stral-served-by"], "local");
        let remaining: u64 = headers["x-ratelimit-remaining-requests"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            remaining < last_remaining,
            "remaining {remaining} after {last_remaining}"
        );
        last_remaining = remaining;
    };
    let (headers, v) = first_429;
    assert_eq!(v["object"], "error");
    assert_eq!(v["code"], "rate_limit_exceeded");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "one request refills every second at 60/min");
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _, v) = call(
        &app,
        "POST",
        "/v1/fim/completions",
        Some(fim(1, 0)),
        "sk-rpm",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "after Retry-After: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_key_file_changes_limits_live_without_dropping_requests() {
    let (app, _ops, file) = stack(
        r#"
[[keys]]
name = "a"
key = "sk-a"
requests_per_minute = 2
"#,
    )
    .await;
    let watcher = tokio::spawn(_ops.clone().watch_key_file());
    // A stream in flight across the reload.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/fim/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-a")
        .body(Body::from(
            json!({"model": "codestral-latest", "prompt": "x", "max_tokens": 64, "stream": true})
                .to_string(),
        ))
        .unwrap();
    let streaming = app.clone().oneshot(req).await.unwrap();
    assert_eq!(streaming.status(), StatusCode::OK);
    let (status, _, _) = call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-a").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-a").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Raise the limit and add a key; the watcher sees the new modification time.
    std::fs::write(
        &file,
        "[[keys]]\nname = \"a\"\nkey = \"sk-a\"\nrequests_per_minute = 5\n\n[[keys]]\nname = \"b\"\nkey = \"sk-b\"\n",
    )
    .unwrap();
    let t = Instant::now();
    loop {
        let (status, headers, _) =
            call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-b").await;
        if status == StatusCode::OK {
            assert!(!headers.contains_key("x-ratelimit-limit-requests"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "reload not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 2 used of 5: three more, then refused.
    for _ in 0..3 {
        let (status, headers, _) =
            call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-a").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-ratelimit-limit-requests"], "5");
    }
    let (status, _, _) = call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-a").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // A broken file keeps the previous keys in force.
    std::fs::write(&file, "[[keys]]\nname = \"a\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, _) = call(&app, "POST", "/v1/fim/completions", Some(fim(1, 0)), "sk-b").await;
    assert_eq!(status, StatusCode::OK);
    // The stream admitted before the reloads finishes normally.
    let body = streaming.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    watcher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_reported_to_admins_and_in_metrics_by_team() {
    let (app, _ops, _) = stack(&format!(
        r#"
[[keys]]
name = "alice"
team = "ide"
key = "sk-alice"
max_concurrent = 2

[[keys]]
name = "root"
team = "ops"
sha256 = "{}"
admin = true

[teams.ide]
tokens_per_day = 100000
"#,
        coordinator::ops::keys::hex_digest("sk-root")
    ))
    .await;
    let (_, _, v) = call(
        &app,
        "POST",
        "/v1/fim/completions",
        Some(fim(5, 1)),
        "sk-alice",
    )
    .await;
    let tokens = used(&v);
    let (status, _, _) = call(&app, "GET", "/v1/models", None, "sk-wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, v) = call(&app, "GET", "/v1/usage", None, "sk-alice").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (status, _, v) = call(&app, "GET", "/v1/usage", None, "sk-root").await;
    assert_eq!(status, StatusCode::OK);
    let alice = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap();
    assert_eq!(alice["requests"], 1);
    assert_eq!(alice["team"], "ide");
    assert_eq!(
        alice["prompt_tokens"].as_u64().unwrap() + alice["generated_tokens"].as_u64().unwrap(),
        tokens
    );
    assert_eq!(alice["limits"]["max_concurrent"], 2);
    assert_eq!(alice["remaining"]["in_flight"], 0);
    let ide = v["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ide")
        .unwrap();
    // Spent tokens are gone from the team's daily budget (which refills ~1.2 tokens/s).
    let left = ide["remaining"]["tokens_per_day"].as_u64().unwrap();
    assert!(
        (100000..=100002).contains(&(left + tokens)),
        "{left} left after {tokens}"
    );
    let (_, _, text) = call(&app, "GET", "/metrics", None, "").await;
    let text = text.as_str().unwrap().to_string();
    assert!(
        text.contains("stral_usage_requests_total{team=\"ide\",backend=\"local\"} 1"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "stral_usage_generated_tokens_total{{team=\"ide\"}} {}",
        alice["generated_tokens"]
    )));
    assert!(text.contains("stral_usage_request_duration_seconds_count{team=\"ide\"} 1"));
    assert!(
        !text.contains("alice"),
        "key names are not labels by default"
    );
}

#[test]
fn ab_split_over_a_thousand_keys_is_within_three_percent_and_sticky() {
    let route = ModelRoute::parse("codestral-latest=local@70,fallback#codestral-next@30")
        .unwrap()
        .unwrap();
    let keys: Vec<_> = (0..1000).map(|i| digest(&format!("sk-team-{i}"))).collect();
    let local = keys
        .iter()
        .filter(|k| route.pick(k).target == Target::Local)
        .count();
    let share = local as f64 / keys.len() as f64;
    assert!((share - 0.70).abs() <= 0.03, "local share {share}");
    for k in &keys {
        assert_eq!(route.pick(k), route.pick(k), "sticky per key");
    }
}

/// Checks `value` against a schema of `doc` (the OpenAPI 3.0 subset the document uses:
/// `$ref`, `allOf`, `type`, `nullable`, `enum`, `minimum`, `required`, `properties`,
/// `additionalProperties: false`, `items`). `at` names the place in errors.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .ok_or(format!("{at}: no {r}"))?;
        return conforms(doc, target, value, at);
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().try_for_each(|s| conforms(doc, s, value, at));
    }
    if value.is_null() && schema["nullable"] == true {
        return Ok(());
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let type_ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("number") => value.is_number(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some(t) => return Err(format!("{at}: the validator does not know type {t}")),
    };
    if !type_ok {
        return Err(format!("{at}: {value} is not of type {}", schema["type"]));
    }
    if let (Some(min), Some(v)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if v < min {
            return Err(format!("{at}: {v} < minimum {min}"));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema["properties"].as_object();
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !obj.contains_key(name) {
                return Err(format!("{at}: required '{name}' is missing"));
            }
        }
        for (name, v) in obj {
            match props.and_then(|p| p.get(name)) {
                Some(s) => conforms(doc, s, v, &format!("{at}.{name}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: '{name}' is not in the schema"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Every `x-ratelimit-*`, `x-stral-served-by` and `Retry-After` header of a response is
/// documented on that response (`response` is its object in the document) and its
/// value conforms to the header's schema. Returns how many were checked.
fn headers_documented(doc: &Value, response: &Value, headers: &axum::http::HeaderMap) -> usize {
    let response = match response["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
        None => response,
    };
    let documented = response["headers"].as_object().cloned().unwrap_or_default();
    let mut checked = 0;
    for (name, value) in headers {
        let name = name.as_str();
        if !(name.starts_with("x-ratelimit-")
            || name == "x-stral-served-by"
            || name == "retry-after")
        {
            continue;
        }
        let spec = documented
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("header {name} is not documented on {response}"));
        let spec = match spec["$ref"].as_str() {
            Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
            None => spec,
        };
        let text = value.to_str().unwrap();
        let value = match spec["schema"]["type"].as_str() {
            Some("integer") => json!(text
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}: {text} is not an integer"))),
            _ => json!(text),
        };
        conforms(doc, &spec["schema"], &value, name).unwrap();
        checked += 1;
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_report_and_the_limit_headers_are_what_openapi_json_documents() {
    let (app, _ops, _) = stack(&format!(
        r#"
[[keys]]
name = "capped"
team = "ide"
key = "sk-capped"
requests_per_minute = 2
tokens_per_minute = 100000
max_concurrent = 3

[[keys]]
name = "root"
sha256 = "{}"
admin = true

[teams.ide]
tokens_per_day = 100000
"#,
        coordinator::ops::keys::hex_digest("sk-root")
    ))
    .await;
    let (_, _, doc) = call(&app, "GET", "/openapi.json", None, "").await;
    let fim_responses = &doc["paths"]["/v1/fim/completions"]["post"]["responses"];
    let mut checked = 0;
    for expect in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/fim/completions")
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-capped")
            .body(Body::from(fim(3, 1).to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), expect);
        let response = &fim_responses[resp.status().as_str()];
        checked += headers_documented(&doc, response, resp.headers());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if expect == StatusCode::TOO_MANY_REQUESTS {
            let v: Value = serde_json::from_slice(&body).unwrap();
            conforms(
                &doc,
                &json!({"$ref": "#/components/schemas/Error"}),
                &v,
                "429",
            )
            .unwrap();
        }
    }
    // 200: served-by + 3 request + 3 token headers, twice; 429: the same + Retry-After.
    assert_eq!(checked, 7 + 7 + 8);

    let (status, _, usage) = call(&app, "GET", "/v1/usage", None, "sk-root").await;
    assert_eq!(status, StatusCode::OK);
    let schema = &doc["paths"]["/v1/usage"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"];
    conforms(&doc, schema, &usage, "usage").unwrap_or_else(|e| panic!("{e}\n{usage:#}"));
    // The report is not vacuous: both keys and both teams, with live numbers in them.
    assert_eq!(usage["keys"].as_array().unwrap().len(), 2);
    assert_eq!(usage["teams"].as_array().unwrap().len(), 2);
    let capped = &usage["keys"][0];
    assert_eq!(capped["name"], "capped");
    assert_eq!(
        (capped["requests"].as_u64(), capped["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(capped["mean_latency_seconds"].as_f64().unwrap() > 0.0);
    assert!(usage["keys"][1]["mean_latency_seconds"].is_null());
    // The checker itself rejects what the document does not allow.
    for (bad, why) in [
        (
            json!({"object": "usage", "served": {"local": 2, "fallback": 0}, "keys": [], "teams": [], "extra": 1}),
            "not in the schema",
        ),
        (
            json!({"object": "usage", "served": {"local": 2}, "keys": [], "teams": []}),
            "required 'fallback'",
        ),
        (
            json!({"object": "usage", "served": {"local": -1, "fallback": 0}, "keys": [], "teams": []}),
            "minimum",
        ),
    ] {
        let e = conforms(&doc, schema, &bad, "usage").unwrap_err();
        assert!(e.contains(why), "{e}");
    }
    let (status, _, v) = call(&app, "GET", "/v1/usage", None, "sk-capped").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let forbidden = &doc["paths"]["/v1/usage"]["get"]["responses"]["403"]["content"]
        ["application/json"]["schema"];
    conforms(&doc, forbidden, &v, "403").unwrap();
}
