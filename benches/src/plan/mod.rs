//! `stral plan`: how many GPUs, which TP and how many replicas serve a workload under a
//! latency SLO — a *modelled* answer, never a measured one.
//!
//! Method: for each TP ∈ {1, 2, 4, 8} that fits the GPU, the step-time model
//! (`worker::sim`) and the real scheduler run a discrete-event simulation of one
//! replica ([`simulate`]) at a grid of arrival rates, giving the curve p95 TTFT /
//! TPOT / E2E vs load per replica. A replica's capacity is the highest grid rate
//! below the first rate that breaks the SLO; replicas = ⌈total rate ÷ capacity⌉;
//! the recommendation is the fewest GPUs (ties: the lower p95 TTFT at the planned
//! load). The grid and the arrival draws do not depend on the workload's size or the
//! SLO, so the answer is monotone: more developers or a tighter SLO never yields
//! fewer GPUs (tested).
//!
//! Costs: per TP, up to `grid_points` simulations of `duration_s` simulated seconds
//! (the curve stops three points past the SLO's knee), plus one at the planned load:
//! a few seconds of CPU in all with the defaults.

pub mod from_bench;
pub mod plot;
pub mod simulate;
pub mod verify;

use serde::Serialize;
use worker::sim::{GpuKind, Provenance, SimWeights, StepTimeModel};
use worker::ModelConfig;

pub use simulate::{simulate, HostOverhead, LoadResult, SimConfig};

/// Errors of the planner; each names what to change.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Input(String),
    #[error("simulation: {0}")]
    Simulation(String),
    #[error("plot: {0}")]
    Plot(String),
    #[error("verify: {0}")]
    Verify(String),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The p95 TTFT target when no SLO is given: the "under 200 ms feels fluid" rule for
/// IDE completion.
pub const DEFAULT_TTFT_P95_MS: f64 = 200.0;

/// Where the developer workload's defaults come from, printed when they are used.
pub const ACTIVE_FRACTION_SOURCE: &str =
    "an assumption of this planner, not a measurement (a developer typing about 6 minutes of every hour); set --active-fraction from your IDE telemetry";
pub const REQUESTS_PER_ACTIVE_MINUTE_SOURCE: &str =
    "an assumption of this planner, not a measurement (one debounced completion every 10 s of typing); set --requests-per-active-minute from your IDE telemetry";

/// The traffic to serve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    pub developers: u64,
    /// Fraction of developers typing at any moment.
    pub active_fraction: f64,
    /// Completion requests per active developer per minute.
    pub requests_per_active_minute: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Share of each prompt served from the prefix cache (0 = none, conservative).
    pub prefix_cache_hit_rate: f64,
    /// Fleet arrival rate, requests/s, when it was measured (`--from-bench`) instead
    /// of derived from the developer counts.
    pub arrival_rate_per_s: Option<f64>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            developers: 2000,
            active_fraction: 0.1,
            requests_per_active_minute: 6.0,
            prompt_tokens: 1536,
            output_tokens: 48,
            prefix_cache_hit_rate: 0.0,
            arrival_rate_per_s: None,
        }
    }
}

impl Workload {
    /// Requests per second over the whole fleet.
    pub fn rate_per_s(&self) -> f64 {
        self.arrival_rate_per_s.unwrap_or(
            self.developers as f64 * self.active_fraction * self.requests_per_active_minute / 60.0,
        )
    }
}

/// Latency objectives at p95, ms; `None` = not constrained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_p95_ms: Option<f64>,
    pub tpot_p95_ms: Option<f64>,
    pub e2e_p95_ms: Option<f64>,
}

impl Slo {
    pub fn met_by(&self, r: &LoadResult) -> bool {
        self.ttft_p95_ms.is_none_or(|s| r.ttft_p95_ms <= s)
            && self.tpot_p95_ms.is_none_or(|s| r.tpot_p95_ms <= s)
            && self.e2e_p95_ms.is_none_or(|s| r.e2e_p95_ms <= s)
    }
}

