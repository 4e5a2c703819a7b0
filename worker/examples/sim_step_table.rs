//! Prints the step-time model's predicted decode step times (MODELLED, not measured)
//! for Codestral-22B on each GPU and TP, for `benches/RESULTS.md`.
//!
//! `cargo run -p worker --example sim_step_table`

use worker::sim::{GpuKind, StepTimeModel};
use worker::ModelConfig;

fn main() {
    println!("| GPU | TP | context | batch 1 | batch 8 | batch 64 | batch 256 | KV blocks/rank |");
    println!("|---|---|---|---|---|---|---|---|");
    for gpu in GpuKind::ALL {
        for tp in [1, 2, 4, 8] {
            let m = StepTimeModel::new(ModelConfig::codestral_22b(), gpu.spec(), tp)
                .expect("22B splits at TP 1-8");
            let Ok(blocks) = m.kv_capacity_blocks(16, 0.9, 8192, 256) else {
                println!("| {gpu} | {tp} | – | does not fit | | | | |");
                continue;
            };
            for ctx in [512u32, 4096] {
                let ms: Vec<String> = [1, 8, 64, 256]
                    .iter()
                    .map(|&b| format!("{:.2}", m.decode_step(b, ctx).total_us / 1e3))
                    .collect();
                println!("| {gpu} | {tp} | {ctx} | {} | {blocks} |", ms.join(" | "));
            }
        }
    }
    let m = StepTimeModel::new(ModelConfig::codestral_22b(), GpuKind::H100.spec(), 1).unwrap();
    let b = m.decode_step(1, 512);
    println!("\nH100 TP 1 batch 1 ctx 512 breakdown (µs): {b:?}");
}
