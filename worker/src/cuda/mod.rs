//! The CUDA worker backend: one tensor-parallel rank of the model on one GPU, bf16.
//!
//! Owns: [`CudaModel`] (the rank's bf16 weights in GPU memory, its paged KV cache,
//! the activation buffers of the largest step, and the forward pass built from the
//! `kernels` launch wrappers plus cuBLASLt GEMMs), the GEMM plan cache ([`gemm`]),
//! the device-side collectives ([`collective`]: NCCL, or host-staged over any
//! [`crate::Collective`]), and the pure arithmetic of device strings and KV sizing
//! (this file, tested without a GPU).
//!
//! Device strings (`InitRequest.device`, `stral worker --device`):
//! `cuda[:ORDINAL][@UTILIZATION]`, e.g. `cuda`, `cuda:1`, `cuda@0.85`. A worker
//! process started for `cuda:K` serves every Init asking for `cuda…` on GPU K with
//! the Init's utilization. The collective follows the Init's bootstrap: an NCCL
//! unique id → NCCL; TCP peers → host-staged (so TP = 2 can share one GPU).
//!
//! Invariants: nothing here calls cudarc before [`kernels::cuda::driver_available`]
//! said yes (cudarc panics without libcuda); every launch goes to the one stream of
//! [`kernels::cuda::CudaKernels`], so launch order is execution order. The math is
//! the CPU reference's ([`crate::model::CpuModel::forward`]) in bf16 storage with f32
//! accumulation; logits are f32.
//!
//! Not here (yet): CUDA graphs for decode steps (every step is launched eagerly).
//!
//! Costs: loading converts each tensor on the host (checkpoint dtype → f32 → bf16)
//! and uploads it once; a step is 7 GEMMs + 6 small kernels per layer, one attention
//! plan upload, two all-reduces per layer when TP > 1, and one logits download.

pub mod collective;
pub mod gemm;
pub mod init;
pub mod libs;
mod model;

pub use crate::model::reorder_logits;
pub use collective::DeviceCollective;
pub use model::{CudaModel, CudaModelConfig, WeightSource};

use crate::config::ModelConfig;
use crate::WorkerError;

pub use kernels::cuda::driver_available;

/// Default fraction of GPU memory for weights, activations and the KV cache.
pub const DEFAULT_MEMORY_UTILIZATION: f64 = 0.90;

/// A parsed `cuda[:ORDINAL][@UTILIZATION]` device string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CudaDevice {
    /// GPU ordinal; `None` = the worker's own (`stral worker --device cuda:K`), else 0.
    pub ordinal: Option<usize>,
    /// Fraction of device memory this rank may use, in (0, 1].
    pub memory_utilization: f64,
}

impl CudaDevice {
    /// `Ok(None)` when `device` is not a CUDA device string.
    pub fn parse(device: &str) -> Result<Option<Self>, WorkerError> {
        let Some(rest) = device.strip_prefix("cuda") else {
            return Ok(None);
        };
        let bad = |why: String| WorkerError::Config(format!("device '{device}': {why}"));
        let (head, util) = match rest.split_once('@') {
            Some((h, u)) => {
                let u: f64 = u
                    .parse()
                    .map_err(|_| bad(format!("'{u}' is not a number")))?;
                (h, u)
            }
            None => (rest, DEFAULT_MEMORY_UTILIZATION),
        };
        if !(util > 0.0 && util <= 1.0) {
            return Err(bad("memory utilization must be in (0, 1]".into()));
        }
        let ordinal = match head.strip_prefix(':') {
            Some(k) => Some(
                k.parse()
                    .map_err(|_| bad(format!("'{k}' is not a GPU ordinal")))?,
            ),
            None if head.is_empty() => None,
            None => return Ok(None),
        };
        Ok(Some(Self {
            ordinal,
            memory_utilization: util,
        }))
    }

    /// What a worker started for `backend` (e.g. `cuda:1`) runs when an Init asks for
    /// `requested` (e.g. `cuda@0.8`): the worker's GPU, the Init's utilization.
    /// `None` when either is not a CUDA device.
    pub fn for_worker(backend: &str, requested: &str) -> Result<Option<Self>, WorkerError> {
        match (Self::parse(backend)?, Self::parse(requested)?) {
            (Some(b), Some(r)) => Ok(Some(Self {
                ordinal: b.ordinal.or(r.ordinal),
                memory_utilization: r.memory_utilization,
            })),
            _ => Ok(None),
        }
    }

    /// The string [`CudaDevice::parse`] reads back.
    pub fn device_string(&self) -> String {
        let mut s = "cuda".to_string();
        if let Some(k) = self.ordinal {
            s += &format!(":{k}");
        }
        if self.memory_utilization != DEFAULT_MEMORY_UTILIZATION {
            s += &format!("@{}", self.memory_utilization);
        }
        s
    }
}

/// Bytes of KV cache one block takes on a rank: K and V, all layers, bf16.
pub fn kv_bytes_per_block(cfg: &ModelConfig, tp: usize, block_size: usize) -> u64 {
    cfg.kv_bytes_per_block(tp, block_size, 2)
}

/// What the memory profile measured (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryProfile {
    pub total: u64,
    /// In use at the peak of the profiling step (weights, activations, workspaces,
    /// the profiling KV cache, and whatever else holds memory on the GPU).
    pub used_at_peak: u64,
    /// The temporary KV cache the profiling step ran on (freed afterwards).
    pub profiling_kv: u64,
}