/// Everything the planner needs.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub gpu: GpuKind,
    /// How the GPUs store the weights (bytes per weight in the step-time model).
    pub weights: SimWeights,
    /// Model name for the report (e.g. `codestral-22b`).
    pub model_name: String,
    pub model: ModelConfig,
    pub workload: Workload,
    pub slo: Slo,
    pub tps: Vec<usize>,
    pub memory_utilization: f64,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub host: HostOverhead,
    /// Load points per curve.
    pub grid_points: usize,
    /// Simulated seconds of arrivals per load point.
    pub duration_s: f64,
    pub seed: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            gpu: GpuKind::H100,
            weights: SimWeights::Bf16,
            model_name: "codestral-22b".into(),
            model: ModelConfig::codestral_22b(),
            workload: Workload::default(),
            slo: Slo {
                ttft_p95_ms: Some(500.0),
                tpot_p95_ms: Some(50.0),
                e2e_p95_ms: None,
            },
            tps: vec![1, 2, 4, 8],
            memory_utilization: 0.9,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            host: HostOverhead::default(),
            grid_points: 24,
            duration_s: 60.0,
            seed: 1,
        }
    }
}

/// One TP's curve and what it implies.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub tp: usize,
    /// Why this TP cannot serve the workload (does not fit, SLO unreachable).
    pub infeasible: Option<String>,
    pub kv_blocks_per_rank: u64,
    /// Highest load per replica (requests/s) that meets the SLO on the curve.
    pub capacity_per_replica_rps: f64,
    pub replicas: u64,
    pub gpus: u64,
    /// Spare capacity at the planned load: `replicas × capacity ÷ rate − 1`.
    pub headroom: f64,
    /// Simulated at the planned load per replica.
    pub predicted: Option<LoadResult>,
    /// p95s vs load per replica, the grid the capacity was read from.
    pub curve: Vec<LoadResult>,
}

/// Provenance of the step-time coefficients, by kind.
#[derive(Clone, Debug, Serialize)]
pub struct CoefficientSummary {
    pub datasheet: Vec<&'static str>,
    pub calibrated: Vec<&'static str>,
    pub estimate: Vec<&'static str>,
}

