//! CUDA step benchmark (issue "CUDA worker backend"): `synthetic:codestral-22b` at TP = 1.
//!
//! Prints markdown: the device-to-device copy bandwidth and the weights-read roofline
//! (bf16 weight bytes ÷ that bandwidth), decode step time at batch 1…256 and context
//! 1K / 8K against it, a measured cuBLASLt bf16 GEMM rate, and prefill tokens/s at
//! 2K / 8K prompts against that rate. All numbers come from this run on this GPU.
//!
//! `cargo run -p worker --release --example cuda_step_bench [-- --model synthetic:tiny]`

use std::time::Instant;

use worker::cuda::gemm::Gemm;
use worker::cuda::{CudaModel, CudaModelConfig, DeviceCollective, WeightSource};
use worker::model::{SeqChunk, ShardSpec, StepInput};

const BS: usize = 16;

fn main() {
    let model = std::env::args()
        .skip_while(|a| a != "--model")
        .nth(1)
        .unwrap_or_else(|| "synthetic:codestral-22b".into());
    let cfg = worker::cuda::synthetic_config(&model)
        .expect("preset")
        .expect("--model synthetic:<preset>");
    let k = kernels::cuda::CudaKernels::new(0).expect("open GPU 0");
    let stream = k.stream().clone();
    // Copy bandwidth: 1 GiB device-to-device, read + write counted.
    let len = 1usize << 29;
    let src = stream.alloc_zeros::<half::bf16>(len).unwrap();
    let mut dst = stream.alloc_zeros::<half::bf16>(len).unwrap();
    stream.memcpy_dtod(&src, &mut dst).unwrap();
    stream.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        stream.memcpy_dtod(&src, &mut dst).unwrap();
    }
    stream.synchronize().unwrap();
    let copy_gbs = 10.0 * 2.0 * (len * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
    // GEMM rate at a prefill-like shape.
    let (m, n, kk) = (8192usize, 16384usize, 6144usize);
    let mut gemm = Gemm::new(stream.clone(), k.arch()).unwrap();
    let x = stream.alloc_zeros::<half::bf16>(m * kk).unwrap();
    let w = stream.alloc_zeros::<half::bf16>(n * kk).unwrap();
    let mut y = stream.alloc_zeros::<half::bf16>(m * n).unwrap();
    gemm.linear(&x, &w, m, kk, n, &mut y).unwrap();
    stream.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..10 {
        gemm.linear(&x, &w, m, kk, n, &mut y).unwrap();
    }
    stream.synchronize().unwrap();
    let gemm_tflops = 10.0 * 2.0 * (m * n * kk) as f64 / t.elapsed().as_secs_f64() / 1e12;
    drop((src, dst, x, w, y, gemm));

    let weight_bytes = cfg.n_params() as f64 * 2.0;
    let roofline_ms = weight_bytes / (copy_gbs * 1e9) * 1e3;
    let mut model = CudaModel::new(
        k,
        WeightSource::Synthetic(cfg.clone()),
        ShardSpec::default(),
        CudaModelConfig::default(),
    )
    .expect("load");
    let mut coll = DeviceCollective::solo();
    println!(
        "## CUDA step bench — {model_name}\n",
        model_name = model_label(&model)
    );
    println!("copy bandwidth {copy_gbs:.0} GB/s → weights-read roofline {roofline_ms:.2} ms; cuBLASLt bf16 GEMM {m}×{n}×{kk}: {gemm_tflops:.0} TFLOP/s; KV capacity {} tokens\n", model.kv_tokens());
    println!("`default` = three QKV GEMMs + rope + KV write, attention buffers allocated per step; `fused` = one QKV GEMM + rope_qkv_cache (`STRAL_CUDA_FUSED_QKV=1`); `+reuse` = fused and attention buffers reused across steps (`STRAL_CUDA_REUSE_ATTN=1`); `+argmax` = that and greedy rows' argmax on the GPU instead of `[batch, vocab]` f32 logits copied to the host (the default for greedy steps; `STRAL_BACKEND_ARGMAX=0` turns it off). Same loaded model, timed alternately, best of 2.\n");
    println!("| step | batch | context | ms/step (default) | × roofline | ms (fused) | ms (fused+reuse) | ms (+argmax) | × roofline |\n|---|---|---|---|---|---|---|---|---|");
    for ctx in [1024usize, 8192] {
        for batch in [1usize, 8, 32, 64, 128, 256] {
            let blocks = ctx.div_ceil(BS) + 1;
            if batch * blocks > model.num_blocks() {
                println!("| decode | {batch} | {ctx} | (KV too small) | |");
                continue;
            }
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|s| ((s * blocks) as u32..((s + 1) * blocks) as u32).collect())
                .collect();
            let tok = [1u32];
            let chunks: Vec<SeqChunk<'_>> = tables
                .iter()
                .map(|t| SeqChunk {
                    block_table: t,
                    cached: ctx - 1,
                    tokens: &tok,
                    sample: true,
                })
                .collect();
            let step = StepInput::build(BS, cfg.sliding_window, &chunks);
            let [ms, fused, reuse, argmax] = time_variants(&mut model, &mut coll, &step, 5);
            println!(
                "| decode | {batch} | {ctx} | {ms:.2} | {:.2} | {fused:.2} | {reuse:.2} | {argmax:.2} | {:.2} |",
                ms / roofline_ms,
                argmax / roofline_ms
            );
        }
    }
    println!("\n| step | prompt | tokens/s (default) | % of GEMM rate | tokens/s (fused) | tokens/s (fused+reuse) | % of GEMM rate |\n|---|---|---|---|---|---|---|");
    for prompt in [2048usize, 8192] {
        let table: Vec<u32> = (0..prompt.div_ceil(BS) as u32).collect();
        let toks = vec![1u32; prompt];
        let chunks = [SeqChunk {
            block_table: &table,
            cached: 0,
            tokens: &toks,
            sample: true,
        }];
        let step = StepInput::build(BS, cfg.sliding_window, &chunks);
        let ms: [f64; 3] = time_variants(&mut model, &mut coll, &step, 3);
        let [tps, fused, reuse] = ms.map(|m| prompt as f64 / (m / 1e3));
        let ideal = gemm_tflops * 1e12 / (2.0 * cfg.n_params() as f64);
        println!(
            "| prefill | {prompt} | {tps:.0} | {:.0} % | {fused:.0} | {reuse:.0} | {:.0} % |",
            100.0 * tps / ideal,
            100.0 * reuse / ideal
        );
    }
}

