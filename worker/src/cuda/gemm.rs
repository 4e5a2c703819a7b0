//! cuBLASLt GEMMs for the linear layers: `y[n, out] = x[n, in] · W[out, in]ᵀ`, bf16
//! inputs, f32 accumulation, bf16 or f32 output (f32 for the logits).
//!
//! Owns: one cuBLASLt handle, its workspace, and a plan cache — per shape
//! `(out, n, in, output dtype)` the matrix layouts, the matmul descriptor and the
//! algorithm cuBLASLt's heuristic picked the first time the shape was seen. The
//! heuristic therefore runs once per shape, never per call.
//!
//! Layout: cuBLASLt is column-major, so the row-major product is computed as
//! `yᵀ[out, n] = W[out, in]·xᵀ` with A = the weight read transposed (`lda = in`),
//! B = the activations (`ldb = in`), D = the output (`ldd = out`).
//!
//! Invariant: every GEMM goes to the stream the handle was created for (the one
//! stream of the worker). Cost per call: one hash lookup plus the cuBLASLt launch;
//! the cache holds one entry per distinct token count seen (bounded by the step
//! token budget).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::WorkerError;

/// Element type of a GEMM output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            OutType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    out: u64,
    n: u64,
    k: u64,
    dtype: OutType,
}

/// The cuBLASLt objects of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the handles were created by `Gemm::plan` and are destroyed once, here;
        // no launch that uses them can still be queued after the stream was synchronized
        // by whoever drops the model. Errors on destruction are ignored (nothing to do).
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle with its workspace and plan cache.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: HashMap<Shape, Plan>,
}

// SAFETY: the handle is used only through `&mut self` (one thread at a time), and
// cuBLASLt handles may move between threads.
unsafe impl Send for Gemm {}

fn blas_err(what: &str) -> impl Fn(lt::CublasError) -> WorkerError + '_ {
    move |e| WorkerError::Serve(format!("cuBLASLt {what}: {e}"))
}

impl Gemm {
    /// Workspace: 32 MiB on Hopper, 4 MiB before (NVIDIA's recommendation).
    pub fn new(stream: Arc<CudaStream>, arch: u32) -> Result<Self, WorkerError> {
        super::libs::probe(super::libs::CudaLib::CublasLt)?; // cudarc panics without it
        let handle = lt::create_handle().map_err(blas_err("create handle"))?;
        let size = if arch >= 90 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(size)
            .map_err(super::driver_err("allocating the cuBLASLt workspace"))?;
        Ok(Self {
            handle,
            stream,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// Shapes planned so far.
    pub fn planned_shapes(&self) -> usize {
        self.plans.len()
    }

    fn plan(&mut self, s: Shape) -> Result<&Plan, WorkerError> {
        if !self.plans.contains_key(&s) {
            let bf = sys::cudaDataType_t::CUDA_R_16BF;
            let a =
                lt::create_matrix_layout(bf, s.k, s.out, s.k as i64).map_err(blas_err("layout"))?;
            let b =
                lt::create_matrix_layout(bf, s.k, s.n, s.k as i64).map_err(blas_err("layout"))?;
            let d = lt::create_matrix_layout(s.dtype.cuda(), s.out, s.n, s.out as i64)
                .map_err(blas_err("layout"))?;
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(blas_err("descriptor"))?;
            let mut plan = Plan {
                desc,
                a,
                b,
                d,
                // SAFETY: a plain-data C struct (an array of integers); overwritten by
                // the heuristic's choice below before any use.
                algo: unsafe { std::mem::zeroed() },
            };
            let transpose: i32 = 1;
            let pref = lt::create_matmul_pref().map_err(blas_err("preference"))?;
            let ws = self.workspace.len();
            // SAFETY: the descriptors were just created; the attribute buffers are live
            // locals of the types cuBLASLt documents for these attributes.
            let heuristic = unsafe {
                let r = lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&transpose) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
                .and_then(|()| {
                    lt::set_matmul_pref_attribute(
                        pref,
                        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        (&ws) as *const usize as *const c_void,
                        std::mem::size_of::<usize>(),
                    )
                })
                .and_then(|()| {
                    lt::get_matmul_algo_heuristic(self.handle, plan.desc, a, b, d, d, pref)
                });
                let _ = lt::destroy_matmul_pref(pref);
                r
            }
            .map_err(|e| {
                WorkerError::Serve(format!(
                    "cuBLASLt has no algorithm for a bf16 GEMM of {}×{}×{} ({:?} out): {e}",
                    s.out, s.n, s.k, s.dtype
                ))
            })?;
            plan.algo = heuristic.algo;
            self.plans.insert(s, plan);
        }
        Ok(&self.plans[&s])
    }

    /// `y[n, out] = x[n, k] · w[out, k]ᵀ` into bf16 `y`.
    pub fn linear(
        &mut self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        n: usize,
        k: usize,
        out: usize,
        y: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), WorkerError> {
        self.run(x, w, n, k, out, OutType::Bf16, y.len(), |s| {
            y.device_ptr_mut(s).0
        })
    }

    /// As [`Gemm::linear`] with an f32 output (the logits).
    pub fn linear_f32(
        &mut self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        n: usize,
        k: usize,
        out: usize,
        y: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), WorkerError> {
        self.run(x, w, n, k, out, OutType::F32, y.len(), |s| {
            y.device_ptr_mut(s).0
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        n: usize,
        k: usize,
        out: usize,
        dtype: OutType,
        y_len: usize,
        y_ptr: impl FnOnce(&Arc<CudaStream>) -> u64,
    ) -> Result<(), WorkerError> {
        if x.len() != n * k || w.len() != out * k || y_len != n * out {
            return Err(WorkerError::Step(format!(
                "GEMM shapes: x has {} (want {n}×{k}), w {} (want {out}×{k}), y {y_len} (want {n}×{out})",
                x.len(),
                w.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        let (xp, wp) = (x.device_ptr(&stream).0, w.device_ptr(&stream).0);
        let yp = y_ptr(&stream);
        let wsp = self.workspace.device_ptr(&stream).0;
        let ws_len = self.workspace.len();
        let handle = self.handle;
        let plan = self.plan(Shape {
            out: out as u64,
            n: n as u64,
            k: k as u64,
            dtype,
        })?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the pointers are live device buffers of the lengths checked above
        // (A: out×k, B: n×k, D: n×out of the plan's dtype), the plan was built for
        // exactly this shape, and the launch goes to the stream they belong to.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                wp as *const c_void,
                plan.a,
                xp as *const c_void,
                plan.b,
                yp as *const c_void,
                plan.d,
                yp as *mut c_void,
                plan.d,
                &plan.algo,
                wsp as *mut c_void,
                ws_len,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("matmul"))
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once; plans that used it are gone.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
