//! Prometheus metrics (HTTP layer and engine), rendered in the text exposition format.
//!
//! Lock-free on the hot path: counters and histogram buckets are atomics; the only
//! lock guards the (endpoint, status) request counter map, touched once per request.
//! Engine gauges (queue, KV blocks, prefix-cache hits, step time) are read from the
//! engine's snapshot at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::EngineStats;

/// Latency buckets in seconds, from 1 ms to 60 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A histogram with fixed buckets; sum kept in microseconds.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Mean of the observations, `None` before the first one.
    pub fn mean_seconds(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_seconds() / n as f64)
    }

    /// The `_bucket`/`_sum`/`_count` lines of one series (`labels` like `team="a"`, or
    /// empty for an unlabelled one), without HELP/TYPE.
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum_seconds());
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }
}

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
        let mut gauge = |name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "stral_ready",
            "1 when a worker group is loaded and serving.",
            ready as u8 as f64,
        );
        gauge(
            "stral_queue_depth",
            "Requests waiting to be scheduled.",
            engine.waiting as f64,
        );
        gauge(
            "stral_requests_running",
            "Sequences holding KV blocks (prefilling or decoding).",
            engine.running as f64,
        );
        gauge(
            "stral_requests_waiting",
            "Sequences waiting for admission.",
            engine.waiting as f64,
        );
        gauge(
            "stral_kv_blocks_used",
            "KV cache blocks referenced by sequences.",
            engine.kv_blocks_used as f64,
        );
        gauge(
            "stral_kv_blocks_total",
            "KV cache blocks in the pool.",
            engine.kv_blocks_total as f64,
        );
        gauge(
            "stral_kv_usage_ratio",
            "Fraction of KV cache blocks in use.",
            if engine.kv_blocks_total > 0 {
                engine.kv_blocks_used as f64 / engine.kv_blocks_total as f64
            } else {
                0.0
            },
        );
        gauge(
            "stral_prefix_cache_hit_rate",
            "Fraction of prompt tokens served from the prefix cache.",
            engine.prefix_cache_hit_rate,
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "stral_prompt_tokens_total",
            "Prompt tokens admitted.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            "stral_generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        counter(
            "stral_requests_aborted_total",
            "Requests aborted by their client.",
            self.aborted.load(Ordering::Relaxed),
        );
        counter(
            "stral_engine_steps_total",
            "Engine steps executed.",
            engine.steps,
        );
        counter(
            "stral_preemptions_total",
            "Sequences preempted by recompute.",
            engine.preemptions,
        );
        counter(
            "stral_worker_restarts_total",
            "Worker groups brought back after a crash.",
            engine.worker_restarts,
        );
        counter(
            "stral_requests_recovered_total",
            "Requests recomputed on a new worker group after a crash.",
            engine.requests_recovered,
        );
        let _ = writeln!(out, "# HELP stral_requests_total HTTP requests by endpoint and status.\n# TYPE stral_requests_total counter");
        for ((endpoint, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "stral_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        self.ttft.render(
            &mut out,
            "stral_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
        );
        self.itl.render(
            &mut out,
            "stral_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
        );
        self.e2e.render(
            &mut out,
            "stral_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
        );
        engine.step_time.render(
            &mut out,
            "stral_step_duration_seconds",
            "Wall time of one engine step (schedule, execute, update).",
        );
        engine.recovery_time.render(
            &mut out,
            "stral_recovery_seconds",
            "Time from losing the worker group to the next one serving.",
        );
        for (h, name, help) in [
            (&engine.phases.engine, "stral_step_engine_seconds", "Per step, the engine's critical path: schedule, plan, submit, and the update after the answers."),
            (&engine.phases.worker, "stral_step_worker_seconds", "Per step, the longest time a worker rank reported (checks, forward pass, sampling)."),
            (&engine.phases.transport, "stral_step_transport_seconds", "Per step, wall time outside the engine and the workers: gRPC encode/decode, network, wake-ups."),
        ] {
            h.render(&mut out, name, help);
        }
        out
    }
}
