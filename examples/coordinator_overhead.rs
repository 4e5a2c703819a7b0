//! Coordinator overhead per engine step: everything but the forward pass (scheduling,
//! plan encoding, gRPC to every rank, plan checks and block-table mirroring in the
//! workers, token fan-out, detokenization and SSE to the clients), measured with
//! `stral serve --worker-backend null` at 1, 64 and 256 concurrently streaming requests.
//!
//! Run: `cargo build --release && cargo run --release --example coordinator_overhead`
//! (optionally pass the path of the `stral` binary). Prints Markdown rows.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{get, metric, start_null_server, stream_fim, wait_running};

fn main() {
    let exe = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/release/stral".into());
    println!("| running sequences | TP | steps measured | mean step (µs) | steps/s |");
    println!("|---|---|---|---|---|");
    for n in [1usize, 64, 256] {
        let (mut server, port) = start_null_server(Path::new(&exe), 2, None);
        for i in 0..n {
            std::thread::spawn(move || stream_fim(port, i, || {}));
        }
        // Wait until all are running, then measure a steady window.
        wait_running(port, n);
        std::thread::sleep(Duration::from_millis(500));
        let a = get(port, "/metrics").unwrap();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let b = get(port, "/metrics").unwrap();
        let dt = t0.elapsed().as_secs_f64();
        let running = metric(&b, "stral_requests_running");
        let steps = metric(&b, "stral_step_duration_seconds_count")
            - metric(&a, "stral_step_duration_seconds_count");
        let secs = metric(&b, "stral_step_duration_seconds_sum")
            - metric(&a, "stral_step_duration_seconds_sum");
        assert!(
            running >= n as f64,
            "only {running} of {n} still running: the window is not steady"
        );
        println!(
            "| {n} | 2 | {steps} | {:.0} | {:.0} |",
            secs / steps * 1e6,
            steps / dt
        );
        let _ = server.kill();
        let _ = server.wait();
    }
}
