//! CPU f32 reference ops: the ground truth for every CUDA kernel and the math of the
//! CPU worker backend.
//!
//! Every function takes plain slices in the layouts stated in the crate docs and
//! panics only on caller bugs (slice lengths that contradict the stated shapes);
//! shapes are validated once per step by the caller, not per op.
//!
//! Costs: `linear` is the only op that matters (O(n·in·out)); it uses a
//! rayon-parallel row-dot kernel for small token counts (decode, where packing a
//! weight matrix would cost as much as reading it) and a packed, threaded SGEMM
//! otherwise. Attention is O(Σ q_len · ctx_len · head_dim) with no tiling.

use rayon::prelude::*;

/// Below this many rows, `linear` streams weight rows (batched GEMV) instead of packing
/// the weight matrix: packing a 32768×512 `lm_head` costs more than the product itself.
const GEMV_MAX_ROWS: usize = 48;

/// `y[n, out] = x[n, in] · w[out, in]ᵀ`.
pub fn linear(x: &[f32], w: &[f32], n: usize, in_f: usize, out_f: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * in_f, "linear: x");
    assert_eq!(w.len(), out_f * in_f, "linear: w");
    assert_eq!(y.len(), n * out_f, "linear: y");
    if n == 0 || out_f == 0 {
        return;
    }
    if n < GEMV_MAX_ROWS {
        // Parallel over chunks of output features; each weight row is read once for all n rows.
        let chunk = 64.max(out_f / (4 * rayon::current_num_threads().max(1)));
        let mut yt = vec![0f32; out_f * n]; // [out, n]
        yt.par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(ci, yc)| {
                let o0 = ci * chunk;
                for (oi, yrow) in yc.chunks_mut(n).enumerate() {
                    let wrow = &w[(o0 + oi) * in_f..(o0 + oi + 1) * in_f];
                    for (t, yv) in yrow.iter_mut().enumerate() {
                        *yv = dot(&x[t * in_f..(t + 1) * in_f], wrow);
                    }
                }
            });
        for t in 0..n {
            for o in 0..out_f {
                y[t * out_f + o] = yt[o * n + t];
            }
        }
        return;
    }
    // SAFETY: the asserts above guarantee that every index matrixmultiply derives from
    // (m, k, n) and the strides lies inside `x`, `w` and `y`, and `y` does not alias them.
    unsafe {
        matrixmultiply::sgemm(
            n,
            in_f,
            out_f,
            1.0,
            x.as_ptr(),
            in_f as isize,
            1,
            w.as_ptr(),
            1,
            in_f as isize,
            0.0,
            y.as_mut_ptr(),
            out_f as isize,
            1,
        );
    }
}

/// Dot product; AVX2+FMA when the CPU has them (detected at run time).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), and the slices
        // have equal lengths (asserted), which is all `dot_avx2` requires.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len() / 16 * 16;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n <= a.len() == b.len(), so both 8-lane loads at i and i + 8 are in bounds.
        unsafe {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
        }
        i += 16;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

/// Dot product with eight independent accumulators so that LLVM vectorizes it.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) · weight`, per row of `hidden`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, hidden: usize, out: &mut [f32]) {
    assert_eq!(weight.len(), hidden, "rms_norm: weight");
    assert_eq!(x.len(), out.len(), "rms_norm: out");
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    }
}

/// Residual add fused with RMSNorm: `residual += delta; normed = rms_norm(residual)`.
pub fn fused_add_rms_norm(
    residual: &mut [f32],
    delta: &[f32],
    weight: &[f32],
    eps: f32,
    hidden: usize,
    normed: &mut [f32],
) {
    assert_eq!(residual.len(), delta.len(), "fused_add_rms_norm: delta");
    for (r, d) in residual.iter_mut().zip(delta) {
        *r += d;
    }
    rms_norm(residual, weight, eps, hidden, normed);
}

