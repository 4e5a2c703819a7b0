//! `stral plan`: flags → [`benches::plan::PlanConfig`]; prints the (modelled)
//! recommendation as text or JSON, with a note for every default it applied and where
//! its number comes from, and optionally writes the curves as PNG or SVG.

use std::path::PathBuf;

use benches::plan::{self, HostOverhead, PlanConfig, Slo, Workload};
use clap::Args;

#[derive(Args)]
pub struct PlanArgs {
    /// GPU type: h100, h200, a100 or l40s.
    #[arg(long, value_parser = parse_gpu, default_value = "h100")]
    gpu: worker::sim::GpuKind,
    /// Weight format on the GPUs: bf16, int8 (weight-only: half the bytes a decode
    /// step streams, bf16 math) or fp8 (also twice the GEMM peak; not on a100).
    #[arg(long, value_parser = parse_weights, default_value = "bf16")]
    dtype: worker::sim::SimWeights,
    /// Model: a preset (`codestral-22b`, `tiny`) or a checkpoint directory (only its
    /// params.json / config.json is read).
    #[arg(long, default_value = "codestral-22b")]
    model: String,
    /// Developers served.
    #[arg(long, default_value_t = 2000)]
    developers: u64,
    /// Fraction of developers typing at any moment [default: 0.1, an assumption of
    /// this planner; the report says so].
    #[arg(long)]
    active_fraction: Option<f64>,
    /// Completion requests per active developer per minute [default: 6, an
    /// assumption of this planner; the report says so].
    #[arg(long)]
    requests_per_active_minute: Option<f64>,
    /// Prompt tokens per request (no prefix-cache hits are assumed: conservative).
    #[arg(long, default_value_t = 1536)]
    prompt_tokens: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 48)]
    output_tokens: usize,
    /// p95 time to first token, ms. With no SLO flag at all: 200 (the "under 200 ms
    /// feels fluid" rule for IDE completion).
    #[arg(long)]
    slo_ttft_p95_ms: Option<f64>,
    /// p95 time per output token after the first, ms.
    #[arg(long)]
    slo_tpot_p95_ms: Option<f64>,
    /// p95 end-to-end latency, ms.
    #[arg(long)]
    slo_e2e_p95_ms: Option<f64>,
    /// Tensor-parallel sizes to consider.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    tp: Vec<usize>,
    /// Fraction of GPU memory for weights, activations and KV.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Coordinator time per step, µs (default: measured on the 2-core dev VM, null
    /// backend; see benches/RESULTS.md).
    #[arg(long, default_value_t = HostOverhead::default().per_step_us)]
    host_us_per_step: f64,
    /// Coordinator time per running sequence per step, µs.
    #[arg(long, default_value_t = HostOverhead::default().per_seq_us)]
    host_us_per_seq: f64,
    /// Load points per curve.
    #[arg(long, default_value_t = 24)]
    grid_points: usize,
    /// Simulated seconds of arrivals per load point.
    #[arg(long, default_value_t = 60.0)]
    sim_seconds: f64,
    /// Seed of the simulated arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Write the curves (p95 TTFT vs load per replica) to this file: PNG or SVG by its
    /// extension (`plan.png`, `plan.svg`).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Check the recommendation against the real coordinator and scheduler: start a
    /// `stral serve --worker-backend sim` replica (same step-time model, no GPU) at the
    /// recommended TP, drive it with this workload through `stral bench` at
    /// --verify-loads of the predicted capacity, and print predicted vs observed.
    #[arg(long)]
    verify: bool,
    /// With --verify: check every feasible TP, not only the recommended one.
    #[arg(long, requires = "verify")]
    verify_every_tp: bool,
    /// With --verify: seconds of arrivals per load level.
    #[arg(long, default_value_t = 30.0, requires = "verify")]
    verify_seconds: f64,
    /// With --verify: load levels as fractions of the predicted capacity per replica.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.5,0.8,1.0",
        requires = "verify"
    )]
    verify_loads: Vec<f64>,
    /// Take the workload (arrival rate, prompt and output tokens, prefix-cache hit
    /// rate) and the per-step overhead from a `stral bench --json-out` report of a run
    /// against a real deployment (its last run); the report notes each number's source.
    #[arg(long, conflicts_with_all = [
        "developers", "active_fraction", "requests_per_active_minute",
        "prompt_tokens", "output_tokens", "host_us_per_step",
    ])]
    from_bench: Option<PathBuf>,
    /// With --from-bench: tensor-parallel ranks of the deployment that run measured
    /// (to take the modelled decode step out of its TPOT).
    #[arg(long, default_value_t = 1, requires = "from_bench")]
    bench_tp: usize,
}

fn parse_weights(s: &str) -> Result<worker::sim::SimWeights, String> {
    s.parse().map_err(|e: worker::WorkerError| e.to_string())
}

