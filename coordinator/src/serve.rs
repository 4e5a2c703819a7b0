//! `stral serve`: tokenizer + engine + worker group + HTTP server, with clean shutdown.
//!
//! On SIGINT/SIGTERM `/ready` turns 503 at once (load balancers and `stral route`
//! stop sending here on their next health read) while the server keeps accepting and
//! serving until no request is in flight; then the listener closes, open responses
//! finish, and the engine and the local workers are stopped. All of it within
//! `shutdown_grace` of the signal: past it, what is still in flight fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::grpc::{GrpcExecutor, GrpcGroupConfig};
use crate::engine::{run_engine, EngineConfig, EngineHandle};
use crate::http::{router, AppState, HttpConfig};
use crate::launch::{LocalWorkers, LocalWorkersConfig};
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;

/// Everything `stral serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Checkpoint directory as the workers see it.
    pub model_dir: PathBuf,
    pub tp: usize,
    pub device: String,
    /// Set for CUDA ranks that all-reduce with NCCL: makes the unique id of each group
    /// Init (local ranks go on GPUs 0..tp-1). Unset: TCP peers (CUDA: host-staged,
    /// all local ranks on GPU 0).
    pub nccl_unique_id: Option<fn() -> Result<Vec<u8>, String>>,
    /// Remote workers (`host:port` per rank); `None` starts local worker processes.
    pub workers: Option<Vec<String>>,
    /// Collective addresses of remote workers; default: each worker's host, port + 1.
    pub collective_peers: Option<Vec<String>>,
    /// The `stral` executable used to start local workers.
    pub exe: PathBuf,
    pub http: HttpConfig,
    pub engine: EngineConfig,
    /// Weight storage on the workers (`--dtype`), sent in `Init`.
    pub dtype: String,
    /// KV cache budget per rank, bytes.
    pub kv_cache_bytes: u64,
    /// Cap on KV blocks per rank (`--num-kv-blocks`), on every backend.
    pub max_kv_blocks: Option<u32>,
    pub step_timeout: Duration,
    pub shutdown_grace: Duration,
    /// The token remote workers require (`--worker-token-file`); local workers get a
    /// fresh one.
    pub worker_token: Option<String>,
}

/// Errors that stop `serve` from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start local workers: {0}")]
    Workers(std::io::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{0}")]
    Config(String),
    #[error("server: {0}")]
    Server(std::io::Error),
}

fn default_peers(workers: &[String]) -> Result<Vec<String>, ServeError> {
    workers
        .iter()
        .map(|w| {
            let (host, port) = w.rsplit_once(':').ok_or_else(|| {
                ServeError::Config(format!("--workers entry '{w}' is not host:port"))
            })?;
            let port: u16 = port.parse().map_err(|_| {
                ServeError::Config(format!("--workers entry '{w}' has no valid port"))
            })?;
            Ok(format!("{host}:{}", port + 1))
        })
        .collect()
}

/// Runs the server until a shutdown signal.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let tokenizer = Tokenizer::codestral()?;
    let mut worker_token = config.worker_token.clone();
    let (local, workers, peers, listen) = match &config.workers {
        Some(w) => {
            if w.len() != config.tp {
                return Err(ServeError::Config(format!(
                    "--workers lists {} addresses but --tp is {}",
                    w.len(),
                    config.tp
                )));
            }
            let peers = match &config.collective_peers {
                Some(p) => p.clone(),
                None => default_peers(w)?,
            };
            let listen = peers
                .iter()
                .map(|p| format!("0.0.0.0:{}", p.rsplit_once(':').map(|x| x.1).unwrap_or("0")))
                .collect();
            (None, w.clone(), peers, listen)
        }
        None => {
            let lw = LocalWorkers::start(LocalWorkersConfig {
                exe: config.exe.clone(),
                tp: config.tp,
                device: (match (
                    config.device.starts_with("cuda"),
                    config.nccl_unique_id.is_some(),
                ) {
                    (true, true) => "cuda",
                    (true, false) => "cuda:0",
                    (false, _) => "cpu",
                })
                .to_string(),
            })
            .map_err(ServeError::Workers)?;
            worker_token = Some(lw.token.clone());
            let w = lw.grpc_addrs.clone();
            (Some(lw), w, Vec::new(), Vec::new())
        }
    };
    let exec = GrpcExecutor::new(GrpcGroupConfig {
        workers,
        collective_peers: peers,
        collective_listen: listen,
        model_path: config.model_dir.to_string_lossy().into_owned(),
        device: config.device.clone(),
        dtype: config.dtype.clone(),
        nccl_unique_id: config.nccl_unique_id,
        block_size: config.engine.scheduler.block_size as u32,
        kv_cache_bytes: config.kv_cache_bytes,
        max_kv_blocks: config.max_kv_blocks,
        max_num_batched_tokens: config.engine.scheduler.max_num_batched_tokens as u32,
        max_num_seqs: config.engine.scheduler.max_num_seqs as u32,
        step_timeout: config.step_timeout,
        token: worker_token,
        ..Default::default()
    });
    let (engine, engine_task) = run_engine(exec, config.engine.clone());
    if let Some(ops) = &config.http.ops {
        tokio::spawn(ops.clone().watch_key_file());
    }
    let metrics = Arc::new(Metrics::default());
    let state = AppState::new(engine.clone(), tokenizer, config.http.clone(), metrics);
    let drain_state = state.clone();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Server)?;
    tracing::info!(%addr, "HTTP API listening; loading workers");
    tokio::spawn(announce_when_ready(
        engine.clone(),
        addr,
        config.http.clone(),
    ));
    let grace = config.shutdown_grace;
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let served = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
        drain_state
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = stopping.send(true);
        tracing::info!(
            ?grace,
            "shutdown requested: /ready is 503; serving until no request is in flight"
        );
        loop {
            let s = drain_state.engine.stats();
            if s.waiting + s.running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("no request in flight: no new connections; finishing open responses");
    });
    let deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = served => r.map_err(ServeError::Server),
        _ = deadline => {
            tracing::warn!("grace period over: failing the requests still in flight");
            Ok(())
        }
    };
    tracing::info!("stopping the engine and the workers");
    drop(engine);
    engine_task.abort();
    if let Some(lw) = local {
        lw.shutdown().await;
    }
    result
}

async fn announce_when_ready(engine: EngineHandle, addr: SocketAddr, http: HttpConfig) {
    while !engine.is_ready() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let model = http.served_model_names.first().cloned().unwrap_or_default();
    let auth = if http.api_keys.is_empty() {
        String::new()
    } else {
        " -H 'Authorization: Bearer $KEY'".to_string()
    };
    eprintln!(
        "\nstral is ready on http://{addr} — try:\n  curl -s http://{addr}/v1/fim/completions{auth} -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"prompt\": \"def fibonacci(n):\", \"suffix\": \"\\n\\nprint(fibonacci(10))\", \"max_tokens\": 32, \"temperature\": 0}}'\n"
    );
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