/// Inverse frequencies `theta^(-2i/head_dim)` for `i < head_dim/2`.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Rotary embedding in place on `q [n, n_heads·head_dim]` and `k [n, n_kv_heads·head_dim]`
/// at the per-token `positions`, rotate-half convention: the pair `(x[i], x[i+d/2])`
/// is rotated by `pos · inv_freq[i]`.
pub fn rope(
    q: &mut [f32],
    k: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    theta: f32,
) {
    let n = positions.len();
    assert_eq!(q.len(), n * n_heads * head_dim, "rope: q");
    assert_eq!(k.len(), n * n_kv_heads * head_dim, "rope: k");
    let inv = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        let (sin, cos): (Vec<f32>, Vec<f32>) =
            inv.iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
        let rot = |x: &mut [f32]| {
            for h in x.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (h[i], h[i + half]);
                    h[i] = a * cos[i] - b * sin[i];
                    h[i + half] = b * cos[i] + a * sin[i];
                }
            }
        };
        rot(&mut q[t * n_heads * head_dim..(t + 1) * n_heads * head_dim]);
        rot(&mut k[t * n_kv_heads * head_dim..(t + 1) * n_kv_heads * head_dim]);
    }
}

/// Shape of one paged KV cache: `[num_blocks, n_kv_heads, block_size, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub n_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements in one cache (K or V).
    pub fn len(&self) -> usize {
        self.num_blocks * self.n_kv_heads * self.block_size * self.head_dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offset of `(slot, kv_head)`, where `slot = block · block_size + offset`.
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, off) = (slot / self.block_size, slot % self.block_size);
        ((block * self.n_kv_heads + kv_head) * self.block_size + off) * self.head_dim
    }
}

