//! Microbenchmarks of the CUDA kernels at Codestral-22B shapes; prints markdown tables.
//!
//! Run on a GPU machine (see kernels/README.md):
//! `cargo run --release -p kernels --example cuda_bench [-- --quick]`
//!
//! Method: CUDA events around each launch (queued behind a device copy, so host launch
//! latency is not counted), 5 warm-up launches, median of 30 timed ones.
//! Inputs are random bf16 (never zeros). Where one launch's working set would fit in
//! the 50 MB L2, launches rotate over enough disjoint copies (≥ 512 MB in all) that
//! every launch reads from DRAM. Bandwidth counts the bytes a launch must move at
//! least (each input read once, each output written once); the reference ceiling is a
//! measured device-to-device copy (bytes read + written).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use kernels::cuda::attention::WorkPlan;
use kernels::cuda::{AttnPlan, AttnPlanConfig, CudaKernels};
use kernels::reference::{AttnMeta, KvLayout};
use kernels::KernelError;

const WARMUP: usize = 5;
const REPEATS: usize = 30;
/// Rotate inputs until one round touches at least this many bytes (defeats the L2).
const ROTATE_BYTES: usize = 512 << 20;

type Result<T> = std::result::Result<T, KernelError>;

/// Times launches with CUDA events. Before each timed launch the GPU is kept busy by a
/// 256 MB device copy, so the host has queued the start event, the launch(es) and the
/// end event before the GPU reaches them: the measurement is device time only, not
/// host launch latency.
struct Timer<'a> {
    g: &'a CudaKernels,
    filler_src: CudaSlice<bf16>,
    filler_dst: CudaSlice<bf16>,
}

impl<'a> Timer<'a> {
    fn new(g: &'a CudaKernels) -> Result<Self> {
        let n = 128 << 20;
        Ok(Self {
            g,
            filler_src: random_bf16(g.stream(), n, 99)?,
            filler_dst: unsafe_alloc(g.stream(), n)?,
        })
    }

    /// Median milliseconds of `f(i)` over REPEATS launches, after WARMUP.
    fn median_ms(&mut self, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        let (ctx, stream) = (self.g.context(), self.g.stream());
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        for i in 0..WARMUP {
            f(i)?;
        }
        let mut times = Vec::with_capacity(REPEATS);
        for i in 0..REPEATS {
            let (start, end) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
            stream.memcpy_dtod(&self.filler_src, &mut self.filler_dst)?;
            start.record(stream)?;
            f(WARMUP + i)?;
            end.record(stream)?;
            times.push(start.elapsed_ms(&end)? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[REPEATS / 2])
    }
}

/// Random bf16 in [-1, 1), generated on the host in a 16 MB pattern and tiled.
fn random_bf16(
    stream: &std::sync::Arc<CudaStream>,
    n: usize,
    seed: u64,
) -> Result<CudaSlice<bf16>> {
    let pattern_len = n.min(8 << 20);
    let pattern: Vec<bf16> = kernels::testdata::uniform_pm1(pattern_len, seed)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let src = stream.clone_htod(&pattern)?;
    let mut dst = unsafe_alloc(stream, n)?;
    let mut off = 0;
    while off < n {
        let len = pattern_len.min(n - off);
        stream.memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(off..off + len))?;
        off += len;
    }
    Ok(dst)
}

fn unsafe_alloc(stream: &std::sync::Arc<CudaStream>, n: usize) -> Result<CudaSlice<bf16>> {
    // SAFETY: every caller overwrites the whole buffer before reading it.
    Ok(unsafe { stream.alloc::<bf16>(n) }?)
}

fn copies_for(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(1, 64)
}

