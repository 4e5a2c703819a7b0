//! Compute kernels for the Mistral forward pass.
//!
//! Owns: the CUDA sources in `kernels/cuda/*.cu` (compiled at run time with NVRTC),
//! their launch wrappers, and — in [`reference`] — a CPU f32 implementation of every
//! op with the same argument layout. The CPU ops are the numerical ground truth the
//! CUDA kernels are tested against, and they are what the CPU worker backend runs.
//! This crate knows nothing of gRPC, block ownership or scheduling: it is handed
//! slices plus per-step metadata ([`reference::AttnMeta`]) and computes.
//!
//! Layouts shared by every backend (row-major throughout):
//! - activations `[n_tokens, features]`;
//! - linear weights `[out_features, in_features]` (as stored in checkpoints), `y = x·Wᵀ`;
//! - KV cache `[num_blocks, n_kv_heads, block_size, head_dim]`, one for K and one for V;
//! - RoPE rotates the pairs `(x[i], x[i + head_dim/2])` ("rotate-half", the Hugging Face
//!   convention); Mistral-layout checkpoints are permuted into it at load time.
//!
//! [`cuda`] holds the GPU side: NVRTC compilation, the kernel table and one launch
//! wrapper per reference op (bf16 storage, f32 arithmetic). It links nothing at build
//! time; the driver and NVRTC are loaded when a [`cuda::CudaKernels`] is opened.

pub mod cuda;
pub mod quant;
pub mod reference;
pub mod testdata;

/// Errors raised by kernel set-up and launches.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine?)")]
    NoDriver,
    #[error("no NVRTC: libnvrtc.so.13 could not be loaded; put its directory on LD_LIBRARY_PATH (scripts/cuda-venv.sh prints one)")]
    NoNvrtc,
    #[error("no CUDA headers (cuda_bf16.h) in {searched:?}; set STRAL_CUDA_INCLUDE_DIR")]
    NoCudaHeaders { searched: Vec<String> },
    #[error("GPU compute capability {major}.{minor} is not supported: the kernels need sm_80 (Ampere) or newer")]
    UnsupportedArch { major: i32, minor: i32 },
    #[error("NVRTC could not compile the kernels for sm_{arch}: {log}")]
    Compile { arch: u32, log: String },
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}
