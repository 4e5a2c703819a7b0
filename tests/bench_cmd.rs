//! `stral bench` as a user runs it: the real binary against a real `stral serve` (null
//! worker backend, so the server answers fast and the run stays short; CPU workers for
//! the edit workload, whose drafts must be verified by a real model) over loopback
//! HTTP; the JSON and the plot files it writes are checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stral, synth_model, Server};
use serde_json::Value;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(stral())
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Every metric has samples and ordered percentiles.
fn check_metrics(run: &Value) {
    for m in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let s = &run[m];
        let f = |k: &str| {
            s[k].as_f64()
                .unwrap_or_else(|| panic!("{m}.{k} missing: {s}"))
        };
        assert!(u(s, "count") > 0, "{m}: {s}");
        assert!(f("mean") >= 0.0 && f("mean").is_finite(), "{m}: {s}");
        let ordered = [f("min"), f("p50"), f("p90"), f("p95"), f("p99"), f("max")];
        assert!(
            ordered.windows(2).all(|w| w[0] <= w[1]),
            "{m} percentiles out of order: {s}"
        );
        assert!(f("min") <= f("mean") && f("mean") <= f("max"), "{m}: {s}");
    }
    let ttft = run["ttft_ms"]["p50"].as_f64().unwrap();
    let e2e = run["e2e_ms"]["p50"].as_f64().unwrap();
    assert!(ttft <= e2e, "TTFT p50 {ttft} > E2E p50 {e2e}");
    for k in [
        "request_throughput",
        "output_token_throughput",
        "input_token_throughput",
    ] {
        assert!(run[k].as_f64().unwrap() > 0.0, "{k}: {run}");
    }
    assert_eq!(run["output_tokens_counted_from"], "usage");
    assert_eq!(
        u(run, "sent"),
        u(run, "completed") + u(run, "cancelled") + u(run, "failed"),
        "counts do not add up: {run}"
    );
    assert_eq!(u(run, "failed"), 0, "{}", run["errors"]);
}

fn check_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert!(bytes.len() > 5_000, "{} is nearly empty", path.display());
}

fn check_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        text.contains("<svg") && text.trim_end().ends_with("</svg>"),
        "{} is not an SVG document",
        path.display()
    );
}

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bench_measures_a_real_server_with_keystroke_fixed_and_chat_workloads() {
    let model = out_dir("stral-bench-model");
    synth_model(&model, "mistral");
    let server = Server::start(&model, 1, &["--worker-backend", "null"]);
    let url = format!("http://127.0.0.1:{}", server.port);
    let dir = out_dir("stral-bench-out");

    // Keystroke: 4 developers firing a request every ~9 ms within a line, while a
    // 64-token completion takes ≥ 10 ms (64 engine steps): the next keystroke often
    // fires while the previous completion still streams. The pause after each line
    // (200 ms mean) lets the last request of the line complete.
    let ks_json = dir.join("keystroke.json");
    let ks_plots = dir.join("keystroke-plots");
    let (ok, stdout, stderr) = bench(&[
        "--url",
        &url,
        "--workload",
        "keystroke",
        "--endpoint",
        "fim",
        "--concurrency",
        "4",
        "--duration",
        "3",
        "--keystroke-ms",
        "3",
        "--think-ms",
        "200",
        "--fim-max-tokens",
        "64",
        "--slo-ttft-ms",
        "60000",
        "--slo-tpot-ms",
        "60000",
        "--json-out",
        ks_json.to_str().unwrap(),
        "--plot-dir",
        ks_plots.to_str().unwrap(),
    ]);
    assert!(ok, "stral bench failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("TTFT") && stdout.contains("cancelled"),
        "{stdout}"
    );
    let report = read_json(&ks_json);
    assert_eq!(
        report["model"], "codestral-latest",
        "the first model /v1/models lists"
    );
    let run = &report["runs"][0];
    check_metrics(run);
    assert!(
        u(run, "cancelled") > 0,
        "no stale request was cancelled: {run}"
    );
    assert!(u(run, "completed") > 0, "{run}");
    // SLOs of a minute: every completed request is good.
    let goodput = run["goodput"].as_f64().unwrap();
    let tput = run["request_throughput"].as_f64().unwrap();
    assert!((goodput - tput).abs() < 1e-9, "goodput {goodput} vs {tput}");
    // The server saw the dropped connections.
    assert!(server.metric("stral_requests_aborted_total") > 0.0);
    check_png(&ks_plots.join("latency_cdf.png"));
    check_svg(&ks_plots.join("latency_cdf.svg"));

    // Fixed lengths, closed-loop sweep over two levels, 24 requests each: min_tokens
    // makes every output exactly 16 tokens; an impossible TTFT SLO makes goodput 0.
    let fx_json = dir.join("fixed.json");
    let fx_plots = dir.join("fixed-plots");
    let (ok, stdout, stderr) = bench(&[
        "--url",
        &url,
        "--workload",
        "fixed",
        "--input-tokens",
        "64",
        "--output-tokens",
        "16",
        "--sweep-concurrency",
        "1,4",
        "--num-requests",
        "24",
        "--slo-ttft-ms",
        "0.000001",
        "--json-out",
        fx_json.to_str().unwrap(),
        "--plot-dir",
        fx_plots.to_str().unwrap(),
    ]);
    assert!(ok, "stral bench failed:\n{stdout}\n{stderr}");
    let report = read_json(&fx_json);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, c) in runs.iter().zip([1, 4]) {
        assert_eq!(run["load"]["concurrency"], c);
        check_metrics(run);
        assert_eq!(
            (u(run, "sent"), u(run, "completed"), u(run, "cancelled")),
            (24, 24, 0)
        );
        assert_eq!(u(run, "total_output_tokens"), 24 * 16);
        assert_eq!(run["tpot_ms"]["count"], 24);
        // 64 one-token words plus the FIM control tokens.
        let prompt = u(run, "total_input_tokens") as f64 / 24.0;
        assert!(
            (64.0..=72.0).contains(&prompt),
            "mean prompt tokens {prompt}"
        );
        assert_eq!(run["goodput"].as_f64(), Some(0.0));
    }
    for f in ["latency_cdf", "sweep"] {
        check_png(&fx_plots.join(format!("{f}.png")));
        check_svg(&fx_plots.join(format!("{f}.svg")));
    }

    // Chat workload on the chat endpoint, open loop.
    let chat_json = dir.join("chat.json");
    let (ok, stdout, stderr) = bench(&[
        "--url",
        &url,
        "--workload",
        "chat",
        "--endpoint",
        "chat",
        "--rate",
        "40",
        "--num-requests",
        "12",
        "--chat-output-median",
        "8",
        "--seed",
        "3",
        "--json-out",
        chat_json.to_str().unwrap(),
    ]);
    assert!(ok, "stral bench failed:\n{stdout}\n{stderr}");
    let run = &read_json(&chat_json)["runs"][0];
    check_metrics(run);
    assert_eq!(run["load"]["mode"], "open");
    assert_eq!(u(run, "completed"), 12);
}

