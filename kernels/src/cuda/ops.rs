//! Launch wrappers for the elementwise, normalisation, RoPE, KV-write, embedding and
//! sampling kernels. Each mirrors the [`crate::reference`] op of the same name: same
//! arguments in the same order and layout, device buffers in place of slices (bf16
//! for activations and weights, f32 for logits, u32 for ids/positions/slots), output
//! buffers passed in rather than returned.
//!
//! Invariants checked before every launch: slice lengths agree with the shapes, the
//! feature counts the kernels vectorise over are multiples of 8, and bf16 pointers are
//! 16-byte aligned (cudarc allocations are; a view must start at a multiple of 8
//! elements). Empty inputs launch nothing.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{CudaKernels, Kernel};
use crate::reference::KvLayout;
use crate::KernelError;

/// Threads per block of each kernel; must match the `*_THREADS` defines in the sources.
const NORM_THREADS: u32 = 256;
const ROPE_THREADS: u32 = 256;
const ROPE_TOKENS: usize = 4; // rope_bf16 and rope_qkv_cache_bf16 alike
const CACHE_THREADS: u32 = 128;
const ELEMENTWISE_THREADS: u32 = 256;
const EMBED_THREADS: u32 = 256;
const SAMPLE_THREADS: u32 = 1024;
/// Largest `k` of [`CudaKernels::top_k_rows`] (`SAMPLE_MAX_K`).
pub const TOP_K_MAX: usize = 1024;

pub(crate) fn shape_err(op: &'static str, detail: String) -> KernelError {
    KernelError::Shape { op, detail }
}

pub(crate) fn expect_len(
    op: &'static str,
    what: &str,
    got: usize,
    want: usize,
) -> Result<(), KernelError> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ))
    }
}

fn expect_multiple(op: &'static str, what: &str, n: usize, of: usize) -> Result<(), KernelError> {
    if n.is_multiple_of(of) && n > 0 {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} = {n} must be a positive multiple of {of}"),
        ))
    }
}

fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaKernels {
    /// Device address of a buffer the kernel reads. Event tracking is off (see the
    /// module invariants), so the returned guard has nothing to record.
    pub(crate) fn ptr<T>(&self, buf: &impl DevicePtr<T>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    /// Device address of a buffer the kernel writes.
    pub(crate) fn ptr_mut<T>(&self, buf: &mut impl DevicePtrMut<T>) -> u64 {
        buf.device_ptr_mut(&self.stream).0
    }

    fn aligned(op: &'static str, ptrs: &[u64]) -> Result<(), KernelError> {
        match ptrs.iter().find(|&&p| p % 16 != 0) {
            None => Ok(()),
            Some(p) => Err(shape_err(
                op,
                format!("buffer at {p:#x} is not 16-byte aligned"),
            )),
        }
    }

    /// `out[t] = x[t] / sqrt(mean(x[t]²) + eps) · weight` (see [`crate::reference::rms_norm`]).
    pub fn rms_norm(
        &self,
        x: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        eps: f32,
        hidden: usize,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const OP: &str = "rms_norm";
        expect_multiple(OP, "hidden", hidden, 8)?;
        expect_len(OP, "weight", weight.len(), hidden)?;
        expect_len(OP, "out", out.len(), x.len())?;
        expect_multiple(OP, "x.len()", x.len().max(hidden), hidden)?;
        let n = x.len() / hidden;
        if n == 0 {
            return Ok(());
        }
        let (xp, wp, op) = (self.ptr(x), self.ptr(weight), self.ptr_mut(out));
        Self::aligned(OP, &[xp, wp, op])?;
        let hidden = hidden as u32;
        let mut launch = self.stream.launch_builder(self.function(Kernel::RmsNorm));
        launch.arg(&xp).arg(&wp).arg(&op).arg(&hidden).arg(&eps);
        // SAFETY: argument types match `rms_norm_bf16`; x and out hold n·hidden bf16,
        // weight hidden, all 16-byte aligned (checked above); one block per row.
        unsafe { launch.launch(grid(n, NORM_THREADS)) }?;
        Ok(())
    }

    /// `residual += delta; normed = rms_norm(residual)` (see
    /// [`crate::reference::fused_add_rms_norm`]). The sum is rounded to bf16 when
    /// stored, and `normed` is computed from the stored value.
    pub fn fused_add_rms_norm(
        &self,
        residual: &mut impl DevicePtrMut<bf16>,
        delta: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        eps: f32,
        hidden: usize,
        normed: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const OP: &str = "fused_add_rms_norm";
        expect_multiple(OP, "hidden", hidden, 8)?;
        expect_len(OP, "weight", weight.len(), hidden)?;
        expect_len(OP, "delta", delta.len(), residual.len())?;
        expect_len(OP, "normed", normed.len(), residual.len())?;
        expect_multiple(OP, "residual.len()", residual.len().max(hidden), hidden)?;
        let n = residual.len() / hidden;
        if n == 0 {
            return Ok(());
        }
        let (rp, dp, wp, np) = (
            self.ptr_mut(residual),
            self.ptr(delta),
            self.ptr(weight),
            self.ptr_mut(normed),
        );
        Self::aligned(OP, &[rp, dp, wp, np])?;
        let hidden = hidden as u32;
        let mut launch = self
            .stream
            .launch_builder(self.function(Kernel::FusedAddRmsNorm));
        launch
            .arg(&rp)
            .arg(&dp)
            .arg(&wp)
            .arg(&np)
            .arg(&hidden)
            .arg(&eps);
        // SAFETY: argument types match `fused_add_rms_norm_bf16`; residual, delta and
        // normed hold n·hidden bf16, weight hidden, all 16-byte aligned; one block per row.
        unsafe { launch.launch(grid(n, NORM_THREADS)) }?;
        Ok(())
    }

    /// Rotary embedding in place on `q [n, n_heads·d]` and `k [n, n_kv_heads·d]` at
    /// `positions [n]` (see [`crate::reference::rope`]).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        q: &mut impl DevicePtrMut<bf16>,
        k: &mut impl DevicePtrMut<bf16>,
        positions: &impl DevicePtr<u32>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<(), KernelError> {
        const OP: &str = "rope";
        expect_multiple(OP, "head_dim", head_dim, 16)?;
        if head_dim > 512 {
            return Err(shape_err(OP, format!("head_dim {head_dim} > 512")));
        }
        let n = positions.len();
        expect_len(OP, "q", q.len(), n * n_heads * head_dim)?;
        expect_len(OP, "k", k.len(), n * n_kv_heads * head_dim)?;
        if n == 0 {
            return Ok(());
        }
        let (qp, kp, pp) = (self.ptr_mut(q), self.ptr_mut(k), self.ptr(positions));
        Self::aligned(OP, &[qp, kp])?;
        let (n32, nh, nkv, d) = (n as u32, n_heads as u32, n_kv_heads as u32, head_dim as u32);
        let mut launch = self.stream.launch_builder(self.function(Kernel::Rope));
        launch
            .arg(&qp)
            .arg(&kp)
            .arg(&pp)
            .arg(&n32)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d)
            .arg(&theta);
        // SAFETY: argument types match `rope_bf16`; q, k and positions hold the n rows
        // checked above, head_dim ≤ 512 fits its shared tables; one block per
        // ROPE_TOKENS tokens, the last one bounded by n.
        unsafe { launch.launch(grid(n.div_ceil(ROPE_TOKENS), ROPE_THREADS)) }?;
        Ok(())
    }

    /// Writes K and V rows `[n, n_kv_heads·d]` into the paged caches at
    /// `slot_mapping [n]` (see [`crate::reference::reshape_and_cache`]). Slots must lie
    /// inside the cache (the caller's contract, as on the CPU); `block_size` must be a
    /// power of two.
    pub fn reshape_and_cache(
        &self,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        slot_mapping: &impl DevicePtr<u32>,
        layout: KvLayout,
    ) -> Result<(), KernelError> {
        const OP: &str = "reshape_and_cache";
        expect_multiple(OP, "head_dim", layout.head_dim, 8)?;
        if !layout.block_size.is_power_of_two() {
            return Err(shape_err(
                OP,
                format!("block_size {} is not a power of two", layout.block_size),
            ));
        }
        let n = slot_mapping.len();
        let row = layout.n_kv_heads * layout.head_dim;
        expect_len(OP, "k", k.len(), n * row)?;
        expect_len(OP, "v", v.len(), n * row)?;
        expect_len(OP, "k_cache", k_cache.len(), layout.len())?;
        expect_len(OP, "v_cache", v_cache.len(), layout.len())?;
        if n == 0 {
            return Ok(());
        }
        let (kp, vp, kcp, vcp, sp) = (
            self.ptr(k),
            self.ptr(v),
            self.ptr_mut(k_cache),
            self.ptr_mut(v_cache),
            self.ptr(slot_mapping),
        );
        Self::aligned(OP, &[kp, vp, kcp, vcp])?;
        let nkv = layout.n_kv_heads as u32;
        let shift = layout.block_size.trailing_zeros();
        let d = layout.head_dim as u32;
        let mut launch = self
            .stream
            .launch_builder(self.function(Kernel::ReshapeAndCache));
        launch
            .arg(&kp)
            .arg(&vp)
            .arg(&kcp)
            .arg(&vcp)
            .arg(&sp)
            .arg(&nkv)
            .arg(&shift)
            .arg(&d);
        // SAFETY: argument types match `reshape_and_cache_bf16`; k, v hold n rows and
        // the caches `layout.len()` elements (checked); slots inside the cache are the
        // caller's contract. One block per token.
        unsafe { launch.launch(grid(n, CACHE_THREADS)) }?;
        Ok(())
    }

    /// RoPE and the KV write fused over one QKV projection (see
    /// [`crate::reference::rope_qkv_cache`]): `qkv [n, (n_heads + 2·n_kv_heads)·d]` in,
    /// rotated q to `q_out [n, n_heads·d]`, rotated k and v into the paged caches at
    /// `slot_mapping [n]`. Bit-identical to [`CudaKernels::rope`] then
    /// [`CudaKernels::reshape_and_cache`] on the split rows. Slots inside the cache are
    /// the caller's contract.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_cache(
        &self,
        qkv: &impl DevicePtr<bf16>,
        q_out: &mut impl DevicePtrMut<bf16>,
        k_cache: &mut impl DevicePtrMut<bf16>,
        v_cache: &mut impl DevicePtrMut<bf16>,
        positions: &impl DevicePtr<u32>,
        slot_mapping: &impl DevicePtr<u32>,
        n_heads: usize,
        layout: KvLayout,
        theta: f32,
    ) -> Result<(), KernelError> {
        const OP: &str = "rope_qkv_cache";
        let d = layout.head_dim;
        expect_multiple(OP, "head_dim", d, 16)?;
        if d > 512 {
            return Err(shape_err(OP, format!("head_dim {d} > 512")));
        }
        if !layout.block_size.is_power_of_two() {
            return Err(shape_err(
                OP,
                format!("block_size {} is not a power of two", layout.block_size),
            ));
        }
        let n = positions.len();
        let kvh = layout.n_kv_heads;
        expect_len(OP, "slot_mapping", slot_mapping.len(), n)?;
        expect_len(OP, "qkv", qkv.len(), n * (n_heads + 2 * kvh) * d)?;
        expect_len(OP, "q_out", q_out.len(), n * n_heads * d)?;
        expect_len(OP, "k_cache", k_cache.len(), layout.len())?;
        expect_len(OP, "v_cache", v_cache.len(), layout.len())?;
        if n == 0 {
            return Ok(());
        }
        let (xp, qp, kcp, vcp, pp, sp) = (
            self.ptr(qkv),
            self.ptr_mut(q_out),
            self.ptr_mut(k_cache),
            self.ptr_mut(v_cache),
            self.ptr(positions),
            self.ptr(slot_mapping),
        );
        Self::aligned(OP, &[xp, qp, kcp, vcp])?;
        let (n32, nh, nkv, d32) = (n as u32, n_heads as u32, kvh as u32, d as u32);
        let shift = layout.block_size.trailing_zeros();
        let mut launch = self
            .stream
            .launch_builder(self.function(Kernel::RopeQkvCache));
        launch
            .arg(&xp)
            .arg(&qp)
            .arg(&kcp)
            .arg(&vcp)
            .arg(&pp)
            .arg(&sp)
            .arg(&n32)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d32)
            .arg(&shift)
            .arg(&theta);
        // SAFETY: argument types match `rope_qkv_cache_bf16`; qkv, q_out, positions and
        // slots hold the n rows checked above, the caches `layout.len()` elements;
        // head_dim ≤ 512 fits its shared tables; one block per ROPE_TOKENS tokens, the
        // last one bounded by n.
        unsafe { launch.launch(grid(n.div_ceil(ROPE_TOKENS), ROPE_THREADS)) }?;
        Ok(())
    }

    /// `out[t, i] = silu(gate_up[t, i]) · gate_up[t, f + i]` (see
    /// [`crate::reference::swiglu`]).
    pub fn swiglu(
        &self,
        gate_up: &impl DevicePtr<bf16>,
        f: usize,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const OP: &str = "swiglu";
        expect_multiple(OP, "f", f, 8)?;
        expect_len(OP, "gate_up", gate_up.len(), out.len() * 2)?;
        expect_multiple(OP, "out.len()", out.len().max(f), f)?;
        let n = out.len() / f;
        if n == 0 {
            return Ok(());
        }
        let (gp, op) = (self.ptr(gate_up), self.ptr_mut(out));
        Self::aligned(OP, &[gp, op])?;
        let chunks = n * f / 8;
        let blocks = chunks
            .div_ceil(ELEMENTWISE_THREADS as usize)
            .min(self.num_sms as usize * 16);
        let (n32, f32_) = (n as u32, f as u32);
        let mut launch = self.stream.launch_builder(self.function(Kernel::SwiGlu));
        launch.arg(&gp).arg(&op).arg(&n32).arg(&f32_);
        // SAFETY: argument types match `swiglu_bf16`; gate_up holds n·2f and out n·f
        // bf16, 16-byte aligned; the kernel is grid-stride bounded by n·f/8 chunks.
        unsafe { launch.launch(grid(blocks, ELEMENTWISE_THREADS)) }?;
        Ok(())
    }

    /// `out[t] = table[ids[t]]` with `table [vocab, hidden]` (see
    /// [`crate::reference::embedding`]); an id ≥ vocab gives a zero row.
    pub fn embedding(
        &self,
        ids: &impl DevicePtr<u32>,
        table: &impl DevicePtr<bf16>,
        hidden: usize,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const OP: &str = "embedding";
        expect_multiple(OP, "hidden", hidden, 8)?;
        expect_multiple(OP, "table.len()", table.len(), hidden)?;
        let n = ids.len();
        expect_len(OP, "out", out.len(), n * hidden)?;
        if n == 0 {
            return Ok(());
        }
        let (ip, tp, op) = (self.ptr(ids), self.ptr(table), self.ptr_mut(out));
        Self::aligned(OP, &[tp, op])?;
        let (vocab, hidden32) = ((table.len() / hidden) as u32, hidden as u32);
        let mut launch = self.stream.launch_builder(self.function(Kernel::Embedding));
        launch.arg(&ip).arg(&tp).arg(&op).arg(&vocab).arg(&hidden32);
        // SAFETY: argument types match `embedding_bf16`; out holds n·hidden bf16, the
        // kernel reads table rows only for ids < vocab. One block per token.
        unsafe { launch.launch(grid(n, EMBED_THREADS)) }?;
        Ok(())
    }

    /// Index of the largest logit of each row of `[n, vocab]`, first on ties, into
    /// `out [n]` (see [`crate::reference::argmax_rows`]).
    pub fn argmax_rows(
        &self,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        out: &mut impl DevicePtrMut<u32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "argmax_rows";
        let n = out.len();
        expect_len(OP, "logits", logits.len(), n * vocab)?;
        if n == 0 || vocab == 0 {
            return Ok(());
        }
        let (lp, op) = (self.ptr(logits), self.ptr_mut(out));
        // SAFETY: logits hold n·vocab f32 and out n u32 (checked above).
        unsafe { self.launch_row_argmax(Kernel::ArgmaxRows, lp, op, n, vocab) }
    }

    /// Per row of `[n, vocab]`, the largest logit and its first index (as f32) into
    /// `out [n, 2]` (see [`crate::reference::argmax_pairs`]): what a vocab-parallel rank
    /// contributes to a greedy step instead of its logit rows. `vocab ≤ 2^24`.
    pub fn argmax_pairs(
        &self,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "argmax_pairs";
        let n = out.len() / 2;
        expect_len(OP, "out (2 per row)", out.len(), 2 * n)?;
        expect_len(OP, "logits", logits.len(), n * vocab)?;
        if vocab > 1 << 24 {
            return Err(KernelError::Shape {
                op: OP,
                detail: format!("vocab {vocab} > 2^24 does not fit an f32 index exactly"),
            });
        }
        if n == 0 || vocab == 0 {
            return Ok(());
        }
        let (lp, op) = (self.ptr(logits), self.ptr_mut(out));
        // SAFETY: logits hold n·vocab f32 and out 2·n f32 (checked above).
        unsafe { self.launch_row_argmax(Kernel::ArgmaxPairs, lp, op, n, vocab) }
    }

    /// The launch both argmax kernels share: `(logits, out, vocab)`, one block of
    /// `SAMPLE_THREADS` per row.
    ///
    /// # Safety
    /// `kernel` takes `(const float*, T*, unsigned)`; `logits` holds `n·vocab` f32 and
    /// `out` what the kernel writes for `n` rows.
    unsafe fn launch_row_argmax(
        &self,
        kernel: Kernel,
        logits: u64,
        out: u64,
        n: usize,
        vocab: usize,
    ) -> Result<(), KernelError> {
        let vocab = vocab as u32;
        let mut launch = self.stream.launch_builder(self.function(kernel));
        launch.arg(&logits).arg(&out).arg(&vocab);
        // SAFETY: the caller's contract above.
        unsafe { launch.launch(grid(n, SAMPLE_THREADS)) }?;
        Ok(())
    }

    /// Top-k pre-filter for sampling (see [`crate::reference::top_k_rows`]): per row of
    /// `logits [n, vocab]` scaled by `1/temperatures[row]` (≤ 0: scale 1), the `k`
    /// largest values in descending order and their ids into `values, indices [n, k]`,
    /// and the row's log-sum-exp into `lse [n]`. `k ≤ min(vocab, TOP_K_MAX)`.
    #[allow(clippy::too_many_arguments)]
    pub fn top_k_rows(
        &self,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        k: usize,
        temperatures: &impl DevicePtr<f32>,
        values: &mut impl DevicePtrMut<f32>,
        indices: &mut impl DevicePtrMut<u32>,
        lse: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), KernelError> {
        const OP: &str = "top_k_rows";
        if k == 0 || k > vocab || k > TOP_K_MAX {
            return Err(shape_err(
                OP,
                format!("k = {k} must be in 1..=min(vocab = {vocab}, {TOP_K_MAX})"),
            ));
        }
        let n = temperatures.len();
        expect_len(OP, "logits", logits.len(), n * vocab)?;
        expect_len(OP, "values", values.len(), n * k)?;
        expect_len(OP, "indices", indices.len(), n * k)?;
        expect_len(OP, "lse", lse.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (lp, tp, vp, ip, sp) = (
            self.ptr(logits),
            self.ptr(temperatures),
            self.ptr_mut(values),
            self.ptr_mut(indices),
            self.ptr_mut(lse),
        );
        let (vocab, k) = (vocab as u32, k as u32);
        let mut launch = self.stream.launch_builder(self.function(Kernel::TopKRows));
        launch
            .arg(&lp)
            .arg(&tp)
            .arg(&vp)
            .arg(&ip)
            .arg(&sp)
            .arg(&vocab)
            .arg(&k);
        // SAFETY: argument types match `top_k_rows_f32`; buffer sizes checked above,
        // k ≤ SAMPLE_MAX_K fits the kernel's candidate arrays; one 1024-thread block per
        // row as its block scan requires.
        unsafe { launch.launch(grid(n, SAMPLE_THREADS)) }?;
        Ok(())
    }
}
