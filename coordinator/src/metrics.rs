//! Prometheus metrics (HTTP layer and engine), rendered in the text exposition format.
//!
//! Lock-free on the hot path: counters and histogram buckets are atomics; the only
//! lock guards the (endpoint, status) request counter map, touched once per request.
//! Engine gauges (queue, KV blocks, prefix-cache hits, step time, the group's step
//! cost model and step-time target) are read from the engine's snapshot at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::draft::DraftSource;
use crate::engine::EngineStats;
use crate::histogram::Histogram;

/// Everything the HTTP layer counts.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub aborted: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Speculative decoding: the drafts whose outcome reached a client.
    pub spec: SpecCounters,
}

/// Buckets of the acceptance-length histogram: 0..=ACCEPT_LEN_BUCKETS − 1 accepted
/// tokens, the last bucket holding that many or more.
pub const ACCEPT_LEN_BUCKETS: usize = 17;

/// Speculation counters since start, by [`DraftSource`] (index `source as usize`), and
/// how many tokens each verified draft had accepted. They count what the clients
/// received, as usage's `completion_tokens_details` does: the HTTP layer records a
/// step's draft once its last token was delivered, or, when the request ended inside
/// the draft (a stop string, EOS, a client gone), the accepted drafts delivered before
/// the end, so a draft accepted past a stop is not counted. Atomics: one record per
/// speculating sequence and step.
#[derive(Debug, Default)]
pub struct SpecCounters {
    drafted: [AtomicU64; 2],
    accepted: [AtomicU64; 2],
    /// Verified drafts by accepted length (the last bucket: that many or more).
    accept_len: [AtomicU64; ACCEPT_LEN_BUCKETS],
}

impl SpecCounters {
    /// Records one verified draft: `accepted` accepted tokens and `rejected` rejected
    /// ones reached the client. Nothing verified, nothing recorded.
    pub fn record(&self, source: DraftSource, accepted: u32, rejected: u32) {
        if accepted + rejected == 0 {
            return;
        }
        let at = source as usize;
        self.drafted[at].fetch_add(u64::from(accepted + rejected), Ordering::Relaxed);
        self.accepted[at].fetch_add(u64::from(accepted), Ordering::Relaxed);
        self.accept_len[(accepted as usize).min(ACCEPT_LEN_BUCKETS - 1)]
            .fetch_add(1, Ordering::Relaxed);
    }

    fn drafted(&self) -> [u64; 2] {
        self.drafted.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    fn accepted(&self) -> [u64; 2] {
        self.accepted.each_ref().map(|c| c.load(Ordering::Relaxed))
    }
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((endpoint, status))
            .or_default() += 1;
    }

    /// The whole exposition, engine gauges included.
    pub fn render(&self, engine: &EngineStats, ready: bool) -> String {
        let mut out = String::with_capacity(8192);
        render_gauges(&mut out, engine, ready);
        self.render_counters(&mut out, engine);
        self.render_latencies(&mut out, engine);
        out
    }

    /// Token, abort, step and preemption counters, and requests by endpoint and status.
    fn render_counters(&self, out: &mut String, engine: &EngineStats) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "stral_prompt_tokens_total",
                "Prompt tokens admitted.",
                load(&self.prompt_tokens),
            ),
            (
                "stral_generation_tokens_total",
                "Tokens generated.",
                load(&self.generation_tokens),
            ),
            (
                "stral_requests_aborted_total",
                "Requests aborted by their client.",
                load(&self.aborted),
            ),
            (
                "stral_engine_steps_total",
                "Engine steps executed.",
                engine.steps,
            ),
            (
                "stral_preemptions_total",
                "Sequences preempted by recompute.",
                engine.preemptions,
            ),
            (
                "stral_worker_restarts_total",
                "Worker groups brought back after a crash.",
                engine.worker_restarts,
            ),
            (
                "stral_requests_recovered_total",
                "Requests recomputed on a new worker group after a crash.",
                engine.requests_recovered,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        render_spec(out, &self.spec);
        let _ = writeln!(out, "# HELP stral_requests_total HTTP requests by endpoint and status.\n# TYPE stral_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "stral_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
    }

    /// The request latency histograms, then the engine's step-time histograms.
    fn render_latencies(&self, out: &mut String, engine: &EngineStats) {
        for (h, name, help) in [
            (&self.ttft, "stral_time_to_first_token_seconds", "Time from request arrival to its first token."),
            (&self.itl, "stral_inter_token_latency_seconds", "Time between consecutive tokens of a request."),
            (&self.e2e, "stral_e2e_request_latency_seconds", "Time from request arrival to its last token."),
            (&*engine.step_time, "stral_step_duration_seconds", "Wall time of one engine step (schedule, execute, update)."),
            (&*engine.recovery_time, "stral_recovery_seconds", "Time from losing the worker group to the next one serving."),
            (&engine.phases.engine, "stral_step_engine_seconds", "Per step, the engine's critical path: schedule, plan, submit, and the update after the answers."),
            (&engine.phases.worker, "stral_step_worker_seconds", "Per step, the longest time a worker rank reported (checks, forward pass, sampling)."),
            (&engine.phases.transport, "stral_step_transport_seconds", "Per step, wall time outside the engine and the workers: gRPC encode/decode, network, wake-ups."),
        ] {
            h.render(out, name, help);
        }
    }
}

