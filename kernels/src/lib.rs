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

pub mod reference;

/// Errors raised by kernel set-up and launches.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
}
