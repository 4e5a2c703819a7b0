//! The coordinator: one process that owns every block table.
//!
//! Owns (ARCHITECTURE §1, §7): the HTTP API (Mistral FIM/chat, OpenAI), auth,
//! the Codestral tokenizer and prompt templates, the engine loop
//! (`schedule → execute → update`) over the `scheduler` crate, gRPC clients for the
//! workers, Prometheus metrics, and the ops layer (per-key limits, usage, upstream
//! fallback, model aliases), and `stral route` (route/: a router in front of many
//! replicas, holding no model state). Invariant: workers only mirror block-table
//! diffs sent from here; a worker can be restarted from scratch.

pub mod detok;
pub mod engine;
pub mod http;
pub mod launch;
pub mod metrics;
pub mod ops;
pub mod prompt;
pub mod route;
pub mod serve;
pub mod tokenizer;
