//! The router's own Prometheus metrics: requests and upstream errors by replica,
//! affinity hits vs spills, retries, upstream latency (time to response headers) by
//! replica, and each replica's health, scraped queue depth and in-flight count.
//!
//! One short lock per request for the per-replica maps (a replica label is its URL);
//! the counters are atomics. Rendered at scrape time in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::fleet::Replica;
use crate::histogram::Histogram;

/// What `GET /metrics` on the router reports.
#[derive(Default)]
pub struct RouteMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    errors: Mutex<BTreeMap<(String, &'static str), u64>>,
    latency: Mutex<BTreeMap<String, Arc<Histogram>>>,
    pub affinity_hits: AtomicU64,
    pub spills: AtomicU64,
    pub retries: AtomicU64,
}

impl RouteMetrics {
    /// One answered request (`replica` is `"none"` when no replica could take it).
    pub fn count_request(&self, replica: &str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((replica.to_string(), status))
            .or_default() += 1;
    }

    /// One upstream failure: `connect`, `timeout`, `protocol` or `stream`.
    pub fn count_error(&self, replica: &str, kind: &'static str) {
        *self
            .errors
            .lock()
            .expect("metrics lock")
            .entry((replica.to_string(), kind))
            .or_default() += 1;
    }

    pub fn observe_latency(&self, replica: &str, seconds: f64) {
        let h = self
            .latency
            .lock()
            .expect("metrics lock")
            .entry(replica.to_string())
            .or_default()
            .clone();
        h.observe(seconds);
    }

    pub fn render(&self, replicas: &[Arc<Replica>]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP stral_route_requests_total Requests answered, by replica and status.\n# TYPE stral_route_requests_total counter"
        );
        for ((r, s), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "stral_route_requests_total{{replica=\"{r}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP stral_route_upstream_errors_total Upstream failures, by replica and kind (connect, timeout, protocol, stream).\n# TYPE stral_route_upstream_errors_total counter"
        );
        for ((r, k), n) in self.errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "stral_route_upstream_errors_total{{replica=\"{r}\",kind=\"{k}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP stral_route_affinity_total Keyed requests sent to their affine replica (hit) or spilled to the least-loaded one (spill).\n# TYPE stral_route_affinity_total counter"
        );
        let _ = writeln!(
            out,
            "stral_route_affinity_total{{outcome=\"hit\"}} {}",
            self.affinity_hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "stral_route_affinity_total{{outcome=\"spill\"}} {}",
            self.spills.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stral_route_retries_total Requests retried on another replica (nothing had been sent to the client).\n# TYPE stral_route_retries_total counter\nstral_route_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stral_route_upstream_latency_seconds Time from sending a request upstream to its response headers.\n# TYPE stral_route_upstream_latency_seconds histogram"
        );
        for (r, h) in self.latency.lock().expect("metrics lock").iter() {
            h.render_series(
                &mut out,
                "stral_route_upstream_latency_seconds",
                &format!("replica=\"{r}\""),
            );
        }
        let gauges: [(&str, &str, fn(&Replica) -> f64); 3] = [
            (
                "stral_route_replica_ready",
                "1 while the replica passes its /ready probe.",
                |r| r.is_healthy() as u8 as f64,
            ),
            (
                "stral_route_replica_queue_depth",
                "The replica's stral_queue_depth at the last scrape.",
                |r| r.queue_depth() as f64,
            ),
            (
                "stral_route_replica_in_flight",
                "Requests this router has in flight on the replica.",
                |r| r.in_flight.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, read) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for r in replicas {
                let _ = writeln!(out, "{name}{{replica=\"{}\"}} {}", r.url, read(r));
            }
        }
        out
    }
}