/// The speculation counters by draft source, and the acceptance-length histogram.
fn render_spec(out: &mut String, spec: &SpecCounters) {
    let (drafted, accepted) = (spec.drafted(), spec.accepted());
    for (name, help, value) in [
        (
            "stral_spec_draft_tokens_total",
            "Speculative draft tokens verified for output that reached a client, by draft source.",
            drafted,
        ),
        (
            "stral_spec_accepted_tokens_total",
            "Speculative draft tokens accepted and delivered, by draft source.",
            accepted,
        ),
        (
            "stral_spec_rejected_tokens_total",
            "Speculative draft tokens rejected, by draft source.",
            [0, 1].map(|i| drafted[i] - accepted[i]),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for source in DraftSource::ALL {
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\"}} {}",
                source.label(),
                value[source as usize]
            );
        }
    }
    let name = "stral_spec_acceptance_length";
    let _ = writeln!(
        out,
        "# HELP {name} Draft tokens accepted per verified draft.\n# TYPE {name} histogram"
    );
    let sum: u64 = accepted.iter().sum();
    let mut cumulative = 0;
    for (len, n) in spec.accept_len.iter().enumerate() {
        cumulative += n.load(Ordering::Relaxed);
        if len + 1 < ACCEPT_LEN_BUCKETS {
            let _ = writeln!(out, "{name}_bucket{{le=\"{len}\"}} {cumulative}");
        }
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}"
    );
}

/// Readiness, queue, KV-cache and prefix-cache gauges from the engine's snapshot.
fn render_gauges(out: &mut String, engine: &EngineStats, ready: bool) {
    let kv_usage = if engine.kv_blocks_total > 0 {
        engine.kv_blocks_used as f64 / engine.kv_blocks_total as f64
    } else {
        0.0
    };
    for (name, help, v) in [
        (
            "stral_ready",
            "1 when a worker group is loaded and serving.",
            ready as u8 as f64,
        ),
        (
            "stral_queue_depth",
            "Requests waiting to be scheduled.",
            engine.waiting as f64,
        ),
        (
            "stral_requests_running",
            "Sequences holding KV blocks (prefilling or decoding).",
            engine.running as f64,
        ),
        (
            "stral_requests_waiting",
            "Sequences waiting for admission.",
            engine.waiting as f64,
        ),
        (
            "stral_kv_blocks_used",
            "KV cache blocks referenced by sequences.",
            engine.kv_blocks_used as f64,
        ),
        (
            "stral_kv_blocks_total",
            "KV cache blocks in the pool.",
            engine.kv_blocks_total as f64,
        ),
        (
            "stral_kv_usage_ratio",
            "Fraction of KV cache blocks in use.",
            kv_usage,
        ),
        (
            "stral_prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache.",
            engine.prefix_cache_hit_rate,
        ),
        (
            "stral_step_cost_fixed_ms",
            "Step cost model of the worker group (slowest rank, measured at start-up): ms per step.",
            engine.step_cost.fixed_ms,
        ),
        (
            "stral_step_cost_per_token_ms",
            "Step cost model of the worker group: ms per token computed.",
            engine.step_cost.per_token_ms,
        ),
        (
            "stral_step_cost_per_context_token_ms",
            "Step cost model of the worker group: ms per KV position read (position + tokens, per sequence).",
            engine.step_cost.per_context_token_ms,
        ),
        (
            "stral_max_step_ms",
            "Predicted step time that prefill is capped to (--max-step-ms MS); 0: no cap.",
            engine.max_step_ms.unwrap_or(0.0),
        ),
        (
            "stral_max_prefill_ms",
            "Predicted prefill time allowed per step on top of its decodes (--max-step-ms auto: a 512-token chunk); 0: none.",
            engine.max_prefill_ms.unwrap_or(0.0),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculation_counters_split_by_source_and_bucket_accepted_lengths() {
        let c = SpecCounters::default();
        c.record(DraftSource::Prediction, 8, 0);
        c.record(DraftSource::Ngram, 0, 3);
        c.record(DraftSource::Ngram, 0, 0);
        c.record(DraftSource::Prediction, 30, 10);
        assert_eq!(c.drafted(), [48, 3]);
        assert_eq!(c.accepted(), [38, 0]);
        let len = |i: usize| c.accept_len[i].load(Ordering::Relaxed);
        assert_eq!(len(0), 1, "an empty draft is not a verified draft");
        assert_eq!(len(8), 1);
        assert_eq!(len(ACCEPT_LEN_BUCKETS - 1), 1);
        let mut out = String::new();
        render_spec(&mut out, &c);
        assert!(out.contains("stral_spec_rejected_tokens_total{source=\"prediction\"} 10\n"));
        assert!(
            out.contains("stral_spec_acceptance_length_count 3\n"),
            "{out}"
        );
    }
}
