//! Every CUDA kernel against its CPU reference op, on a GPU. The GPU tests are
//! `#[ignore = "needs a GPU: STRAL_GPU=1"]`, so a CPU run reports them as ignored;
//! the device run (`worker/scripts/device-run.sh`) runs them with `--ignored`.
//!
//! Inputs are random and bf16-representable: the reference runs in f32 on exactly the
//! values the GPU sees, so the only differences are the GPU's roundings, which the
//! tolerances below bound:
//! - bf16 has an 8-bit significand: rounding an output costs at most half an ulp,
//!   2⁻⁹ relative. Elementwise kernels compute in f32 and round once, so they must
//!   agree to one ulp: |gpu − ref| ≤ 2⁻⁸·|ref| (+ a tiny absolute term for results
//!   that cancel to ~0, where the f32 inputs' own error dominates).
//! - Copies (KV write, embedding) and selections (argmax, top-k ids and values) are
//!   exact.
//! - Attention rounds the softmax weights P to bf16 before P·V (relative error 2⁻⁹ per
//!   weight) and the output once more. The output is a convex combination of V rows
//!   (|v| ≤ 1), so the error is at most ~2⁻⁹ + 2⁻⁹·|out| ≈ 0.004 in the worst case and
//!   much less on average; we require max |err| ≤ 1.6e-2 (four times the bound, for
//!   f32 accumulation order over 32K keys and split-K merging) and relative L2 error
//!   ‖gpu − ref‖/‖ref‖ ≤ 1e-2 — the usual bar for bf16 operands.
//!
//! Cache slots the reference never reads are filled with NaN on the GPU, so a kernel
//! that touches a key outside a sequence's range poisons its output and fails.

use std::sync::OnceLock;

use cudarc::driver::CudaSlice;
use half::bf16;
use kernels::cuda::{driver_available, AttnPlanConfig, CudaKernels};
use kernels::reference::{self, AttnMeta, KvLayout};
use kernels::KernelError;

/// The GPU every test shares. Only `--ignored` runs reach this; without a usable GPU
/// they fail (a GPU test that silently passes would claim a result nobody measured).
fn gpu() -> Option<&'static CudaKernels> {
    static GPU: OnceLock<CudaKernels> = OnceLock::new();
    Some(GPU.get_or_init(|| {
        assert!(
            std::env::var("STRAL_GPU").is_ok_and(|v| v == "1"),
            "GPU test run without STRAL_GPU=1 (run it on a GPU machine: worker/scripts/device-run.sh)"
        );
        CudaKernels::new(0).unwrap_or_else(|e| panic!("STRAL_GPU=1 but: {e}"))
    }))
}

/// SplitMix64: deterministic, dependency-free test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    fn f32(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
    /// bf16-representable values: (host f32 copy, bf16 for upload).
    fn bf16s(&mut self, n: usize, scale: f32) -> (Vec<f32>, Vec<bf16>) {
        let b: Vec<bf16> = (0..n).map(|_| bf16::from_f32(self.f32(scale))).collect();
        (b.iter().map(|x| x.to_f32()).collect(), b)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u32 + 1) as usize);
        }
    }
}

fn up<T: cudarc::driver::DeviceRepr>(g: &CudaKernels, v: &[T]) -> CudaSlice<T> {
    g.stream().clone_htod(v).expect("upload")
}

