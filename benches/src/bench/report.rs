//! The results of `stral bench`: one [`RunReport`] per load level, the JSON file, and
//! the text summary printed at the end.
//!
//! JSON shape (`--json-out`; stable, read back by [`BenchReport::read_json`]): the
//! settings (`url`, `endpoint`, `model`, `workload`, `seed`, `slo`) and `runs`, one
//! object per load level with counts (`sent = completed + cancelled + failed`),
//! throughputs (per second of run duration), `prefix_cache_hit_rate` (cached ÷ prompt
//! tokens where the server reported them, else `null`), `goodput` (requests/s meeting the SLO,
//! `null` when no SLO was given), `output_tokens_counted_from` (`usage`, `chunks`,
//! `mixed` or `none`), `accepted_prediction_tokens` / `rejected_prediction_tokens`
//! (summed from usage over completed requests; `null` when no usage had them), and `ttft_ms`, `tpot_ms`, `itl_ms`, `e2e_ms` summaries (count,
//! mean, min, p50, p90, p95, p99, max), over completed requests. Definitions:
//! [`super::metrics`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::client::Endpoint;
use super::metrics::{
    goodput, Outcome, PredictionTokens, RequestRecord, Slo, Stats, TokenCountSource,
};
use super::workload::Workload;
use super::{BenchConfig, BenchError, Load};

/// How many distinct error messages a run keeps.
const MAX_ERROR_KINDS: usize = 20;

/// Summary of one run at one load level.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub load: Load,
    /// First send to the end of the last request, seconds.
    pub duration_s: f64,
    pub sent: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Failure messages and how often each occurred.
    pub errors: BTreeMap<String, u64>,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second.
    pub output_token_throughput: f64,
    /// Prompt tokens (server-reported) of completed requests per second; `null` when the
    /// server reports no usage.
    pub input_token_throughput: Option<f64>,
    pub total_output_tokens: u64,
    pub total_input_tokens: Option<u64>,
    /// Share of prompt tokens served from the server's prefix cache, over the completed
    /// requests whose usage said (`prompt_tokens_details.cached_tokens`); `null` when
    /// none did (older reports lack the field).
    #[serde(default)]
    pub prefix_cache_hit_rate: Option<f64>,
    /// Speculative draft tokens accepted (among the output tokens) and rejected, summed
    /// over the completed requests whose usage said; `null` when none did.
    #[serde(default)]
    pub accepted_prediction_tokens: Option<u64>,
    #[serde(default)]
    pub rejected_prediction_tokens: Option<u64>,
    /// Completed requests per second that met every SLO; `null` without an SLO.
    pub goodput: Option<f64>,
    pub output_tokens_counted_from: String,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
}

