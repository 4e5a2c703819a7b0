//! A worker: one tensor-parallel rank of the model.
//!
//! Owns (ARCHITECTURE §2, §3): the model config, checkpoint loading and sharding
//! (safetensors, memory-mapped, only this rank's slices), synthetic checkpoints, the
//! `Backend` that runs the forward pass (the CPU f32 reference, the bf16 CUDA backend
//! in `cuda`, or the sim backend's modelled GPU step times), and the
//! `Collective` all-reduce between ranks (in-process, and over TCP between worker
//! processes), rank 0's sampler, and the gRPC worker service. Invariant: a worker
//! never owns block tables; it is handed them per step and only mirrors them.

pub mod auth;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod cuda;
pub mod embedded;
pub mod fault;
pub mod local;
pub mod model;
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
