//! The sim backend across real processes: `stral serve --worker-backend sim --gpu h100
//! --model synthetic:codestral-22b --tp 2` starts two weightless worker ranks, the real
//! coordinator, scheduler and HTTP stack serve a FIM request, and `/metrics`' step time
//! matches the step-time model.

mod common;

use std::path::Path;

use common::Server;
use serde_json::json;
use worker::sim::{GpuKind, SeqWork, StepTimeModel};
use worker::ModelConfig;

/// Held by the tests that start a server: the step-time comparison needs the cores to
/// itself (another test's server on the same two cores inflates every step).
static ONE_SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_server() -> std::sync::MutexGuard<'static, ()> {
    ONE_SERVER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tokens generated per request; with the prompt's prefill, this many steps.
const MAX_TOKENS: u64 = 64;

/// Sum and count of `stral_step_duration_seconds`.
fn step_metric(s: &Server) -> (f64, f64) {
    (
        s.metric("stral_step_duration_seconds_sum"),
        s.metric("stral_step_duration_seconds_count"),
    )
}

#[test]
fn a_sim_22b_group_serves_fim_and_its_step_time_matches_the_model() {
    let _one = one_server();
    let s = Server::start(
        Path::new("synthetic:codestral-22b"),
        2,
        &["--worker-backend", "sim", "--gpu", "h100"],
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("MODELLED"),
        "the serve log labels sim times:\n{log}"
    );
    // The real scheduler sees the modelled H100 memory, not a CPU budget.
    let model = StepTimeModel::new(ModelConfig::codestral_22b(), GpuKind::H100.spec(), 2).unwrap();
    let blocks = model.kv_capacity_blocks(16, 0.9, 8192, 256).unwrap() as f64;
    // The pool reports its usable blocks: all but the null block.
    assert_eq!(s.metric("stral_kv_blocks_total"), blocks - 1.0);

    // The engine cannot be faster than the workers' sleep, so the lower bound is
    // strict. Above the model sit the coordinator's own per-step costs (~0.2–0.5 ms
    // here, see RESULTS.md "Coordinator overhead") and whatever else runs on this
    // 2-core machine: the 20 % upper bound holds on an idle machine; a load spike
    // only adds time, so a second and third try absorb one.
    let mut errors = Vec::new();
    for attempt in 0..3 {
        let (sum0, count0) = step_metric(&s);
        let (status, body) = s.post(
            "/v1/fim/completions",
            &json!({
                "model": "codestral-latest",
                "prompt": "def fibonacci(n):\n    ",
                "suffix": "\n\nprint(fibonacci(10))\n",
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
        assert_eq!(body["usage"]["completion_tokens"], MAX_TOKENS, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.is_empty());
        let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap() as u32;
        let (sum1, count1) = step_metric(&s);
        let steps = (count1 - count0) as u64;
        // One prefill, MAX_TOKENS − 1 decodes, and possibly a step that only frees.
        assert!(
            (MAX_TOKENS..=MAX_TOKENS + 1).contains(&steps),
            "{steps} steps"
        );
        let mut predicted_us = model
            .step(&[SeqWork {
                new_tokens: prompt,
                cached: 0,
                sample: true,
            }])
            .total_us;
        for i in 0..MAX_TOKENS as u32 - 1 {
            predicted_us += model.step(&[SeqWork::decode(prompt + i)]).total_us;
        }
        predicted_us += (steps - MAX_TOKENS) as f64 * model.step(&[]).total_us;
        let predicted = predicted_us / steps as f64;
        let measured = (sum1 - sum0) / (count1 - count0) * 1e6;
        let err = (measured - predicted) / predicted;
        eprintln!(
            "attempt {attempt}: mean step {measured:.0} µs, modelled {predicted:.0} µs ({:+.1} %)",
            err * 100.0
        );
        assert!(
            err > -0.02,
            "a step ({measured:.0} µs) took less than the modelled {predicted:.0} µs"
        );
        if err < 0.20 {
            return;
        }
        errors.push(err);
    }
    panic!("mean step time over the model by more than 20 % in every try: {errors:?}");
}

#[test]
fn a_shape_without_weights_needs_the_sim_and_the_sim_needs_a_gpu() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::stral())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["serve", "--model", "synthetic:codestral-22b", "--port", "1"]);
    assert!(e.contains("--worker-backend sim"), "{e}");
    let e = run(&["serve", "--worker-backend", "sim", "--port", "1"]);
    assert!(e.contains("--gpu"), "{e}");
    let e = run(&["serve", "--gpu", "h100", "--port", "1"]);
    assert!(e.contains("--worker-backend sim"), "{e}");
    let e = run(&[
        "serve",
        "--worker-backend",
        "sim",
        "--gpu",
        "cpu",
        "--port",
        "1",
    ]);
    assert!(e.contains("never modelled"), "{e}");
    // 44.5 GB of weights do not fit one 48 GB L40S at 90 %.
    let e = run(&[
        "serve",
        "--worker-backend",
        "sim",
        "--gpu",
        "l40s",
        "--tp",
        "1",
        "--port",
        "1",
    ]);
    assert!(e.contains("cannot hold"), "{e}");
}

/// SIGTERM during a stream: `/ready` turns 503 at once, the server still accepts and
/// answers (a router's next health read sees the 503), the stream in flight finishes
/// with every token, and then the process exits.
#[test]
fn sigterm_turns_ready_to_503_finishes_the_stream_in_flight_then_exits() {
    let _one = one_server();
    let mut s = Server::start(
        Path::new("synthetic:codestral-22b"),
        2,
        &["--worker-backend", "sim", "--gpu", "h100"],
    );
    let port = s.port;
    // About 300 × 11 ms of modelled decode: still streaming when the signal comes.
    let stream = std::thread::spawn(move || {
        let body = json!({
            "model": "codestral-latest", "prompt": "def f(x):", "suffix": "\n",
            "max_tokens": 300, "min_tokens": 300, "stream": true,
        });
        common::http(
            port,
            "POST",
            "/v1/fim/completions",
            Some(&body.to_string()),
            &[],
        )
        .unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(
        common::http(port, "GET", "/ready", None, &[]).unwrap().0,
        200
    );
    std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (status, body) = common::http(port, "GET", "/ready", None, &[]).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "exited with a stream in flight"
    );
    let (status, text) = stream.join().unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("\"completion_tokens\":300"), "{text}");
    let t = std::time::Instant::now();
    while s.child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "still running 10 s after its last request finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