fn down_bf16(g: &CudaKernels, d: &CudaSlice<bf16>) -> Vec<f32> {
    let h = g.stream().clone_dtoh(d).expect("download");
    h.iter().map(|x| x.to_f32()).collect()
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Asserts one-ulp agreement (see the module docs).
fn assert_ulp(op: &str, gpu: &[f32], reference: &[f32], abs: f32) {
    assert_eq!(gpu.len(), reference.len(), "{op}: length");
    for (i, (g, r)) in gpu.iter().zip(reference).enumerate() {
        assert!(
            (g - r).abs() <= r.abs() / 256.0 + abs,
            "{op}[{i}]: gpu {g} vs reference {r}"
        );
    }
}

#[test]
fn opening_without_a_driver_is_a_typed_error_not_a_panic() {
    let opened = CudaKernels::new(0);
    if driver_available() {
        // With a driver, opening must not claim there is none; on a GPU it must work.
        assert!(
            !matches!(opened, Err(KernelError::NoDriver)),
            "driver_available() said yes but CudaKernels::new said NoDriver"
        );
        if std::env::var("STRAL_GPU").is_ok_and(|v| v == "1") {
            opened.unwrap();
        }
    } else {
        assert!(matches!(opened, Err(KernelError::NoDriver)));
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn rms_norm_and_fused_add_match_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(1);
    for &hidden in &[64usize, 6144] {
        for &n in &[1usize, 17, 257] {
            let (x, xb) = rng.bf16s(n * hidden, 2.0);
            let (d, db) = rng.bf16s(n * hidden, 2.0);
            let (w, wb) = rng.bf16s(hidden, 1.5);
            let eps = 1e-5;

            let mut out = g.stream().alloc_zeros::<bf16>(n * hidden).unwrap();
            g.rms_norm(&up(g, &xb), &up(g, &wb), eps, hidden, &mut out)
                .unwrap();
            let mut want = vec![0f32; n * hidden];
            reference::rms_norm(&x, &w, eps, hidden, &mut want);
            assert_ulp("rms_norm", &down_bf16(g, &out), &want, 1e-6);

            let mut res = up(g, &xb);
            let mut normed = g.stream().alloc_zeros::<bf16>(n * hidden).unwrap();
            g.fused_add_rms_norm(&mut res, &up(g, &db), &up(g, &wb), eps, hidden, &mut normed)
                .unwrap();
            // The kernel stores the bf16-rounded sum and normalises that (documented).
            let mut want_res = x.clone();
            let mut scratch = vec![0f32; n * hidden];
            reference::fused_add_rms_norm(&mut want_res, &d, &w, eps, hidden, &mut scratch);
            let want_res: Vec<f32> = want_res.into_iter().map(round_bf16).collect();
            assert_eq!(
                down_bf16(g, &res),
                want_res,
                "residual n={n} hidden={hidden}"
            );
            reference::rms_norm(&want_res, &w, eps, hidden, &mut want);
            assert_ulp("fused_add_rms_norm", &down_bf16(g, &normed), &want, 1e-6);
        }
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn rope_matches_reference_at_far_positions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(2);
    for &(nh, nkv, d, theta) in &[(48, 8, 128, 1e6f32), (8, 2, 64, 1e4), (24, 4, 128, 1e6)] {
        for &n in &[1usize, 17, 257] {
            let (mut q, qb) = rng.bf16s(n * nh * d, 1.0);
            let (mut k, kb) = rng.bf16s(n * nkv * d, 1.0);
            let mut pos: Vec<u32> = (0..n).map(|_| rng.below(32768)).collect();
            pos[0] = 32767;
            let (mut qd, mut kd) = (up(g, &qb), up(g, &kb));
            g.rope(&mut qd, &mut kd, &up(g, &pos), nh, nkv, d, theta)
                .unwrap();
            reference::rope(&mut q, &mut k, &pos, nh, nkv, d, theta);
            assert_ulp("rope q", &down_bf16(g, &qd), &q, 1e-5);
            assert_ulp("rope k", &down_bf16(g, &kd), &k, 1e-5);
        }
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn reshape_and_cache_writes_exactly_the_mapped_slots() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(3);
    for &(nkv, d) in &[(8usize, 128usize), (2, 64)] {
        for &n in &[1usize, 17, 257] {
            let layout = KvLayout {
                num_blocks: 40,
                n_kv_heads: nkv,
                block_size: 16,
                head_dim: d,
            };
            let mut slots: Vec<u32> = (0..(40 * 16)).collect();
            rng.shuffle(&mut slots);
            slots.truncate(n);
            let (k, kb) = rng.bf16s(n * nkv * d, 1.0);
            let (v, vb) = rng.bf16s(n * nkv * d, 1.0);
            let mut kc = g.stream().alloc_zeros::<bf16>(layout.len()).unwrap();
            let mut vc = g.stream().alloc_zeros::<bf16>(layout.len()).unwrap();
            g.reshape_and_cache(
                &up(g, &kb),
                &up(g, &vb),
                &mut kc,
                &mut vc,
                &up(g, &slots),
                layout,
            )
            .unwrap();
            let (mut kr, mut vr) = (vec![0f32; layout.len()], vec![0f32; layout.len()]);
            reference::reshape_and_cache(&k, &v, &mut kr, &mut vr, &slots, layout);
            assert_eq!(down_bf16(g, &kc), kr);
            assert_eq!(down_bf16(g, &vc), vr);
        }
    }
}

/// The fused RoPE + KV write over one QKV row equals `rope` then `reshape_and_cache`
/// on the split rows bit for bit (same math, one rounding), and the reference to an ulp.
#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn rope_qkv_cache_equals_rope_then_reshape_and_cache_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(4);
    for &(nh, nkv, d, theta) in &[(48, 8, 128, 1e6f32), (8, 2, 64, 1e4)] {
        for &n in &[1usize, 5, 257] {
            let layout = KvLayout {
                num_blocks: 40,
                n_kv_heads: nkv,
                block_size: 16,
                head_dim: d,
            };
            let mut slots: Vec<u32> = (0..(40 * 16)).collect();
            rng.shuffle(&mut slots);
            slots.truncate(n);
            let pos: Vec<u32> = (0..n).map(|_| rng.below(32768)).collect();
            let (qkv, qkvb) = rng.bf16s(n * (nh + 2 * nkv) * d, 1.0);
            let (qd, kvd) = (nh * d, nkv * d);
            let split = |from: usize, len: usize| -> Vec<bf16> {
                qkvb.chunks_exact(qd + 2 * kvd)
                    .flat_map(|r| r[from..from + len].to_vec())
                    .collect()
            };
            let (pos_d, slots_d) = (up(g, &pos), up(g, &slots));
            let zeros = |len| g.stream().alloc_zeros::<bf16>(len).unwrap();
            // Fused.
            let (mut q_f, mut kc_f, mut vc_f) =
                (zeros(n * qd), zeros(layout.len()), zeros(layout.len()));
            g.rope_qkv_cache(
                &up(g, &qkvb),
                &mut q_f,
                &mut kc_f,
                &mut vc_f,
                &pos_d,
                &slots_d,
                nh,
                layout,
                theta,
            )
            .unwrap();
            // Unfused.
            let (mut q_u, mut k_u, v_u) = (
                up(g, &split(0, qd)),
                up(g, &split(qd, kvd)),
                up(g, &split(qd + kvd, kvd)),
            );
            let (mut kc_u, mut vc_u) = (zeros(layout.len()), zeros(layout.len()));
            g.rope(&mut q_u, &mut k_u, &pos_d, nh, nkv, d, theta)
                .unwrap();
            g.reshape_and_cache(&k_u, &v_u, &mut kc_u, &mut vc_u, &slots_d, layout)
                .unwrap();
            assert_eq!(down_bf16(g, &q_f), down_bf16(g, &q_u), "q (n {n}, d {d})");
            assert_eq!(
                down_bf16(g, &kc_f),
                down_bf16(g, &kc_u),
                "k cache (n {n}, d {d})"
            );
            assert_eq!(
                down_bf16(g, &vc_f),
                down_bf16(g, &vc_u),
                "v cache (n {n}, d {d})"
            );
            // And the reference, to an ulp.
            let (mut kr, mut vr) = (vec![0f32; layout.len()], vec![0f32; layout.len()]);
            let q_r =
                reference::rope_qkv_cache(&qkv, &pos, &mut kr, &mut vr, &slots, nh, layout, theta);
            assert_ulp("rope_qkv_cache q", &down_bf16(g, &q_f), &q_r, 1e-5);
            assert_ulp("rope_qkv_cache k", &down_bf16(g, &kc_f), &kr, 1e-5);
            assert_eq!(down_bf16(g, &vc_f), vr, "v is copied unchanged");
        }
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn swiglu_matches_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(4);
    for &f in &[64usize, 16384] {
        for &n in &[1usize, 17, 257] {
            let (gu, gub) = rng.bf16s(n * 2 * f, 4.0);
            let mut out = g.stream().alloc_zeros::<bf16>(n * f).unwrap();
            g.swiglu(&up(g, &gub), f, &mut out).unwrap();
            let mut want = vec![0f32; n * f];
            reference::swiglu(&gu, f, &mut want);
            assert_ulp("swiglu", &down_bf16(g, &out), &want, 1e-6);
        }
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn embedding_gathers_rows_exactly() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(5);
    let (vocab, hidden) = (1000usize, 6144usize);
    let (table, tb) = rng.bf16s(vocab * hidden, 1.0);
    let table_d = up(g, &tb);
    for &n in &[1usize, 17, 257] {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab as u32)).collect();
        let mut out = g.stream().alloc_zeros::<bf16>(n * hidden).unwrap();
        g.embedding(&up(g, &ids), &table_d, hidden, &mut out)
            .unwrap();
        let mut want = vec![0f32; n * hidden];
        reference::embedding(&ids, &table, hidden, &mut want);
        assert_eq!(down_bf16(g, &out), want);
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn argmax_argmax_pairs_and_top_k_match_reference_exactly() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(6);
    let vocab = 32768usize;
    for &n in &[1usize, 17, 257] {
        let mut logits: Vec<f32> = (0..n * vocab).map(|_| rng.f32(8.0)).collect();
        // Ties: a duplicated maximum, and a row of many equal values.
        let row0 = &mut logits[..vocab];
        row0[77] = 20.0;
        row0[5] = 20.0;
        if n > 1 {
            for x in &mut logits[vocab..vocab + 5000] {
                *x = 3.0;
            }
        }
        let logits_d = up(g, &logits);
        let mut am = g.stream().alloc_zeros::<u32>(n).unwrap();
        g.argmax_rows(&logits_d, vocab, &mut am).unwrap();
        assert_eq!(
            g.stream().clone_dtoh(&am).unwrap(),
            reference::argmax_rows(&logits, vocab)
        );
        // Pairs on a vocab-parallel shard's width too (TP 2 of Codestral's vocab).
        for width in [vocab, vocab / 2] {
            let shard: Vec<f32> = logits
                .chunks_exact(vocab)
                .flat_map(|r| r[..width].iter().copied())
                .collect();
            let mut pairs = g.stream().alloc_zeros::<f32>(2 * n).unwrap();
            g.argmax_pairs(&up(g, &shard), width, &mut pairs).unwrap();
            let got = g.stream().clone_dtoh(&pairs).unwrap();
            let want = reference::argmax_pairs(&shard, width);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "argmax_pairs, width {width}, {n} rows"
            );
        }

        let temps: Vec<f32> = (0..n).map(|i| [0.0, 0.7, 1.0, 1.3][i % 4]).collect();
        for &k in &[1usize, 40, 1024] {
            let mut v = g.stream().alloc_zeros::<f32>(n * k).unwrap();
            let mut ix = g.stream().alloc_zeros::<u32>(n * k).unwrap();
            let mut lse = g.stream().alloc_zeros::<f32>(n).unwrap();
            g.top_k_rows(
                &logits_d,
                vocab,
                k,
                &up(g, &temps),
                &mut v,
                &mut ix,
                &mut lse,
            )
            .unwrap();
            let (mut wv, mut wi, mut wl) = (vec![0f32; n * k], vec![0u32; n * k], vec![0f32; n]);
            reference::top_k_rows(&logits, vocab, k, &temps, &mut wv, &mut wi, &mut wl);
            assert_eq!(
                g.stream().clone_dtoh(&ix).unwrap(),
                wi,
                "top-k ids n={n} k={k}"
            );
            assert_eq!(
                g.stream().clone_dtoh(&v).unwrap(),
                wv,
                "top-k values n={n} k={k}"
            );
            // f32 tree sum on the GPU vs f64 on the CPU over 32768 terms.
            for (a, b) in g.stream().clone_dtoh(&lse).unwrap().iter().zip(&wl) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}");
            }
        }
    }
}

/// One attention scenario: per-sequence query and context lengths.
struct AttnCase {
    q_lens: Vec<u32>,
    ctx_lens: Vec<u32>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<u32>,
    config: AttnPlanConfig,
}

impl AttnCase {
    fn new(q_lens: Vec<u32>, ctx_lens: Vec<u32>, heads: (usize, usize, usize)) -> Self {
        Self {
            q_lens,
            ctx_lens,
            n_heads: heads.0,
            n_kv_heads: heads.1,
            head_dim: heads.2,
            window: None,
            config: AttnPlanConfig::default(),
        }
    }

    fn window(mut self, w: u32) -> Self {
        self.window = Some(w);
        self
    }

    /// Splits aggressively, so the split-K + merge path runs at small sizes.
    fn force_splits(mut self) -> Self {
        self.config = AttnPlanConfig {
            min_split_keys: 64,
            max_splits: 64,
        };
        self
    }
}

/// Decode: every sequence has one query row.
fn decode(ctx_lens: Vec<u32>, heads: (usize, usize, usize)) -> AttnCase {
    AttnCase::new(vec![1; ctx_lens.len()], ctx_lens, heads)
}

const TP1: (usize, usize, usize) = (48, 8, 128); // GQA 6, Codestral at TP=1
const TP2: (usize, usize, usize) = (24, 4, 128); // GQA 6, TP=2
const GQA2_D64: (usize, usize, usize) = (8, 4, 64);

fn check_attention(case: AttnCase, seed: u64) {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(seed);
    let (nh, nkv, d, bs) = (case.n_heads, case.n_kv_heads, case.head_dim, 16usize);
    let n_seqs = case.ctx_lens.len();
    let blocks_per_seq: Vec<usize> = case
        .ctx_lens
        .iter()
        .map(|&c| (c as usize).div_ceil(bs))
        .collect();
    let max_blocks = blocks_per_seq.iter().copied().max().unwrap_or(1).max(1);
    // Pages scattered over a cache with spare blocks, in random order.
    let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
    let mut pages: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut pages);
    let mut block_tables = vec![0u32; n_seqs * max_blocks];
    let mut next = 0;
    for (s, &nb) in blocks_per_seq.iter().enumerate() {
        block_tables[s * max_blocks..s * max_blocks + nb].copy_from_slice(&pages[next..next + nb]);
        next += nb;
    }
    let mut q_indptr = vec![0u32];
    for &q in &case.q_lens {
        q_indptr.push(q_indptr.last().unwrap() + q);
    }
    let meta = AttnMeta {
        block_size: bs,
        q_indptr,
        ctx_lens: case.ctx_lens.clone(),
        block_tables,
        max_blocks,
        sliding_window: case.window,
    };
    let layout = KvLayout {
        num_blocks,
        n_kv_heads: nkv,
        block_size: bs,
        head_dim: d,
    };
    // Fill only the slots of each sequence's context; the rest stays NaN on the GPU.
    let nan = bf16::from_f32(f32::NAN);
    let (mut kc, mut vc) = (vec![0f32; layout.len()], vec![0f32; layout.len()]);
    let (mut kcb, mut vcb) = (vec![nan; layout.len()], vec![nan; layout.len()]);
    for s in 0..n_seqs {
        for p in 0..meta.ctx_lens[s] as usize {
            let slot = meta.block_tables[s * max_blocks + p / bs] as usize * bs + p % bs;
            for h in 0..nkv {
                let off = layout.offset(slot, h);
                for i in off..off + d {
                    let (kx, vx) = (bf16::from_f32(rng.f32(1.0)), bf16::from_f32(rng.f32(1.0)));
                    (kcb[i], vcb[i], kc[i], vc[i]) = (kx, vx, kx.to_f32(), vx.to_f32());
                }
            }
        }
    }
    let n_tokens = meta.n_tokens();
    let (q, qb) = rng.bf16s(n_tokens * nh * d, 2.0);

    let plan = g.plan_attention(&meta, nh, layout, case.config).unwrap();
    let mut out = g.stream().alloc_zeros::<bf16>(n_tokens * nh * d).unwrap();
    g.paged_attention(&up(g, &qb), &up(g, &kcb), &up(g, &vcb), &plan, &mut out)
        .unwrap();
    let got = down_bf16(g, &out);
    let mut want = vec![0f32; n_tokens * nh * d];
    reference::paged_attention(&q, &kc, &vc, &meta, nh, layout, &mut want);

    let (mut max_err, mut err2, mut ref2) = (0f32, 0f64, 0f64);
    for (a, b) in got.iter().zip(&want) {
        assert!(
            a.is_finite(),
            "non-finite output (a key outside the context was read?)"
        );
        max_err = max_err.max((a - b).abs());
        err2 += ((a - b) as f64).powi(2);
        ref2 += (*b as f64).powi(2);
    }
    let rel = (err2 / ref2.max(1e-30)).sqrt();
    let work = plan.work();
    assert!(
        max_err <= 1.6e-2 && rel <= 1e-2,
        "attention {} seqs, heads {nh}/{nkv} d{d}, window {:?}, items per tier {:?}, \
         max splits {}: max err {max_err}, rel L2 {rel}",
        n_seqs,
        case.window,
        work.tiers.each_ref().map(Vec::len),
        work.max_splits,
    );
    if case.config.min_split_keys == 64 {
        assert!(work.max_splits > 1, "the split-K path did not run");
    }
}