#[test]
fn bench_edit_workload_sends_predictions_and_reports_the_drafts_the_server_counted() {
    let model = out_dir("stral-bench-edit-model");
    synth_model(&model, "hf");
    let server = Server::start(&model, 1, &[]);
    let url = format!("http://127.0.0.1:{}", server.port);
    let json = out_dir("stral-bench-edit-out").join("edit.json");
    let (ok, stdout, stderr) = bench(&[
        "--url",
        &url,
        "--workload",
        "edit",
        "--concurrency",
        "4",
        "--num-requests",
        "4",
        "--edit-max-code-chars",
        "300",
        "--edit-max-tokens",
        "160",
        "--json-out",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "stral bench failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Accepted prediction tokens"), "{stdout}");
    let report = read_json(&json);
    assert_eq!(report["workload"]["kind"], "edit");
    assert_eq!(
        report["endpoint"], "chat",
        "edit defaults to the chat endpoint"
    );
    let run = &report["runs"][0];
    check_metrics(run);
    assert_eq!(u(run, "completed"), 4);
    // The report sums the usage of every response; the server's counters count the
    // same drafts (those whose outcome reached a client). The synthetic model's output
    // does not follow the predictions (it follows no instruction), so the prediction
    // drafts are rejected, and what is accepted comes from prompt lookup over its
    // output's repeats; a real model's edits accept most of the prediction.
    let accepted = u(run, "accepted_prediction_tokens");
    let rejected = u(run, "rejected_prediction_tokens");
    let metric = |name: &str| {
        ["prediction", "ngram"]
            .map(|s| server.metric(&format!("{name}{{source=\"{s}\"}}")))
            .iter()
            .sum::<f64>()
    };
    assert_eq!(accepted as f64, metric("stral_spec_accepted_tokens_total"));
    assert_eq!(rejected as f64, metric("stral_spec_rejected_tokens_total"));
    assert!(
        server.metric("stral_spec_draft_tokens_total{source=\"prediction\"}") > 0.0,
        "no draft came from the predictions"
    );
    assert!(accepted > 0, "no draft accepted: {run}");
    // The edit workload is for chat.
    let (ok, _, stderr) = bench(&[
        "--url",
        &url,
        "--workload",
        "edit",
        "--endpoint",
        "fim",
        "--num-requests",
        "1",
    ]);
    assert!(!ok && stderr.contains("--endpoint chat"), "{stderr}");
}

#[test]
fn bench_against_an_unreachable_url_fails_with_one_line() {
    let port = common::free_port();
    let (ok, stdout, stderr) = bench(&[
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--duration",
        "1",
    ]);
    assert!(!ok, "should fail: {stdout}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: cannot reach"), "{stderr}");
    assert!(lines[0].contains("refused"), "{stderr}");
}
