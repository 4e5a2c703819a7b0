//! `stral route` in front of real `stral serve` replicas (sim backend, tiny shape: the
//! real coordinator, scheduler and prefix cache, no math) over loopback HTTP: the API
//! passes through unchanged, and affinity routing keeps a keystroke workload's
//! prefix-cache hit rate where one replica has it, far above round-robin's.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{http_with_head, next_data, open_stream, run_bench, Router, Server};
use serde_json::{json, Value};

const REPLICA_ARGS: &[&str] = &["--worker-backend", "sim", "--gpu", "h100"];

fn start_replicas(n: usize) -> Vec<Server> {
    start_replicas_with(n, None)
}

/// `n` replicas, each with its KV cache capped at `kv_blocks` when set.
fn start_replicas_with(n: usize, kv_blocks: Option<u32>) -> Vec<Server> {
    let starts: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let mut args: Vec<String> = REPLICA_ARGS.iter().map(|a| a.to_string()).collect();
                if let Some(b) = kv_blocks {
                    args.extend(["--num-kv-blocks".to_string(), b.to_string()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Server::start(Path::new("synthetic:tiny"), 1, &args)
            })
        })
        .collect();
    starts.into_iter().map(|s| s.join().unwrap()).collect()
}

fn urls(servers: &[Server]) -> Vec<String> {
    servers
        .iter()
        .map(|s| format!("http://127.0.0.1:{}", s.port))
        .collect()
}

/// The fleet's prefix-cache hit rate: each replica's rate weighted by the prompt
/// tokens it admitted (the replicas export a rate, not the hit count).
fn fleet_hit_rate(servers: &[Server]) -> f64 {
    let (mut hits, mut tokens) = (0.0, 0.0);
    for s in servers {
        let t = s.metric("stral_prompt_tokens_total");
        hits += t * s.metric("stral_prefix_cache_hit_rate");
        tokens += t;
    }
    hits / tokens
}

/// 24 developers typing for 4 s; returns the run's JSON.
fn keystroke_run(port: u16) -> Value {
    let report = run_bench(
        &format!("http://127.0.0.1:{port}"),
        &[
            "--workload",
            "keystroke",
            "--endpoint",
            "fim",
            "--concurrency",
            "24",
            "--duration",
            "4",
            "--keystroke-ms",
            "25",
            "--keystrokes-per-request",
            "6",
            "--think-ms",
            "100",
            "--fim-max-tokens",
            "8",
            "--seed",
            "11",
        ],
    );
    let run = report["runs"][0].clone();
    assert_eq!(run["failed"], 0, "{}", run["errors"]);
    assert!(run["completed"].as_u64().unwrap() > 20, "{run}");
    run
}

fn ttft(run: &Value) -> (f64, f64) {
    (
        run["ttft_ms"]["p50"].as_f64().unwrap(),
        run["ttft_ms"]["p95"].as_f64().unwrap(),
    )
}

/// Hit rate and TTFT (p50, p95) of one replica, and of 3 replicas behind the router
/// with affinity (plus its affinity hits and spills) and with round-robin; each
/// replica's cache capped at `kv_blocks` (the single replica gets 3× that: the same
/// total memory as the fleet).
struct Policies {
    single: (f64, (f64, f64)),
    affinity: (f64, (f64, f64), f64, f64),
    rr: (f64, (f64, f64), f64, f64),
}

fn compare_policies(kv_blocks: Option<u32>) -> Policies {
    let single = {
        let s = start_replicas_with(1, kv_blocks.map(|b| 3 * b));
        let run = keystroke_run(s[0].port);
        (fleet_hit_rate(&s), ttft(&run))
    };
    let through_router = |policy: &str| {
        let fleet = start_replicas_with(3, kv_blocks);
        let router = Router::start(&urls(&fleet), &["--policy", policy]);
        router.wait_replicas_ready(3, Duration::from_secs(30));
        let run = keystroke_run(router.port);
        for u in urls(&fleet) {
            let ok = format!("stral_route_requests_total{{replica=\"{u}\",status=\"200\"}}");
            assert!(
                router.sample(&ok).unwrap_or(0.0) > 0.0,
                "{policy}: replica {u} got no requests:\n{}",
                router.log_text()
            );
        }
        let spills = router
            .sample("stral_route_affinity_total{outcome=\"spill\"}")
            .unwrap();
        let hits = router
            .sample("stral_route_affinity_total{outcome=\"hit\"}")
            .unwrap();
        (fleet_hit_rate(&fleet), ttft(&run), hits, spills)
    };
    let p = Policies {
        single,
        affinity: through_router("affinity"),
        rr: through_router("round-robin"),
    };
    let (single, affinity, rr) = (p.single, p.affinity, p.rr);
    eprintln!(
        "KV blocks per replica {kv_blocks:?}: prefix-cache hit rate (TTFT p50/p95 ms): one replica {:.3} ({:.1}/{:.1}); 3 replicas affinity {:.3} ({:.1}/{:.1}, {} hits, {} spills); 3 replicas round-robin {:.3} ({:.1}/{:.1}); affinity / round-robin {:.2}x",
        single.0, single.1 .0, single.1 .1, affinity.0, affinity.1 .0, affinity.1 .1, affinity.2, affinity.3, rr.0, rr.1 .0, rr.1 .1, affinity.0 / rr.0
    );
    assert!(
        affinity.2 > 0.0 && rr.2 == 0.0,
        "round-robin counts no affinity: {rr:?}"
    );
    assert!(
        affinity.0 >= 0.9 * single.0,
        "affinity {:.3} not within 10% of one replica's {:.3}",
        affinity.0,
        single.0
    );
    p
}

