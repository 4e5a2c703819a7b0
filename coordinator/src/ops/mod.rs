//! Org-wide operation: per-key and per-team rate limits and token quotas, usage
//! accounting, upstream fallback, and model aliases with sticky A/B splits.
//!
//! [`Ops`] sits in front of the generation endpoints as one middleware ([`gate()`]):
//! it authenticates the key (by SHA-256 digest, [`keys`]), buffers the body (≤ the API's
//! body limit) to read `model` and `max_tokens`, picks the backend (alias arm, then the
//! fallback policy), and either runs the local handler or forwards upstream
//! ([`fallback`]). Local requests are admitted by the handler itself once it knows the
//! prompt's token count, with the [`Ticket`] the gate put in the request's extensions;
//! the returned [`Admission`] lives in the response stream, charging generated tokens
//! as they stream ([`limits`]).
//!
//! Fallback policy, in order: the key's rule (`always`/`never`); no worker group ready;
//! the expected queue wait (mean step time × (waiting + 1), counted only when a queue
//! exists) plus one step would exceed `--fallback-ttft-budget-ms`. A local request that
//! fails before sending anything (503, or an SSE stream whose first event is an error)
//! is retried upstream, so losing the workers is invisible to clients. Every response
//! carries `x-stral-served-by: local|fallback`.
//!
//! Invariants: the key file is swapped atomically on reload (SIGHUP, or a changed
//! modification time seen by the poll every `reload_poll`); accounts and usage survive a
//! reload by key digest / team name, so nothing in flight is dropped or double-counted.
//! Cost per local request: one SHA-256, one map probe, one `serde_json` pass over the body
//! to peek two fields, two mutex acquisitions to admit and two per generated token
//! (benches/RESULTS.md).

//!
//! Modules, in call order (each uses only those above it): [`error`], [`limits`],
//! [`keys`], [`routing`], [`usage`], [`fallback`] (the upstream client), `accounts`
//! (principals, callers, admissions), `table` (the key table), `layer` ([`Ops`] and its
//! per-request decisions), `metrics_text` and `usage_json` (the reports), `forward`
//! (sending a request upstream), `gate` (the middleware).

mod accounts;
pub mod error;
pub mod fallback;
mod forward;
mod gate;
pub mod keys;
mod layer;
pub mod limits;
mod metrics_text;
pub mod routing;
mod table;
pub mod usage;
mod usage_json;

pub use accounts::{Admission, Caller, Principal};
pub use error::OpsError;
pub use gate::{gate, Ticket};
pub use layer::{Ops, OpsConfig, SpillReason};
pub use usage_json::usage_report;
