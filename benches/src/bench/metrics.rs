//! Per-request measurements and the statistics `stral bench` reports over them.
//!
//! Owns the metric definitions. They follow vLLM's `benchmarks/benchmark_serving.py`
//! (`vllm bench serve`), so a number from `stral bench` means what the same name means
//! there:
//!
//! - **TTFT** (time to first token): from just before the request is written to the
//!   socket until the first streamed chunk that carries non-empty content arrives.
//!   Includes queueing and prefill on the server, and the network.
//! - **ITL** (inter-token latency): every gap between two successive content-carrying
//!   chunks of one request. One sample per gap, pooled over all completed requests (so
//!   long outputs weigh more). A chunk may carry more than one token (a server that
//!   batches its SSE writes), in which case one gap covers several tokens.
//! - **TPOT** (time per output token): per request, `(E2E − TTFT) / (output_tokens − 1)`;
//!   only for requests with more than one output token. One sample per request.
//! - **E2E** (end-to-end latency): from send until the stream ends (`[DONE]` or the end
//!   of the body).
//! - **Output tokens**: the server's `usage.completion_tokens` from the final chunk when
//!   it sends one (stral always does; OpenAI-compatible servers do when asked with
//!   `stream_options.include_usage`); otherwise the count of content chunks, and the
//!   report says which ([`TokenCountSource`]).
//! - **Request throughput**: completed requests / run duration; **output token
//!   throughput**: output tokens of completed requests / run duration. The duration runs
//!   from the first send to the end of the last request.
//! - **Goodput**: completed requests per second that met every SLO given (TTFT, TPOT,
//!   E2E); a request with one output token has no TPOT and passes that SLO (as in vLLM).
//! - **Cancelled**: requests the client abandoned (the keystroke workload drops a stale
//!   completion when the next keystroke fires, as IDE plugins do). They are neither
//!   completed nor failed, and are left out of the latency statistics — so in a
//!   keystroke run the statistics describe the completions that finished before the
//!   developer's next keystroke, which is what an IDE user ever sees.
//! - **Prediction tokens**: the server's `usage.completion_tokens_details`
//!   `accepted_prediction_tokens` (output tokens that were speculative drafts, from the
//!   request's `prediction` or the server's own lookup, accepted by verification) and
//!   `rejected_prediction_tokens` (drafts verified and rejected), summed over completed
//!   requests whose usage has them (OpenAI's and stral's do).
//! - **Failed**: connection errors, non-2xx answers, in-band `error` chunks, streams that
//!   end without `[DONE]`.
//!
//! Percentiles use linear interpolation between closest ranks, numpy's default
//! (`method="linear"`): for sorted `x` of length `n`, `p` → rank `r = p/100 · (n−1)`,
//! value `x[⌊r⌋] + (x[⌈r⌉] − x[⌊r⌋]) · (r − ⌊r⌋)`.
//!
//! Cost: summarising sorts each metric once, O(n log n) in the number of samples.

use serde::{Deserialize, Serialize};

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Cancelled,
    Failed(String),
}

/// Where a request's output token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountSource {
    /// The server's `usage.completion_tokens`.
    Usage,
    /// No usage was sent: the number of content-carrying chunks.
    Chunks,
}

