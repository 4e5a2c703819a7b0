//! `stral`: the one binary. Subcommands map onto the crates' config structs:
//! `serve` (coordinator), `worker` (one TP rank), `bench` (load generator),
//! `plan` (capacity planner), `synth` (synthetic checkpoints), `route` (a router in
//! front of many `serve` replicas).

mod bench_cmd;
mod plan_cmd;
mod plan_verify;
mod route_cmd;
mod serve_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use worker::safetensors_io::StoredDtype;
use worker::synth::{synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

#[derive(Parser)]
#[command(
    name = "stral",
    version,
    about = "Serve Mistral's Codestral-22B: continuous batching, paged KV cache, tensor-parallel workers."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (Mistral FIM/chat, OpenAI) with tensor-parallel worker
    /// processes. With no --model, builds (once, cached) a tiny synthetic
    /// Mistral-architecture model with the real 32768-token vocabulary and serves it
    /// on CPU with two ranks.
    Serve(serve_cmd::ServeArgs),
    /// Run one tensor-parallel worker rank (started by `serve`, or by Kubernetes).
    Worker(WorkerArgs),
    /// Load-test a Mistral- or OpenAI-compatible server and report latency percentiles.
    #[command(long_about = bench_cmd::LONG_ABOUT)]
    Bench(bench_cmd::BenchArgs),
    /// Plan capacity: GPUs, TP and replicas for a workload under a latency SLO.
    Plan(plan_cmd::PlanArgs),
    /// Write a deterministic random checkpoint of a preset in either on-disk layout.
    Synth(SynthArgs),
    /// Route requests over many `serve` replicas (prefix-cache affinity, bounded load,
    /// health ejection, retry of requests that sent nothing).
    #[command(long_about = route_cmd::LONG_ABOUT)]
    Route(route_cmd::RouteArgs),
}

