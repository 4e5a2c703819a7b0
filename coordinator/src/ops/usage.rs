//! Usage accounting per key and per team: requests, refusals, prompt and generated
//! tokens, latency — rendered into `/metrics` and `GET /v1/usage`.
//!
//! Label cardinality is bounded by default: series carry only `team` (teams are few);
//! `key` (the key's configured *name*, never the key) is added only when
//! `metrics_key_label` is set. Counters are atomics; recording a finished request is a
//! handful of relaxed adds and one histogram observation.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::histogram::Histogram;

/// Counters of one key or one team.
#[derive(Debug, Default)]
pub struct Usage {
    pub requests_local: AtomicU64,
    pub requests_fallback: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub latency: Histogram,
}

impl Usage {
    /// Counts one finished (or client-aborted) request.
    pub fn record(&self, fallback: bool, prompt: u64, generated: u64, seconds: f64) {
        if fallback {
            &self.requests_fallback
        } else {
            &self.requests_local
        }
        .fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated, Ordering::Relaxed);
        self.latency.observe(seconds);
    }

    pub fn json(&self) -> Value {
        let l = self.requests_local.load(Ordering::Relaxed);
        let f = self.requests_fallback.load(Ordering::Relaxed);
        json!({
            "requests": l + f,
            "requests_local": l,
            "requests_fallback": f,
            "rejected": self.rejected.load(Ordering::Relaxed),
            "prompt_tokens": self.prompt_tokens.load(Ordering::Relaxed),
            "generated_tokens": self.generated_tokens.load(Ordering::Relaxed),
            "mean_latency_seconds": self.latency.mean_seconds(),
        })
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the usage series for `(labels, usage)` pairs, labels already formatted.
pub fn render<'a>(out: &mut String, series: impl Iterator<Item = (String, &'a Usage)> + Clone) {
    type Values = fn(&Usage) -> Vec<(&'static str, u64)>;
    let counters: [(&str, &str, Values); 4] = [
        (
            "stral_usage_requests_total",
            "Requests served, by where they were served.",
            |u| {
                vec![
                    (
                        "backend=\"local\"",
                        u.requests_local.load(Ordering::Relaxed),
                    ),
                    (
                        "backend=\"fallback\"",
                        u.requests_fallback.load(Ordering::Relaxed),
                    ),
                ]
            },
        ),
        (
            "stral_usage_rejected_total",
            "Requests refused by a rate limit or quota (429).",
            |u| vec![("", u.rejected.load(Ordering::Relaxed))],
        ),
        (
            "stral_usage_prompt_tokens_total",
            "Prompt tokens charged.",
            |u| vec![("", u.prompt_tokens.load(Ordering::Relaxed))],
        ),
        (
            "stral_usage_generated_tokens_total",
            "Generated tokens charged.",
            |u| vec![("", u.generated_tokens.load(Ordering::Relaxed))],
        ),
    ];
    for (name, help, values) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, u) in series.clone() {
            for (extra, v) in values(u) {
                let sep = if extra.is_empty() { "" } else { "," };
                let _ = writeln!(out, "{name}{{{labels}{sep}{extra}}} {v}");
            }
        }
    }
    let name = "stral_usage_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from arrival to the last byte, per team (and key when enabled).\n# TYPE {name} histogram"
    );
    for (labels, u) in series {
        u.latency.render_series(out, name, &labels);
    }
}

pub fn team_labels(team: &str) -> String {
    format!("team=\"{}\"", escape(team))
}

pub fn key_labels(team: &str, key_name: &str) -> String {
    format!("team=\"{}\",key=\"{}\"", escape(team), escape(key_name))
}
