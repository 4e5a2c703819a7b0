//! `stral plan --verify`: for each TP to check, starts one replica of this binary,
//! `stral serve --worker-backend sim` on a free loopback port with the plan's GPU, TP
//! and scheduler settings, waits for `/ready`, runs [`benches::plan::verify`] against
//! it and stops it (SIGTERM, so it reaps its workers; SIGKILL after 10 s).
//!
//! Invariant: no replica outlives the call, whatever fails. Cost: the replica's start
//! (a second or two) plus the levels' wall time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benches::plan::verify::{self, VerifyConfig, VerifyRow};
use benches::plan::{Candidate, PlanConfig};

/// A `stral serve` child; stopped on drop.
struct Replica {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Replica {
    fn start(cfg: &PlanConfig, model: &str, tp: usize) -> anyhow::Result<Replica> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::env::temp_dir().join(format!(
            "stral-plan-verify-{}-tp{tp}.log",
            std::process::id()
        ));
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--tp", &tp.to_string(), "--model", model])
            .args(["--worker-backend", "sim", "--gpu", cfg.gpu.name()])
            .args(["--dtype", cfg.weights.name()])
            .args(["--max-num-seqs", &cfg.max_num_seqs.to_string()])
            .args([
                "--max-num-batched-tokens",
                &cfg.max_num_batched_tokens.to_string(),
            ])
            .args(["--block-size", &cfg.block_size.to_string()])
            .args([
                "--gpu-memory-utilization",
                &cfg.memory_utilization.to_string(),
            ])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let r = Replica { child, port, log };
        r.wait_ready(Duration::from_secs(120))?;
        Ok(r)
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if get_status(self.port, "/ready").is_some_and(|s| s == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        anyhow::bail!(
            "the sim replica (stral serve --worker-backend sim) was not ready after {limit:?}; the end of its log ({}):\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status of `GET path` on loopback `port`, if it answered.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// What `stral serve --model` takes for the planner's `--model`: a preset becomes its
/// weightless shape (`synthetic:NAME`), a directory is passed as is.
fn serve_model(model: &str) -> String {
    if worker::ModelConfig::preset(model).is_ok() {
        format!("synthetic:{model}")
    } else {
        model.to_string()
    }
}

/// Verifies each of `candidates` in turn on its own replica.
pub fn verify_all(
    cfg: &PlanConfig,
    model: &str,
    candidates: &[&Candidate],
    v: &VerifyConfig,
) -> anyhow::Result<Vec<VerifyRow>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for c in candidates {
        eprintln!(
            "verify: starting a sim replica at TP {} and driving it at {} of its predicted {:.2} requests/s, {} s each",
            c.tp,
            v.fractions
                .iter()
                .map(|f| format!("{:.0} %", f * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            c.capacity_per_replica_rps,
            v.seconds
        );
        let replica = Replica::start(cfg, &serve_model(model), c.tp)?;
        let v = VerifyConfig {
            url: format!("http://127.0.0.1:{}", replica.port),
            ..v.clone()
        };
        rows.extend(runtime.block_on(verify::verify(cfg, c, &v))?);
    }
    Ok(rows)
}
