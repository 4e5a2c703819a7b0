//! `stral`: the one binary. Subcommands map onto the crates' config structs:
//! `serve` (coordinator), `worker` (one TP rank), `bench` (load generator),
//! `plan` (capacity planner), `synth` (synthetic checkpoints).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
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
    /// Serve the model. With no --model, builds (once, cached) a tiny synthetic
    /// Mistral-architecture model with the real 32768-token vocabulary and runs it on
    /// CPU in tensor parallel.
    Serve(ServeArgs),
    /// Run one tensor-parallel worker rank (started by `serve`, or by Kubernetes).
    Worker(PendingArgs),
    /// Load-test a Mistral- or OpenAI-compatible server and report latency percentiles.
    Bench(PendingArgs),
    /// Plan capacity: GPUs, TP and replicas for a workload under a latency SLO.
    Plan(PendingArgs),
    /// Write a deterministic random checkpoint of a preset in either on-disk layout.
    Synth(SynthArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Checkpoint directory, either layout (params.json + consolidated.safetensors,
    /// or config.json + model-*.safetensors). Default: the embedded tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel ranks (1, 2, 4 or 8; must divide the kv heads).
    #[arg(long, default_value_t = 2)]
    tp: usize,
    /// Where the forward pass runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Prompt token ids for the offline preview (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,1784,1070,29473,1115,1027,1032,1093"
    )]
    preview_tokens: Vec<u32>,
    /// Tokens to generate in the offline preview.
    #[arg(long, default_value_t = 32)]
    preview_new: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Args)]
struct PendingArgs {
    /// Arguments for the future implementation.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
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
        Command::Worker(_) => pending("worker", "distributed runtime (gRPC workers)"),
        Command::Bench(_) => pending("bench", "benchmarking and capacity planning"),
        Command::Plan(_) => pending("plan", "benchmarking and capacity planning"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pending(cmd: &str, issue: &str) -> anyhow::Result<()> {
    anyhow::bail!("`stral {cmd}` is not available yet: it arrives with the {issue} work")
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

/// Until the HTTP server lands, `serve` loads the model in tensor parallel (ranks as
/// threads) and runs a short greedy generation, reporting its speed.
fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if matches!(a.device, Device::Cuda) {
        anyhow::bail!("--device cuda is not available yet: the CUDA worker backend arrives with its own issue");
    }
    let dir = match a.model {
        Some(d) => d,
        None => worker::embedded::ensure_embedded_model()?,
    };
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&dir)?;
    ckpt.config.check_tp(a.tp)?;
    let block_size = 16;
    let blocks = (a.preview_tokens.len() + a.preview_new).div_ceil(block_size);
    let mut group = LocalTpGroup::load(&ckpt, a.tp, blocks, block_size)?;
    eprintln!(
        "loaded {} (TP={}) in {:.2} s",
        dir.display(),
        a.tp,
        t0.elapsed().as_secs_f64()
    );
    if let Some(t) = a
        .preview_tokens
        .iter()
        .find(|&&t| t as usize >= ckpt.config.vocab_size)
    {
        anyhow::bail!(
            "--preview-tokens: id {t} is outside the vocabulary of {}",
            ckpt.config.vocab_size
        );
    }
    let t1 = Instant::now();
    let (tokens, _) =
        group.generate_greedy(&a.preview_tokens, a.preview_new, a.preview_tokens.len())?;
    let dt = t1.elapsed().as_secs_f64();
    println!(
        "{}",
        tokens
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!(
        "generated {} tokens in {:.3} s ({:.1} tokens/s). The HTTP server on {}:{} is not available yet; this was an offline preview.",
        tokens.len(),
        dt,
        tokens.len() as f64 / dt,
        a.host,
        a.port
    );
    Ok(())
}
