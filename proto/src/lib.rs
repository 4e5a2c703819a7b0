//! The worker protocol (ARCHITECTURE §6): `.proto` files and the tonic/prost types
//! generated from them without a system `protoc`.
//!
//! Will own: `service Worker { Init, Steps (bidirectional stream), Health }`, with
//! `StepPlan`s that carry only what one forward step needs (token ids packed).