/// The planner's answer.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    /// Always "modelled": these figures come from the step-time model and a
    /// simulation of the scheduler, not from a measurement.
    pub source: &'static str,
    pub gpu: &'static str,
    pub gpu_product: &'static str,
    /// Weight format modelled (`bf16`, `int8`, `fp8`).
    pub weights: &'static str,
    pub model: String,
    pub workload: Workload,
    pub slo: Slo,
    pub total_rate_per_s: f64,
    pub host_overhead: HostOverhead,
    pub coefficients: CoefficientSummary,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates`; `None` when no TP meets the SLO.
    pub recommended: Option<usize>,
    /// Defaults that were applied and where their numbers come from.
    pub notes: Vec<String>,
    /// `--verify`: predicted vs observed on a real sim replica, per load level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Vec<verify::VerifyRow>>,
}

impl PlanReport {
    pub fn recommendation(&self) -> Option<&Candidate> {
        self.recommended.map(|i| &self.candidates[i])
    }
}

/// The label every planner output carries.
pub const MODELLED: &str = "modelled (step-time model + simulated scheduler), not measured";

/// Plans `cfg`.
pub fn plan(cfg: &PlanConfig) -> Result<PlanReport, PlanError> {
    let rate = cfg.workload.rate_per_s();
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(PlanError::Input(format!(
            "the workload has no traffic ({rate} requests/s): set --developers, --active-fraction and --requests-per-active-minute above 0"
        )));
    }
    let mut notes = Vec::new();
    let mut slo = cfg.slo;
    if slo == Slo::default() {
        slo.ttft_p95_ms = Some(DEFAULT_TTFT_P95_MS);
        notes.push(format!(
            "no SLO given: using p95 TTFT {DEFAULT_TTFT_P95_MS} ms (the \"under 200 ms feels fluid\" rule for IDE completion); set --slo-ttft-p95-ms, --slo-tpot-p95-ms or --slo-e2e-p95-ms"
        ));
    }
    let with_slo = PlanConfig { slo, ..cfg.clone() };
    let cfg = &with_slo;
    let hit = cfg.workload.prefix_cache_hit_rate;
    if !(0.0..1.0).contains(&hit) {
        return Err(PlanError::Input(format!(
            "the prefix-cache hit rate must be in [0, 1), got {hit}"
        )));
    }
    if cfg.workload.prompt_tokens == 0 || cfg.workload.output_tokens == 0 {
        return Err(PlanError::Input(
            "--prompt-tokens and --output-tokens must be at least 1".into(),
        ));
    }
    if cfg.grid_points < 2 {
        return Err(PlanError::Input("grid_points must be at least 2".into()));
    }
    let spec = cfg.gpu.spec();
    let mut candidates = Vec::new();
    for &tp in &cfg.tps {
        candidates.push(candidate(cfg, tp, rate)?);
    }
    let recommended = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.infeasible.is_none())
        .min_by(|(_, a), (_, b)| {
            let key = |c: &Candidate| c.predicted.map_or(f64::INFINITY, |p| p.ttft_p95_ms);
            a.gpus.cmp(&b.gpus).then(key(a).total_cmp(&key(b)))
        })
        .map(|(i, _)| i);
    Ok(PlanReport {
        source: MODELLED,
        gpu: cfg.gpu.name(),
        gpu_product: spec.product,
        weights: cfg.weights.name(),
        model: cfg.model_name.clone(),
        workload: cfg.workload.clone(),
        slo: cfg.slo,
        total_rate_per_s: rate,
        host_overhead: cfg.host,
        coefficients: CoefficientSummary {
            datasheet: spec.fields_with(Provenance::Datasheet),
            calibrated: spec.fields_with(Provenance::Calibrated),
            estimate: spec.fields_with(Provenance::Estimate),
        },
        candidates,
        recommended,
        notes,
        verify: None,
    })
}

fn infeasible(tp: usize, why: String) -> Candidate {
    Candidate {
        tp,
        infeasible: Some(why),
        kv_blocks_per_rank: 0,
        capacity_per_replica_rps: 0.0,
        replicas: 0,
        gpus: 0,
        headroom: 0.0,
        predicted: None,
        curve: Vec::new(),
    }
}

/// One replica of `model` with `blocks` KV blocks per rank, simulated for
/// `duration_s` at `rate_per_s` with `cfg`'s workload, scheduler and host overhead.
fn simulate_at(
    cfg: &PlanConfig,
    model: &StepTimeModel,
    blocks: u64,
    rate_per_s: f64,
    duration_s: f64,
    arrivals_s: Option<Vec<f64>>,
) -> Result<LoadResult, PlanError> {
    let warmup_fraction = if arrivals_s.is_some() { 0.0 } else { 0.1 };
    let w = &cfg.workload;
    simulate(
        model,
        &SimConfig {
            rate_per_s,
            prompt_tokens: w.prompt_tokens,
            output_tokens: w.output_tokens,
            prefix_hit_rate: w.prefix_cache_hit_rate,
            duration_s,
            warmup_fraction,
            seed: cfg.seed,
            arrivals_s,
            host: cfg.host,
            scheduler: scheduler::SchedulerConfig {
                num_blocks: blocks.min(u64::from(u32::MAX - 1)) as usize,
                block_size: cfg.block_size,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                max_model_len: cfg.model.max_position_embeddings,
                max_waiting: usize::MAX / 2,
                sliding_window: cfg.model.sliding_window.map(|s| s as usize),
                ..serve_default_step_caps(cfg, model, blocks)
            },
        },
    )
    .map_err(PlanError::Simulation)
}

/// The step caps `stral serve` gives this replica by default (`--max-step-ms auto`):
/// the step cost its sim workers would report (the same profile shapes and fit,
/// [`worker::profile::modelled_cost`]) and the prefill allowance resolved from it.
fn serve_default_step_caps(
    cfg: &PlanConfig,
    model: &StepTimeModel,
    blocks: u64,
) -> scheduler::SchedulerConfig {
    let limits = worker::profile::ProfileLimits {
        max_tokens: cfg.max_num_batched_tokens,
        max_seqs: cfg.max_num_seqs,
        block_size: cfg.block_size,
        max_context: cfg.model.max_position_embeddings,
        scratch_blocks: blocks.saturating_sub(1).min(usize::MAX as u64) as usize,
    };
    let fitted = worker::profile::modelled_cost(&limits, |w| model.step(w).total_us * 1e-3);
    let cost = scheduler::StepCost {
        fixed_ms: fitted.fixed_ms,
        per_token_ms: fitted.per_token_ms,
        per_context_token_ms: fitted.per_context_token_ms,
    };
    scheduler::SchedulerConfig {
        step_cost: Some(cost),
        max_prefill_ms: Some(cost.auto_prefill_ms()),
        ..Default::default()
    }
}

/// The model and KV blocks per rank of one TP, or why it cannot serve.
fn replica(cfg: &PlanConfig, tp: usize) -> Result<(StepTimeModel, u64), String> {
    let model = StepTimeModel::new(cfg.model.clone(), cfg.gpu.spec(), tp)
        .and_then(|m| m.with_weights(cfg.weights))
        .map_err(|e| e.to_string())?;
    let blocks = model
        .kv_capacity_blocks(
            cfg.block_size,
            cfg.memory_utilization,
            cfg.max_num_batched_tokens,
            cfg.max_num_seqs,
        )
        .map_err(|e| e.to_string())?;
    Ok((model, blocks))
}

/// The simulated p95s of one replica at TP `tp` for exactly the arrivals `arrivals_s`
/// (seconds from the start, ascending; every request measured, no warm-up cut) at a
/// nominal `rate_per_s`: what `--verify` compares a real replica against.
pub fn predict(
    cfg: &PlanConfig,
    tp: usize,
    rate_per_s: f64,
    arrivals_s: Vec<f64>,
) -> Result<LoadResult, PlanError> {
    let (model, blocks) = replica(cfg, tp).map_err(PlanError::Input)?;
    let end = arrivals_s.last().copied().unwrap_or(0.0);
    simulate_at(cfg, &model, blocks, rate_per_s, end, Some(arrivals_s))
}

fn candidate(cfg: &PlanConfig, tp: usize, rate: f64) -> Result<Candidate, PlanError> {
    let (model, blocks) = match replica(cfg, tp) {
        Ok(r) => r,
        Err(e) => return Ok(infeasible(tp, e)),
    };
    let w = &cfg.workload;
    let sim = |rate_per_s: f64| simulate_at(cfg, &model, blocks, rate_per_s, cfg.duration_s, None);
    // The grid spans up to 1.2× a throughput bound no replica beats: full decode
    // batches plus prefills packed into full steps. It depends on the model, GPU, TP
    // and request shape only, never on the traffic or the SLO.
    let budget = cfg.max_num_batched_tokens;
    let decode_share_us = model
        .decode_step(
            cfg.max_num_seqs,
            (w.prompt_tokens + w.output_tokens / 2) as u32,
        )
        .total_us
        / cfg.max_num_seqs as f64
        * w.output_tokens as f64;
    let per_step = (budget / w.prompt_tokens).max(1);
    let chunk = w.prompt_tokens.min(budget) as u32;
    let prefill_share_us = model
        .step(&vec![
            worker::sim::SeqWork {
                new_tokens: chunk,
                cached: 0,
                sample: true,
            };
            per_step
        ])
        .total_us
        / per_step as f64
        * (w.prompt_tokens as f64 / chunk as f64);
    let max_rate = 1.2e6 / (decode_share_us + prefill_share_us);
    let mut curve = Vec::with_capacity(cfg.grid_points);
    let mut capacity = 0.0;
    let mut broken = false;
    // Two points past the first that breaks the SLO show the knee; further ones are
    // deeper overload and would not change the capacity.
    let mut past = 0;
    for i in 1..=cfg.grid_points {
        let r = sim(max_rate * i as f64 / cfg.grid_points as f64)?;
        if !broken && cfg.slo.met_by(&r) {
            capacity = r.rate_per_s;
        } else {
            broken = true;
            past += 1;
        }
        curve.push(r);
        if past > 2 {
            break;
        }
    }
    if capacity == 0.0 {
        let mut c = infeasible(
            tp,
            format!(
                "the SLO is not met even at {:.2} requests/s per replica (p95 TTFT {:.0} ms, TPOT {:.1} ms)",
                curve[0].rate_per_s, curve[0].ttft_p95_ms, curve[0].tpot_p95_ms
            ),
        );
        c.kv_blocks_per_rank = blocks;
        c.curve = curve;
        return Ok(c);
    }
    let replicas = (rate / capacity).ceil().max(1.0) as u64;
    let predicted = sim(rate / replicas as f64)?;
    Ok(Candidate {
        tp,
        infeasible: None,
        kv_blocks_per_rank: blocks,
        capacity_per_replica_rps: capacity,
        replicas,
        gpus: replicas * tp as u64,
        headroom: replicas as f64 * capacity / rate - 1.0,
        predicted: Some(predicted),
        curve,
    })
}

/// The report as text for a terminal.
pub fn render_text(r: &PlanReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let w = &r.workload;
    let _ = writeln!(s, "stral plan — MODELLED, not measured ({})", r.source);
    let traffic = match w.arrival_rate_per_s {
        Some(rate) => format!("{rate:.2} requests/s (measured)"),
        None => format!(
            "{} developers × {} active × {} req/min = {:.2} requests/s",
            w.developers, w.active_fraction, w.requests_per_active_minute, r.total_rate_per_s
        ),
    };
    let cached = if w.prefix_cache_hit_rate > 0.0 {
        format!(
            ", {:.0}% from the prefix cache",
            w.prefix_cache_hit_rate * 100.0
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "model {} ({} weights) on {} ({}); workload: {traffic}, {} prompt{cached} + {} output tokens",
        r.model, r.weights, r.gpu, r.gpu_product, w.prompt_tokens, w.output_tokens
    );
    let slo = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    let _ = writeln!(
        s,
        "SLO (p95): TTFT {}, TPOT {}, E2E {}",
        slo(r.slo.ttft_p95_ms),
        slo(r.slo.tpot_p95_ms),
        slo(r.slo.e2e_p95_ms)
    );
    for note in &r.notes {
        let _ = writeln!(s, "note: {note}");
    }
    let _ = writeln!(
        s,
        "coefficients calibrated on our H100: {}; datasheet: {}; estimates: {}",
        if r.coefficients.calibrated.is_empty() {
            "none for this GPU".to_string()
        } else {
            r.coefficients.calibrated.join(", ")
        },
        r.coefficients.datasheet.join(", "),
        r.coefficients.estimate.join(", ")
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:>3} {:>10} {:>12} {:>9} {:>5} {:>9} {:>12} {:>12}",
        "TP",
        "KV blocks",
        "cap req/s",
        "replicas",
        "GPUs",
        "headroom",
        "p95 TTFT ms",
        "p95 TPOT ms"
    );
    for c in &r.candidates {
        match (&c.infeasible, &c.predicted) {
            (None, Some(p)) => {
                let _ = writeln!(
                    s,
                    "{:>3} {:>10} {:>12.2} {:>9} {:>5} {:>8.0}% {:>12.0} {:>12.1}",
                    c.tp,
                    c.kv_blocks_per_rank,
                    c.capacity_per_replica_rps,
                    c.replicas,
                    c.gpus,
                    c.headroom * 100.0,
                    p.ttft_p95_ms,
                    p.tpot_p95_ms
                );
            }
            (why, _) => {
                let _ = writeln!(
                    s,
                    "{:>3}  not feasible: {}",
                    c.tp,
                    why.as_deref().unwrap_or("?")
                );
            }
        }
    }
    let _ = writeln!(s);
    match r.recommendation() {
        Some(c) => {
            let p = c.predicted.unwrap_or_default();
            let _ = writeln!(
                s,
                "recommendation: {} × {} GPUs = {} replicas of TP {} ({:.2} requests/s each, capacity {:.2}, headroom {:.0}%); predicted p95 TTFT {:.0} ms, p95 TPOT {:.1} ms, p95 E2E {:.0} ms",
                c.gpus, r.gpu, c.replicas, c.tp, r.total_rate_per_s / c.replicas as f64,
                c.capacity_per_replica_rps, c.headroom * 100.0, p.ttft_p95_ms, p.tpot_p95_ms, p.e2e_p95_ms
            );
            let _ = writeln!(s, "curve (TP {}, per replica; modelled):", c.tp);
            let _ = writeln!(
                s,
                "  {:>9} {:>12} {:>12} {:>12} {:>10}",
                "req/s", "p95 TTFT ms", "p95 TPOT ms", "p95 E2E ms", "mean batch"
            );
            for p in &c.curve {
                let _ = writeln!(
                    s,
                    "  {:>9.2} {:>12.0} {:>12.1} {:>12.0} {:>10.1}{}",
                    p.rate_per_s,
                    p.ttft_p95_ms,
                    p.tpot_p95_ms,
                    p.e2e_p95_ms,
                    p.mean_batch,
                    if r.slo.met_by(p) {
                        ""
                    } else {
                        "  (misses SLO)"
                    }
                );
            }
        }
        None => {
            let _ = writeln!(s, "no TP in the search meets the SLO on {}", r.gpu);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small grids and short simulations: monotonicity holds by construction, not by
    /// resolution.
    fn quick(developers: u64, ttft_ms: f64) -> PlanConfig {
        PlanConfig {
            workload: Workload {
                developers,
                active_fraction: 0.1,
                requests_per_active_minute: 6.0,
                prompt_tokens: 1024,
                output_tokens: 32,
                ..Default::default()
            },
            slo: Slo {
                ttft_p95_ms: Some(ttft_ms),
                tpot_p95_ms: Some(60.0),
                e2e_p95_ms: None,
            },
            tps: vec![1, 2, 4],
            grid_points: 8,
            duration_s: 15.0,
            ..Default::default()
        }
    }

    fn gpus(cfg: &PlanConfig) -> u64 {
        plan(cfg)
            .unwrap()
            .recommendation()
            .map_or(u64::MAX, |c| c.gpus)
    }

    #[test]
    fn more_developers_never_need_fewer_gpus() {
        let mut last = 0;
        for d in [200, 2000, 8000, 20000] {
            let g = gpus(&quick(d, 1000.0));
            assert!(g >= last, "{d} developers: {g} GPUs after {last}");
            last = g;
        }
        assert!(last > gpus(&quick(200, 1000.0)), "the fleet grows at all");
    }

    #[test]
    fn a_tighter_slo_never_needs_fewer_gpus() {
        let mut last = 0;
        for ttft in [4000.0, 1000.0, 300.0, 150.0] {
            let g = gpus(&quick(8000, ttft));
            assert!(g >= last, "TTFT ≤ {ttft} ms: {g} GPUs after {last}");
            last = g;
        }
        assert!(
            last > gpus(&quick(8000, 4000.0)),
            "the tightest SLO costs more"
        );
    }

    #[test]
    fn the_report_is_labelled_modelled_and_names_calibrated_coefficients() {
        let r = plan(&quick(2000, 1000.0)).unwrap();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["source"], MODELLED);
        assert!(json["coefficients"]["calibrated"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "mem_efficiency"));
        let text = render_text(&r);
        assert!(text.contains("MODELLED, not measured"), "{text}");
        let c = r.recommendation().unwrap();
        assert!(c.headroom >= 0.0);
        assert_eq!(c.gpus, c.replicas * c.tp as u64);
        assert!(c.replicas as f64 * c.capacity_per_replica_rps >= r.total_rate_per_s);
        assert!(r.slo.met_by(c.predicted.as_ref().unwrap()), "{c:?}");
    }

    #[test]
    fn a_model_that_does_not_fit_is_reported_not_planned() {
        let cfg = PlanConfig {
            gpu: GpuKind::L40s,
            tps: vec![1],
            ..quick(200, 1000.0)
        };
        let r = plan(&cfg).unwrap();
        assert!(r.recommended.is_none());
        assert!(r.candidates[0]
            .infeasible
            .as_ref()
            .unwrap()
            .contains("cannot hold"));
        let r = plan(&PlanConfig {
            slo: Slo::default(),
            ..quick(200, 1000.0)
        })
        .unwrap();
        assert_eq!(r.slo.ttft_p95_ms, Some(DEFAULT_TTFT_P95_MS));
        assert!(r.notes[0].contains("no SLO given: using p95 TTFT 200 ms"));
        assert!(render_text(&r).contains("note: no SLO given"));
    }
}
