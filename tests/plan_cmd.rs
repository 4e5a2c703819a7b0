//! `stral plan` as a user runs it (the real binary, a small plan of the tiny model so
//! it stays short): with no SLO and no workload flags it says which defaults it used
//! and where their numbers come from; `--plot` writes a real PNG (or SVG) by the file
//! name, and refuses any other extension with a clear error.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::stral())
        .arg("plan")
        .args([
            "--model",
            "tiny",
            "--developers",
            "40",
            "--tp",
            "1",
            "--grid-points",
            "4",
            "--sim-seconds",
            "4",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn out_dir(name: &str) -> PathBuf {
    let dir = common::tmpdir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn plan_without_an_slo_uses_200_ms_and_names_every_default_and_writes_a_png() {
    let dir = out_dir("plan_defaults");
    let png = dir.join("plan.png");
    let (ok, stdout, stderr) = plan(&["--plot", png.to_str().unwrap()]);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("SLO (p95): TTFT 200 ms"), "{stdout}");
    assert!(
        stdout.contains("note: no SLO given: using p95 TTFT 200 ms"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: --active-fraction 0.1: an assumption of this planner"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: --requests-per-active-minute 6: an assumption of this planner"),
        "{stdout}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    // IHDR: width and height, big-endian, right after the chunk header.
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!((dim(16), dim(20)), (1200, 900));
    assert!(bytes.len() > 5_000, "a nearly empty PNG");
}

#[test]
fn given_flags_are_not_noted_and_the_plot_format_follows_the_extension() {
    let dir = out_dir("plan_flags");
    let svg = dir.join("plan.svg");
    let (ok, stdout, stderr) = plan(&[
        "--slo-ttft-p95-ms",
        "300",
        "--active-fraction",
        "0.2",
        "--requests-per-active-minute",
        "4",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("SLO (p95): TTFT 300 ms"), "{stdout}");
    assert!(!stdout.contains("note:"), "{stdout}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.trim_end().ends_with("</svg>"));

    let (ok, _, stderr) = plan(&["--plot", dir.join("plan.txt").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("must end in .png or .svg"), "{stderr}");
}

fn stral_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(common::stral()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stral {args:?}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `--verify` starts a real sim replica, drives it with `stral bench` and reports
/// predicted vs observed per level. The sim workers sleep the same modelled step times
/// the prediction uses, so an observed p95 TTFT far from the prediction (a replica that
/// did not apply the model, or a prediction that ignores queueing) fails here; the
/// tight error figures come from longer runs (benches/RESULTS.md).
#[test]
fn verify_drives_a_real_sim_replica_and_reports_predicted_vs_observed() {
    let r = stral_json(&[
        "plan",
        "--developers",
        "100",
        "--tp",
        "1",
        "--grid-points",
        "8",
        "--sim-seconds",
        "10",
        "--verify",
        "--verify-seconds",
        "8",
        "--verify-loads",
        "0.5,1.0",
        "--json",
    ]);
    let cap = r["candidates"][0]["capacity_per_replica_rps"]
        .as_f64()
        .unwrap();
    let rows = r["verify"].as_array().expect("a verify section");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, fraction) in rows.iter().zip([0.5, 1.0]) {
        assert_eq!(row["tp"], 1);
        assert_eq!(row["fraction"].as_f64(), Some(fraction));
        let rate = row["rate_per_s"].as_f64().unwrap();
        assert!((rate - fraction * cap).abs() < 1e-9, "{row}");
        let obs = &row["observed"];
        assert!(obs["completed"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(obs["failed"], 0, "{row}");
        let (pred, seen) = (
            row["predicted"]["ttft_p95_ms"].as_f64().unwrap(),
            obs["ttft_p95_ms"].as_f64().unwrap(),
        );
        assert!(
            pred > 0.0 && seen / pred > 0.33 && seen / pred < 3.0,
            "{row}"
        );
        let err = row["ttft_p95_error"].as_f64().unwrap();
        assert!((err - (seen / pred - 1.0)).abs() < 1e-9, "{row}");
        let tpot = obs["tpot_p95_ms"].as_f64().unwrap();
        let tpot_pred = row["predicted"]["tpot_p95_ms"].as_f64().unwrap();
        assert!(tpot / tpot_pred > 0.33 && tpot / tpot_pred < 3.0, "{row}");
    }
}

/// `--from-bench` takes the workload from a real `stral bench --json-out` report (a
/// keystroke run against a sim replica: closed loop, prefix-cache hits) and says where
/// each number came from.
#[test]
fn from_bench_takes_rate_lengths_and_hit_rate_from_a_real_bench_report() {
    let dir = out_dir("plan_from_bench");
    let server = common::Server::start(
        std::path::Path::new("synthetic:codestral-22b"),
        2,
        &["--worker-backend", "sim", "--gpu", "h100"],
    );
    let json = dir.join("r.json");
    let out = Command::new(common::stral())
        .args([
            "bench",
            "--url",
            &format!("http://127.0.0.1:{}", server.port),
        ])
        .args([
            "--workload",
            "keystroke",
            "--concurrency",
            "2",
            "--duration",
            "5",
        ])
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let run = &bench["runs"][0];
    let completed = run["completed"].as_f64().unwrap();
    assert!(completed > 0.0, "{run}");
    let hit = run["prefix_cache_hit_rate"]
        .as_f64()
        .expect("stral reports cached tokens");
    assert!(hit > 0.0, "a keystroke session re-sends its prefix: {run}");

    let r = stral_json(&[
        "plan",
        "--from-bench",
        json.to_str().unwrap(),
        "--bench-tp",
        "2",
        "--tp",
        "2",
        "--grid-points",
        "6",
        "--sim-seconds",
        "10",
        "--json",
    ]);
    let w = &r["workload"];
    let rate = run["request_throughput"].as_f64().unwrap();
    assert!(
        (w["arrival_rate_per_s"].as_f64().unwrap() - rate).abs() < 1e-9,
        "{w}"
    );
    assert!((r["total_rate_per_s"].as_f64().unwrap() - rate).abs() < 1e-9);
    let prompt = (run["total_input_tokens"].as_f64().unwrap() / completed).round();
    assert_eq!(w["prompt_tokens"].as_f64(), Some(prompt), "{w}");
    let output = (run["total_output_tokens"].as_f64().unwrap() / completed).round();
    assert_eq!(w["output_tokens"].as_f64(), Some(output), "{w}");
    assert!((w["prefix_cache_hit_rate"].as_f64().unwrap() - hit).abs() < 1e-9);
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let has = |s: &str| notes.iter().any(|n| n.contains(s));
    assert!(has("the achieved throughput of closed-loop"), "{notes:?}");
    assert!(
        has(&format!("prompt tokens {prompt}: the server-reported mean")),
        "{notes:?}"
    );
    assert!(has("prefix-cache hit rate"), "{notes:?}");
    assert!(has("per-step overhead"), "{notes:?}");
    assert!(
        !has("--active-fraction"),
        "developer defaults do not apply: {notes:?}"
    );
}