fn copy_bandwidth(g: &CudaKernels, t: &mut Timer) -> Result<f64> {
    let n = 1usize << 30; // 2 GiB of bf16
    let src = random_bf16(g.stream(), n, 1)?;
    let mut dst = unsafe_alloc(g.stream(), n)?;
    let ms = t.median_ms(|_| Ok(g.stream().memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
}

struct Heads {
    label: &'static str,
    n_heads: usize,
    n_kv_heads: usize,
}

const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;

/// `batch` sequences of `ctx` keys with `q_len` query rows each, pages laid out
/// contiguously from `first_block`.
fn attn_meta(batch: usize, ctx: usize, q_len: usize, first_block: usize) -> AttnMeta {
    let blocks = ctx.div_ceil(BLOCK);
    AttnMeta {
        block_size: BLOCK,
        q_indptr: (0..=batch as u32).map(|s| s * q_len as u32).collect(),
        ctx_lens: vec![ctx as u32; batch],
        block_tables: (0..batch * blocks)
            .map(|i| (first_block + i) as u32)
            .collect(),
        max_blocks: blocks,
        sliding_window: None,
    }
}

struct AttnRun {
    ms: f64,
    work: WorkPlan,
}

/// Times paged attention for `batch × q_len` query rows over `ctx` keys each, rotating
/// over disjoint page ranges of one cache when a launch's K/V would fit in L2.
fn time_attention(
    g: &CudaKernels,
    t: &mut Timer,
    heads: &Heads,
    batch: usize,
    ctx: usize,
    q_len: usize,
    config: AttnPlanConfig,
) -> Result<AttnRun> {
    let kv_bytes = batch * ctx * heads.n_kv_heads * HEAD_DIM * 2 * 2;
    let copies = copies_for(kv_bytes);
    let blocks = batch * ctx.div_ceil(BLOCK);
    let layout = KvLayout {
        num_blocks: blocks * copies,
        n_kv_heads: heads.n_kv_heads,
        block_size: BLOCK,
        head_dim: HEAD_DIM,
    };
    let k_cache = random_bf16(g.stream(), layout.len(), 2)?;
    let v_cache = random_bf16(g.stream(), layout.len(), 3)?;
    let rows = batch * q_len * heads.n_heads * HEAD_DIM;
    let q = random_bf16(g.stream(), rows, 4)?;
    let mut out = unsafe_alloc(g.stream(), rows)?;
    let plans: Vec<AttnPlan> = (0..copies)
        .map(|c| {
            g.plan_attention(
                &attn_meta(batch, ctx, q_len, c * blocks),
                heads.n_heads,
                layout,
                config,
            )
        })
        .collect::<Result<_>>()?;
    let ms =
        t.median_ms(|i| g.paged_attention(&q, &k_cache, &v_cache, &plans[i % copies], &mut out))?;
    Ok(AttnRun {
        ms,
        work: plans[0].work().clone(),
    })
}

fn decode_table(g: &CudaKernels, t: &mut Timer, copy_gbs: f64, quick: bool) -> Result<()> {
    println!("\n### Decode attention (paged, bf16 KV, block 16, head_dim 128)\n");
    println!("GB/s counts K and V once plus q and out; \"no split\" is the same kernel with split-K off.\n");
    println!("| heads q/kv | batch | context | time (µs) | KV (MB) | GB/s | % of copy | blocks × splits | no split: GB/s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let batches: &[usize] = if quick { &[1, 64] } else { &[1, 16, 64, 256] };
    let no_split = AttnPlanConfig {
        max_splits: 1,
        ..AttnPlanConfig::default()
    };
    for heads in [
        Heads {
            label: "48/8 (TP=1)",
            n_heads: 48,
            n_kv_heads: 8,
        },
        Heads {
            label: "24/4 (TP=2)",
            n_heads: 24,
            n_kv_heads: 4,
        },
    ] {
        for &batch in batches {
            for &ctx in &[512usize, 4096, 32768] {
                let kv = (batch * ctx * heads.n_kv_heads * HEAD_DIM * 2 * 2) as f64;
                let qo = (batch * heads.n_heads * HEAD_DIM * 2 * 2) as f64;
                let gbs = |ms: f64| (kv + qo) / (ms * 1e-3) / 1e9;
                let run = time_attention(g, t, &heads, batch, ctx, 1, AttnPlanConfig::default())?;
                let base = if run.work.max_splits > 1 {
                    format!(
                        "{:.0}",
                        gbs(time_attention(g, t, &heads, batch, ctx, 1, no_split)?.ms)
                    )
                } else {
                    "–".into()
                };
                println!(
                    "| {} | {batch} | {ctx} | {:.1} | {:.1} | {:.0} | {:.0}% | {} × {} | {base} |",
                    heads.label,
                    run.ms * 1e3,
                    kv / 1e6,
                    gbs(run.ms),
                    100.0 * gbs(run.ms) / copy_gbs,
                    batch * heads.n_kv_heads,
                    run.work.max_splits.max(1),
                );
            }
        }
    }
    Ok(())
}

fn prefill_table(g: &CudaKernels, t: &mut Timer) -> Result<()> {
    println!("\n### Prefill attention (causal, one sequence, q_len = context)\n");
    println!("| heads q/kv | tokens | time (ms) | TFLOP/s |");
    println!("|---|---|---|---|");
    for heads in [
        Heads {
            label: "48/8 (TP=1)",
            n_heads: 48,
            n_kv_heads: 8,
        },
        Heads {
            label: "24/4 (TP=2)",
            n_heads: 24,
            n_kv_heads: 4,
        },
    ] {
        for &n in &[2048usize, 8192] {
            let run = time_attention(g, t, &heads, 1, n, n, AttnPlanConfig::default())?;
            // QK^T and PV over the causal half (n(n+1)/2 pairs), 2 FLOPs per MAC.
            let flops = 4.0 * (n * (n + 1) / 2) as f64 * HEAD_DIM as f64 * heads.n_heads as f64;
            println!(
                "| {} | {n} | {:.3} | {:.0} |",
                heads.label,
                run.ms,
                flops / (run.ms * 1e-3) / 1e12
            );
        }
    }
    Ok(())
}

fn elementwise_table(g: &CudaKernels, t: &mut Timer, copy_gbs: f64) -> Result<()> {
    println!("\n### Elementwise kernels (4096 tokens, Codestral-22B TP=1 shapes)\n");
    println!("| kernel | shape | time (µs) | bytes moved (MB) | GB/s | % of copy |");
    println!("|---|---|---|---|---|---|");
    let n = 4096usize;
    let (hidden, f, nh, nkv) = (6144usize, 16384usize, 48usize, 8usize);
    let row = |label: &str, shape: &str, bytes: usize, ms: f64| {
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        println!(
            "| {label} | {shape} | {:.1} | {:.1} | {gbs:.0} | {:.0}% |",
            ms * 1e3,
            bytes as f64 / 1e6,
            100.0 * gbs / copy_gbs
        );
    };
    let s = g.stream();

    let bytes = 4 * n * hidden * 2;
    let copies = copies_for(bytes);
    let weight = random_bf16(s, hidden, 9)?;
    let mut res: Vec<_> = (0..copies)
        .map(|c| random_bf16(s, n * hidden, 10 + c as u64))
        .collect::<Result<_>>()?;
    let delta: Vec<_> = (0..copies)
        .map(|c| random_bf16(s, n * hidden, 80 + c as u64))
        .collect::<Result<_>>()?;
    let mut normed = unsafe_alloc(s, n * hidden)?;
    let ms = t.median_ms(|i| {
        let c = i % copies;
        g.fused_add_rms_norm(&mut res[c], &delta[c], &weight, 1e-5, hidden, &mut normed)
    })?;
    row("fused_add_rms_norm", "4096×6144", bytes, ms);
    drop((res, delta));

    let bytes = 2 * n * (nh + nkv) * HEAD_DIM * 2;
    let copies = copies_for(bytes);
    let mut qs: Vec<_> = (0..copies)
        .map(|c| random_bf16(s, n * nh * HEAD_DIM, 20 + c as u64))
        .collect::<Result<_>>()?;
    let mut ks: Vec<_> = (0..copies)
        .map(|c| random_bf16(s, n * nkv * HEAD_DIM, 40 + c as u64))
        .collect::<Result<_>>()?;
    let positions = s.clone_htod(&(0..n as u32).map(|p| p * 7).collect::<Vec<_>>())?;
    let ms = t.median_ms(|i| {
        let c = i % copies;
        let (q, k) = (&mut qs[c], &mut ks[c]);
        g.rope(q, k, &positions, nh, nkv, HEAD_DIM, 1e6)
    })?;
    row("rope (q and k)", "4096×(48+8)×128", bytes, ms);
    drop((qs, ks));

    let bytes = 3 * n * f * 2;
    let copies = copies_for(bytes);
    let gate_up: Vec<_> = (0..copies)
        .map(|c| random_bf16(s, n * 2 * f, 60 + c as u64))
        .collect::<Result<_>>()?;
    let mut out = unsafe_alloc(s, n * f)?;
    let ms = t.median_ms(|i| g.swiglu(&gate_up[i % copies], f, &mut out))?;
    row("swiglu", "4096×2·16384", bytes, ms);
    drop(gate_up);

    let layout = KvLayout {
        num_blocks: 4 * n / BLOCK,
        n_kv_heads: nkv,
        block_size: BLOCK,
        head_dim: HEAD_DIM,
    };
    let mut kc = unsafe_alloc(s, layout.len())?;
    let mut vc = unsafe_alloc(s, layout.len())?;
    let (k, v) = (
        random_bf16(s, n * nkv * HEAD_DIM, 70)?,
        random_bf16(s, n * nkv * HEAD_DIM, 71)?,
    );
    let slots: Vec<CudaSlice<u32>> = (0..4u32)
        .map(|c| s.clone_htod(&(0..n as u32).map(|t| c * n as u32 + t).collect::<Vec<_>>()))
        .collect::<std::result::Result<_, _>>()?;
    let ms =
        t.median_ms(|i| g.reshape_and_cache(&k, &v, &mut kc, &mut vc, &slots[i % 4], layout))?;
    row(
        "reshape_and_cache",
        "4096×8×128 (K+V)",
        4 * n * nkv * HEAD_DIM * 2,
        ms,
    );
    Ok(())
}

fn sampling_table(g: &CudaKernels, t: &mut Timer) -> Result<()> {
    println!("\n### Sampling support (f32 logits, vocab 32768)\n");
    println!("| kernel | rows | k | time (µs) |");
    println!("|---|---|---|---|");
    let s = g.stream();
    let vocab = 32768usize;
    for &n in &[1usize, 64, 256] {
        let logits: Vec<f32> = (0..n * vocab)
            .map(|i| ((i as f32) * 0.618).sin() * 10.0)
            .collect();
        let logits = s.clone_htod(&logits)?;
        let mut ids = s.alloc_zeros::<u32>(n)?;
        let ms = t.median_ms(|_| g.argmax_rows(&logits, vocab, &mut ids))?;
        println!("| argmax_rows | {n} | – | {:.1} |", ms * 1e3);
        let k = 64;
        let temps = s.clone_htod(&vec![0.8f32; n])?;
        let (mut v, mut ix, mut lse) = (
            s.alloc_zeros::<f32>(n * k)?,
            s.alloc_zeros::<u32>(n * k)?,
            s.alloc_zeros::<f32>(n)?,
        );
        let ms =
            t.median_ms(|_| g.top_k_rows(&logits, vocab, k, &temps, &mut v, &mut ix, &mut lse))?;
        println!("| top_k_rows | {n} | {k} | {:.1} |", ms * 1e3);
    }
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let g = CudaKernels::new(0)?;
    let name = g.context().name()?;
    let mut t = Timer::new(&g)?;
    let copy_gbs = copy_bandwidth(&g, &mut t)?;
    println!("## CUDA kernel microbenchmarks\n");
    println!(
        "device: {name} (sm_{}, {} SMs); device-to-device copy: {copy_gbs:.0} GB/s (read + write); \
         median of {REPEATS} after {WARMUP} warm-up launches",
        g.arch(),
        g.num_sms()
    );
    decode_table(&g, &mut t, copy_gbs, quick)?;
    prefill_table(&g, &mut t)?;
    elementwise_table(&g, &mut t, copy_gbs)?;
    sampling_table(&g, &mut t)?;
    Ok(())
}
