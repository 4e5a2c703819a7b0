//! Quantized weight storage for the CPU backend: `[out, in]` linear weights kept as
//! f32, bf16 (f32 accumulation), int8 with one f32 scale per output row (symmetric,
//! `scale = max|w_row| / 127`, quantized once at load from f32), or Q8_0 — llama.cpp's
//! blocks of [`Q8_0_BLOCK`] int8 values along the input dimension with one f16 scale
//! each, either read as stored from a GGUF file ([`QMatrix::q8_0_from_blocks`]) or
//! quantized at load with llama.cpp's rule (`d = max|x|/127`, `q = round(x/d)`).
//!
//! Owns [`WeightDtype`], [`QMatrix`] and the ops over it: [`linear`] (decode GEMV for
//! small batches, a dequantize-a-tile-then-GEMM path for large ones) and
//! [`embedding`] (row gather from the stored format). Dot products use AVX2/FMA/F16C
//! when the CPU has them (runtime detection) and a scalar loop otherwise; both are
//! tested against the f32 reference in [`crate::reference`]. The int8 and Q8_0 GEMVs
//! quantize each activation row once per call into 32-blocks of int8 with an f32
//! scale (as llama.cpp's `vec_dot_q8_0_q8_0` does) and take integer dots per block
//! (`maddubs`/`madd`), so a weight byte costs no float conversion; that adds the
//! activation's rounding, ≤ max|x_block|/254 per value, to the weight's.
//!
//! Invariant: a Q8_0 matrix's `cols` is a multiple of [`Q8_0_BLOCK`] and it holds one
//! scale per block of every row.
//!
//! Cost: a GEMV reads `out·in` bytes of int8 (2 for bf16, 4 for f32, 34/32 for Q8_0)
//! plus `4·out` of scales for int8; the GEMM path dequantizes `TILE` rows at a time
//! (`TILE·in` floats of scratch per thread) so each weight row is read once per call.

use rayon::prelude::*;

use crate::reference;

/// Below this many activation rows, [`linear`] runs as GEMVs over the stored format.
const GEMV_MAX_ROWS: usize = 16;
/// Weight rows dequantized at a time by the batched path.
const TILE: usize = 64;
/// Values per Q8_0 block (one f16 scale each), as in GGML.
pub const Q8_0_BLOCK: usize = 32;

/// How a CPU linear weight is stored in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    Int8,
    /// Blocks of 32 int8 values along a row, one f16 scale per block (GGML's Q8_0).
    Q8_0,
}

impl WeightDtype {
    /// Bytes one weight takes (the per-row int8 scale is not counted; Q8_0's per-block
    /// scale is: 34 bytes per 32 weights).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 => 2.0,
            Self::Int8 => 1.0,
            Self::Q8_0 => (Q8_0_BLOCK + 2) as f64 / Q8_0_BLOCK as f64,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            "q8_0" | "Q8_0" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown weight dtype {other:?} (expected f32, bf16, int8 or q8_0)"
            )),
        }
    }
}

/// A row-major `[rows, cols]` matrix in one of the [`WeightDtype`] formats.
#[derive(Clone, Debug)]
pub enum QMatrix {
    F32 {
        cols: usize,
        w: Vec<f32>,
    },
    Bf16 {
        cols: usize,
        w: Vec<u16>,
    },
    Int8 {
        cols: usize,
        q: Vec<i8>,
        /// One per row: `w[r][c] ≈ q[r][c] · scale[r]`.
        scale: Vec<f32>,
    },
    Q8_0 {
        cols: usize,
        q: Vec<i8>,
        /// f16 bits, one per block: `w[r][c] = q[r][c] · d[(r·cols + c) / 32]`.
        d: Vec<u16>,
    },
}

