//! `stral serve --device cuda` end to end as far as this machine allows: without an
//! NVIDIA driver it must fail at once with one clear line — no panic (cudarc panics
//! when libcuda is missing and it is called anyway), no hang waiting for workers.
//! With a GPU (`STRAL_GPU=1`), `worker/tests/cuda_gpu.rs` serves a FIM request instead.

use std::process::Command;
use std::time::{Duration, Instant};

fn stral() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stral"));
    c.env(
        "STRAL_CACHE_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/stral-cache"),
    );
    c
}

#[test]
fn serve_on_cuda_without_a_driver_fails_fast_with_one_line() {
    if worker::cuda::driver_available() {
        eprintln!("skipped: this machine has a CUDA driver (the GPU path is tested by worker/tests/cuda_gpu.rs)");
        return;
    }
    for args in [
        &["serve", "--device", "cuda", "--tp", "2", "--port", "0"][..],
        &[
            "serve",
            "--device",
            "cuda",
            "--tp",
            "1",
            "--collective",
            "host",
            "--port",
            "0",
        ][..],
        &["worker", "--device", "cuda:0", "--listen", "127.0.0.1:0"][..],
    ] {
        let t0 = Instant::now();
        let out = stral().args(args).output().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            t0.elapsed()
        );
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: expected one line, got:\n{stderr}"
        );
        assert!(
            lines[0].starts_with("error: --device cuda: no CUDA driver"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

mod common;

#[test]
fn serve_on_cuda_answers_a_fim_request() {
    if std::env::var("STRAL_GPU").as_deref() != Ok("1") {
        eprintln!("skipped: GPU test (STRAL_GPU=1; run worker/scripts/gpu-check.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    common::synth_model(dir.path(), "mistral");
    let server = common::Server::start(dir.path(), 1, &["--device", "cuda"]);
    let (status, body) = server.post(
        "/v1/fim/completions",
        &serde_json::json!({
            "model": "codestral-latest",
            "prompt": "def fibonacci(n):",
            "suffix": "\n\nprint(fibonacci(10))",
            "max_tokens": 16,
            "temperature": 0
        }),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );
}
