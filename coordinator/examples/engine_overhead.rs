//! Coordinator overhead per engine step, without the HTTP layer: the real engine loop and
//! scheduler, gRPC to `--tp` real `stral worker` processes on loopback running the null
//! backend (every plan checked and block tables mirrored, no forward pass), and one
//! in-process reader per request draining its token events.
//!
//! What a GPU would see as idle time between two steps is this loop's step time with
//! a zero-cost forward pass; the breakdown (engine critical path, worker-reported time,
//! transport) comes from the engine's own phase histograms.
//!
//! Run: `cargo build --release --bin stral && cargo run --release -p coordinator --example
//! engine_overhead -- [path/to/stral] [tp]`. Prints Markdown rows.

use std::path::PathBuf;
use std::time::Duration;

use coordinator::engine::grpc::{GrpcExecutor, GrpcGroupConfig};
use coordinator::engine::{
    run_engine, EngineConfig, EngineEvent, EngineStats, GenerateRequest, Priority, SamplingParams,
};
use coordinator::launch::{LocalWorkers, LocalWorkersConfig};
use scheduler::SchedulerConfig;

/// (steps, sum of step, engine, worker, transport seconds)
fn snapshot(s: &EngineStats) -> [f64; 5] {
    [
        s.step_time.count() as f64,
        s.step_time.sum_seconds(),
        s.phases.engine.sum_seconds(),
        s.phases.worker.sum_seconds(),
        s.phases.transport.sum_seconds(),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let exe = PathBuf::from(args.next().unwrap_or_else(|| "target/release/stral".into()));
    let tp: usize = args.next().map_or(2, |t| t.parse().expect("tp"));
    let model = worker::embedded::ensure_embedded_model().expect("embedded model");
    println!("| running sequences | TP | steps | mean step (µs) | engine (µs) | workers (µs) | transport (µs) | tokens/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let counts: Vec<usize> = std::env::var("SEQS").map_or(vec![1, 64, 256], |v| {
        v.split(',')
            .map(|n| n.parse().expect("SEQS: comma-separated counts"))
            .collect()
    });
    for n in counts {
        let workers = LocalWorkers::start(LocalWorkersConfig {
            exe: exe.clone(),
            tp,
            device: "cpu".into(),
        })
        .expect("start workers");
        let exec = GrpcExecutor::new(GrpcGroupConfig {
            workers: workers.grpc_addrs.clone(),
            token: Some(workers.token.clone()),
            model_path: model.to_string_lossy().into_owned(),
            device: "null".into(),
            kv_cache_bytes: 0,
            max_kv_blocks: Some(32768),
            ..Default::default()
        });
        let (engine, task) = run_engine(
            exec,
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_num_seqs: 512,
                    max_num_batched_tokens: 8192,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        while !engine.is_ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut readers = Vec::new();
        for i in 0..n {
            let prompt: Vec<u32> = (0..16)
                .map(|t| 1000 + (i as u32 * 31 + t) % 30000)
                .collect();
            let mut stream = engine
                .submit(GenerateRequest {
                    prompt,
                    max_tokens: 1_000_000,
                    sampling: SamplingParams {
                        min_tokens: 1_000_000,
                        ..Default::default()
                    },
                    priority: Priority::Interactive,
                    stop_token_ids: vec![2],
                    ..Default::default()
                })
                .await
                .expect("admitted");
            readers.push(tokio::spawn(async move {
                let mut tokens = 0u64;
                while let Some(ev) = stream.next().await {
                    match ev {
                        EngineEvent::Token(_) => tokens += 1,
                        _ => break,
                    }
                }
                tokens
            }));
        }
        // Warm up until every request runs, then measure a steady window.
        while engine.stats().running < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = snapshot(&engine.stats());
        let window = Duration::from_secs(3);
        tokio::time::sleep(window).await;
        let b = snapshot(&engine.stats());
        let steps = b[0] - a[0];
        let us = |i: usize| (b[i] - a[i]) / steps * 1e6;
        println!(
            "| {n} | {tp} | {steps} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            us(1),
            us(2),
            us(3),
            us(4),
            steps * n as f64 / window.as_secs_f64()
        );
        drop(engine);
        task.abort();
        for r in readers {
            r.abort();
        }
        workers.shutdown().await;
    }
}
