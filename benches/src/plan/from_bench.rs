//! `stral plan --from-bench r.json`: the workload and the coordinator's per-step
//! overhead taken from a `stral bench --json-out` run against a real deployment (stral
//! or any compatible server) instead of the planner's defaults, each with a note of
//! where its number came from.
//!
//! From the report's last run that completed requests:
//! - arrival rate: an open-loop run's offered rate; a closed-loop run's achieved
//!   request throughput (its concurrency limited it: a lower bound of the demand);
//! - prompt and output tokens: server-reported usage per completed request (mean);
//! - prefix-cache hit rate: `prompt_tokens_details.cached_tokens` ÷ prompt tokens,
//!   0 when the server did not report it;
//! - per-step overhead: p50 TPOT minus the step-time model's decode step for the
//!   deployment's GPU and TP at the run's mean decode batch (Little's law: rate × mean
//!   E2E) — an estimate that is only as good as the model for that GPU.

use worker::sim::StepTimeModel;

use super::{HostOverhead, PlanConfig, PlanError, Workload};
use crate::bench::report::BenchReport;
use crate::bench::Load;

/// What a bench report gives the planner.
#[derive(Clone, Debug)]
pub struct FromBench {
    pub workload: Workload,
    /// `None` when it could not be estimated (the defaults stay).
    pub host: Option<HostOverhead>,
    /// One line per number taken, saying where it came from.
    pub notes: Vec<String>,
}

/// Derives the workload and overhead from `report` (read from `source`), for a
/// deployment of `bench_tp` ranks on `cfg.gpu`; `cfg` supplies the model and the
/// defaults.
pub fn from_bench(
    report: &BenchReport,
    source: &str,
    cfg: &PlanConfig,
    bench_tp: usize,
) -> Result<FromBench, PlanError> {
    let input = |m: String| PlanError::Input(format!("--from-bench {source}: {m}"));
    let (index, run) = report
        .runs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, r)| r.completed > 0)
        .ok_or_else(|| input("no run completed a request".into()))?;
    let which = format!(
        "{source}, run {} of {} ({}, {} completed)",
        index + 1,
        report.runs.len(),
        run.label(),
        run.completed
    );
    let mut notes = Vec::new();
    let rate = match run.load {
        Load::Open { rate } => {
            notes.push(format!(
                "arrival rate {rate:.3} requests/s: the offered rate of {which}"
            ));
            rate
        }
        Load::Closed { .. } => {
            notes.push(format!(
                "arrival rate {:.3} requests/s: the achieved throughput of closed-loop {which} (its concurrency limited it, so the real demand may be higher)",
                run.request_throughput
            ));
            run.request_throughput
        }
    };
    let completed = run.completed as f64;
    let prompt_total = run.total_input_tokens.ok_or_else(|| {
        input("the server reported no prompt tokens (usage); rerun against a server that reports usage, or plan with --prompt-tokens".into())
    })?;
    let prompt_tokens = (prompt_total as f64 / completed).round().max(1.0) as usize;
    notes.push(format!(
        "prompt tokens {prompt_tokens}: the server-reported mean of {which}"
    ));
    let output_tokens = (run.total_output_tokens as f64 / completed)
        .round()
        .max(1.0) as usize;
    notes.push(format!(
        "output tokens {output_tokens}: the mean of {which}, counted from {}",
        run.output_tokens_counted_from
    ));
    let hit = match run.prefix_cache_hit_rate {
        Some(h) => {
            notes.push(format!(
                "prefix-cache hit rate {:.1}%: cached ÷ prompt tokens in {which}",
                h * 100.0
            ));
            h.clamp(0.0, 0.99)
        }
        None => {
            notes.push(format!(
                "prefix-cache hit rate 0: {which} carries no cached-token counts (the server did not report them)"
            ));
            0.0
        }
    };
    let host = estimate_overhead(cfg, bench_tp, rate, prompt_tokens, output_tokens, run)
        .map_err(&input)?;
    match &host {
        Some((h, text)) => notes.push(format!("per-step overhead {:.0} µs: {text}", h.per_step_us)),
        None => notes.push(format!(
            "per-step overhead: not estimated ({which} has no TPOT); the default stays"
        )),
    }
    Ok(FromBench {
        workload: Workload {
            prompt_tokens,
            output_tokens,
            prefix_cache_hit_rate: hit,
            arrival_rate_per_s: Some(rate),
            ..cfg.workload.clone()
        },
        host: host.map(|(h, _)| h),
        notes,
    })
}

fn estimate_overhead(
    cfg: &PlanConfig,
    tp: usize,
    rate: f64,
    prompt_tokens: usize,
    output_tokens: usize,
    run: &crate::bench::report::RunReport,
) -> Result<Option<(HostOverhead, String)>, String> {
    if run.tpot_ms.count == 0 {
        return Ok(None);
    }
    let model = StepTimeModel::new(cfg.model.clone(), cfg.gpu.spec(), tp)
        .and_then(|m| m.with_weights(cfg.weights))
        .map_err(|e| format!("--bench-tp {tp}: {e}"))?;
    let batch = (rate * run.e2e_ms.mean / 1e3)
        .round()
        .clamp(1.0, cfg.max_num_seqs as f64) as usize;
    let context = (prompt_tokens + output_tokens / 2) as u32;
    let modelled_ms = model.decode_step(batch, context).total_us / 1e3;
    let per_seq_us = cfg.host.per_seq_us;
    let over_us = run.tpot_ms.p50 * 1e3 - modelled_ms * 1e3 - per_seq_us * batch as f64;
    let text = format!(
        "p50 TPOT {:.2} ms − the modelled decode step {modelled_ms:.2} ms ({} TP {tp}, batch {batch} by Little's law) − {per_seq_us} µs × {batch} per sequence{}",
        run.tpot_ms.p50,
        cfg.gpu.name(),
        if over_us < 0.0 {
            "; negative, so 0: the deployment decodes faster than the model predicts for this GPU"
        } else {
            ""
        }
    );
    Ok(Some((
        HostOverhead {
            per_step_us: over_us.max(0.0),
            per_seq_us,
        },
        text,
    )))
}
