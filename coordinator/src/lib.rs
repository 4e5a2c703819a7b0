//! The coordinator: one process that owns every block table.
//!
//! Owns (ARCHITECTURE §1, §7): the HTTP API (Mistral FIM/chat, OpenAI), auth,
//! the Codestral tokenizer and prompt templates, the engine loop
//! (`schedule → execute → update`) over the `scheduler` crate, gRPC clients for the
//! workers, Prometheus metrics, and the ops layer (per-key limits, usage, upstream
//! fallback, model aliases), and `stral route` (route/: a router in front of many
//! replicas, holding no model state). Invariant: workers only mirror block-table
//! diffs sent from here; a worker can be restarted from scratch.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | [`serve`] | wiring: tokenizer, local workers ([`launch`]), engine, router; shutdown |
//! | [`http`] | routes, request schemas ([`http::schema`]), handlers, JSON and SSE rendering |
//! | [`ops`] | the gate in front of `/v1/*`: keys, limits, usage, aliases, upstream fallback |
//! | [`engine`] | the step loop, its handle, the executor trait and its gRPC implementation, prompt-lookup drafts ([`engine::draft`]) |
//! | [`prompt`] | FIM and chat token layouts, conversation checks ([`prompt::PromptError`]) |
//! | [`tokenizer`] | the Codestral SentencePiece tokenizer and its control ids |
//! | [`detok`] | incremental detokenization and stop strings |
//! | [`metrics`] | the HTTP and engine series of `/metrics` |
//! | [`histogram`] | the fixed-bucket latency histogram every series uses |
//! | [`error`] | [`AppError`] (the API's error body), the body limit, [`error::FailedBeforeServing`] |
//! | [`launch`] | starting and stopping local `stral worker` processes |
//!
//! Calls go one way, top to bottom: `serve → http → ops → engine`; `http → prompt →
//! tokenizer`, `http → detok → tokenizer`; `http, ops → error → {engine, prompt,
//! tokenizer}`; `http, engine, ops::usage → histogram`; `metrics → engine`. No module
//! imports one above it (`ops` never reaches back into `http`: the gate is handed the
//! engine handle and gives the handler a [`ops::Ticket`] as a request extension).

pub mod detok;
pub mod engine;
pub mod error;
pub mod histogram;
pub mod http;
pub mod launch;
pub mod metrics;
pub mod ops;
pub mod prompt;
pub mod route;
pub mod serve;
pub mod tokenizer;

pub use error::{AppError, MAX_BODY_BYTES};