/// What the client saw of one request. Times are seconds.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub outcome: Outcome,
    /// Send time, seconds since the run started.
    pub sent_at: f64,
    /// Time to the first content chunk, if one came.
    pub ttft: Option<f64>,
    /// Time to the end of the stream (or to the cancel/failure).
    pub e2e: f64,
    /// Gaps between successive content chunks.
    pub itl: Vec<f64>,
    pub output_tokens: u64,
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens the server served from its prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens`), when it says.
    pub cached_tokens: Option<u64>,
    /// Draft tokens the server accepted and rejected, when its usage says.
    pub predicted: Option<PredictionTokens>,
    pub token_source: TokenCountSource,
}

/// `usage.completion_tokens_details`' accepted and rejected prediction tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredictionTokens {
    pub accepted: u64,
    pub rejected: u64,
}

impl RequestRecord {
    /// `(E2E − TTFT) / (output_tokens − 1)`, for a completed request with more than one
    /// output token.
    pub fn tpot(&self) -> Option<f64> {
        match (self.outcome == Outcome::Completed, self.ttft) {
            (true, Some(ttft)) if self.output_tokens > 1 => {
                Some((self.e2e - ttft) / (self.output_tokens - 1) as f64)
            }
            _ => None,
        }
    }
}

/// Latency objectives; `None` means not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
}

impl Slo {
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2e_ms.is_none()
    }

    /// Whether a completed request met every objective given.
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        if r.outcome != Outcome::Completed {
            return false;
        }
        let ok_ttft = self
            .ttft_ms
            .is_none_or(|slo| r.ttft.is_some_and(|t| t * 1e3 <= slo));
        let ok_tpot = self
            .tpot_ms
            .is_none_or(|slo| r.tpot().is_none_or(|t| t * 1e3 <= slo));
        let ok_e2e = self.e2e_ms.is_none_or(|slo| r.e2e * 1e3 <= slo);
        ok_ttft && ok_tpot && ok_e2e
    }
}

/// Distribution summary of one metric, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// Summary of samples given in seconds, reported in milliseconds. All zeros (count 0)
    /// for an empty sample.
    pub fn from_seconds(samples: &[f64]) -> Stats {
        if samples.is_empty() {
            return Stats::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Stats {
            count: ms.len(),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            min: ms[0],
            p50: percentile_sorted(&ms, 50.0),
            p90: percentile_sorted(&ms, 90.0),
            p95: percentile_sorted(&ms, 95.0),
            p99: percentile_sorted(&ms, 99.0),
            max: ms[ms.len() - 1],
        }
    }
}

/// The `p`-th percentile (0–100) of an ascending, non-empty sample, interpolated
/// linearly between closest ranks (numpy's default).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of an empty sample");
    let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Requests per second that completed and met every objective.
pub fn goodput(records: &[RequestRecord], slo: &Slo, duration_s: f64) -> f64 {
    if duration_s <= 0.0 {
        return 0.0;
    }
    records.iter().filter(|r| slo.met_by(r)).count() as f64 / duration_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(ttft: f64, e2e: f64, tokens: u64) -> RequestRecord {
        RequestRecord {
            outcome: Outcome::Completed,
            sent_at: 0.0,
            ttft: Some(ttft),
            e2e,
            itl: Vec::new(),
            output_tokens: tokens,
            prompt_tokens: None,
            cached_tokens: None,
            predicted: None,
            token_source: TokenCountSource::Usage,
        }
    }

    #[test]
    fn percentiles_match_numpy_linear_on_a_hand_computed_sample() {
        // numpy.percentile([15, 20, 35, 40, 50], q) with the default method="linear":
        // q=50 → 35; q=90 → rank 3.6 → 40 + 0.6·10 = 46; q=95 → rank 3.8 → 48;
        // q=99 → rank 3.96 → 49.6; q=25 → rank 1 → 20; q=10 → rank 0.4 → 17.
        let x = [15.0, 20.0, 35.0, 40.0, 50.0];
        let cases = [
            (50.0, 35.0),
            (90.0, 46.0),
            (95.0, 48.0),
            (99.0, 49.6),
            (25.0, 20.0),
            (10.0, 17.0),
            (0.0, 15.0),
            (100.0, 50.0),
        ];
        for (p, want) in cases {
            let got = percentile_sorted(&x, p);
            assert!((got - want).abs() < 1e-9, "p{p}: got {got}, want {want}");
        }
        // Even-length sample: the median falls between the two middle values.
        assert!((percentile_sorted(&[1.0, 2.0, 3.0, 4.0], 50.0) - 2.5).abs() < 1e-12);
        assert_eq!(percentile_sorted(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn stats_convert_seconds_to_milliseconds_and_sort_the_sample() {
        let s = Stats::from_seconds(&[0.050, 0.015, 0.040, 0.020, 0.035]);
        assert_eq!(s.count, 5);
        assert!((s.mean - 32.0).abs() < 1e-9);
        assert!((s.min - 15.0).abs() < 1e-9 && (s.max - 50.0).abs() < 1e-9);
        assert!((s.p50 - 35.0).abs() < 1e-9);
        assert!((s.p90 - 46.0).abs() < 1e-9);
        assert!((s.p99 - 49.6).abs() < 1e-9);
        assert_eq!(Stats::from_seconds(&[]).count, 0);
    }

    #[test]
    fn tpot_excludes_the_first_token_and_needs_two_tokens() {
        // 0.1 s to the first token, 1.0 s in all, 10 tokens → 0.9 s over 9 gaps.
        assert!((completed(0.1, 1.0, 10).tpot().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(completed(0.1, 1.0, 1).tpot(), None);
        let mut cancelled = completed(0.1, 1.0, 10);
        cancelled.outcome = Outcome::Cancelled;
        assert_eq!(cancelled.tpot(), None);
    }

    #[test]
    fn goodput_counts_completed_requests_meeting_every_slo() {
        let records = vec![
            completed(0.100, 1.0, 10),  // ttft 100 ms, tpot 100 ms: meets both
            completed(0.300, 1.2, 10),  // ttft 300 ms: misses the TTFT SLO
            completed(0.100, 2.0, 10),  // tpot 211 ms: misses the TPOT SLO
            completed(0.150, 0.150, 1), // one token: no TPOT, meets
            RequestRecord {
                outcome: Outcome::Cancelled,
                ..completed(0.05, 0.06, 2)
            },
            RequestRecord {
                outcome: Outcome::Failed("boom".into()),
                ..completed(0.05, 0.06, 2)
            },
        ];
        let slo = Slo {
            ttft_ms: Some(200.0),
            tpot_ms: Some(150.0),
            e2e_ms: None,
        };
        // 2 good requests over 4 s.
        assert!((goodput(&records, &slo, 4.0) - 0.5).abs() < 1e-12);
        // No SLO: every completed request is good (4 over 4 s).
        assert!((goodput(&records, &Slo::default(), 4.0) - 1.0).abs() < 1e-12);
        // An E2E SLO alone: 1.0, 0.15 s pass; 1.2 and 2.0 s miss.
        let e2e = Slo {
            e2e_ms: Some(1000.0),
            ..Slo::default()
        };
        assert!((goodput(&records, &e2e, 2.0) - 1.0).abs() < 1e-12);
    }
}
