//! What the in-process coordinator tests share: a tiny checkpoint with the real
//! vocabulary, and an engine driving a real worker service over loopback gRPC.

use std::path::PathBuf;
use std::time::Duration;

use coordinator::engine::grpc::{GrpcExecutor, GrpcGroupConfig};
use coordinator::engine::{run_engine, EngineConfig, EngineHandle};
use scheduler::SchedulerConfig;
use worker::safetensors_io::StoredDtype;
use worker::service::{WorkerConfig, WorkerService};
use worker::synth::{synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

/// A one-layer model with the real vocabulary: fast, and every tokenizer id is valid.
/// Built once per test binary.
pub fn model_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // One directory per test binary: binaries may run side by side.
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("stral-model-{binary}"));
        let _ = std::fs::remove_dir_all(&dir);
        let config = ModelConfig {
            n_layers: 1,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            hidden_dim: 128,
            max_position_embeddings: 512,
            ..ModelConfig::tiny()
        };
        synthesize(
            &SynthOptions {
                config,
                format: CheckpointFormat::Mistral,
                dtype: StoredDtype::F32,
                seed: 1,
                progress: false,
            },
            &dir,
        )
        .unwrap();
        dir
    })
    .clone()
}

/// A worker service on a loopback port and a ready engine driving it.
pub async fn engine_over_loopback_worker(scheduler: SchedulerConfig) -> EngineHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let service = WorkerService::new(WorkerConfig {
        listen: addr.clone(),
        ..Default::default()
    })
    .into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    let exec = GrpcExecutor::new(GrpcGroupConfig {
        workers: vec![addr],
        model_path: model_dir().to_string_lossy().into_owned(),
        kv_cache_bytes: 8 << 20,
        init_timeout: Duration::from_secs(30),
        ..Default::default()
    });
    let (engine, _task) = run_engine(
        exec,
        EngineConfig {
            scheduler,
            ..Default::default()
        },
    );
    for _ in 0..600 {
        if engine.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(engine.is_ready(), "engine never became ready");
    engine
}
