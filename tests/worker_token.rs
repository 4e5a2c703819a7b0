//! The worker port is closed to strangers: a worker reachable beyond loopback refuses to
//! start without a token, and one with a token refuses every caller that lacks it —
//! real `stral worker` processes, real gRPC clients (the coordinator's executor and
//! `stral serve --workers`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, stral, synth_model, Server};
use coordinator::engine::grpc::{GrpcExecutor, GrpcGroupConfig};
use coordinator::engine::Executor;
use serde_json::json;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(listen: &str, token_file: Option<&Path>) -> Command {
    let mut cmd = Command::new(stral());
    cmd.args(["worker", "--backend", "null", "--listen", listen])
        .env_remove("STRAL_WORKER_TOKEN_FILE");
    if let Some(f) = token_file {
        cmd.arg("--worker-token-file").arg(f);
    }
    cmd
}

async fn init_with(addr: &str, model: &Path, token: Option<&str>) -> Result<(), String> {
    let mut exec = GrpcExecutor::new(GrpcGroupConfig {
        workers: vec![addr.to_string()],
        model_path: model.to_string_lossy().into_owned(),
        device: "null".into(),
        kv_cache_bytes: 64 << 20,
        init_timeout: Duration::from_secs(30),
        token: token.map(String::from),
        ..Default::default()
    });
    exec.init().await.map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn a_worker_beyond_loopback_needs_a_token_and_refuses_callers_without_it() {
    let dir = tmp("stral-worker-token");
    let model = dir.join("model");
    synth_model(&model, "hf");

    // No token on a non-loopback address: the worker does not start.
    let out = worker("0.0.0.0:0", None).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a token: {err}");
    assert!(err.contains("--worker-token-file"), "{err}");

    // With a token it serves, on every address, but only to callers that present it.
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let _w = Worker(
        worker(&format!("0.0.0.0:{port}"), Some(&token_file))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let none = rt.block_on(init_with(&addr, &model, None)).unwrap_err();
    assert!(
        none.contains("refused the coordinator") && none.contains("requires a token"),
        "{none}"
    );
    let wrong = rt
        .block_on(init_with(
            &addr,
            &model,
            Some("ffffffffffffffffffffffffffffffff"),
        ))
        .unwrap_err();
    assert!(wrong.contains("wrong worker token"), "{wrong}");
    rt.block_on(init_with(&addr, &model, Some(TOKEN)))
        .expect("the right token is accepted");

    // `stral serve --workers` with the same token file drives it end to end.
    let server = Server::start(
        &model,
        1,
        &[
            "--workers",
            &addr,
            "--worker-token-file",
            token_file.to_str().unwrap(),
            "--worker-backend",
            "null",
        ],
    );
    let (status, body) = server.post(
        "/v1/fim/completions",
        &json!({"model": "codestral-latest", "prompt": "def f(", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{body}");
}