fn ctx_cycle(n: usize, lens: &[u32]) -> Vec<u32> {
    (0..n).map(|i| lens[i % lens.len()]).collect()
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn decode_attention_single_sequence_short_contexts() {
    for (i, &ctx) in [1u32, 15, 16, 17, 4095].iter().enumerate() {
        check_attention(decode(vec![ctx], TP1), 10 + i as u64);
        check_attention(decode(vec![ctx], GQA2_D64), 20 + i as u64);
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn decode_attention_17_sequences_mixed_lengths_and_window() {
    let ctx = ctx_cycle(17, &[1, 15, 16, 17, 4095, 300, 33]);
    check_attention(decode(ctx.clone(), TP1), 30);
    check_attention(decode(ctx.clone(), TP2).window(256), 31);
    check_attention(decode(ctx.clone(), GQA2_D64).window(17), 32);
    check_attention(decode(ctx, TP1).force_splits(), 33);
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn decode_attention_257_sequences() {
    let mut rng = Rng(40);
    let ctx: Vec<u32> = (0..257).map(|_| 1 + rng.below(1500)).collect();
    check_attention(decode(ctx.clone(), TP1), 41);
    check_attention(decode(ctx, GQA2_D64).window(100), 42);
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn decode_attention_long_32k_context_split_k() {
    check_attention(decode(vec![32768], TP1), 50);
    check_attention(decode(vec![32768, 4095, 17], TP2).window(4096), 51);
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn prefill_attention_ragged_chunks_with_prefix_hits() {
    // Chunked prefill: odd chunk sizes, ctx > q_len (cached prefix), decodes mixed in.
    let q = vec![17, 1, 100, 33, 1, 5];
    let ctx = vec![17, 40, 300, 4095, 1, 1000];
    check_attention(AttnCase::new(q.clone(), ctx.clone(), TP1), 60);
    check_attention(AttnCase::new(q.clone(), ctx.clone(), TP2).window(256), 61);
    check_attention(
        AttnCase::new(q.clone(), ctx.clone(), GQA2_D64).window(33),
        62,
    );
    check_attention(AttnCase::new(q, ctx, TP1).force_splits(), 63);
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn prefill_attention_long_prompt_causal() {
    // One 2K prompt from scratch and a 257-token chunk on a 32K prefix; fewer heads keep
    // the CPU reference quick while the GQA ratio stays 6.
    check_attention(AttnCase::new(vec![2048], vec![2048], (12, 2, 128)), 70);
    check_attention(
        AttnCase::new(vec![2048], vec![2048], (12, 2, 128)).window(512),
        71,
    );
    check_attention(AttnCase::new(vec![257], vec![32768], (12, 2, 128)), 72);
    check_attention(
        AttnCase::new(vec![1000, 999], vec![1000, 1500], (4, 2, 64)),
        73,
    );
}
