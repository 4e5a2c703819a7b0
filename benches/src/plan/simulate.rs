//! Discrete-event simulation of one replica: Poisson arrivals into the real
//! [`scheduler::Scheduler`] (continuous batching, chunked prefill, paged KV with the
//! modelled capacity, preemption), each step lasting the step-time model's time plus
//! the coordinator's per-step overhead. Gives TTFT / TPOT / E2E percentiles at one
//! load.
//!
//! Invariants: deterministic for a seed; arrivals are the same unit-rate exponential
//! gaps scaled by `1/rate` (common random numbers), so curves over rates compare
//! like with like. Costs: one `schedule` + `update` + model evaluation per simulated
//! step, O(running sequences) each; no sleeping, no threads.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use scheduler::{Priority, Scheduler, SchedulerConfig};
use serde::Serialize;
use worker::sim::{SeqWork, StepTimeModel};

/// Coordinator time per step besides the workers' (scheduling, gRPC, detokenization,
/// SSE): `per_step_us + per_seq_us × sequences`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct HostOverhead {
    pub per_step_us: f64,
    pub per_seq_us: f64,
}

impl Default for HostOverhead {
    /// A line through the full-stack null-backend measurements in `benches/RESULTS.md`
    /// ("Coordinator overhead per engine step", after the engine thread and outbox: 120 µs
    /// at 1 sequence, 488 µs at 256, TP 2, on the 2-core dev VM with its 256 SSE clients on
    /// the same cores) — still pessimistic for a real server, whose HTTP fan-out does not
    /// share two cores with the workers.
    fn default() -> Self {
        Self {
            per_step_us: 119.0,
            per_seq_us: 1.45,
        }
    }
}

/// One simulated load point.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Request arrival rate at this replica, per second.
    pub rate_per_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Every prompt starts with the same `prefix_hit_rate × prompt_tokens` tokens, which
    /// the scheduler's prefix cache then serves (in whole blocks) once the first request
    /// has computed them; the rest is distinct per request.
    pub prefix_hit_rate: f64,
    /// Arrivals are generated for this long (simulated seconds); the first
    /// `warmup_fraction` of requests are not measured.
    pub duration_s: f64,
    pub warmup_fraction: f64,
    pub seed: u64,
    /// Given arrival times (seconds from the start, ascending) instead of Poisson
    /// draws: `--verify` replays the very arrivals `stral bench` sent, so predicted and
    /// observed differ by the model only, not by sampling.
    pub arrivals_s: Option<Vec<f64>>,
    pub host: HostOverhead,
    pub scheduler: SchedulerConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            rate_per_s: 1.0,
            prompt_tokens: 1024,
            output_tokens: 64,
            prefix_hit_rate: 0.0,
            duration_s: 60.0,
            warmup_fraction: 0.1,
            seed: 0,
            arrivals_s: None,
            host: HostOverhead::default(),
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// Percentiles of one load point, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LoadResult {
    pub rate_per_s: f64,
    pub requests: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p95_ms: f64,
    pub e2e_p95_ms: f64,
    /// Mean step time of the simulated engine, ms.
    pub mean_step_ms: f64,
    pub mean_batch: f64,
    pub preemptions: usize,
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values; 0 for none.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

struct Request {
    arrival_us: f64,
    first_token_us: Option<f64>,
}