impl RunReport {
    pub fn new(load: Load, records: &[RequestRecord], duration_s: f64, slo: &Slo) -> RunReport {
        let done: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Completed)
            .collect();
        let count =
            |f: fn(&Outcome) -> bool| records.iter().filter(|r| f(&r.outcome)).count() as u64;
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for r in records {
            if let Outcome::Failed(e) = &r.outcome {
                if errors.len() < MAX_ERROR_KINDS || errors.contains_key(e) {
                    *errors.entry(e.clone()).or_default() += 1;
                }
            }
        }
        let total_output_tokens: u64 = done.iter().map(|r| r.output_tokens).sum();
        let total_input_tokens = done
            .iter()
            .map(|r| r.prompt_tokens)
            .sum::<Option<u64>>()
            .filter(|_| !done.is_empty());
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let from_usage = done
            .iter()
            .filter(|r| r.token_source == TokenCountSource::Usage)
            .count();
        let counted_from = match from_usage {
            _ if done.is_empty() => "none",
            n if n == done.len() => "usage",
            0 => "chunks",
            _ => "mixed",
        };
        let (cached, of) = done
            .iter()
            .filter_map(|r| Some((r.cached_tokens?, r.prompt_tokens?)))
            .fold((0u64, 0u64), |(c, p), (rc, rp)| (c + rc, p + rp));
        let predicted = done
            .iter()
            .filter_map(|r| r.predicted)
            .reduce(|a, b| PredictionTokens {
                accepted: a.accepted + b.accepted,
                rejected: a.rejected + b.rejected,
            });
        let ttft: Vec<f64> = done.iter().filter_map(|r| r.ttft).collect();
        let tpot: Vec<f64> = done.iter().filter_map(|r| r.tpot()).collect();
        let itl: Vec<f64> = done.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let e2e: Vec<f64> = done.iter().map(|r| r.e2e).collect();
        RunReport {
            load,
            duration_s,
            sent: records.len() as u64,
            completed: done.len() as u64,
            cancelled: count(|o| *o == Outcome::Cancelled),
            failed: count(|o| matches!(o, Outcome::Failed(_))),
            errors,
            request_throughput: per_s(done.len() as f64),
            output_token_throughput: per_s(total_output_tokens as f64),
            input_token_throughput: total_input_tokens.map(|t| per_s(t as f64)),
            total_output_tokens,
            total_input_tokens,
            prefix_cache_hit_rate: (of > 0).then(|| cached as f64 / of as f64),
            accepted_prediction_tokens: predicted.map(|p| p.accepted),
            rejected_prediction_tokens: predicted.map(|p| p.rejected),
            goodput: (!slo.is_empty()).then(|| goodput(records, slo, duration_s)),
            output_tokens_counted_from: counted_from.to_string(),
            ttft_ms: Stats::from_seconds(&ttft),
            tpot_ms: Stats::from_seconds(&tpot),
            itl_ms: Stats::from_seconds(&itl),
            e2e_ms: Stats::from_seconds(&e2e),
        }
    }

    /// "concurrency 4" / "rate 2.5/s".
    pub fn label(&self) -> String {
        match self.load {
            Load::Closed { concurrency } => format!("concurrency {concurrency}"),
            Load::Open { rate } => format!("rate {rate}/s"),
        }
    }
}

/// A whole `stral bench` invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub workload: Workload,
    pub seed: u64,
    pub duration_limit_s: Option<f64>,
    pub num_requests_limit: Option<u64>,
    pub slo: Slo,
    pub runs: Vec<RunReport>,
    /// Per run, the raw samples (seconds) the plots are drawn from; not serialised.
    #[serde(skip)]
    pub samples: Vec<Vec<RequestRecord>>,
}