impl QMatrix {
    /// Converts an f32 `[rows, cols]` matrix to `dtype` (bf16: round to nearest even;
    /// Q8_0: llama.cpp's `quantize_row_q8_0_ref`, which needs `cols` to be a multiple
    /// of [`Q8_0_BLOCK`]).
    pub fn from_f32(w: Vec<f32>, cols: usize, dtype: WeightDtype) -> Self {
        assert!(
            cols > 0 && w.len().is_multiple_of(cols),
            "QMatrix: {} not a multiple of {cols}",
            w.len()
        );
        assert!(
            dtype != WeightDtype::Q8_0 || cols.is_multiple_of(Q8_0_BLOCK),
            "QMatrix: Q8_0 rows of {cols} are not whole blocks"
        );
        match dtype {
            WeightDtype::F32 => Self::F32 { cols, w },
            WeightDtype::Bf16 => Self::Bf16 {
                cols,
                w: w.iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
            },
            WeightDtype::Int8 => {
                let mut q = Vec::with_capacity(w.len());
                let mut scale = Vec::with_capacity(w.len() / cols);
                for row in w.chunks_exact(cols) {
                    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    scale.push(s);
                    q.extend(
                        row.iter()
                            .map(|&v| (v / s).round().clamp(-127.0, 127.0) as i8),
                    );
                }
                Self::Int8 { cols, q, scale }
            }
            WeightDtype::Q8_0 => {
                let mut q = Vec::with_capacity(w.len());
                let mut d = Vec::with_capacity(w.len() / Q8_0_BLOCK);
                for b in w.chunks_exact(Q8_0_BLOCK) {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let s = amax / 127.0;
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    d.push(half::f16::from_f32(s).to_bits());
                    q.extend(b.iter().map(|&v| (v * inv).round() as i8));
                }
                Self::Q8_0 { cols, q, d }
            }
        }
    }

    /// A Q8_0 matrix from stored blocks (as a GGUF file holds them): `q` row-major
    /// `[rows, cols]`, `d` the f16 scale bits of each 32-block in the same order.
    pub fn q8_0_from_blocks(cols: usize, q: Vec<i8>, d: Vec<u16>) -> Result<Self, String> {
        if cols == 0 || !cols.is_multiple_of(Q8_0_BLOCK) || !q.len().is_multiple_of(cols) {
            return Err(format!(
                "Q8_0 blocks: {} values do not make rows of {cols} whole 32-blocks",
                q.len()
            ));
        }
        if d.len() * Q8_0_BLOCK != q.len() {
            return Err(format!(
                "Q8_0 blocks: {} scales for {} values (one per 32 expected)",
                d.len(),
                q.len()
            ));
        }
        Ok(Self::Q8_0 { cols, q, d })
    }

    /// The stored values and f16 scale bits of a Q8_0 matrix, `None` otherwise.
    pub fn q8_0_blocks(&self) -> Option<(&[i8], &[u16])> {
        match self {
            Self::Q8_0 { q, d, .. } => Some((q, d)),
            _ => None,
        }
    }

    /// Appends `other`'s rows (same format and width; fused projections are built so).
    pub fn append_rows(&mut self, other: QMatrix) -> Result<(), String> {
        if self.cols() != other.cols() || self.dtype() != other.dtype() {
            return Err(format!(
                "cannot stack {:?} rows of {} under {:?} rows of {}",
                other.dtype(),
                other.cols(),
                self.dtype(),
                self.cols()
            ));
        }
        match (self, other) {
            (Self::F32 { w, .. }, Self::F32 { w: o, .. }) => w.extend(o),
            (Self::Bf16 { w, .. }, Self::Bf16 { w: o, .. }) => w.extend(o),
            (
                Self::Int8 { q, scale, .. },
                Self::Int8 {
                    q: oq, scale: os, ..
                },
            ) => {
                q.extend(oq);
                scale.extend(os);
            }
            (Self::Q8_0 { q, d, .. }, Self::Q8_0 { q: oq, d: od, .. }) => {
                q.extend(oq);
                d.extend(od);
            }
            _ => unreachable!("dtypes compared equal above"),
        }
        Ok(())
    }

    pub fn dtype(&self) -> WeightDtype {
        match self {
            Self::F32 { .. } => WeightDtype::F32,
            Self::Bf16 { .. } => WeightDtype::Bf16,
            Self::Int8 { .. } => WeightDtype::Int8,
            Self::Q8_0 { .. } => WeightDtype::Q8_0,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::F32 { cols, .. }
            | Self::Bf16 { cols, .. }
            | Self::Int8 { cols, .. }
            | Self::Q8_0 { cols, .. } => *cols,
        }
    }

