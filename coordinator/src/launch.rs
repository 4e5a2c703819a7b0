//! Local worker processes: `stral serve` without `--workers` starts one `stral worker`
//! per rank on loopback and keeps them alive.
//!
//! Invariant: a rank that exits is restarted on the same addresses, so the engine's
//! re-initialization finds the group where it was; on shutdown every child is killed
//! and reaped. Cost: one `try_wait` per child every 200 ms.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// How to start the local workers.
#[derive(Clone, Debug)]
pub struct LocalWorkersConfig {
    /// The `stral` executable.
    pub exe: PathBuf,
    pub tp: usize,
    pub device: String,
}

/// A running set of local worker processes.
pub struct LocalWorkers {
    /// gRPC address of each rank.
    pub grpc_addrs: Vec<String>,
    /// TCP collective address of each rank.
    pub collective_addrs: Vec<String>,
    children: Arc<Mutex<Vec<Child>>>,
    supervisor: JoinHandle<()>,
}

/// A free loopback port (bound, then released: the child binds it right after).
fn free_addr() -> std::io::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// Device `cuda` puts rank K on GPU K; any other device string is passed as is.
fn spawn_one(cfg: &LocalWorkersConfig, rank: usize, addr: &str) -> std::io::Result<Child> {
    let device = if cfg.device == "cuda" {
        format!("cuda:{rank}")
    } else {
        cfg.device.clone()
    };
    Command::new(&cfg.exe)
        .args(["worker", "--listen", addr, "--device", &device])
        .kill_on_drop(true)
        .spawn()
}

impl LocalWorkers {
    /// Starts `tp` workers and a supervisor that restarts any that exits.
    pub fn start(cfg: LocalWorkersConfig) -> std::io::Result<Self> {
        let grpc_addrs = (0..cfg.tp)
            .map(|_| free_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let collective_addrs = (0..cfg.tp)
            .map(|_| free_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let children = grpc_addrs
            .iter()
            .enumerate()
            .map(|(rank, a)| spawn_one(&cfg, rank, a))
            .collect::<std::io::Result<Vec<_>>>()?;
        for (rank, c) in children.iter().enumerate() {
            tracing::info!(rank, pid = c.id(), addr = %grpc_addrs[rank], "started worker");
        }
        let children = Arc::new(Mutex::new(children));
        let supervisor = tokio::spawn(supervise(cfg, grpc_addrs.clone(), children.clone()));
        Ok(Self {
            grpc_addrs,
            collective_addrs,
            children,
            supervisor,
        })
    }

    /// Stops supervising and kills every worker.
    pub async fn shutdown(self) {
        self.supervisor.abort();
        for c in self.children.lock().await.iter_mut() {
            let _ = c.kill().await;
        }
    }
}

async fn supervise(cfg: LocalWorkersConfig, addrs: Vec<String>, children: Arc<Mutex<Vec<Child>>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut kids = children.lock().await;
        for (rank, child) in kids.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::warn!(rank, %status, "worker exited; restarting it");
                match spawn_one(&cfg, rank, &addrs[rank]) {
                    Ok(c) => *child = c,
                    Err(e) => tracing::error!(rank, error = %e, "cannot restart worker"),
                }
            }
        }
    }
}