/// Simulates `cfg` on `model`; `None` when the scheduler config is invalid.
pub fn simulate(model: &StepTimeModel, cfg: &SimConfig) -> Result<LoadResult, String> {
    let mut sched = Scheduler::new(cfg.scheduler.clone()).map_err(|e| e.to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut arrivals = Vec::new();
    if let Some(given) = &cfg.arrivals_s {
        arrivals.extend(given.iter().map(|t| t * 1e6));
    } else {
        let mut t = 0.0;
        loop {
            let u: f64 = rng.random::<f64>();
            t += -(1.0 - u).ln() / cfg.rate_per_s;
            if t > cfg.duration_s {
                break;
            }
            arrivals.push(t * 1e6);
        }
    }
    let warmup = (arrivals.len() as f64 * cfg.warmup_fraction) as usize;
    let mut reqs: Vec<Request> = arrivals
        .iter()
        .map(|&a| Request {
            arrival_us: a,
            first_token_us: None,
        })
        .collect();
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let (mut now, mut next) = (0.0f64, 0usize);
    let (mut steps, mut step_sum, mut batch_sum) = (0usize, 0.0, 0usize);
    let out = cfg.output_tokens.max(1);
    let shared = (cfg.prefix_hit_rate.clamp(0.0, 1.0) * cfg.prompt_tokens as f64) as usize;
    while next < reqs.len() || sched.has_work() {
        while next < reqs.len() && reqs[next].arrival_us <= now {
            // A shared head, then tokens distinct per request.
            let prompt: Vec<u32> = (0..cfg.prompt_tokens)
                .map(|i| {
                    let who = if i < shared { 0 } else { next + 1 };
                    1000 + ((who * 7919 + i * 31) % 30000) as u32
                })
                .collect();
            sched
                .add(
                    next as u64,
                    prompt,
                    out,
                    Priority::Interactive,
                    reqs[next].arrival_us as u64,
                )
                .map_err(|e| format!("request {next}: {e}"))?;
            next += 1;
        }
        if !sched.has_work() {
            now = reqs[next].arrival_us;
            continue;
        }
        let plan = sched.schedule(now as u64);
        let work: Vec<SeqWork> = plan
            .seqs
            .iter()
            .map(|s| SeqWork {
                new_tokens: s.num_tokens() as u32,
                cached: s.position as u32,
                sample: s.sample,
            })
            .collect();
        let step_us = model.step(&work).total_us
            + cfg.host.per_step_us
            + cfg.host.per_seq_us * plan.seqs.len() as f64;
        now += step_us;
        steps += 1;
        step_sum += step_us;
        batch_sum += plan.seqs.len();
        let sampled: Vec<(u64, u32)> = plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.seq_id, 1000))
            .collect();
        for &(id, _) in &sampled {
            let r = &mut reqs[id as usize];
            if r.first_token_us.is_none() {
                r.first_token_us = Some(now);
            }
        }
        for (id, _) in sched.update(&plan, &sampled, &[]) {
            let i = id as usize;
            if i < warmup {
                continue;
            }
            let r = &reqs[i];
            let first = r.first_token_us.unwrap_or(now);
            ttft.push((first - r.arrival_us) / 1e3);
            e2e.push((now - r.arrival_us) / 1e3);
            if out > 1 {
                tpot.push((now - first) / 1e3 / (out - 1) as f64);
            }
        }
    }
    let requests = ttft.len();
    Ok(LoadResult {
        rate_per_s: cfg.rate_per_s,
        requests,
        ttft_p50_ms: percentile(&mut ttft, 50.0),
        ttft_p95_ms: percentile(&mut ttft, 95.0),
        tpot_p50_ms: percentile(&mut tpot, 50.0),
        tpot_p95_ms: percentile(&mut tpot, 95.0),
        e2e_p95_ms: percentile(&mut e2e, 95.0),
        mean_step_ms: if steps > 0 {
            step_sum / steps as f64 / 1e3
        } else {
            0.0
        },
        mean_batch: if steps > 0 {
            batch_sum as f64 / steps as f64
        } else {
            0.0
        },
        preemptions: sched.counters().preemptions as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use worker::sim::GpuKind;
    use worker::ModelConfig;

    fn model() -> StepTimeModel {
        StepTimeModel::new(ModelConfig::codestral_22b(), GpuKind::H100.spec(), 2).unwrap()
    }

    fn sched() -> SchedulerConfig {
        SchedulerConfig {
            num_blocks: 20_000,
            max_waiting: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn nearest_rank_percentiles_of_a_hand_computed_sample() {
        let mut v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 10.0);
        assert_eq!(percentile(&mut v, 95.0), 19.0);
        assert_eq!(percentile(&mut v, 100.0), 20.0);
        assert_eq!(percentile(&mut v, 0.0), 1.0);
        assert_eq!(percentile(&mut [], 95.0), 0.0);
    }

    #[test]
    fn at_light_load_latency_is_one_prefill_and_one_decode_per_token() {
        let m = model();
        let cfg = SimConfig {
            rate_per_s: 0.2,
            prompt_tokens: 512,
            output_tokens: 32,
            duration_s: 60.0,
            host: HostOverhead {
                per_step_us: 0.0,
                per_seq_us: 0.0,
            },
            scheduler: sched(),
            ..Default::default()
        };
        let r = simulate(&m, &cfg).unwrap();
        assert!(r.requests > 3, "{r:?}");
        let prefill = m
            .step(&[SeqWork {
                new_tokens: 512,
                cached: 0,
                sample: true,
            }])
            .total_us
            / 1e3;
        let decode = m.decode_step(1, 530).total_us / 1e3;
        // Requests rarely overlap at 0.2/s × ~0.4 s each.
        assert!(
            (r.ttft_p50_ms - prefill).abs() / prefill < 0.05,
            "{r:?} {prefill}"
        );
        assert!(
            (r.tpot_p50_ms - decode).abs() / decode < 0.05,
            "{r:?} {decode}"
        );
    }

    #[test]
    fn a_shared_prompt_head_is_served_from_the_prefix_cache() {
        let m = model();
        let at = |hit: f64| {
            simulate(
                &m,
                &SimConfig {
                    rate_per_s: 0.2,
                    prompt_tokens: 1024,
                    output_tokens: 8,
                    prefix_hit_rate: hit,
                    duration_s: 60.0,
                    scheduler: sched(),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (cold, warm) = (at(0.0), at(0.75));
        // 768 of 1024 tokens (48 whole blocks) come from the cache: a light-load TTFT
        // is the prefill of the other 256 over a 768-token context.
        let rest = m
            .step(&[SeqWork {
                new_tokens: 256,
                cached: 768,
                sample: true,
            }])
            .total_us
            / 1e3;
        assert!(
            warm.ttft_p50_ms < 0.6 * cold.ttft_p50_ms,
            "{cold:?} {warm:?}"
        );
        assert!(
            (warm.ttft_p50_ms - rest).abs() / rest < 0.15,
            "{warm:?} {rest}"
        );
    }

    #[test]
    fn more_load_means_bigger_batches_and_no_lower_latency() {
        let m = model();
        let base = SimConfig {
            prompt_tokens: 512,
            output_tokens: 64,
            duration_s: 30.0,
            scheduler: sched(),
            ..Default::default()
        };
        let mut last: Option<LoadResult> = None;
        for rate in [1.0, 10.0, 40.0] {
            let r = simulate(
                &m,
                &SimConfig {
                    rate_per_s: rate,
                    ..base.clone()
                },
            )
            .unwrap();
            if let Some(l) = last {
                assert!(r.mean_batch > l.mean_batch, "{l:?} {r:?}");
                assert!(r.tpot_p95_ms >= l.tpot_p95_ms, "{l:?} {r:?}");
            }
            last = Some(r);
        }
    }
}