    pub fn rows(&self) -> usize {
        let n = match self {
            Self::F32 { w, .. } => w.len(),
            Self::Bf16 { w, .. } => w.len(),
            Self::Int8 { q, .. } | Self::Q8_0 { q, .. } => q.len(),
        };
        n / self.cols()
    }

    /// The values when stored as f32, `None` otherwise.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Self::F32 { w, .. } => Some(w),
            _ => None,
        }
    }

    /// Bytes held in memory (weights plus scales).
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32 { w, .. } => 4 * w.len(),
            Self::Bf16 { w, .. } => 2 * w.len(),
            Self::Int8 { q, scale, .. } => q.len() + 4 * scale.len(),
            Self::Q8_0 { q, d, .. } => q.len() + 2 * d.len(),
        }
    }

    /// Row `r` converted to f32 into `out` (`cols` long).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols();
        assert_eq!(out.len(), c, "row_f32: out");
        match self {
            Self::F32 { w, .. } => out.copy_from_slice(&w[r * c..(r + 1) * c]),
            Self::Bf16 { w, .. } => {
                for (o, &b) in out.iter_mut().zip(&w[r * c..(r + 1) * c]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            Self::Int8 { q, scale, .. } => {
                let s = scale[r];
                for (o, &v) in out.iter_mut().zip(&q[r * c..(r + 1) * c]) {
                    *o = v as f32 * s;
                }
            }
            Self::Q8_0 { q, d, .. } => {
                let nb = c / Q8_0_BLOCK;
                for ((o, qb), &db) in out
                    .chunks_exact_mut(Q8_0_BLOCK)
                    .zip(q[r * c..(r + 1) * c].chunks_exact(Q8_0_BLOCK))
                    .zip(&d[r * nb..(r + 1) * nb])
                {
                    let s = half::f16::from_bits(db).to_f32();
                    for (o, &v) in o.iter_mut().zip(qb) {
                        *o = v as f32 * s;
                    }
                }
            }
        }
    }

    /// Whether this format's GEMV takes activations quantized to int8 blocks.
    fn wants_q8_activations(&self) -> bool {
        matches!(self, Self::Int8 { .. } | Self::Q8_0 { .. })
    }

    /// `x · row_r` with f32 accumulation (int8 and Q8_0: over `x`'s int8 blocks).
    fn dot_row(&self, r: usize, x: &ActivationRow<'_>, simd: bool) -> f32 {
        let c = self.cols();
        match self {
            Self::F32 { w, .. } => dot_f32(x.x, &w[r * c..(r + 1) * c]),
            Self::Bf16 { w, .. } => dot_bf16(x.x, &w[r * c..(r + 1) * c], simd),
            Self::Int8 { q, scale, .. } => dot_i8(x, &q[r * c..(r + 1) * c], simd) * scale[r],
            Self::Q8_0 { q, d, .. } => {
                let nb = c / Q8_0_BLOCK;
                dot_q8_0(x, &q[r * c..(r + 1) * c], &d[r * nb..(r + 1) * nb], simd)
            }
        }
    }
}

/// One activation row as a GEMV reads it: the f32 values, and for int8 weights also
/// its whole 32-blocks quantized to int8 (`xq`) with one f32 scale each (`xd`).
struct ActivationRow<'a> {
    x: &'a [f32],
    xq: Vec<i8>,
    xd: Vec<f32>,
}

impl<'a> ActivationRow<'a> {
    fn plain(x: &'a [f32]) -> Self {
        Self {
            x,
            xq: Vec::new(),
            xd: Vec::new(),
        }
    }

