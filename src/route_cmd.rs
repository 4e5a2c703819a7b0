//! `stral route`: flags → [`coordinator::route::RouteConfig`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, ValueEnum};
use coordinator::route::fleet::{FleetTimings, ReplicaSource};
use coordinator::route::pick::{LoadLimits, Policy};
use coordinator::route::RouteConfig;

pub const LONG_ABOUT: &str = "\
Route requests over many `stral serve` replicas, keeping each developer's keystrokes on \
the replica whose prefix cache holds their prompt.

The router speaks the same API as `stral serve` (FIM, chat, completions, models) and \
forwards each request to one replica, streaming the answer back unchanged (header \
x-stral-replica says which). Its own /health, /ready (200 while any replica is ready) \
and /metrics (requests and errors by replica, affinity hits vs spills, upstream latency).

Policy `affinity` (default) hashes the API key plus the start of the rendered prompt (FIM: \
the suffix, then the prefix; chat: the first messages) onto a replica by rendezvous \
hashing; `session` hashes the API key only; `round-robin` takes turns. A replica whose \
queue depth, KV usage or in-flight count is over its limit gets no new keyed requests: \
they spill to the least-loaded ready replica. Replicas failing GET /ready are ejected \
within a second and readmitted when ready; a request that failed before anything was \
sent to the client is retried once on another replica.

Example: stral route --replica http://10.0.0.5:8080 --replica http://10.0.0.6:8080
Kubernetes: stral route --replicas-dns stral-replicas.default.svc.cluster.local:8080";

#[derive(Args)]
pub struct RouteArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// A replica's base URL, e.g. http://10.0.0.5:8080 (repeatable).
    #[arg(
        long = "replica",
        value_name = "URL",
        required_unless_present = "replicas_dns",
        conflicts_with = "replicas_dns"
    )]
    replicas: Vec<String>,
    /// NAME:PORT of a headless Service: every address it resolves to is a replica,
    /// re-resolved every --dns-interval-ms.
    #[arg(long, value_name = "NAME:PORT")]
    replicas_dns: Option<String>,
    /// How to pick a replica: `affinity` (API key + prompt start, rendezvous hashing),
    /// `session` (API key only), `round-robin`.
    #[arg(long, value_enum, default_value_t = PolicyArg::Affinity)]
    policy: PolicyArg,
    /// Bytes of the prompt start hashed into the affinity key (cut to 64-byte blocks).
    #[arg(long, default_value_t = RouteConfig::default().affinity_prefix_bytes)]
    affinity_prefix_bytes: usize,
    /// Spill when the affine replica's queue depth (stral_queue_depth) reaches this.
    #[arg(long, default_value_t = LoadLimits::default().max_queue_depth)]
    spill_queue_depth: u64,
    /// Spill when the affine replica's KV usage (stral_kv_usage_ratio) reaches this.
    #[arg(long, default_value_t = LoadLimits::default().max_kv_usage)]
    spill_kv_usage: f64,
    /// Spill when the affine replica's in-flight requests would exceed this multiple of
    /// the fleet's mean (bounded-load hashing; ≥ 1).
    #[arg(long, default_value_t = LoadLimits::default().load_factor)]
    load_factor: f64,
    /// How often each replica's /ready and /metrics are read, ms.
    #[arg(long, default_value_t = 200)]
    probe_interval_ms: u64,
    /// A probe slower than this fails (and ejects the replica), ms.
    #[arg(long, default_value_t = 500)]
    probe_timeout_ms: u64,
    /// How often --replicas-dns is re-resolved, ms.
    #[arg(long, default_value_t = 5000)]
    dns_interval_ms: u64,
    /// Longest wait for a replica's response headers, seconds (a non-streaming request
    /// gets its headers only when generation is done).
    #[arg(long, default_value_t = 300.0)]
    upstream_timeout: f64,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Affinity,
    Session,
    RoundRobin,
}

impl RouteArgs {
    fn config(self) -> anyhow::Result<RouteConfig> {
        if !(self.upstream_timeout > 0.0 && self.upstream_timeout.is_finite()) {
            anyhow::bail!("--upstream-timeout must be a positive number of seconds");
        }
        if !(0.0..=1.0).contains(&self.spill_kv_usage) {
            anyhow::bail!("--spill-kv-usage is a fraction in 0..=1");
        }
        if !(self.load_factor >= 1.0) {
            anyhow::bail!("--load-factor must be at least 1");
        }
        let source = match self.replicas_dns {
            Some(name) => {
                if name
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    anyhow::bail!("--replicas-dns {name}: expected NAME:PORT");
                }
                ReplicaSource::Dns(name)
            }
            None => ReplicaSource::Static(self.replicas),
        };
        Ok(RouteConfig {
            listen: SocketAddr::new(self.host, self.port),
            source,
            policy: match self.policy {
                PolicyArg::Affinity => Policy::Affinity,
                PolicyArg::Session => Policy::Session,
                PolicyArg::RoundRobin => Policy::RoundRobin,
            },
            limits: LoadLimits {
                max_queue_depth: self.spill_queue_depth,
                max_kv_usage: self.spill_kv_usage,
                load_factor: self.load_factor,
            },
            timings: FleetTimings {
                probe_interval: Duration::from_millis(self.probe_interval_ms.max(10)),
                probe_timeout: Duration::from_millis(self.probe_timeout_ms.max(10)),
                dns_interval: Duration::from_millis(self.dns_interval_ms.max(100)),
            },
            upstream_timeout: Duration::from_secs_f64(self.upstream_timeout),
            affinity_prefix_bytes: self.affinity_prefix_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
        })
    }
}

pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(coordinator::route::run(config))?;
    Ok(())
}
