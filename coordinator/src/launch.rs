//! Local worker processes: `stral serve` without `--workers` starts one `stral worker`
//! per rank on loopback and keeps them alive.
//!
//! Invariant: a rank that exits is restarted on the same gRPC address, so the engine's
//! re-initialization finds the group where it was; on shutdown every child is killed
//! and reaped. Cost: one `try_wait` per child every 200 ms.
//!
//! The workers get a fresh random token ([`TokenFile`]) even though they listen on
//! loopback, so another local user cannot drive them.

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
    /// The token every worker requires (give it to the executor).
    pub token: String,
    /// Kept so the file outlives every worker restart; removed when this is dropped.
    _token_file: Arc<TokenFile>,
    children: Arc<Mutex<Vec<Child>>>,
    supervisor: JoinHandle<()>,
}

/// `n` distinct free loopback ports. All `n` are held bound until every one is
/// picked, then released for the children to bind: picking them one at a time
/// lets the kernel hand the same just-released port out twice (a rank's gRPC
/// port once came back as its collective port, and Init failed with
/// "address in use" on every retry).
pub(crate) fn free_addrs(n: usize) -> std::io::Result<Vec<String>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter()
        .map(|l| Ok(l.local_addr()?.to_string()))
        .collect()
}

/// Device `cuda` puts rank K on GPU K; any other device string is passed as is.
fn spawn_one(
    cfg: &LocalWorkersConfig,
    token: &TokenFile,
    rank: usize,
    addr: &str,
) -> std::io::Result<Child> {
    let device = if cfg.device == "cuda" {
        format!("cuda:{rank}")
    } else {
        cfg.device.clone()
    };
    Command::new(&cfg.exe)
        .args(["worker", "--listen", addr, "--device", &device])
        .arg("--worker-token-file")
        .arg(&token.path)
        .kill_on_drop(true)
        .spawn()
}

impl LocalWorkers {
    /// Starts `tp` workers and a supervisor that restarts any that exits.
    pub fn start(cfg: LocalWorkersConfig) -> std::io::Result<Self> {
        let token_file = Arc::new(TokenFile::create()?);
        let grpc_addrs = free_addrs(cfg.tp)?;
        let children = grpc_addrs
            .iter()
            .enumerate()
            .map(|(rank, a)| spawn_one(&cfg, &token_file, rank, a))
            .collect::<std::io::Result<Vec<_>>>()?;
        for (rank, c) in children.iter().enumerate() {
            tracing::info!(rank, pid = c.id(), addr = %grpc_addrs[rank], "started worker");
        }
        let children = Arc::new(Mutex::new(children));
        let supervisor = tokio::spawn(supervise(
            cfg,
            token_file.clone(),
            grpc_addrs.clone(),
            children.clone(),
        ));
        Ok(Self {
            grpc_addrs,
            token: token_file.token.clone(),
            _token_file: token_file,
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

async fn supervise(
    cfg: LocalWorkersConfig,
    token: Arc<TokenFile>,
    addrs: Vec<String>,
    children: Arc<Mutex<Vec<Child>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut kids = children.lock().await;
        for (rank, child) in kids.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::warn!(rank, %status, "worker exited; restarting it");
                match spawn_one(&cfg, &token, rank, &addrs[rank]) {
                    Ok(c) => *child = c,
                    Err(e) => tracing::error!(rank, error = %e, "cannot restart worker"),
                }
            }
        }
    }
}

/// A fresh random worker token in a file only this user can read; the file and its
/// folder are removed on drop.
pub struct TokenFile {
    pub path: PathBuf,
    pub token: String,
}

impl TokenFile {
    pub fn create() -> std::io::Result<Self> {
        use std::io::{Read, Write};
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!(
            "stral-serve-{}-{}",
            std::process::id(),
            &token[..8]
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        let path = dir.join("worker-token");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path)?.write_all(token.as_bytes())?;
        Ok(Self { path, token })
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addrs_are_distinct_loopback_ports() {
        let addrs = free_addrs(256).unwrap();
        let unique: std::collections::HashSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len(), "a port was handed out twice");
        assert!(addrs.iter().all(|a| a.starts_with("127.0.0.1:")));
    }
}