impl BenchReport {
    pub fn new(
        config: &BenchConfig,
        model: &str,
        runs: Vec<(RunReport, Vec<RequestRecord>)>,
    ) -> Self {
        let (runs, samples) = runs.into_iter().unzip();
        BenchReport {
            url: config.url.clone(),
            endpoint: config.endpoint,
            model: model.to_string(),
            workload: config.workload.clone(),
            seed: config.seed,
            duration_limit_s: config.duration.map(|d| d.as_secs_f64()),
            num_requests_limit: config.num_requests,
            slo: config.slo,
            runs,
            samples,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).expect("report serialises");
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a file written by [`BenchReport::write_json`] (without raw samples).
    pub fn read_json(path: &Path) -> Result<BenchReport, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The human-readable summary (vLLM `bench serve` style).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "stral bench: {} workload, {} {} model {:?}, seed {}",
            self.workload.name(),
            self.url,
            self.endpoint.path(),
            self.model,
            self.seed
        );
        for run in &self.runs {
            let _ = writeln!(s, "============ {} ============", run.label());
            let line = |s: &mut String, k: &str, v: String| {
                let _ = writeln!(s, "{k:<40}{v:>14}");
            };
            line(&mut s, "Duration (s):", format!("{:.2}", run.duration_s));
            line(&mut s, "Requests sent:", run.sent.to_string());
            line(&mut s, "  completed:", run.completed.to_string());
            line(
                &mut s,
                "  cancelled (not failures):",
                run.cancelled.to_string(),
            );
            line(&mut s, "  failed:", run.failed.to_string());
            line(
                &mut s,
                "Request throughput (req/s):",
                format!("{:.2}", run.request_throughput),
            );
            line(
                &mut s,
                "Output token throughput (tok/s):",
                format!("{:.1}", run.output_token_throughput),
            );
            if let Some(t) = run.input_token_throughput {
                line(&mut s, "Input token throughput (tok/s):", format!("{t:.1}"));
            }
            if let Some(h) = run.prefix_cache_hit_rate {
                line(
                    &mut s,
                    "Prefix-cache hit rate (prompt tokens):",
                    format!("{:.1}%", h * 100.0),
                );
            }
            if let (Some(a), Some(r)) = (
                run.accepted_prediction_tokens,
                run.rejected_prediction_tokens,
            ) {
                line(&mut s, "Accepted prediction tokens:", a.to_string());
                line(&mut s, "Rejected prediction tokens:", r.to_string());
                if a + r > 0 {
                    line(
                        &mut s,
                        "Draft acceptance (accepted / verified):",
                        format!("{:.1}%", 100.0 * a as f64 / (a + r) as f64),
                    );
                }
            }
            line(
                &mut s,
                "Output tokens counted from:",
                run.output_tokens_counted_from.clone(),
            );
            if let Some(g) = run.goodput {
                line(&mut s, "Goodput under the SLO (req/s):", format!("{g:.2}"));
            }
            for (name, st) in [
                ("TTFT", &run.ttft_ms),
                ("TPOT", &run.tpot_ms),
                ("ITL", &run.itl_ms),
                ("E2E", &run.e2e_ms),
            ] {
                let _ = writeln!(
                    s,
                    "{name:<5} ms  mean {:>9.2}  p50 {:>9.2}  p90 {:>9.2}  p95 {:>9.2}  p99 {:>9.2}  (n={})",
                    st.mean, st.p50, st.p90, st.p95, st.p99, st.count
                );
            }
            for (e, n) in &run.errors {
                let _ = writeln!(s, "error ×{n}: {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(outcome: Outcome, ttft: f64, e2e: f64, tokens: u64) -> RequestRecord {
        RequestRecord {
            outcome,
            sent_at: 0.0,
            ttft: Some(ttft),
            e2e,
            itl: vec![(e2e - ttft) / 2.0; 2],
            output_tokens: tokens,
            prompt_tokens: Some(10),
            cached_tokens: None,
            predicted: None,
            token_source: TokenCountSource::Usage,
        }
    }

    #[test]
    fn run_report_counts_add_up_and_cancelled_are_not_failures() {
        let records = vec![
            rec(Outcome::Completed, 0.1, 0.5, 5),
            rec(Outcome::Completed, 0.2, 0.6, 5),
            rec(Outcome::Cancelled, 0.0, 0.05, 0),
            rec(Outcome::Failed("HTTP 429: busy".into()), 0.0, 0.01, 0),
        ];
        let r = RunReport::new(
            Load::Closed { concurrency: 2 },
            &records,
            2.0,
            &Slo::default(),
        );
        assert_eq!((r.sent, r.completed, r.cancelled, r.failed), (4, 2, 1, 1));
        assert_eq!(r.errors.get("HTTP 429: busy"), Some(&1));
        assert!((r.request_throughput - 1.0).abs() < 1e-12);
        assert!((r.output_token_throughput - 5.0).abs() < 1e-12);
        assert_eq!(r.total_input_tokens, Some(20));
        assert_eq!(r.goodput, None);
        assert_eq!(r.output_tokens_counted_from, "usage");
        // Latency statistics cover the two completed requests only.
        assert_eq!(r.ttft_ms.count, 2);
        assert!((r.ttft_ms.mean - 150.0).abs() < 1e-9);
        assert_eq!(r.itl_ms.count, 4);
        // TPOT = (E2E − TTFT) / (tokens − 1): 0.4/4 and 0.4/4 → 100 ms.
        assert!((r.tpot_ms.p50 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn report_json_round_trips() {
        let records = vec![rec(Outcome::Completed, 0.1, 0.5, 5)];
        let run = RunReport::new(Load::Open { rate: 2.0 }, &records, 1.0, &Slo::default());
        let config = BenchConfig::default();
        let report = BenchReport::new(&config, "m", vec![(run, records)]);
        let dir = std::env::temp_dir().join(format!("stral-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.json");
        report.write_json(&path).unwrap();
        let back = BenchReport::read_json(&path).unwrap();
        assert_eq!(back.runs[0].completed, 1);
        assert_eq!(back.runs[0].load, Load::Open { rate: 2.0 });
        assert_eq!(back.model, "m");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