/// KV blocks that fit in `utilization · total` next to everything the profiling step
/// needed (vLLM's rule): `⌊(util·total − (used_at_peak − profiling_kv)) / per_block⌋`,
/// capped by `max_blocks`. Zero when nothing is left.
pub fn kv_blocks_for(
    p: MemoryProfile,
    utilization: f64,
    per_block: u64,
    max_blocks: Option<u64>,
) -> u64 {
    let budget = (p.total as f64 * utilization) as u64;
    let needed = p.used_at_peak.saturating_sub(p.profiling_kv);
    let blocks = budget.saturating_sub(needed) / per_block.max(1);
    max_blocks.map_or(blocks, |m| blocks.min(m))
}

/// The model shape of `synthetic:<preset>` (random weights filled on the device).
pub fn synthetic_config(source: &str) -> Result<Option<ModelConfig>, WorkerError> {
    match source.strip_prefix(crate::sim::SYNTHETIC_PREFIX) {
        Some(preset) => {
            let cfg = ModelConfig::preset(preset)?;
            cfg.validate()?;
            Ok(Some(cfg))
        }
        None => Ok(None),
    }
}

/// A fresh NCCL unique id (128 bytes) for `InitRequest.collective`. The process that
/// calls this hosts NCCL's bootstrap root until the group has formed, so it must
/// outlive the ranks' Init (the coordinator does).
pub fn nccl_unique_id() -> Result<Vec<u8>, WorkerError> {
    collective::new_unique_id()
}

/// Maps a CUDA driver error to a [`WorkerError`] naming what was being done; an
/// out-of-memory error says so plainly.
pub(crate) fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> WorkerError + '_ {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            WorkerError::Config(format!(
                "out of GPU memory while {what}; lower --max-num-batched-tokens, raise --tp, or free the GPU"
            ))
        } else {
            WorkerError::Serve(format!("CUDA error while {what}: {e}"))
        }
    }
}

/// Maps a kernel-crate error (a launch or set-up failure) to a [`WorkerError`].
pub(crate) fn kernel_err(what: &str) -> impl Fn(kernels::KernelError) -> WorkerError + '_ {
    move |e| match e {
        kernels::KernelError::Driver(d) => driver_err(what)(d),
        kernels::KernelError::Shape { .. } => WorkerError::Step(format!("{what}: {e}")),
        other => WorkerError::Config(format!("{what}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_and_round_trip() {
        let d = CudaDevice::parse("cuda").unwrap().unwrap();
        assert_eq!(d.ordinal, None);
        assert_eq!(d.memory_utilization, DEFAULT_MEMORY_UTILIZATION);
        let d = CudaDevice::parse("cuda:3@0.5").unwrap().unwrap();
        assert_eq!((d.ordinal, d.memory_utilization), (Some(3), 0.5));
        for s in ["cuda", "cuda:1", "cuda@0.85", "cuda:2@0.7"] {
            assert_eq!(CudaDevice::parse(s).unwrap().unwrap().device_string(), s);
        }
        let w = CudaDevice::for_worker("cuda:1", "cuda@0.8")
            .unwrap()
            .unwrap();
        assert_eq!((w.ordinal, w.memory_utilization), (Some(1), 0.8));
        assert_eq!(CudaDevice::for_worker("cuda:1", "cpu").unwrap(), None);
        assert_eq!(CudaDevice::parse("cpu").unwrap(), None);
        assert_eq!(CudaDevice::parse("cudax").unwrap(), None);
        for bad in ["cuda:x", "cuda@2", "cuda@0", "cuda@z"] {
            assert!(CudaDevice::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kv_block_bytes_are_bf16_k_and_v_for_every_layer() {
        let cfg = ModelConfig::codestral_22b();
        // 2 (K,V) · 56 layers · 8 kv heads · 16 tokens · 128 dims · 2 bytes.
        assert_eq!(kv_bytes_per_block(&cfg, 1, 16), 3_670_016);
        assert_eq!(kv_bytes_per_block(&cfg, 2, 16), 3_670_016 / 2);
    }

    #[test]
    fn kv_capacity_is_what_the_utilization_leaves_after_the_profiled_peak() {
        let gib = 1u64 << 30;
        let p = MemoryProfile {
            total: 80 * gib,
            used_at_peak: 50 * gib,
            profiling_kv: 2 * gib,
        };
        // 72 GiB budget − 48 GiB needed = 24 GiB of 1 MiB blocks.
        assert_eq!(kv_blocks_for(p, 0.9, 1 << 20, None), 24 * 1024);
        assert_eq!(kv_blocks_for(p, 0.9, 1 << 20, Some(100)), 100);
        // Weights alone exceed the budget: no blocks (the caller turns that into an error).
        assert_eq!(kv_blocks_for(p, 0.5, 1 << 20, None), 0);
        // Codestral-22B on an 80 GiB GPU at TP=1 leaves room for tens of thousands of tokens.
        let cfg = ModelConfig::codestral_22b();
        let weights = cfg.n_params() * 2;
        let p = MemoryProfile {
            total: 80 * gib,
            used_at_peak: weights + 3 * gib,
            profiling_kv: 0,
        };
        let blocks = kv_blocks_for(p, 0.9, kv_bytes_per_block(&cfg, 1, 16), None);
        assert!((1000..10_000).contains(&blocks), "{blocks} blocks");
    }

    #[test]
    fn synthetic_sources_name_a_preset_shape() {
        let cfg = synthetic_config("synthetic:codestral-22b")
            .unwrap()
            .unwrap();
        assert_eq!(cfg, ModelConfig::codestral_22b());
        assert_eq!(synthetic_config("/models/codestral").unwrap(), None);
        assert!(synthetic_config("synthetic:nope").is_err());
    }
}
