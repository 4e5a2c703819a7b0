//! The worker protocol (ARCHITECTURE §6): `worker.proto` and the tonic/prost types
//! generated from it at build time without a system `protoc`.
//!
//! Owns: `service Worker { Init, Steps (bidirectional stream), Health }`, with
//! `StepPlan`s that carry only what one forward step needs (token and block ids
//! packed). The semantics of every field are documented in `worker.proto`.
//! Invariant: the coordinator owns block tables; plans carry diffs that workers
//! mirror. Cost: a decode step of `n` sequences is ~`n · 20` bytes on the wire.

/// Package `stral.worker.v1`: messages, `worker_client::WorkerClient` and
/// `worker_server::{Worker, WorkerServer}`.
pub mod v1 {
    tonic::include_proto!("stral.worker.v1");
}
