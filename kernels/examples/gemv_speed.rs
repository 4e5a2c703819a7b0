//! Decode GEMV speed of each CPU weight format: `y = x · Wᵀ` at batch 1 for the tiny
//! model's `lm_head` shape and a Codestral-22B projection, best of several repeats.
//! Prints a Markdown table (µs per GEMV, weight GB/s, speed-up over f32).
//!
//! Run: `cargo run --release -p kernels --example gemv_speed`

use std::time::Instant;

use kernels::quant::{linear, QMatrix, WeightDtype};
use kernels::testdata::uniform_pm1;

fn main() {
    println!("| shape [out, in] | dtype | MiB | µs / GEMV | GB/s | × f32 |");
    println!("|---|---|---|---|---|---|");
    for (out_f, in_f) in [(32768, 512), (1536, 512), (6144, 6144)] {
        let x = uniform_pm1(in_f, 1);
        let w = uniform_pm1(out_f * in_f, 2);
        let mut f32_us = 0.0;
        for dtype in [
            WeightDtype::F32,
            WeightDtype::Bf16,
            WeightDtype::Int8,
            WeightDtype::Q8_0,
        ] {
            let m = QMatrix::from_f32(w.clone(), in_f, dtype);
            let mut y = vec![0f32; out_f];
            // Enough repeats for ~0.3 s of work; the best repeat is reported.
            let reps = (3e8 / m.bytes() as f64).clamp(5.0, 2000.0) as usize;
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                linear(&x, &m, 1, &mut y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let us = best * 1e6;
            if dtype == WeightDtype::F32 {
                f32_us = us;
            }
            println!(
                "| [{out_f}, {in_f}] | {dtype:?} | {:.1} | {us:.0} | {:.1} | {:.2} |",
                m.bytes() as f64 / (1 << 20) as f64,
                m.bytes() as f64 / best / 1e9,
                f32_us / us
            );
        }
    }
}
