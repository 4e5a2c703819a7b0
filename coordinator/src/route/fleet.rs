//! The replicas the router knows, their health and load, and the tasks that keep both
//! current.
//!
//! Owns: the replica list (fixed `--replica` URLs, or the addresses a DNS name resolves
//! to, re-resolved every `dns_interval`), and per replica its health, scraped load and
//! this router's in-flight count. Invariants: a replica is healthy only after a
//! `GET /ready` answered 200 within `probe_timeout`; one failed probe, or a failed
//! connection from a forwarded request, ejects it at once, so a dead or draining
//! replica is out within `probe_interval + probe_timeout` (default 200 + 500 ms); the
//! next 200 readmits it. A replica that stays in the DNS answer keeps its state.
//! Cost: two small GETs (`/ready`, `/metrics`) per replica per `probe_interval`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::pick::{fnv1a, Candidate};
use super::HttpClient;

/// One `stral serve` behind the router.
#[derive(Debug)]
pub struct Replica {
    /// `http://host:port`, no trailing slash.
    pub url: String,
    /// HRW identity: hash of `url`.
    pub id: u64,
    healthy: AtomicBool,
    queue_depth: AtomicU64,
    /// KV usage ratio × 1e6.
    kv_usage_ppm: AtomicU64,
    pub in_flight: AtomicU64,
}

impl Replica {
    pub fn new(url: &str) -> Self {
        let url = url.trim_end_matches('/').to_string();
        Self {
            id: fnv1a(url.as_bytes()),
            url,
            healthy: AtomicBool::new(false),
            queue_depth: AtomicU64::new(0),
            kv_usage_ppm: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks the replica up or down, logging transitions.
    pub fn set_healthy(&self, up: bool, why: &str) {
        if self.healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(replica = %self.url, "replica ready: admitted");
            } else {
                tracing::warn!(replica = %self.url, why, "replica ejected");
            }
        }
    }

    pub fn candidate(&self) -> Candidate {
        Candidate {
            id: self.id,
            healthy: self.is_healthy(),
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            kv_usage: self.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6,
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }
}

/// Where the replica list comes from.
#[derive(Clone, Debug)]
pub enum ReplicaSource {
    /// Fixed base URLs (`--replica`).
    Static(Vec<String>),
    /// `NAME:PORT`, every address it resolves to (`--replicas-dns`, a headless Service).
    Dns(String),
}

/// Probe and resolve timings.
#[derive(Clone, Copy, Debug)]
pub struct FleetTimings {
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub dns_interval: Duration,
}

impl Default for FleetTimings {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(500),
            dns_interval: Duration::from_secs(5),
        }
    }
}

/// The current replica list; readers take a cheap snapshot.
#[derive(Debug, Default)]
pub struct Fleet {
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
}

impl Fleet {
    pub fn new(urls: &[String]) -> Self {
        Self {
            replicas: RwLock::new(Arc::new(
                urls.iter().map(|u| Arc::new(Replica::new(u))).collect(),
            )),
        }
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas.read().expect("fleet lock").clone()
    }

    /// Replaces the list by `urls`, keeping the state of replicas still in it.
    pub fn set_urls(&self, urls: &[String]) {
        let old = self.snapshot();
        let next: Vec<Arc<Replica>> = urls
            .iter()
            .map(|u| {
                let u = u.trim_end_matches('/');
                old.iter()
                    .find(|r| r.url == u)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Replica::new(u)))
            })
            .collect();
        if next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| a.url != b.url) {
            tracing::info!(replicas = ?urls, "replica set changed");
        }
        *self.replicas.write().expect("fleet lock") = Arc::new(next);
    }

    /// Runs the probe loop (and the DNS loop for a [`ReplicaSource::Dns`]) forever.
    pub async fn maintain(
        self: Arc<Self>,
        source: ReplicaSource,
        t: FleetTimings,
        client: HttpClient,
    ) {
        if let ReplicaSource::Dns(name) = source {
            let fleet = self.clone();
            tokio::spawn(async move {
                loop {
                    match resolve(&name).await {
                        Ok(urls) => fleet.set_urls(&urls),
                        Err(e) => {
                            tracing::warn!(%name, error = %e, "resolving replicas failed; keeping the last set")
                        }
                    }
                    tokio::time::sleep(t.dns_interval).await;
                }
            });
        }
        let mut tick = tokio::time::interval(t.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let probes = self
                .snapshot()
                .iter()
                .map(|r| probe(r.clone(), client.clone(), t.probe_timeout))
                .collect::<Vec<_>>();
            futures::future::join_all(probes).await;
        }
    }
}

/// `NAME:PORT` → `http://IP:PORT` for every address, sorted (stable HRW ids).
pub async fn resolve(name: &str) -> Result<Vec<String>, std::io::Error> {
    let mut urls: Vec<String> = tokio::net::lookup_host(name)
        .await?
        .map(|a| format!("http://{a}"))
        .collect();
    urls.sort();
    urls.dedup();
    Ok(urls)
}

/// One GET with a deadline; the status and body.
async fn get(
    client: &HttpClient,
    url: String,
    limit: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// Reads `/ready`, then (when ready) the load gauges from `/metrics`.
async fn probe(r: Arc<Replica>, client: HttpClient, limit: Duration) {
    match get(&client, format!("{}/ready", r.url), limit).await {
        Ok((s, _)) if s == StatusCode::OK => {}
        Ok((s, _)) => return r.set_healthy(false, &format!("/ready answered {s}")),
        Err(e) => return r.set_healthy(false, &format!("/ready: {e}")),
    }
    if let Ok((StatusCode::OK, body)) = get(&client, format!("{}/metrics", r.url), limit).await {
        let text = String::from_utf8_lossy(&body);
        if let Some(q) = gauge(&text, "stral_queue_depth") {
            r.queue_depth.store(q as u64, Ordering::Relaxed);
        }
        if let Some(kv) = gauge(&text, "stral_kv_usage_ratio") {
            r.kv_usage_ppm.store((kv * 1e6) as u64, Ordering::Relaxed);
        }
    }
    r.set_healthy(true, "");
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_from_the_exposition() {
        let text = "# HELP stral_queue_depth x\nstral_queue_depth 3\nstral_queue_depth_x 9\nstral_kv_usage_ratio 0.25\n";
        assert_eq!(gauge(text, "stral_queue_depth"), Some(3.0));
        assert_eq!(gauge(text, "stral_kv_usage_ratio"), Some(0.25));
        assert_eq!(gauge(text, "stral_missing"), None);
    }

    #[test]
    fn a_new_replica_set_keeps_the_state_of_replicas_that_stayed() {
        let f = Fleet::new(&["http://a:1".into(), "http://b:1/".into()]);
        f.snapshot()[1].set_healthy(true, "");
        f.set_urls(&["http://b:1".into(), "http://c:1".into()]);
        let s = f.snapshot();
        assert_eq!(s.len(), 2);
        assert!(s[0].is_healthy(), "b kept its health");
        assert!(!s[1].is_healthy(), "c starts unhealthy until probed");
    }

    #[tokio::test]
    async fn localhost_resolves_to_http_urls_with_the_port() {
        let urls = resolve("localhost:8080").await.unwrap();
        assert!(!urls.is_empty());
        assert!(
            urls.iter()
                .all(|u| u.starts_with("http://") && u.ends_with(":8080")),
            "{urls:?}"
        );
    }
}