fn parse_gpu(s: &str) -> Result<worker::sim::GpuKind, String> {
    s.parse().map_err(|e: worker::WorkerError| e.to_string())
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let model = match worker::ModelConfig::preset(&a.model) {
        Ok(m) => m,
        Err(_) => worker::sim::model_config(&a.model).map_err(|e| {
            anyhow::anyhow!(
                "--model {}: not a preset (codestral-22b, tiny) and {e}",
                a.model
            )
        })?,
    };
    if let Some(path) = &a.plot {
        plan::plot::is_png(path)?;
    }
    let defaults = Workload::default();
    let mut notes = Vec::new();
    let active_fraction = a.active_fraction.unwrap_or_else(|| {
        notes.push(format!(
            "--active-fraction {}: {}",
            defaults.active_fraction,
            plan::ACTIVE_FRACTION_SOURCE
        ));
        defaults.active_fraction
    });
    let requests_per_active_minute = a.requests_per_active_minute.unwrap_or_else(|| {
        notes.push(format!(
            "--requests-per-active-minute {}: {}",
            defaults.requests_per_active_minute,
            plan::REQUESTS_PER_ACTIVE_MINUTE_SOURCE
        ));
        defaults.requests_per_active_minute
    });
    for (name, v) in [
        ("active-fraction", active_fraction),
        ("requests-per-active-minute", requests_per_active_minute),
        ("sim-seconds", a.sim_seconds),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            anyhow::bail!("--{name} must be a positive number, got {v}");
        }
    }
    if active_fraction > 1.0 {
        anyhow::bail!("--active-fraction must be at most 1");
    }
    if !(a.host_us_per_step >= 0.0 && a.host_us_per_seq >= 0.0) {
        anyhow::bail!("--host-us-per-step and --host-us-per-seq must be ≥ 0");
    }
    let cfg = PlanConfig {
        gpu: a.gpu,
        weights: a.dtype,
        model_name: a.model.clone(),
        model,
        workload: Workload {
            developers: a.developers,
            active_fraction,
            requests_per_active_minute,
            prompt_tokens: a.prompt_tokens,
            output_tokens: a.output_tokens,
            ..Workload::default()
        },
        slo: Slo {
            ttft_p95_ms: a.slo_ttft_p95_ms,
            tpot_p95_ms: a.slo_tpot_p95_ms,
            e2e_p95_ms: a.slo_e2e_p95_ms,
        },
        tps: a.tp,
        memory_utilization: a.gpu_memory_utilization,
        host: HostOverhead {
            per_step_us: a.host_us_per_step,
            per_seq_us: a.host_us_per_seq,
        },
        grid_points: a.grid_points,
        duration_s: a.sim_seconds,
        seed: a.seed,
        ..PlanConfig::default()
    };
    let v = plan::verify::VerifyConfig {
        fractions: a.verify_loads.clone(),
        seconds: a.verify_seconds,
        seed: a.seed,
        progress: true,
        ..Default::default()
    };
    if a.verify {
        v.validate()?;
    }
    let mut cfg = cfg;
    if let Some(path) = &a.from_bench {
        let source = path.display().to_string();
        let bench = benches::bench::report::BenchReport::read_json(path)
            .map_err(|e| anyhow::anyhow!("--from-bench: {e}"))?;
        let taken = plan::from_bench::from_bench(&bench, &source, &cfg, a.bench_tp)?;
        cfg.workload = taken.workload;
        if let Some(h) = taken.host {
            cfg.host = h;
        }
        // The developer counts do not apply to a measured rate.
        notes.clear();
        notes.extend(taken.notes);
    }
    let mut report = plan::plan(&cfg)?;
    report.notes.extend(notes);
    if a.verify {
        let to_check: Vec<_> = if a.verify_every_tp {
            report
                .candidates
                .iter()
                .filter(|c| c.infeasible.is_none())
                .collect()
        } else {
            report.recommendation().into_iter().collect()
        };
        if to_check.is_empty() {
            anyhow::bail!(
                "--verify: no TP meets the SLO on {}, so there is no capacity to check",
                report.gpu
            );
        }
        report.verify = Some(crate::plan_verify::verify_all(
            &cfg, &a.model, &to_check, &v,
        )?);
    }
    if let Some(path) = &a.plot {
        plan::plot::write_plot(&report, path)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", plan::render_text(&report));
        if let Some(rows) = &report.verify {
            print!("{}", plan::verify::render_verify(rows, a.verify_seconds));
        }
        if let Some(path) = &a.plot {
            println!("plot written to {}", path.display());
        }
    }
    if report.recommended.is_none() {
        anyhow::bail!("no TP meets the SLO on {}", report.gpu);
    }
    Ok(())
}
