//! The scheduler: the pure, synchronous, deterministic brain of the coordinator.
//!
//! Owns (ARCHITECTURE §4): the paged KV block pool, the prefix cache, the request
//! queue, the batching policy (decodes first, then prefill chunks under a token
//! budget), priorities with aging, and preemption by recompute. It performs no I/O
//! and reads no clock: time is passed in. It depends on `std` and `thiserror` only.
