//! Quantized weight storage for the CPU backend: `[out, in]` linear weights kept as
//! f32, bf16 (f32 accumulation) or int8 with one f32 scale per output row (symmetric,
//! `scale = max|w_row| / 127`, quantized once at load from f32).
//!
//! Owns [`WeightDtype`], [`QMatrix`] and the ops over it: [`linear`] (decode GEMV for
//! small batches, a dequantize-a-tile-then-GEMM path for large ones) and
//! [`embedding`] (row gather from the stored format). Dot products use AVX2/FMA when
//! the CPU has them (runtime detection) and a scalar loop otherwise; both are tested
//! against the f32 reference in [`crate::reference`].
//!
//! Cost: a GEMV reads `out·in` bytes of int8 (2 for bf16, 4 for f32) plus `4·out` of
//! scales; the GEMM path dequantizes `TILE` rows at a time (`TILE·in` floats of scratch
//! per thread) so each weight row is read once per call.

use rayon::prelude::*;

use crate::reference;

/// Below this many activation rows, [`linear`] runs as GEMVs over the stored format.
const GEMV_MAX_ROWS: usize = 16;
/// Weight rows dequantized at a time by the batched path.
const TILE: usize = 64;

/// How a CPU linear weight is stored in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    Int8,
}

impl WeightDtype {
    /// Bytes one weight takes (the per-row int8 scale is not counted).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 => 2.0,
            Self::Int8 => 1.0,
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
            other => Err(format!(
                "unknown weight dtype {other:?} (expected f32, bf16 or int8)"
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
}

impl QMatrix {
    /// Converts an f32 `[rows, cols]` matrix to `dtype` (bf16: round to nearest even).
    pub fn from_f32(w: Vec<f32>, cols: usize, dtype: WeightDtype) -> Self {
        assert!(
            cols > 0 && w.len() % cols == 0,
            "QMatrix: {} not a multiple of {cols}",
            w.len()
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
        }
    }

    pub fn dtype(&self) -> WeightDtype {
        match self {
            Self::F32 { .. } => WeightDtype::F32,
            Self::Bf16 { .. } => WeightDtype::Bf16,
            Self::Int8 { .. } => WeightDtype::Int8,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::F32 { cols, .. } | Self::Bf16 { cols, .. } | Self::Int8 { cols, .. } => *cols,
        }
    }

    pub fn rows(&self) -> usize {
        let n = match self {
            Self::F32 { w, .. } => w.len(),
            Self::Bf16 { w, .. } => w.len(),
            Self::Int8 { q, .. } => q.len(),
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
        }
    }

    /// `x · row_r` with f32 accumulation.
    fn dot_row(&self, r: usize, x: &[f32], simd: bool) -> f32 {
        let c = self.cols();
        match self {
            Self::F32 { w, .. } => dot_f32(x, &w[r * c..(r + 1) * c]),
            Self::Bf16 { w, .. } => dot_bf16(x, &w[r * c..(r + 1) * c], simd),
            Self::Int8 { q, scale, .. } => dot_i8(x, &q[r * c..(r + 1) * c], simd) * scale[r],
        }
    }
}

/// Whether this CPU runs the AVX2/FMA dot products.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
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
        let chunk = 64.max(out_f / (4 * rayon::current_num_threads().max(1)));
        yt.par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(ci, yc)| {
                for (oi, yrow) in yc.chunks_mut(n).enumerate() {
                    let r = ci * chunk + oi;
                    for (t, yv) in yrow.iter_mut().enumerate() {
                        *yv = w.dot_row(r, &x[t * in_f..(t + 1) * in_f], simd);
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

fn dot_i8(x: &[f32], q: &[i8], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot_bf16`: AVX2 and FMA are present.
        return unsafe { avx2::dot_i8(x, q) };
    }
    let _ = simd;
    x.iter().zip(q).map(|(a, &b)| a * b as f32).sum()
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

    /// # Safety
    /// The CPU must have AVX2 and FMA; `q` at least as long as `x`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_i8(x: &[f32], q: &[i8]) -> f32 {
        let n = x.len().min(q.len());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY (for the loads): i + 16 <= n bounds both slices.
            let b = _mm_loadu_si128(q.as_ptr().add(i) as *const __m128i);
            let f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            let f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), f0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), f1, a1);
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        while i < n {
            s += x[i] * q[i] as f32;
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Max |a-b| relative to max |b|.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
    }

    fn check(dtype: WeightDtype, tol: f32) {
        // Sizes chosen to break things: 1, 17 and 33 rows (GEMV and GEMM paths), an
        // input width that is not a multiple of 16, output rows crossing a tile edge.
        for &(n, in_f, out_f) in &[(1, 37, 5), (1, 256, 130), (17, 100, 65), (33, 257, 129)] {
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
    fn simd_and_scalar_dots_agree() {
        if !simd_available() {
            return;
        }
        let x = rand_vec(1001, 3);
        let q = QMatrix::from_f32(rand_vec(1001, 4), 1001, WeightDtype::Int8);
        let b = QMatrix::from_f32(rand_vec(1001, 4), 1001, WeightDtype::Bf16);
        for m in [&q, &b] {
            let (s, v) = (m.dot_row(0, &x, false), m.dot_row(0, &x, true));
            assert!(
                (s - v).abs() < 1e-3 * s.abs().max(1.0),
                "{:?}: {s} vs {v}",
                m.dtype()
            );
        }
    }

    #[test]
    fn embedding_reads_the_stored_rows() {
        let t = rand_vec(4 * 8, 9);
        for d in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
            let q = QMatrix::from_f32(t.clone(), 8, d);
            let mut out = vec![0f32; 16];
            embedding(&[3, 1], &q, &mut out);
            assert!(rel_err(&out[..8], &t[24..32]) < 1e-2, "{d:?}");
            assert!(rel_err(&out[8..], &t[8..16]) < 1e-2, "{d:?}");
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
