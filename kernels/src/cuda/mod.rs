//! The CUDA side of the kernels: device set-up and one launch wrapper per reference op.
//!
//! Owns: a [`CudaKernels`] — the CUDA context of one GPU, the stream every wrapper
//! launches on, and the loaded kernel module (compiled by [`compile`] for the device's
//! compute capability, cached on disk). Wrappers live in `ops` (elementwise, norm,
//! RoPE, KV write, sampling) and [`attention`] (paged attention with its per-step
//! [`AttnPlan`]).
//!
//! Buffers are cudarc device slices of `half::bf16` (activations, weights, KV caches),
//! `u32` (ids, positions, slots) and `f32` (logits); callers allocate and upload them
//! through [`CudaKernels::stream`] (`stream.clone_htod(&host)`, `stream.alloc_zeros`,
//! `stream.clone_dtoh(&dev)`), and may pass views (`slice.slice(a..b)`) wherever a
//! wrapper takes `impl DevicePtr`. Layouts are the reference ops' (crate docs).
//!
//! Invariants: every launch goes to the one stream, so launch order is execution order
//! and cudarc's cross-stream event tracking is switched off (it would record events
//! per argument per launch); callers that use other streams order them with events.
//! Wrappers validate shapes against slice lengths and return [`KernelError::Shape`]
//! instead of launching out of bounds; what they cannot check on the host (ids < vocab,
//! slots inside the cache, block tables) is the caller's contract, as for the CPU ops.
//!
//! Opening checks, in order, that libcuda loads ([`KernelError::NoDriver`] — cudarc
//! itself would panic), that the GPU is sm_80 or newer
//! ([`KernelError::UnsupportedArch`]), and that NVRTC and the CUDA headers are there.
//!
//! Costs: opening compiles the program once per source change and architecture (a
//! few seconds; cached under [`compile::cache_dir`]); a wrapper is one or a few
//! kernel launches (a few µs of host time each) and no allocation, except
//! [`CudaKernels::plan_attention`], which uploads the step's metadata once per step.

pub mod attention;
pub mod compile;
mod ops;

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

pub use attention::{AttnPlan, AttnPlanConfig, PlanBuffers};
pub use compile::Kernel;
pub use ops::TOP_K_MAX;

use crate::KernelError;

/// Whether the CUDA driver library can be loaded. cudarc panics on first use when it
/// cannot, so everything that touches the driver checks this first.
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names; it
    // has no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The kernels loaded on one GPU, with the stream they run on.
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    /// Resident blocks per SM of each kernel at its launch shape (0: not measured).
    blocks_per_sm: Vec<u32>,
    arch: u32,
    num_sms: u32,
    _module: Arc<CudaModule>,
}

impl CudaKernels {
    /// Opens GPU `ordinal`: checks the driver and the architecture, compiles (or loads
    /// from the cache) the kernels for it, and creates the stream.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        if !driver_available() {
            return Err(KernelError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(KernelError::UnsupportedArch { major, minor });
        }
        let arch = (major * 10 + minor) as u32;
        let include_dir = compile::cuda_include_dir()?;
        let cubin = compile::cached_cubin(arch, &include_dir)?;
        // SAFETY: no slice exists yet on this context, and all our work is submitted to
        // the single stream created below, so no cross-stream synchronisation is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let module = ctx.load_module(Ptx::from_binary(cubin))?;
        let functions = Kernel::ALL
            .iter()
            .map(|k| module.load_function(k.name()))
            .collect::<Result<Vec<_>, _>>()?;
        let num_sms =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let mut blocks_per_sm = vec![0; Kernel::ALL.len()];
        for (tier, head_dim) in attention::TIERS.iter().flat_map(|t| [(t, 128), (t, 64)]) {
            let kernel = tier.kernel(head_dim);
            let function = &functions[kernel.index()];
            let smem = tier.smem_bytes(head_dim);
            function.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
            blocks_per_sm[kernel.index()] = function
                .occupancy_max_active_blocks_per_multiprocessor(tier.threads(), smem, None)?;
        }
        Ok(Self {
            ctx,
            stream,
            functions,
            blocks_per_sm,
            arch,
            num_sms: num_sms as u32,
            _module: module,
        })
    }

    /// SMs and resident blocks per SM of the attention kernels for `head_dim`.
    pub fn attention_grid(&self, head_dim: usize) -> attention::GridShape {
        let per_tier = attention::TIERS.map(|t| self.blocks_per_sm[t.kernel(head_dim).index()]);
        attention::GridShape {
            sms: self.num_sms,
            blocks_per_sm: per_tier,
        }
    }

    /// The stream every wrapper launches on; use it to allocate, upload and download.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compute capability as `major * 10 + minor`.
    pub fn arch(&self) -> u32 {
        self.arch
    }

    pub fn num_sms(&self) -> u32 {
        self.num_sms
    }

    /// Waits for everything launched so far.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        Ok(self.stream.synchronize()?)
    }

    fn function(&self, kernel: Kernel) -> &CudaFunction {
        &self.functions[kernel.index()]
    }
}