#[test]
fn affinity_keeps_one_replicas_prefix_cache_hit_rate_and_beats_round_robin() {
    let p = compare_policies(None);
    // Unbounded caches (the sim H100's), measured on 2 shared cores: one replica 0.807,
    // affinity 0.757, round-robin 0.548 (1.38x). Round-robin loses only the first
    // request of each line on each replica (a FIM prompt starts with the suffix, which
    // changes with the line), so 2x is out of reach here; see the capped test below.
    assert!(
        p.affinity.0 >= 1.2 * p.rr.0,
        "affinity {:.3} not clearly above round-robin's {:.3}",
        p.affinity.0,
        p.rr.0
    );
}

/// Each replica's cache holds about half of the 24 developers' contexts (640 blocks
/// of 16 tokens vs ~56 blocks per developer): under round-robin every replica must
/// cache every developer and evicts what the next visit needs; under affinity each
/// caches its third. (A real Codestral-22B H100 replica has ~7.6K blocks for a few
/// hundred developers of ~140-block contexts: tighter still.) Measured 2.07–2.41x in
/// 6 runs on 2 shared cores (benches/RESULTS.md); asserted at 1.8x, below that spread.
#[test]
fn with_caches_holding_half_the_fleets_contexts_affinity_doubles_round_robins_hit_rate() {
    let p = compare_policies(Some(640));
    assert!(
        p.affinity.0 >= 1.8 * p.rr.0,
        "affinity {:.3} not about 2x round-robin's {:.3}",
        p.affinity.0,
        p.rr.0
    );
}

#[test]
fn the_router_speaks_the_replicas_api_and_names_the_replica() {
    let fleet = start_replicas(2);
    let router = Router::start(&urls(&fleet), &[]);
    router.wait_replicas_ready(2, Duration::from_secs(30));
    let get = |port, path| http_with_head(port, "GET", path, None, &[]).unwrap();

    let (s, _, direct) = get(fleet[0].port, "/v1/models");
    let (rs, head, routed) = get(router.port, "/v1/models");
    assert_eq!((s, rs), (200, 200));
    let ids = |b: &str| serde_json::from_str::<Value>(b).unwrap()["data"].clone();
    assert_eq!(ids(&direct)["id"], ids(&routed)["id"]);
    assert!(
        head.to_ascii_lowercase()
            .contains("x-stral-replica: http://127.0.0.1:"),
        "{head}"
    );

    // A non-streaming FIM request: the replica's answer (the sim backend's tokens are
    // pseudo-random per sequence, so compare the shape and the prompt accounting).
    let fim = json!({"model": "codestral-latest", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))", "max_tokens": 8, "temperature": 0});
    let (s, head, body) = http_with_head(
        router.port,
        "POST",
        "/v1/fim/completions",
        Some(&fim.to_string()),
        &[],
    )
    .unwrap();
    assert_eq!(s, 200, "{body}");
    let replica = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-stral-replica: ")
                .map(str::to_string)
        })
        .unwrap();
    let port: u16 = replica.rsplit(':').next().unwrap().trim().parse().unwrap();
    let (_, direct) = fleet
        .iter()
        .find(|s| s.port == port)
        .unwrap()
        .post("/v1/fim/completions", &fim);
    let routed: Value = serde_json::from_str(&body).unwrap();
    assert!(
        routed["choices"][0]["message"]["content"].is_string(),
        "{routed}"
    );
    assert_eq!(routed["object"], direct["object"]);
    assert_eq!(
        routed["usage"]["prompt_tokens"],
        direct["usage"]["prompt_tokens"]
    );
    // The same request again lands on the same replica (affinity).
    let (_, head2, _) = http_with_head(
        router.port,
        "POST",
        "/v1/fim/completions",
        Some(&fim.to_string()),
        &[],
    )
    .unwrap();
    assert!(
        head2
            .to_ascii_lowercase()
            .contains(&format!("x-stral-replica: {replica}")),
        "{head2}"
    );

    // Streaming passes through: chunks, then [DONE].
    let mut stream = fim.clone();
    stream["stream"] = json!(true);
    let (_s, mut reader) = open_stream(router.port, "/v1/fim/completions", &stream);
    let mut events = Vec::new();
    while let Some(d) = next_data(&mut reader) {
        events.push(d);
    }
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(events.len() >= 3, "{events:?}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");

    // A replica's errors come back as they are, in the API's shape.
    let (s, _, body) = http_with_head(
        router.port,
        "POST",
        "/v1/fim/completions",
        Some("{not json"),
        &[],
    )
    .unwrap();
    assert_eq!(s, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["object"], "error");
    // The router's own endpoints.
    let (s, _, body) = get(router.port, "/ready");
    assert_eq!(s, 200, "{body}");
    assert!(
        router
            .sample("stral_route_affinity_total{outcome=\"hit\"}")
            .unwrap()
            >= 2.0
    );
    let text = get(router.port, "/metrics").2;
    assert!(
        text.contains("stral_route_upstream_latency_seconds_bucket{replica=\"http://127.0.0.1:"),
        "{text}"
    );
}
