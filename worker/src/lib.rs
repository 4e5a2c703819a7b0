//! A worker: one tensor-parallel rank of the model.
//!
//! Owns (ARCHITECTURE §2, §3): the model config, checkpoint loading and sharding
//! (safetensors, memory-mapped, only this rank's slices), synthetic checkpoints, the
//! [`backend::Backend`] that runs the forward pass (the CPU f32 reference, the bf16
//! CUDA backend in `cuda`, the sim backend's modelled GPU step times, or none for
//! device "null"), the `Collective` all-reduce between ranks (in-process, and over
//! TCP between worker processes), rank 0's sampler, and the gRPC worker service.
//! Invariant: a worker never owns block tables; it is handed them per step and only
//! mirrors them.
//!
//! Map (calls go downwards; no module calls one above it):
//!
//! | module | owns |
//! |---|---|
//! | [`service`] | the gRPC adapter: server, `Health`, the `Steps` stream, the one [`rank::Rank`] slot |
//! | [`auth`] | who may call: the token rule for non-loopback listeners and the interceptor |
//! | [`init`] | `Init`: device resolution, the shared checks, the backend choice, CPU/null setup with memory bounds, the `InitReply` |
//! | [`rank`] | a rank's mirrored sequences, the plan checks, the one step path, rank 0's sampling |
//! | [`profile`] | the step cost model: scratch steps timed at `Init` (or the backend's own model), the fit |
//! | [`backend`] | the `Backend` trait, the CPU and null backends, what `Init` hands a backend |
//! | [`cuda`] (`cuda::init`) / [`sim`] | the CUDA backend and its `Init` / the sim backend and its `Init`, GPU table, step-time model |
//! | [`model`], [`sampler`] | the CPU forward pass and step input / per-sequence sampling and draft verification |
//! | [`checkpoint`], [`safetensors_io`], [`gguf`], [`config`], [`synth`], [`embedded`] | weights and model shapes |
//! | [`collective`], [`tcp_collective`], [`local`] | all-reduce and gather between ranks; an in-process TP group |
//! | [`fault`] | the test-only crash hook (`STRAL_FAULT_CRASH_ON_TOKEN`) |
//!
//! `service → init → {cuda::init, sim, backend, rank, profile}`; `profile → rank`; `rank → {backend, sampler,
//! model}`; backends → `model` / `cuda::model` → `collective`, `kernels`.

pub mod auth;
pub mod backend;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod embedded;
pub mod fault;
pub mod gguf;
pub mod init;
pub mod local;
pub mod model;
pub mod profile;
pub mod rank;
pub mod safetensors_io;
pub mod sampler;
pub mod service;
pub mod sim;
pub mod synth;
pub mod tcp_collective;

use std::path::{Path, PathBuf};

pub use collective::{Collective, LocalCollective};
pub use config::{CheckpointFormat, ModelConfig};

/// Everything that can go wrong in a worker; every message names what it is about.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("collective: {0}")]
    Collective(String),
    #[error("invalid step: {0}")]
    Step(String),
    #[error("serving: {0}")]
    Serve(String),
}

impl WorkerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
