//! `stral serve`: flags → [`coordinator::serve::ServeConfig`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use coordinator::engine::EngineConfig;
use coordinator::http::{HttpConfig, DEFAULT_MODEL_NAMES};
use coordinator::serve::ServeConfig;
use scheduler::SchedulerConfig;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Checkpoint directory, either layout (params.json + consolidated.safetensors, or
    /// config.json + model-*.safetensors). Default: the embedded tiny model, built once
    /// and cached.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel ranks (1, 2, 4 or 8; must divide the model's kv heads).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Where the forward pass runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Remote workers, `host:port` per rank in rank order (e.g. a StatefulSet's pods).
    /// Without it, `serve` starts its own `stral worker` processes on loopback.
    #[arg(long, value_delimiter = ',')]
    workers: Option<Vec<String>>,
    /// TCP collective address per remote rank (default: each worker's host, port + 1).
    #[arg(long, value_delimiter = ',', requires = "workers")]
    collective_peers: Option<Vec<String>>,
    /// API key clients must send as `Authorization: Bearer KEY` (repeatable). Also read
    /// from STRAL_API_KEYS (comma-separated) and --api-key-file (one per line).
    #[arg(
        long = "api-key",
        env = "STRAL_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// File with one API key per line.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Require the API key on /metrics too.
    #[arg(long)]
    protect_metrics: bool,
    /// Model name clients may send (repeatable). Default: codestral-latest,
    /// codestral-2405, stral.
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    /// Most sequences in one step (and running at once).
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Token budget of one step (decodes plus prefill chunks).
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// Requests that may wait for admission before the API answers 429.
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Fraction of GPU memory a CUDA worker may use (weights, activations, KV cache).
    /// The CPU backend sizes its KV cache from --kv-cache-mib instead.
    #[arg(long, default_value_t = 0.90)]
    gpu_memory_utilization: f64,
    /// Worker math: `cpu` runs the model; `null` checks and mirrors every plan but skips
    /// the forward pass and answers fixed pseudo-tokens (to measure coordinator overhead).
    #[arg(long, value_enum, default_value_t = WorkerBackend::Cpu)]
    worker_backend: WorkerBackend,
    /// KV cache per rank, in MiB (CPU backend).
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: u64,
    /// A worker that does not answer a step within this many seconds is considered lost.
    #[arg(long, default_value_t = 60)]
    step_timeout_s: u64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_s: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkerBackend {
    Cpu,
    Null,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

impl ServeArgs {
    pub fn into_config(self) -> anyhow::Result<ServeConfig> {
        if matches!(self.device, Device::Cuda) {
            anyhow::bail!("--device cuda is not available yet: the CUDA worker backend arrives with its own issue (the kernels are in kernels/)");
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            anyhow::bail!(
                "--gpu-memory-utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            );
        }
        let model_dir = match self.model {
            Some(d) => d,
            None if self.workers.is_some() => {
                anyhow::bail!("--workers needs --model (the path as the workers see it)")
            }
            None => worker::embedded::ensure_embedded_model()?,
        };
        if self.workers.is_none() {
            let (cfg, _) = worker::ModelConfig::from_dir(&model_dir)?;
            cfg.check_tp(self.tp)?;
        }
        let mut api_keys: Vec<String> = self
            .api_keys
            .into_iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(f) = &self.api_key_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", f.display()))?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        let served_model_names = if self.served_model_names.is_empty() {
            DEFAULT_MODEL_NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            self.served_model_names
        };
        Ok(ServeConfig {
            listen: SocketAddr::new(self.host, self.port),
            model_dir,
            tp: self.tp,
            device: match self.worker_backend {
                WorkerBackend::Cpu => "cpu".into(),
                WorkerBackend::Null => "null".into(),
            },
            workers: self.workers,
            collective_peers: self.collective_peers,
            exe: std::env::current_exe()?,
            http: HttpConfig {
                served_model_names,
                api_keys,
                protect_metrics: self.protect_metrics,
            },
            engine: EngineConfig {
                scheduler: SchedulerConfig {
                    block_size: self.block_size,
                    max_num_seqs: self.max_num_seqs,
                    max_num_batched_tokens: self.max_num_batched_tokens,
                    max_waiting: self.max_waiting,
                    ..SchedulerConfig::default()
                },
                ..EngineConfig::default()
            },
            kv_cache_bytes: self.kv_cache_mib << 20,
            step_timeout: Duration::from_secs(self.step_timeout_s),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
        })
    }
}
