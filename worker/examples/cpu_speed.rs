//! Tokens/s of the CPU reference backend on the embedded tiny model: prefill of a
//! 512-token prompt, and greedy decode at batch 1 and 16, for each weight dtype and
//! TP (ranks as threads). Prints Markdown rows for `benches/RESULTS.md`.
//!
//! Run: `cargo run --release -p worker --example cpu_speed -- [--dtype f32,bf16,int8,q8_0] [--tp 1,2] [--model PATH]`
//! (defaults: f32; TP 1 and 2; the embedded model). `--model` takes what
//! `stral serve --model` takes: a checkpoint folder or a `.gguf` file, so the same
//! file can be timed here and with llama.cpp's `llama-bench`.

use std::time::Instant;

use kernels::quant::WeightDtype;
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::{SeqChunk, StepInput};

/// The value after `flag` on the command line, if `flag` is there.
fn flag_value(flag: &str) -> Result<Option<String>, String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == flag) {
        Some(i) => match args.get(i + 1) {
            Some(v) => Ok(Some(v.clone())),
            None => Err(format!("{flag} needs a value")),
        },
        None => Ok(None),
    }
}

/// The comma-separated values after `flag`, or `default`.
fn list_arg<T: std::str::FromStr>(flag: &str, default: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    let v = flag_value(flag)?.unwrap_or_else(|| default.to_string());
    v.split(',')
        .map(|s| s.parse().map_err(|e| format!("{flag} {s}: {e}")))
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtypes: Vec<WeightDtype> = list_arg("--dtype", "f32")?;
    let tps: Vec<usize> = list_arg("--tp", "1,2")?;
    let dir = match flag_value("--model")? {
        Some(path) => path.into(),
        None => worker::embedded::ensure_embedded_model()?,
    };
    let ckpt = Checkpoint::open(&dir)?;
    eprintln!("model: {}", dir.display());
    let bs = 16;
    let vocab = ckpt.config.vocab_size as u32;
    println!("| dtype | TP | phase | batch | tokens | seconds | tokens/s |");
    println!("|---|---|---|---|---|---|---|");
    for (&dtype, tp) in dtypes
        .iter()
        .flat_map(|d| tps.iter().map(move |&tp| (d, tp)))
    {
        let prompt_len: usize = 512;
        let seqs = 16;
        let decode_steps = 64;
        let per_seq_blocks = (prompt_len + decode_steps).div_ceil(bs);
        let mut g = LocalTpGroup::load_as(&ckpt, tp, seqs * per_seq_blocks, bs, dtype)?;
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| ((s * per_seq_blocks) as u32..((s + 1) * per_seq_blocks) as u32).collect())
            .collect();
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|i| (i * 7919 + 3) % vocab)
            .collect();
        // Prefill: every sequence's prompt, one sequence per step (warm-up: the first).
        let mut prefill_time = 0.0;
        for (s, table) in tables.iter().enumerate() {
            let step = StepInput::build(
                bs,
                None,
                &[SeqChunk {
                    block_table: table,
                    cached: 0,
                    tokens: &prompt,
                    sample: true,
                }],
            );
            let t = Instant::now();
            g.forward(&step)?;
            if s > 0 {
                prefill_time += t.elapsed().as_secs_f64();
            }
        }
        let n_prefill = (seqs - 1) * prompt_len;
        println!(
            "| {dtype:?} | {tp} | prefill | 1 | {n_prefill} | {prefill_time:.3} | {:.0} |",
            n_prefill as f64 / prefill_time
        );
        for batch in [1, seqs] {
            let t = Instant::now();
            for cached in prompt_len..prompt_len + decode_steps / 2 {
                let tok = [42u32];
                let chunks: Vec<SeqChunk> = tables[..batch]
                    .iter()
                    .map(|tb| SeqChunk {
                        block_table: tb,
                        cached,
                        tokens: &tok,
                        sample: true,
                    })
                    .collect();
                g.forward(&StepInput::build(bs, None, &chunks))?;
            }
            let dt = t.elapsed().as_secs_f64();
            let n = batch * decode_steps / 2;
            println!(
                "| {dtype:?} | {tp} | decode | {batch} | {n} | {dt:.3} | {:.0} |",
                n as f64 / dt
            );
        }
    }
    Ok(())
}
