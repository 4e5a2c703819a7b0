//! `stral plan --verify`: one candidate's prediction checked against the real
//! coordinator and scheduler under the same load.
//!
//! Method: the caller starts a `stral serve --worker-backend sim` replica with the
//! candidate's TP and the plan's scheduler settings — the real HTTP front end,
//! tokenizer, engine loop and scheduler, over sim workers whose every step lasts the
//! same step-time model's time (no GPU, no math). [`verify`] drives it with the
//! planner's workload through `stral bench` (fixed prompt and output lengths, Poisson
//! arrivals, FIM) at fractions of the candidate's predicted capacity, and replays the
//! very arrival times the bench sent through the planner's simulation, so the two
//! differ by the model only, not by sampling. Error = observed ÷ predicted − 1.
//!
//! What this checks: the simulation's model of batching, chunked prefill, queueing and
//! the coordinator's per-step overhead. It does not check the step-time model itself —
//! both sides use it; only a GPU run can.
//!
//! Costs: `seconds` of wall time per level plus the drain of the requests in flight;
//! the client and the server share this machine's cores, which the prediction's host
//! overhead (measured on a 2-core VM) only partly covers.

use std::time::Duration;

use serde::Serialize;

use super::{predict, Candidate, LoadResult, PlanConfig, PlanError};
use crate::bench::client::Endpoint;
use crate::bench::report::RunReport;
use crate::bench::workload::{FixedConfig, Workload as BenchWorkload};
use crate::bench::{self, BenchConfig, Load};

/// How to verify.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// `http://host:port` of the sim replica.
    pub url: String,
    /// Loads, as fractions of the candidate's predicted capacity per replica.
    pub fractions: Vec<f64>,
    /// Seconds of arrivals per load level.
    pub seconds: f64,
    pub seed: u64,
    /// Draw `stral bench`'s progress bar (on a terminal).
    pub progress: bool,
}

impl VerifyConfig {
    /// Rejects settings no run can use (checked before planning, so a typo costs no
    /// simulation, and again by [`verify`]).
    pub fn validate(&self) -> Result<(), PlanError> {
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if positive(self.seconds)
            && !self.fractions.is_empty()
            && self.fractions.iter().all(|&f| positive(f))
        {
            Ok(())
        } else {
            Err(PlanError::Input(
                "--verify-seconds and every --verify-loads level must be positive".into(),
            ))
        }
    }
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            fractions: vec![0.5, 0.8, 1.0],
            seconds: 30.0,
            seed: 1,
            progress: false,
        }
    }
}

/// What the real replica did at one load level.
#[derive(Clone, Debug, Serialize)]
pub struct Observed {
    pub sent: u64,
    pub completed: u64,
    pub failed: u64,
    /// Completed requests per second of the run.
    pub request_throughput: f64,
    pub ttft_p95_ms: f64,
    pub tpot_p95_ms: f64,
    /// Server-reported prompt tokens per completed request (the prediction assumes
    /// the plan's `prompt_tokens`; FIM adds a few template tokens).
    pub prompt_tokens_mean: Option<f64>,
}

impl Observed {
    fn from_run(r: &RunReport) -> Self {
        Self {
            sent: r.sent,
            completed: r.completed,
            failed: r.failed,
            request_throughput: r.request_throughput,
            ttft_p95_ms: r.ttft_ms.p95,
            tpot_p95_ms: r.tpot_ms.p95,
            prompt_tokens_mean: r
                .total_input_tokens
                .filter(|_| r.completed > 0)
                .map(|t| t as f64 / r.completed as f64),
        }
    }
}

/// Predicted vs observed at one load level.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyRow {
    pub tp: usize,
    /// Offered load as a fraction of the predicted capacity per replica.
    pub fraction: f64,
    pub rate_per_s: f64,
    pub predicted: LoadResult,
    pub observed: Observed,
    /// `observed ÷ predicted − 1` of p95 TTFT, p95 TPOT and request throughput (the
    /// predicted throughput is the offered rate: below capacity every request
    /// completes).
    pub ttft_p95_error: f64,
    pub tpot_p95_error: f64,
    pub throughput_error: f64,
}