    /// llama.cpp's `quantize_row_q8_0` over the whole blocks of `x` (the tail past the
    /// last whole block stays f32).
    fn quantized(x: &'a [f32]) -> Self {
        let nb = x.len() / Q8_0_BLOCK;
        let mut xq = Vec::with_capacity(nb * Q8_0_BLOCK);
        let mut xd = Vec::with_capacity(nb);
        for b in x[..nb * Q8_0_BLOCK].chunks_exact(Q8_0_BLOCK) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            xd.push(s);
            xq.extend(b.iter().map(|&v| (v * inv).round() as i8));
        }
        Self { x, xq, xd }
    }
}

/// Whether this CPU runs the AVX2/FMA/F16C dot products.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[n, out] = x[n, in] · wᵀ` for a stored `w: [out, in]`.
pub fn linear(x: &[f32], w: &QMatrix, n: usize, y: &mut [f32]) {
    linear_with(x, w, n, y, simd_available());
}

/// [`linear`] with the SIMD choice made by the caller (tests run both).
pub fn linear_with(x: &[f32], w: &QMatrix, n: usize, y: &mut [f32], simd: bool) {
    let (in_f, out_f) = (w.cols(), w.rows());
    if let QMatrix::F32 { w, .. } = w {
        return reference::linear(x, w, n, in_f, out_f, y);
    }
    assert_eq!(x.len(), n * in_f, "quant::linear: x");
    assert_eq!(y.len(), n * out_f, "quant::linear: y");
    if n == 0 || out_f == 0 {
        return;
    }
    // Both paths compute [out, n] tiles in parallel, then transpose into y.
    let mut yt = vec![0f32; out_f * n];
    if n < GEMV_MAX_ROWS {
        let rows: Vec<ActivationRow> = x
            .chunks_exact(in_f)
            .map(|r| {
                if w.wants_q8_activations() {
                    ActivationRow::quantized(r)
                } else {
                    ActivationRow::plain(r)
                }
            })
            .collect();
        let chunk = 64.max(out_f / (4 * rayon::current_num_threads().max(1)));
        yt.par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(ci, yc)| {
                for (oi, yrow) in yc.chunks_mut(n).enumerate() {
                    let r = ci * chunk + oi;
                    for (yv, xr) in yrow.iter_mut().zip(&rows) {
                        *yv = w.dot_row(r, xr, simd);
                    }
                }
            });
    } else {
        yt.par_chunks_mut(TILE * n)
            .enumerate()
            .for_each(|(ci, yc)| {
                let rows = yc.len() / n;
                let mut tile = vec![0f32; rows * in_f];
                for (i, t) in tile.chunks_exact_mut(in_f).enumerate() {
                    w.row_f32(ci * TILE + i, t);
                }
                // yc is [rows, n] = tile[rows, in] · x[n, in]ᵀ.
                reference::linear(&tile, x, rows, in_f, n, yc);
            });
    }
    for t in 0..n {
        for o in 0..out_f {
            y[t * out_f + o] = yt[o * n + t];
        }
    }
}

/// Gathers rows `ids` of `table` (`[vocab, hidden]`) as f32 into `out`.
pub fn embedding(ids: &[u32], table: &QMatrix, out: &mut [f32]) {
    let h = table.cols();
    assert_eq!(out.len(), ids.len() * h, "quant::embedding: out");
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(h)) {
        table.row_f32(id as usize, o);
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_bf16(x: &[f32], w: &[u16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and FMA were detected at run time
        // (`simd_available`), or a test asserted it before passing true.
        return unsafe { avx2::dot_bf16(x, w) };
    }
    let _ = simd;
    x.iter()
        .zip(w)
        .map(|(a, &b)| a * f32::from_bits((b as u32) << 16))
        .sum()
}

/// `x · q` for one int8 row (its scale applied by the caller): integer dots over the
/// whole blocks of the quantized activation, f32 over the tail.
fn dot_i8(x: &ActivationRow<'_>, q: &[i8], simd: bool) -> f32 {
    let full = x.xq.len();
    let tail: f32 = x.x[full..]
        .iter()
        .zip(&q[full..])
        .map(|(a, &b)| a * b as f32)
        .sum();
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot_bf16`; `q` has at least `xq.len()` values and `xd` one
        // scale per 32 of them.
        return unsafe { avx2::dot_q8_blocks(&x.xq, &x.xd, &q[..full], None) } + tail;
    }
    let _ = simd;
    let blocks: f32 =
        x.xq.chunks_exact(Q8_0_BLOCK)
            .zip(q.chunks_exact(Q8_0_BLOCK))
            .zip(&x.xd)
            .map(|((a, b), &s)| s * block_dot_i32(a, b) as f32)
            .sum();
    blocks + tail
}

/// `x · w` for one Q8_0 row of `q` values and f16 block scales `d`.
fn dot_q8_0(x: &ActivationRow<'_>, q: &[i8], d: &[u16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot_bf16` (F16C is part of `simd_available`); the row is whole
        // blocks, as long as the activation's, with one scale per block.
        return unsafe { avx2::dot_q8_blocks(&x.xq, &x.xd, q, Some(d)) };
    }
    let _ = simd;
    x.xq.chunks_exact(Q8_0_BLOCK)
        .zip(q.chunks_exact(Q8_0_BLOCK))
        .zip(x.xd.iter().zip(d))
        .map(|((a, b), (&sx, &sw))| {
            sx * half::f16::from_bits(sw).to_f32() * block_dot_i32(a, b) as f32
        })
        .sum()
}