/// Writes each token's K and V (`[n, n_kv_heads·head_dim]`) into the paged caches at
/// `slot_mapping[t] = block · block_size + offset`.
pub fn reshape_and_cache(
    k: &[f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    slot_mapping: &[u32],
    layout: KvLayout,
) {
    let (h, d) = (layout.n_kv_heads, layout.head_dim);
    assert_eq!(k.len(), slot_mapping.len() * h * d, "reshape_and_cache: k");
    assert_eq!(k.len(), v.len(), "reshape_and_cache: v");
    assert_eq!(k_cache.len(), layout.len(), "reshape_and_cache: k_cache");
    assert_eq!(v_cache.len(), layout.len(), "reshape_and_cache: v_cache");
    for (t, &slot) in slot_mapping.iter().enumerate() {
        for kh in 0..h {
            let dst = layout.offset(slot as usize, kh);
            let src = (t * h + kh) * d;
            k_cache[dst..dst + d].copy_from_slice(&k[src..src + d]);
            v_cache[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
}

/// The fused form of [`rope`] then [`reshape_and_cache`] over one QKV projection:
/// `qkv [n, (n_heads + 2·n_kv_heads)·head_dim]` holds each token's q | k | v rows;
/// rotated q goes to the returned `[n, n_heads·head_dim]`, rotated k and v into the
/// caches at `slot_mapping`. Defined as exactly those two ops on the split rows.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_cache(
    qkv: &[f32],
    positions: &[u32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    slot_mapping: &[u32],
    n_heads: usize,
    layout: KvLayout,
    theta: f32,
) -> Vec<f32> {
    let (n, d, kvh) = (positions.len(), layout.head_dim, layout.n_kv_heads);
    let (qd, kvd) = (n_heads * d, kvh * d);
    assert_eq!(qkv.len(), n * (qd + 2 * kvd), "rope_qkv_cache: qkv");
    assert_eq!(slot_mapping.len(), n, "rope_qkv_cache: slot_mapping");
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in qkv.chunks_exact(qd + 2 * kvd) {
        q.extend_from_slice(&row[..qd]);
        k.extend_from_slice(&row[qd..qd + kvd]);
        v.extend_from_slice(&row[qd + kvd..]);
    }
    rope(&mut q, &mut k, positions, n_heads, kvh, d, theta);
    reshape_and_cache(&k, &v, k_cache, v_cache, slot_mapping, layout);
    q
}

/// Per-step attention metadata, computed once on the host and used by every layer.
///
/// Sequence `s` owns query rows `q_indptr[s]..q_indptr[s+1]` of the batch; after this
/// step's cache write it has `ctx_lens[s]` tokens in the cache, so its `j`-th query
/// row sits at position `ctx_lens[s] - q_len + j` and attends causally to cached
/// positions `k ≤ pos` with `k > pos - sliding_window` when a window is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttnMeta {
    pub block_size: usize,
    pub q_indptr: Vec<u32>,
    pub ctx_lens: Vec<u32>,
    /// `[n_seqs, max_blocks]`, row-major, unused entries 0.
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    pub sliding_window: Option<u32>,
}

impl AttnMeta {
    pub fn n_seqs(&self) -> usize {
        self.ctx_lens.len()
    }

    pub fn n_tokens(&self) -> usize {
        self.q_indptr.last().copied().unwrap_or(0) as usize
    }

    /// Position of every query row, in batch order.
    pub fn positions(&self) -> Vec<u32> {
        let mut pos = Vec::with_capacity(self.n_tokens());
        for s in 0..self.n_seqs() {
            let q_len = self.q_indptr[s + 1] - self.q_indptr[s];
            pos.extend((self.ctx_lens[s] - q_len)..self.ctx_lens[s]);
        }
        pos
    }

    /// Cache slot of every query row (where its K/V are written), in batch order.
    pub fn slot_mapping(&self) -> Vec<u32> {
        let bs = self.block_size as u32;
        let mut slots = Vec::with_capacity(self.n_tokens());
        for s in 0..self.n_seqs() {
            let q_len = self.q_indptr[s + 1] - self.q_indptr[s];
            for p in (self.ctx_lens[s] - q_len)..self.ctx_lens[s] {
                let block = self.block_tables[s * self.max_blocks + (p / bs) as usize];
                slots.push(block * bs + p % bs);
            }
        }
        slots
    }

    /// First key position query position `pos` may attend to.
    #[inline]
    pub fn window_start(&self, pos: u32) -> u32 {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Causal attention of the batch's query rows over the paged caches (prefill chunks
/// and decodes mixed), GQA: q head `h` reads kv head `h / (n_heads / n_kv_heads)`.
/// `q` and `out` are `[n_tokens, n_heads·head_dim]`; the scale is `1/sqrt(head_dim)`.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    meta: &AttnMeta,
    n_heads: usize,
    layout: KvLayout,
    out: &mut [f32],
) {
    let d = layout.head_dim;
    let group = n_heads / layout.n_kv_heads;
    let n_tokens = meta.n_tokens();
    assert_eq!(q.len(), n_tokens * n_heads * d, "paged_attention: q");
    assert_eq!(out.len(), q.len(), "paged_attention: out");
    let scale = 1.0 / (d as f32).sqrt();
    let bs = meta.block_size;
    // (seq, position) of each query row.
    let mut rows = Vec::with_capacity(n_tokens);
    for s in 0..meta.n_seqs() {
        let q_len = meta.q_indptr[s + 1] - meta.q_indptr[s];
        rows.extend(((meta.ctx_lens[s] - q_len)..meta.ctx_lens[s]).map(|p| (s, p)));
    }
    // Parallel over (query row, head) pairs, so a decode step's one row still spreads
    // its heads over the cores.
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .enumerate()
        .for_each(|(i, (oh, qh))| {
            let (s, pos) = rows[i / n_heads];
            let kh = (i % n_heads) / group;
            let table = &meta.block_tables[s * meta.max_blocks..(s + 1) * meta.max_blocks];
            let start = meta.window_start(pos) as usize;
            let keys = start..pos as usize + 1;
            let mut scores = vec![0f32; keys.len()];
            let slot = |p: usize| table[p / bs] as usize * bs + p % bs;
            let mut max = f32::NEG_INFINITY;
            for (sc, p) in scores.iter_mut().zip(keys.clone()) {
                let off = layout.offset(slot(p), kh);
                *sc = dot(qh, &k_cache[off..off + d]) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0.0;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            oh.fill(0.0);
            for (sc, p) in scores.iter().zip(keys.clone()) {
                let off = layout.offset(slot(p), kh);
                let w = sc / sum;
                for (o, v) in oh.iter_mut().zip(&v_cache[off..off + d]) {
                    *o += w * v;
                }
            }
        });
}

/// SwiGLU on the fused gate|up projection: `out[t, i] = silu(gu[t, i]) · gu[t, f + i]`
/// with `gu` of shape `[n, 2f]` and `out` of shape `[n, f]`.
pub fn swiglu(gate_up: &[f32], f: usize, out: &mut [f32]) {
    assert_eq!(gate_up.len(), out.len() * 2, "swiglu");
    for (gu, o) in gate_up.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = gu.split_at(f);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Gathers embedding rows: `out[t] = table[ids[t]]`, `table` is `[vocab, hidden]`.
pub fn embedding(ids: &[u32], table: &[f32], hidden: usize, out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * hidden, "embedding: out");
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        let id = id as usize;
        o.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
}

/// Index of the largest value of each row of `[n, vocab]` (first one on ties).
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Per row of `[n, vocab]`: its largest value and the first index holding it (as
/// f32, exact while `vocab ≤ 2^24`), as `[n, 2]` — [`argmax_rows`] with the maximum.
pub fn argmax_pairs(logits: &[f32], vocab: usize) -> Vec<f32> {
    argmax_rows(logits, vocab)
        .into_iter()
        .zip(logits.chunks_exact(vocab))
        .flat_map(|(i, r)| [r[i as usize], i as f32])
        .collect()
}

/// Top-k pre-filter for sampling. Per row of `logits [n, vocab]`, scaled by
/// `1 / temperatures[row]` (a temperature ≤ 0 means greedy: scale 1), writes the `k`
/// largest scaled values in descending order (lower index first on ties; ordered by
/// `f32::total_cmp`) to `values [n, k]`, their ids to `indices [n, k]`, and the
/// log-sum-exp of the whole scaled row to `lse [n]`, so that candidate `j` has
/// probability `exp(values[j] - lse)` under the full softmax.
pub fn top_k_rows(
    logits: &[f32],
    vocab: usize,
    k: usize,
    temperatures: &[f32],
    values: &mut [f32],
    indices: &mut [u32],
    lse: &mut [f32],
) {
    let n = temperatures.len();
    assert!(k >= 1 && k <= vocab, "top_k_rows: k");
    assert_eq!(logits.len(), n * vocab, "top_k_rows: logits");
    assert_eq!(values.len(), n * k, "top_k_rows: values");
    assert_eq!(indices.len(), n * k, "top_k_rows: indices");
    assert_eq!(lse.len(), n, "top_k_rows: lse");
    for (r, row) in logits.chunks_exact(vocab).enumerate() {
        let t = temperatures[r];
        let scaled: Vec<f32> = row
            .iter()
            .map(|&x| if t > 0.0 { x / t } else { x })
            .collect();
        let order = |a: &u32, b: &u32| {
            scaled[*b as usize]
                .total_cmp(&scaled[*a as usize])
                .then(a.cmp(b))
        };
        let mut ids: Vec<u32> = (0..vocab as u32).collect();
        if k < vocab {
            ids.select_nth_unstable_by(k - 1, order);
        }
        ids.truncate(k);
        ids.sort_unstable_by(order);
        for (j, &id) in ids.iter().enumerate() {
            values[r * k + j] = scaled[id as usize];
            indices[r * k + j] = id;
        }
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = scaled.iter().map(|&v| ((v - max) as f64).exp()).sum();
        lse[r] = max + sum.ln() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_linear(x: &[f32], w: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * o];
        for t in 0..n {
            for j in 0..o {
                y[t * o + j] = (0..i).map(|k| x[t * i + k] * w[j * i + k]).sum();
            }
        }
        y
    }

    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect()
    }

    #[test]
    fn linear_matches_naive_for_gemv_and_gemm_paths() {
        for &(n, i, o) in &[(1, 33, 130), (7, 64, 17), (8, 31, 9), (40, 129, 65)] {
            let x = ramp(n * i, 0.1);
            let w = ramp(o * i, 0.7);
            let mut y = vec![0f32; n * o];
            linear(&x, &w, n, i, o, &mut y);
            let r = naive_linear(&x, &w, n, i, o);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "{n}x{i}x{o}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rope_rotation_preserves_pair_norms_and_is_identity_at_position_zero() {
        let mut q = ramp(2 * 2 * 8, 0.3);
        let mut k = ramp(2 * 8, 0.9);
        let (q0, k0) = (q.clone(), k.clone());
        rope(&mut q, &mut k, &[0, 5], 2, 1, 8, 10000.0);
        assert_eq!(&q[..16], &q0[..16]);
        assert_eq!(&k[..8], &k0[..8]);
        for i in 0..4 {
            let before = q0[16 + i].hypot(q0[16 + i + 4]);
            let after = q[16 + i].hypot(q[16 + i + 4]);
            assert!((before - after).abs() < 1e-6);
        }
        assert_ne!(&q[16..], &q0[16..]);
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let layout = KvLayout {
            num_blocks: 2,
            n_kv_heads: 1,
            block_size: 4,
            head_dim: 4,
        };
        let meta = AttnMeta {
            block_size: 4,
            q_indptr: vec![0, 1],
            ctx_lens: vec![1],
            block_tables: vec![1],
            max_blocks: 1,
            sliding_window: None,
        };
        let mut kc = vec![0f32; layout.len()];
        let mut vc = vec![0f32; layout.len()];
        reshape_and_cache(
            &[1.0; 4],
            &[1.0, 2.0, 3.0, 4.0],
            &mut kc,
            &mut vc,
            &meta.slot_mapping(),
            layout,
        );
        assert_eq!(meta.slot_mapping(), vec![4]);
        let mut out = vec![0f32; 8];
        paged_attention(&[0.5; 8], &kc, &vc, &meta, 2, layout, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn sliding_window_limits_keys_to_the_last_w_positions() {
        let meta = AttnMeta {
            sliding_window: Some(3),
            ..Default::default()
        };
        assert_eq!(meta.window_start(0), 0);
        assert_eq!(meta.window_start(2), 0);
        assert_eq!(meta.window_start(3), 1);
        assert_eq!(meta.window_start(10), 8);
    }

    #[test]
    fn swiglu_and_norm_match_formulas() {
        let mut out = [0f32; 2];
        swiglu(&[1.0, -2.0, 3.0, 4.0], 2, &mut out);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert!((out[0] - silu(1.0) * 3.0).abs() < 1e-6);
        assert!((out[1] - silu(-2.0) * 4.0).abs() < 1e-6);
        let mut n = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, 2, &mut n);
        let r = (12.5f32).sqrt();
        assert!((n[0] - 3.0 / r).abs() < 1e-6 && (n[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_by_value_then_index_and_reports_the_full_lse() {
        let logits = [1.0, 3.0, 3.0, -1.0, 2.0, 0.0, 0.0, 5.0];
        let (mut v, mut i, mut lse) = ([0f32; 6], [0u32; 6], [0f32; 2]);
        top_k_rows(&logits, 4, 3, &[1.0, 0.5], &mut v, &mut i, &mut lse);
        assert_eq!(&i[..3], &[1, 2, 0]);
        assert_eq!(&v[..3], &[3.0, 3.0, 1.0]);
        assert_eq!(&i[3..], &[3, 0, 1]);
        assert_eq!(&v[3..], &[10.0, 4.0, 0.0]);
        let full = |row: &[f32]| row.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((lse[0] - full(&logits[..4])).abs() < 1e-6);
        assert!((lse[1] - full(&[4.0, 0.0, 0.0, 10.0])).abs() < 1e-5);
    }
}
