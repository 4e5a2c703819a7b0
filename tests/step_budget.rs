//! The step cost model and the step-time target across real processes: `stral serve`
//! with CPU workers exports the cost model its workers measured at start-up, with
//! null workers zeros (and `auto` then means no cap); `--max-step-ms` takes `auto`,
//! `off` or a number of ms, and refuses anything else with a clear CLI error.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{stral, synth_model, Server};
use serde_json::json;

fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stral-step-budget-model");
        if !dir.join("params.json").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            synth_model(&dir, "mistral");
        }
        dir
    })
}

const COST: [&str; 3] = [
    "stral_step_cost_fixed_ms",
    "stral_step_cost_per_token_ms",
    "stral_step_cost_per_context_token_ms",
];

#[test]
fn cpu_workers_export_their_measured_step_cost_and_a_5_ms_target_still_serves() {
    let server = Server::start(model_dir(), 1, &["--max-step-ms", "5"]);
    let cost: Vec<f64> = COST.iter().map(|m| server.metric(m)).collect();
    assert!(cost[1] > 0.0, "per-token cost {cost:?}");
    assert!(cost.iter().all(|c| c.is_finite() && *c >= 0.0), "{cost:?}");
    assert_eq!(server.metric("stral_max_step_ms"), 5.0);
    // A step of the tiny model takes longer than 5 ms: prefill goes on in short
    // chunks and the request still completes.
    let prompt = "fn main() { println!(\"hello\"); } // ".repeat(8);
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"model": "codestral-latest", "prompt": prompt, "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.contains("step_cost_per_token_ms"),
        "the start-up log names the cost model"
    );
}

#[test]
fn auto_is_derived_from_the_measured_cost_and_off_means_no_cap() {
    let server = Server::start(model_dir(), 1, &[]);
    // auto: no step-time cap, a prefill allowance of a 512-token chunk's predicted
    // time from the exported coefficients.
    assert_eq!(server.metric("stral_max_step_ms"), 0.0);
    let c: Vec<f64> = COST.iter().map(|m| server.metric(m)).collect();
    let allowance = server.metric("stral_max_prefill_ms");
    let want = (512.0 * (c[1] + c[2])).max(10.0 * c[0]);
    assert!(
        allowance > 0.0 && (allowance - want).abs() <= 1e-9 * want.max(1.0),
        "auto's prefill allowance {allowance} ms, expected max(512 × ({} + {}), 10 × {}) = {want}",
        c[1],
        c[2],
        c[0]
    );
    drop(server);
    let null = Server::start(model_dir(), 1, &["--worker-backend", "null"]);
    for m in COST {
        assert_eq!(
            null.metric(m),
            0.0,
            "{m}: the null backend measures nothing"
        );
    }
    for m in ["stral_max_step_ms", "stral_max_prefill_ms"] {
        assert_eq!(
            null.metric(m),
            0.0,
            "{m}: auto without a cost model: no cap"
        );
    }
    drop(null);
    let off = Server::start(
        model_dir(),
        1,
        &["--worker-backend", "null", "--max-step-ms", "off"],
    );
    assert_eq!(off.metric("stral_max_step_ms"), 0.0);
}

#[test]
fn bad_step_targets_are_refused_on_the_command_line() {
    for bad in ["-1", "abc", "0"] {
        let out = Command::new(stral())
            .args(["serve", "--max-step-ms", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("--max-step-ms") && err.contains("positive number of milliseconds"),
            "{bad}: {err}"
        );
    }
}