fn block_dot_i32(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `w` at least as long as `x`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
        let n = x.len().min(w.len());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY (for the loads): i + 16 <= n bounds both slices.
            let w0 = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
            let w1 = _mm_loadu_si128(w.as_ptr().add(i + 8) as *const __m128i);
            let f0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w0), 16));
            let f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w1), 16));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), f0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), f1, a1);
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        while i < n {
            s += x[i] * f32::from_bits((w[i] as u32) << 16);
            i += 1;
        }
        s
    }

    /// The 8 partial int32 sums of one 32-block dot `x · w`, as f32: `|x| · (w · sign x)`
    /// as u8 × i8 pairs (127·127·2 fits i16: quantized values are ≤ 127 in magnitude).
    ///
    /// # Safety
    /// AVX2; 32 bytes readable at `x` and at `w`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_dot(x: *const i8, w: *const i8) -> __m256 {
        let vx = _mm256_loadu_si256(x as *const __m256i);
        let vw = _mm256_loadu_si256(w as *const __m256i);
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(vx, vx), _mm256_sign_epi8(vw, vx));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// `Σ_b xd[b] · wd[b] · (xq_b · q_b)` over 32-blocks (`wd`: f16 bits, or 1 for
    /// all blocks when `None`), two blocks per iteration into two accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `q` at least as long as `xq`, `xd` (and
    /// `wd`) at least `xq.len() / 32` long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_blocks(xq: &[i8], xd: &[f32], q: &[i8], wd: Option<&[u16]>) -> f32 {
        let nb = (xq.len() / 32).min(q.len() / 32).min(xd.len());
        // SAFETY (for `block`'s loads): every index passed is < nb, so 32 bytes from
        // i·32 are in both slices.
        let block = |i: usize| block_dot(xq.as_ptr().add(i * 32), q.as_ptr().add(i * 32));
        let mut scales = [0f32; 8];
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < nb {
            let m = (nb - i).min(8);
            match wd {
                Some(d) if m == 8 => {
                    // SAFETY: i + 8 <= nb <= d.len().
                    let h = _mm_loadu_si128(d.as_ptr().add(i) as *const __m128i);
                    let xs = _mm256_loadu_ps(xd.as_ptr().add(i));
                    _mm256_storeu_ps(scales.as_mut_ptr(), _mm256_mul_ps(xs, _mm256_cvtph_ps(h)));
                }
                Some(d) => {
                    for j in 0..m {
                        scales[j] = xd[i + j] * half::f16::from_bits(d[i + j]).to_f32();
                    }
                }
                None => scales[..m].copy_from_slice(&xd[i..i + m]),
            }
            let mut j = 0;
            while j + 2 <= m {
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(scales[j]), block(i + j), a0);
                a1 = _mm256_fmadd_ps(_mm256_set1_ps(scales[j + 1]), block(i + j + 1), a1);
                j += 2;
            }
            if j < m {
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(scales[j]), block(i + j), a0);
            }
            i += m;
        }
        hsum(_mm256_add_ps(a0, a1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testdata::uniform_pm1 as rand_vec;

    /// Max |a-b| relative to max |b|.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
    }

    fn check(dtype: WeightDtype, tol: f32) {
        // Sizes chosen to break things: 1, 17 and 33 rows (GEMV and GEMM paths), an
        // input width that is not a multiple of 16 (or, for Q8_0, an odd number of
        // blocks), output rows crossing a tile edge.
        let sizes: &[(usize, usize, usize)] = if dtype == WeightDtype::Q8_0 {
            &[(1, 32, 5), (1, 288, 130), (15, 96, 65), (33, 256, 129)]
        } else {
            &[
                (1, 37, 5),
                (1, 256, 130),
                (15, 100, 65),
                (17, 100, 65),
                (33, 257, 129),
            ]
        };
        for &(n, in_f, out_f) in sizes {
            let x = rand_vec(n * in_f, 1 + n as u64);
            let wf = rand_vec(out_f * in_f, 7 + in_f as u64);
            let mut want = vec![0f32; n * out_f];
            reference::linear(&x, &wf, n, in_f, out_f, &mut want);
            let q = QMatrix::from_f32(wf, in_f, dtype);
            let mut simd_opts = vec![false];
            if simd_available() {
                simd_opts.push(true);
            }
            for simd in simd_opts {
                let mut got = vec![0f32; n * out_f];
                linear_with(&x, &q, n, &mut got, simd);
                let e = rel_err(&got, &want);
                assert!(
                    e < tol,
                    "{dtype:?} n={n} in={in_f} out={out_f} simd={simd}: rel err {e}"
                );
            }
        }
    }

    #[test]
    fn bf16_linear_matches_f32_within_bf16_rounding() {
        // bf16 keeps 8 mantissa bits: each weight is off by ≤ 2⁻⁹ relative.
        check(WeightDtype::Bf16, 1e-2);
    }

    #[test]
    fn int8_linear_matches_f32_within_row_scale_rounding() {
        // Each weight is off by ≤ scale/2 = amax/254 per row.
        check(WeightDtype::Int8, 2e-2);
    }

    #[test]
    fn q8_0_linear_matches_f32_within_block_scale_rounding() {
        // Each weight is off by ≤ d/2 = max|block|/254 plus the f16 rounding of d
        // (2⁻¹¹ relative), and each activation by max|x_block|/254.
        check(WeightDtype::Q8_0, 2e-2);
    }

    #[test]
    fn simd_and_scalar_dots_agree() {
        if !simd_available() {
            return;
        }
        // 1001: 31 whole blocks and a tail of 9 (int8); 1024 = 32 blocks (Q8_0); 800 =
        // 25 blocks, so the 8-scale groups end in a partial one.
        for len in [1001, 1024, 800] {
            let x = rand_vec(len, 3);
            let mut ms = vec![
                QMatrix::from_f32(rand_vec(len, 4), len, WeightDtype::Int8),
                QMatrix::from_f32(rand_vec(len, 4), len, WeightDtype::Bf16),
            ];
            if len % Q8_0_BLOCK == 0 {
                ms.push(QMatrix::from_f32(rand_vec(len, 4), len, WeightDtype::Q8_0));
            }
            for m in &ms {
                let xr = if m.wants_q8_activations() {
                    ActivationRow::quantized(&x)
                } else {
                    ActivationRow::plain(&x)
                };
                let (s, v) = (m.dot_row(0, &xr, false), m.dot_row(0, &xr, true));
                assert!(
                    (s - v).abs() < 1e-4 * s.abs().max(1.0),
                    "{:?} len {len}: {s} vs {v}",
                    m.dtype()
                );
                let mut row = vec![0f32; len];
                m.row_f32(0, &mut row);
                let exact = dot_f32(&x, &row);
                assert!(
                    (s - exact).abs() < 2e-2 * exact.abs().max(1.0),
                    "{:?} len {len}: {s} vs dequantized {exact}",
                    m.dtype()
                );
            }
        }
    }

    #[test]
    fn q8_0_quantizes_each_block_with_llama_cpps_rule() {
        // Block 0 reaches ±127 at its max; block 1 is all zero (scale 0, values 0).
        let mut w: Vec<f32> = (0..32).map(|i| (i as f32 - 10.0) * 0.25).collect();
        w.extend([0.0; 32]);
        let m = QMatrix::from_f32(w.clone(), 64, WeightDtype::Q8_0);
        let (q, d) = m.q8_0_blocks().unwrap();
        let d0 = 5.25f32 / 127.0;
        assert_eq!(d, &[half::f16::from_f32(d0).to_bits(), 0]);
        for (i, &v) in q[..32].iter().enumerate() {
            assert_eq!(v, (w[i] / d0).round() as i8, "value {i}");
        }
        assert_eq!(q[31], 127);
        assert!(q[32..].iter().all(|&v| v == 0));
        assert_eq!(m.bytes(), 64 + 2 * 2);
        assert_eq!(WeightDtype::Q8_0.bytes_per_weight() * 32.0, 34.0);
    }

    #[test]
    fn q8_0_blocks_are_kept_as_given_and_checked() {
        let q: Vec<i8> = (0..64).map(|i| (i as i8) - 32).collect();
        let d = vec![
            half::f16::from_f32(0.5).to_bits(),
            half::f16::from_f32(-0.25).to_bits(),
        ];
        let m = QMatrix::q8_0_from_blocks(32, q.clone(), d.clone()).unwrap();
        assert_eq!((m.rows(), m.cols()), (2, 32));
        assert_eq!(m.q8_0_blocks(), Some((&q[..], &d[..])));
        let mut row = vec![0f32; 32];
        m.row_f32(1, &mut row);
        assert_eq!(row[0], 0.0 * -0.25);
        assert_eq!(row[31], 31.0 * -0.25);
        let e = QMatrix::q8_0_from_blocks(48, q.clone(), d.clone()).unwrap_err();
        assert!(e.contains("whole 32-blocks"), "{e}");
        let e = QMatrix::q8_0_from_blocks(32, q, d[..1].to_vec()).unwrap_err();
        assert!(e.contains("1 scales for 64 values"), "{e}");
    }

    #[test]
    fn rows_of_one_format_stack_and_mixed_formats_are_refused() {
        let mut a = QMatrix::from_f32(rand_vec(64, 1), 32, WeightDtype::Q8_0);
        let b = QMatrix::from_f32(rand_vec(96, 2), 32, WeightDtype::Q8_0);
        a.append_rows(b).unwrap();
        assert_eq!(a.rows(), 5);
        let (q, d) = a.q8_0_blocks().unwrap();
        assert_eq!((q.len(), d.len()), (160, 5));
        let e = a
            .append_rows(QMatrix::from_f32(rand_vec(32, 3), 32, WeightDtype::Int8))
            .unwrap_err();
        assert!(e.contains("Int8") && e.contains("Q8_0"), "{e}");
    }

    #[test]
    fn embedding_reads_the_stored_rows() {
        let t = rand_vec(4 * 32, 9);
        for d in [
            WeightDtype::F32,
            WeightDtype::Bf16,
            WeightDtype::Int8,
            WeightDtype::Q8_0,
        ] {
            let q = QMatrix::from_f32(t.clone(), 32, d);
            let mut out = vec![0f32; 64];
            embedding(&[3, 1], &q, &mut out);
            assert!(rel_err(&out[..32], &t[96..128]) < 1e-2, "{d:?}");
            assert!(rel_err(&out[32..], &t[32..64]) < 1e-2, "{d:?}");
        }
    }

    #[test]
    fn int8_zero_row_does_not_divide_by_zero() {
        let q = QMatrix::from_f32(vec![0.0; 8], 4, WeightDtype::Int8);
        let mut y = vec![1f32; 2];
        linear(&[1.0; 4], &q, 1, &mut y);
        assert_eq!(y, vec![0.0, 0.0]);
    }
}
