//! A worker: one tensor-parallel rank of the model.
//!
//! Owns (ARCHITECTURE §2, §3): the model config, checkpoint loading and sharding
//! (safetensors, memory-mapped, only this rank's slices), the `Backend` that runs the
//! forward pass (the CPU f32 reference here), the `Collective` all-reduce between
//! ranks, synthetic checkpoints, and (later) the gRPC worker service and sampler.
//! Invariant: a worker never owns block tables; it is handed them per step.
