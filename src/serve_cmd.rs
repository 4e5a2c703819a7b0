//! `stral serve`: flags → [`coordinator::serve::ServeConfig`].
//!
//! The step limits' defaults (`--max-num-seqs`, `--max-num-batched-tokens`,
//! `--max-waiting`, `--block-size`) are `scheduler::SchedulerConfig::default()`'s, the
//! one source of truth. [`ServeArgs::into_config`] checks the flags piece by piece: the
//! backend, the model, the API keys and names, the ops layer, then the engine.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use coordinator::engine::{EngineConfig, Speculative, StepTarget};
use coordinator::http::{HttpConfig, DEFAULT_MODEL_NAMES};
use coordinator::ops::{Ops, OpsConfig};
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
    /// and cached. With `--worker-backend sim`: a shape without weights,
    /// `synthetic:codestral-22b` (the default there) or `synthetic:tiny`, or a
    /// directory of which only the config is read.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel ranks (1, 2, 4 or 8; must divide the model's kv heads).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Where the forward pass runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// How CUDA ranks all-reduce: `nccl` (one GPU per rank, local ranks on GPUs
    /// 0..tp-1) or `host` (copy to host, TCP all-reduce, copy back; all local ranks
    /// share GPU 0 — checks the sharded math on one GPU).
    #[arg(long, value_enum, default_value_t = CollectiveKind::Nccl)]
    collective: CollectiveKind,
    /// Remote workers, `host:port` per rank in rank order (e.g. a StatefulSet's pods).
    /// Without it, `serve` starts its own `stral worker` processes on loopback.
    #[arg(long, value_delimiter = ',')]
    workers: Option<Vec<String>>,
    /// TCP collective address per remote rank (default: each worker's host, port + 1).
    #[arg(long, value_delimiter = ',', requires = "workers")]
    collective_peers: Option<Vec<String>>,
    /// File holding the token the remote workers require (their `stral worker
    /// --worker-token-file`); sent with every call. Local workers get a fresh token.
    #[arg(long, env = "STRAL_WORKER_TOKEN_FILE", requires = "workers")]
    worker_token_file: Option<PathBuf>,
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
    /// codestral-2405, stral. `NAME=SPEC` makes an alias served by other backends with an
    /// optional A/B split sticky per key: SPEC is a comma list of `TARGET[#MODEL][@WEIGHT]`,
    /// TARGET one of `local`, `fallback` or an `http://` / `https://` URL
    /// (e.g. `codestral-latest=local@90,fallback#codestral-2501@10`).
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    /// Key file (TOML, or YAML when named `.yaml`/`.yml`; same fields): keys or their
    /// SHA-256, name, team, per-key and per-team limits (requests/min, tokens/min,
    /// tokens/day, concurrent), admin and fallback rules. Reloaded on SIGHUP and when the
    /// file changes. See README "Keys, limits, fallback".
    #[arg(long)]
    keys_config: Option<PathBuf>,
    /// How often the key file's modification time is checked, in milliseconds; 0 reloads
    /// on SIGHUP only.
    #[arg(long, default_value_t = 1000, requires = "keys_config")]
    keys_reload_poll_ms: u64,
    /// Another Mistral/OpenAI-compatible endpoint (`http[s]://host[:port][/v1]`, e.g.
    /// `https://codestral.mistral.ai/v1`) that serves requests when no worker group is
    /// ready, when the queue would break --fallback-ttft-budget-ms, or for keys with
    /// `fallback = "always"`.
    #[arg(long)]
    fallback_url: Option<String>,
    /// PEM file of CA certificates to trust for `https://` upstreams, in addition to the
    /// built-in Mozilla (webpki) roots: for a private upstream with its own CA.
    #[arg(long)]
    fallback_ca_file: Option<PathBuf>,
    /// Bearer key sent to the fallback upstream.
    #[arg(long, env = "STRAL_FALLBACK_API_KEY", hide_env_values = true)]
    fallback_api_key: Option<String>,
    /// Spill to the fallback when the expected queue wait plus one step exceeds this.
    #[arg(long, requires = "fallback_url")]
    fallback_ttft_budget_ms: Option<u64>,
    /// Add a `key` label (the key's name from the key file) to the per-key usage series in
    /// /metrics; the default labels by team only.
    #[arg(long)]
    metrics_key_label: bool,
    /// Most sequences in one step (and running at once).
    #[arg(long, default_value_t = SchedulerConfig::default().max_num_seqs)]
    max_num_seqs: usize,
    /// Token budget of one step (decodes plus prefill chunks): a hard cap, whatever
    /// --max-step-ms allows.
    #[arg(long, default_value_t = SchedulerConfig::default().max_num_batched_tokens)]
    max_num_batched_tokens: usize,
    /// Step-time target in milliseconds: the prefill tokens added to a step are
    /// capped so that its predicted time (from the step cost model the workers
    /// measure at start-up, shown in /metrics as stral_step_cost_*) stays within it,
    /// so a burst of prompts reaches its first tokens over several short steps instead
    /// of one long one. Running decodes are always scheduled. `auto`: each step's
    /// prefill may take what a 512-token prompt chunk is predicted to take (at least 10
    /// × the per-step fixed cost), on top of the step's decodes (/metrics: stral_max_prefill_ms), no cap when the workers
    /// measure no cost (--worker-backend null); `off` (or `none`): no cap; a number:
    /// the whole step's predicted time, in ms.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|off|MS",
        allow_hyphen_values = true
    )]
    max_step_ms: StepTarget,
    /// Requests that may wait for admission before the API answers 429.
    #[arg(long, default_value_t = SchedulerConfig::default().max_waiting)]
    max_waiting: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = SchedulerConfig::default().block_size)]
    block_size: usize,
    /// Fraction of GPU memory a CUDA worker may use (weights, activations, KV cache).
    /// The CPU backend sizes its KV cache from --kv-cache-mib instead.
    #[arg(long, default_value_t = 0.90)]
    gpu_memory_utilization: f64,
    /// Worker math: `cpu` runs the model; `null` checks and mirrors every plan but skips
    /// the forward pass and answers fixed pseudo-tokens (to measure coordinator overhead);
    /// `sim` does the same but each step lasts the modelled time of --gpu, and the KV
    /// cache is the modelled GPU's (step times are modelled, not measured).
    #[arg(long, value_enum, default_value_t = WorkerBackend::Cpu)]
    worker_backend: WorkerBackend,
    /// GPU the sim backend models: h100, h200, a100 or l40s.
    #[arg(long, value_parser = parse_gpu, required_if_eq("worker_backend", "sim"))]
    gpu: Option<worker::sim::GpuKind>,
    /// How the workers store weights. `auto`: the checkpoint's own format where the
    /// backend has it (CPU: f32 or bf16, f16 widens to f32; a GGUF file's Q8_0 blocks
    /// are kept bit for bit, its F16/BF16 become bf16 and its Q4_0/Q4_K int8 rows,
    /// lossy; CUDA: bf16). On the CPU, `bf16` halves, and `int8` (one f32 scale per
    /// output row) and `q8_0` (llama.cpp's blocks of 32 int8 with an f16 scale, 34/32
    /// bytes per weight), both quantized at load, quarter the bytes a decode step reads
    /// against `f32`; activations are f32 (int8 per 32-block inside the int8 and q8_0
    /// decode dot products). `--worker-backend sim` models `bf16`, `int8` and `fp8`
    /// weights (bytes per weight in its step-time model).
    #[arg(long, value_enum, default_value_t = WeightDtypeArg::Auto)]
    dtype: WeightDtypeArg,
    /// KV cache per rank, in MiB (CPU backend).
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: u64,
    /// Cap on KV-cache blocks per rank, on any backend (default: all that memory or
    /// --kv-cache-mib allows). For capacity experiments: e.g. give a `--worker-backend
    /// sim` replica the cache a real deployment would have per developer (vLLM calls
    /// this --num-gpu-blocks-override).
    #[arg(long, value_name = "BLOCKS", value_parser = clap::value_parser!(u32).range(1..))]
    num_kv_blocks: Option<u32>,
    /// A worker that does not answer a step within this many seconds is considered lost.
    #[arg(long, default_value_t = 60)]
    step_timeout_s: u64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM. From the signal
    /// on, /ready answers 503 (so a load balancer or `stral route` stops sending here)
    /// while the server keeps serving until nothing is in flight, then exits.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_s: u64,
    /// Seconds a request waits for a crashed worker group to come back (its stream
    /// pauses, then continues where it stopped); past it, it fails with 503. 0 fails
    /// in-flight requests at once.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    recovery_timeout: f64,
    /// Worker-group crashes one request may live through; the next fails it with 503.
    #[arg(long, default_value_t = 2)]
    max_restarts_per_request: u32,
    /// Speculative decoding's draft source: `ngram` (prompt lookup over each sequence's
    /// own tokens, verified in one step; exact for greedy, distribution-preserving for
    /// sampling) or `none`. Default: ngram with CPU workers; none on CUDA (whose
    /// backend does not verify drafts yet) and with sim or null workers (their
    /// pseudo-tokens never match a draft).
    #[arg(long, value_enum)]
    speculative: Option<SpeculativeArg>,
    /// Most draft tokens one sequence verifies per step (k adapts per sequence below it).
    #[arg(long, default_value_t = 8)]
    num_speculative_tokens: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SpeculativeArg {
    Ngram,
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WeightDtypeArg {
    Auto,
    F32,
    Bf16,
    Int8,
    #[value(name = "q8_0")]
    Q8_0,
    Fp8,
}

impl std::fmt::Display for WeightDtypeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_possible_value().expect("no skipped variants");
        f.write_str(v.get_name())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkerBackend {
    Cpu,
    Null,
    Sim,
}

fn nccl_unique_id() -> Result<Vec<u8>, String> {
    worker::cuda::nccl_unique_id().map_err(|e| e.to_string())
}

fn parse_gpu(s: &str) -> Result<worker::sim::GpuKind, String> {
    s.parse().map_err(|e: worker::WorkerError| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CollectiveKind {
    Nccl,
    Host,
}

impl ServeArgs {
    pub fn into_config(self) -> anyhow::Result<ServeConfig> {
        let cuda = matches!(self.device, Device::Cuda);
        let sim = self.backend(cuda)?;
        let model_dir = self.model_dir(sim.is_some())?;
        self.check_model(&model_dir, sim, cuda)?;
        let api_keys = self.api_keys()?;
        let (served_model_names, aliases) = self.model_names();
        let ops = self.ops(&api_keys, aliases)?;
        Ok(ServeConfig {
            listen: SocketAddr::new(self.host, self.port),
            model_dir,
            tp: self.tp,
            device: self.device_string(cuda, sim),
            nccl_unique_id: (cuda && self.collective == CollectiveKind::Nccl)
                .then_some(nccl_unique_id as fn() -> Result<Vec<u8>, String>),
            exe: std::env::current_exe()?,
            http: HttpConfig {
                served_model_names,
                api_keys,
                protect_metrics: self.protect_metrics,
                ops,
            },
            engine: self.engine_config()?,
            dtype: self.dtype.to_string(),
            kv_cache_bytes: self.kv_cache_mib << 20,
            max_kv_blocks: self.num_kv_blocks,
            step_timeout: Duration::from_secs(self.step_timeout_s),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            worker_token: self
                .worker_token_file
                .as_deref()
                .map(worker::auth::read_token_file)
                .transpose()?,
            workers: self.workers,
            collective_peers: self.collective_peers,
        })
    }

    /// Checks the device and backend flags together; the modelled GPU for `sim`.
    fn backend(&self, cuda: bool) -> anyhow::Result<Option<worker::sim::SimDevice>> {
        if cuda && !matches!(self.worker_backend, WorkerBackend::Cpu) {
            anyhow::bail!(
                "--device cuda runs the CUDA backend; --worker-backend is for CPU workers"
            );
        }
        if cuda && self.workers.is_none() && !worker::cuda::driver_available() {
            anyhow::bail!("--device cuda: no CUDA driver on this machine (libcuda.so could not be loaded); run on a machine with an NVIDIA GPU and driver, or use --device cpu");
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            anyhow::bail!(
                "--gpu-memory-utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            );
        }
        Ok(match (self.worker_backend, self.gpu) {
            (WorkerBackend::Sim, Some(gpu)) => Some(worker::sim::SimDevice {
                gpu,
                memory_utilization: self.gpu_memory_utilization,
            }),
            (WorkerBackend::Sim, None) => anyhow::bail!("--worker-backend sim needs --gpu"),
            (_, Some(_)) => anyhow::bail!(
                "--gpu needs --worker-backend sim (the cpu and null backends measure, they do not model a GPU)"
            ),
            (_, None) => None,
        })
    }

    /// `--model`, or the default for the backend (the embedded tiny model, built once).
    fn model_dir(&self, sim: bool) -> anyhow::Result<PathBuf> {
        Ok(match &self.model {
            Some(d) => d.clone(),
            None if sim => PathBuf::from("synthetic:codestral-22b"),
            None if self.workers.is_some() => {
                anyhow::bail!("--workers needs --model (the path as the workers see it)")
            }
            None => worker::embedded::ensure_embedded_model()?,
        })
    }

    /// Fails early when the model does not suit the backend or `--tp` (local workers).
    fn check_model(
        &self,
        model_dir: &std::path::Path,
        sim: Option<worker::sim::SimDevice>,
        cuda: bool,
    ) -> anyhow::Result<()> {
        let source = model_dir.to_string_lossy().into_owned();
        if let Some(dev) = sim {
            if self.workers.is_none() {
                // Fails early when the modelled GPUs cannot hold the model.
                let cfg = worker::sim::model_config(&source)?;
                let m = worker::sim::StepTimeModel::new(cfg, dev.gpu.spec(), self.tp)?
                    .with_weights(self.dtype.to_string().parse()?)?;
                let blocks = m.kv_capacity_blocks(
                    self.block_size,
                    dev.memory_utilization,
                    self.max_num_batched_tokens,
                    self.max_num_seqs,
                )?;
                tracing::warn!(
                    device = %dev.device_string(),
                    model = %source,
                    tp = self.tp,
                    kv_blocks = blocks,
                    "sim backend: no weights, no math; step times are MODELLED for this GPU, not measured"
                );
            }
        } else if cuda && worker::sim::is_synthetic(&source) {
            worker::sim::model_config(&source)?.check_tp(self.tp)?;
        } else if worker::sim::is_synthetic(&source) {
            anyhow::bail!("--model {source} is a shape without weights: serve it with --worker-backend sim --gpu GPU");
        } else if self.workers.is_none() {
            // Headers only: a safetensors directory, a `.gguf` file or a directory holding one.
            let cfg = worker::checkpoint::Checkpoint::open(model_dir)?.config;
            cfg.check_tp(self.tp)?;
        }
        Ok(())
    }

    /// The plain API keys: `--api-key`/STRAL_API_KEYS, then `--api-key-file` (one per
    /// line; blank lines and `#` comments skipped).
    fn api_keys(&self) -> anyhow::Result<Vec<String>> {
        let mut api_keys: Vec<String> = self
            .api_keys
            .iter()
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
        Ok(api_keys)
    }

    /// `(served names, NAME=SPEC aliases)` from `--served-model-name`: every name is
    /// served, an alias under its NAME.
    fn model_names(&self) -> (Vec<String>, Vec<String>) {
        let aliases: Vec<String> = self
            .served_model_names
            .iter()
            .filter(|n| n.contains('='))
            .cloned()
            .collect();
        let served = if self.served_model_names.is_empty() {
            DEFAULT_MODEL_NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            self.served_model_names
                .iter()
                .map(|n| {
                    n.split_once('=')
                        .map_or(n.as_str(), |x| x.0)
                        .trim()
                        .to_string()
                })
                .collect()
        };
        (served, aliases)
    }

    /// The ops layer, when a key file, a fallback or an alias asks for it.
    fn ops(&self, api_keys: &[String], aliases: Vec<String>) -> anyhow::Result<Option<Arc<Ops>>> {
        if self.fallback_ca_file.is_some() && self.fallback_url.is_none() && aliases.is_empty() {
            anyhow::bail!("--fallback-ca-file is for https upstreams: give --fallback-url or an alias with an https:// target");
        }
        let config = OpsConfig {
            key_file: self.keys_config.clone(),
            plain_keys: api_keys.to_vec(),
            fallback_url: self.fallback_url.clone(),
            fallback_ca_file: self.fallback_ca_file.clone(),
            fallback_api_key: self.fallback_api_key.clone(),
            fallback_ttft_budget: self.fallback_ttft_budget_ms.map(Duration::from_millis),
            max_num_seqs: self.max_num_seqs,
            aliases,
            metrics_key_label: self.metrics_key_label,
            reload_poll: Duration::from_millis(self.keys_reload_poll_ms),
        };
        Ok(if config.is_active() {
            Some(Ops::new(config)?)
        } else {
            None
        })
    }

    /// The device string the workers are started with.
    fn device_string(&self, cuda: bool, sim: Option<worker::sim::SimDevice>) -> String {
        match (self.worker_backend, sim) {
            _ if cuda => worker::cuda::CudaDevice {
                ordinal: None,
                memory_utilization: self.gpu_memory_utilization,
            }
            .device_string(),
            (_, Some(dev)) => dev.device_string(),
            (WorkerBackend::Null, _) => "null".into(),
            _ => "cpu".into(),
        }
    }

    fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        Ok(EngineConfig {
            scheduler: SchedulerConfig {
                block_size: self.block_size,
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_waiting: self.max_waiting,
                ..SchedulerConfig::default()
            },
            recovery_timeout: Duration::try_from_secs_f64(self.recovery_timeout).map_err(|_| {
                anyhow::anyhow!("--recovery-timeout must be a number of seconds ≥ 0")
            })?,
            max_restarts_per_request: self.max_restarts_per_request,
            max_step: self.max_step_ms,
            speculative: {
                let cuda = matches!(self.device, Device::Cuda);
                // Sim and null workers answer pseudo-tokens no draft ever matches:
                // speculating there only adds (modelled) verification work.
                let pseudo = !matches!(self.worker_backend, WorkerBackend::Cpu);
                match self.speculative {
                    Some(SpeculativeArg::Ngram) if cuda => anyhow::bail!(
                        "--speculative ngram is not supported with --device cuda yet (the CUDA backend does not verify drafts)"
                    ),
                    Some(SpeculativeArg::Ngram) => Speculative::Ngram,
                    Some(SpeculativeArg::None) => Speculative::None,
                    None if cuda || pseudo => Speculative::None,
                    None => Speculative::Ngram,
                }
            },
            num_speculative_tokens: self.num_speculative_tokens,
            ..EngineConfig::default()
        })
    }
}