fn model_label(m: &CudaModel) -> String {
    format!(
        "{} layers, dim {}, TP 1, sm_{}",
        m.config().n_layers,
        m.config().dim,
        m.kernels().arch()
    )
}

/// ms per step of (default, fused QKV, fused QKV + reused attention buffers, the
/// same + argmax on the GPU): the first `N` of them, each timed twice, alternating,
/// best kept; the model is left on the default path.
fn time_variants<const N: usize>(
    m: &mut CudaModel,
    c: &mut DeviceCollective,
    step: &StepInput,
    reps: usize,
) -> [f64; N] {
    let mut best = [f64::MAX; N];
    let variants = [
        (false, false, false),
        (true, false, false),
        (true, true, false),
        (true, true, true),
    ];
    for _ in 0..2 {
        for (i, &(fused, reuse, argmax)) in variants[..N].iter().enumerate() {
            m.set_fused_qkv(fused);
            m.set_reuse_attn_buffers(reuse);
            best[i] = best[i].min(time_ms(m, c, step, reps, argmax));
        }
    }
    m.set_fused_qkv(false);
    m.set_reuse_attn_buffers(false);
    best
}

/// ms per step; `argmax`: the greedy form (`forward_argmax`, no logits to the host).
fn time_ms(
    m: &mut CudaModel,
    c: &mut DeviceCollective,
    step: &StepInput,
    reps: usize,
    argmax: bool,
) -> f64 {
    let mut run = |m: &mut CudaModel| match argmax {
        true => drop(m.forward_argmax(step, c).expect("step")),
        false => drop(m.forward(step, c).expect("step")),
    };
    run(m);
    let t = Instant::now();
    for _ in 0..reps {
        run(m);
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}