#[derive(Args)]
struct WorkerArgs {
    /// gRPC address to serve the worker protocol on (HOST:PORT; port 0 picks one and logs it).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Where the forward pass runs: `cpu`, or `cuda:K` (GPU K; `cuda` = GPU 0). A CUDA
    /// worker serves every Init asking for `cuda` on that GPU, with
    /// --gpu-memory-utilization unless the Init names its own.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// Compute threads for the forward pass (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve only this backend: `cpu` (the reference forward pass), `null` (no math),
    /// or `sim` (no math, no weights: each step lasts the modelled time of --gpu).
    /// Default: whatever each Init from the coordinator asks for.
    #[arg(long, value_enum)]
    backend: Option<WorkerBackend>,
    /// GPU the sim backend models: h100, h200, a100 or l40s.
    #[arg(long, value_parser = parse_gpu, required_if_eq("backend", "sim"))]
    gpu: Option<worker::sim::GpuKind>,
    /// Fraction of GPU memory for weights, activations and KV (cuda; sim: of the
    /// modelled GPU's).
    #[arg(long, default_value_t = worker::sim::DEFAULT_MEMORY_UTILIZATION)]
    gpu_memory_utilization: f64,
    /// File holding the shared token that every call from the coordinator must carry
    /// (the same file as `stral serve --worker-token-file`). Required when --listen is
    /// not a loopback address; `stral serve` makes one for the workers it starts.
    #[arg(long, env = "STRAL_WORKER_TOKEN_FILE")]
    worker_token_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkerBackend {
    Cpu,
    Null,
    Sim,
}

/// `cpu` → `None`; `cuda[:K]` → that GPU.
/// `stral worker --device`: `None` for the CPU. (A newtype: clap treats a bare `Option`
/// field as "flag may be absent" and would not store the parser's `Option`.)
#[derive(Clone)]
struct DeviceArg(Option<worker::cuda::CudaDevice>);

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    if s == "cpu" {
        return Ok(DeviceArg(None));
    }
    match worker::cuda::CudaDevice::parse(s) {
        Ok(Some(d)) => Ok(DeviceArg(Some(d))),
        Ok(None) => Err(format!("'{s}' is not a device: use cpu, cuda or cuda:K")),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_gpu(s: &str) -> Result<worker::sim::GpuKind, String> {
    s.parse().map_err(|e: worker::WorkerError| e.to_string())
}

#[derive(Args)]
struct SynthArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// On-disk layout.
    #[arg(long, value_enum, default_value_t = Format::Mistral)]
    format: Format,
    /// Stored element type.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Random seed; the same seed gives the same model in both layouts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    #[value(name = "codestral-22b")]
    Codestral22b,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Mistral,
    Hf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Synth(a) => synth(a),
        Command::Worker(a) => run_worker(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Route(a) => route_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_worker(a: WorkerArgs) -> anyhow::Result<()> {
    let token = a
        .worker_token_file
        .as_deref()
        .map(worker::auth::read_token_file)
        .transpose()?;
    worker::auth::check_listen(&a.listen, token.as_deref())?;
    if let Some(dev) = a.device.0 {
        if a.backend.is_some() || a.gpu.is_some() {
            anyhow::bail!(
                "--device cuda runs the CUDA backend; --backend and --gpu are for CPU workers"
            );
        }
        if !worker::cuda::driver_available() {
            anyhow::bail!("--device cuda: no CUDA driver on this machine (libcuda.so could not be loaded); use --device cpu");
        }
        let dev = worker::cuda::CudaDevice {
            ordinal: Some(dev.ordinal.unwrap_or(0)),
            memory_utilization: a.gpu_memory_utilization,
        };
        worker::cuda::CudaDevice::parse(&dev.device_string())?;
        worker::service::run_worker_blocking(worker::service::WorkerConfig {
            listen: a.listen,
            threads: a.threads,
            backend: Some(dev.device_string()),
            token,
            ..Default::default()
        })?;
        return Ok(());
    }
    if a.gpu.is_some() && a.backend != Some(WorkerBackend::Sim) {
        anyhow::bail!(
            "--gpu needs --backend sim (the CPU backends measure, they do not model a GPU)"
        );
    }
    let backend = match (a.backend, a.gpu) {
        (None, _) => None,
        (Some(WorkerBackend::Cpu), _) => Some("cpu".to_string()),
        (Some(WorkerBackend::Null), _) => Some("null".to_string()),
        (Some(WorkerBackend::Sim), Some(gpu)) => Some(
            worker::sim::SimDevice {
                gpu,
                memory_utilization: a.gpu_memory_utilization,
            }
            .device_string(),
        ),
        (Some(WorkerBackend::Sim), None) => anyhow::bail!("--backend sim needs --gpu"),
    };
    if let Some(b) = &backend {
        // Fails early on a bad utilization.
        worker::sim::SimDevice::parse(b)?;
    }
    worker::service::run_worker_blocking(worker::service::WorkerConfig {
        listen: a.listen,
        threads: a.threads,
        backend,
        token,
        ..Default::default()
    })?;
    Ok(())
}

fn synth(a: SynthArgs) -> anyhow::Result<()> {
    let opts = SynthOptions {
        config: match a.preset {
            Preset::Tiny => ModelConfig::tiny(),
            Preset::Codestral22b => ModelConfig::codestral_22b(),
        },
        format: match a.format {
            Format::Mistral => CheckpointFormat::Mistral,
            Format::Hf => CheckpointFormat::Hf,
        },
        dtype: match a.dtype {
            Dtype::F32 => StoredDtype::F32,
            Dtype::Bf16 => StoredDtype::Bf16,
        },
        seed: a.seed,
        progress: true,
    };
    synthesize(&opts, &a.out)?;
    eprintln!(
        "wrote {} ({} parameters) to {}",
        match a.preset {
            Preset::Tiny => "tiny",
            Preset::Codestral22b => "codestral-22b",
        },
        opts.config.n_params(),
        a.out.display()
    );
    Ok(())
}

fn serve(a: serve_cmd::ServeArgs) -> anyhow::Result<()> {
    let config = a.into_config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(coordinator::serve::serve(config))?;
    Ok(())
}