fn rel_error(observed: f64, predicted: f64) -> f64 {
    if predicted > 0.0 {
        observed / predicted - 1.0
    } else {
        f64::NAN
    }
}

/// Runs every level of `v` against the replica at `v.url`, which serves `cand.tp`
/// ranks with `cfg`'s scheduler settings, and the prediction at the same rates.
pub async fn verify(
    cfg: &PlanConfig,
    cand: &Candidate,
    v: &VerifyConfig,
) -> Result<Vec<VerifyRow>, PlanError> {
    if cand.infeasible.is_some() || cand.capacity_per_replica_rps <= 0.0 {
        return Err(PlanError::Input(format!(
            "TP {} has no predicted capacity to verify",
            cand.tp
        )));
    }
    v.validate()?;
    let w = &cfg.workload;
    let mut rows = Vec::new();
    for (level, &fraction) in v.fractions.iter().enumerate() {
        let rate = fraction * cand.capacity_per_replica_rps;
        let bench_cfg = BenchConfig {
            url: v.url.clone(),
            endpoint: Endpoint::Fim,
            workload: BenchWorkload::Fixed(FixedConfig {
                input_tokens: w.prompt_tokens as u32,
                output_tokens: w.output_tokens as u32,
            }),
            load: Load::Open { rate },
            duration: Some(Duration::from_secs_f64(v.seconds)),
            seed: v.seed.wrapping_add(level as u64),
            progress: v.progress,
            plot_formats: bench::PlotFormats::default(),
            ..BenchConfig::default()
        };
        let report = bench::run(&bench_cfg)
            .await
            .map_err(|e| PlanError::Verify(format!("{:.0} % load: {e}", fraction * 100.0)))?;
        let run = report
            .runs
            .first()
            .ok_or_else(|| PlanError::Verify("stral bench reported no run".into()))?;
        let observed = Observed::from_run(run);
        let mut sent: Vec<f64> = report
            .samples
            .first()
            .map(|records| records.iter().map(|r| r.sent_at).collect())
            .unwrap_or_default();
        sent.sort_by(f64::total_cmp);
        let predicted = predict(cfg, cand.tp, rate, sent)?;
        rows.push(VerifyRow {
            tp: cand.tp,
            fraction,
            rate_per_s: rate,
            ttft_p95_error: rel_error(observed.ttft_p95_ms, predicted.ttft_p95_ms),
            tpot_p95_error: rel_error(observed.tpot_p95_ms, predicted.tpot_p95_ms),
            throughput_error: rel_error(observed.request_throughput, rate),
            predicted,
            observed,
        });
    }
    Ok(rows)
}

/// The comparison as a table for a terminal.
pub fn render_verify(rows: &[VerifyRow], seconds: f64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nverify: predicted vs observed on the real coordinator and scheduler (stral serve --worker-backend sim: the same step-time model, no GPU), {seconds} s of arrivals per level"
    );
    let _ = writeln!(
        s,
        "{:>3} {:>5} {:>8} | {:>21} {:>7} | {:>21} {:>7} | {:>17} {:>7} | {:>6}",
        "TP",
        "load",
        "req/s",
        "p95 TTFT ms pred/obs",
        "err",
        "p95 TPOT ms pred/obs",
        "err",
        "req/s pred/obs",
        "err",
        "failed"
    );
    let pct = |e: f64| {
        if e.is_finite() {
            format!("{:+.1}%", e * 100.0)
        } else {
            "-".into()
        }
    };
    for r in rows {
        let _ = writeln!(
            s,
            "{:>3} {:>4.0}% {:>8.2} | {:>10.1} {:>10.1} {:>7} | {:>10.2} {:>10.2} {:>7} | {:>8.2} {:>8.2} {:>7} | {:>6}",
            r.tp,
            r.fraction * 100.0,
            r.rate_per_s,
            r.predicted.ttft_p95_ms,
            r.observed.ttft_p95_ms,
            pct(r.ttft_p95_error),
            r.predicted.tpot_p95_ms,
            r.observed.tpot_p95_ms,
            pct(r.tpot_p95_error),
            r.rate_per_s,
            r.observed.request_throughput,
            pct(r.throughput_error),
            r.observed.failed
        );
    }
    s
}
