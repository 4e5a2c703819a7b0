//! A test-only fault hook: with `STRAL_FAULT_CRASH_ON_TOKEN=ID` in its environment, a
//! worker process aborts (as a crashing kernel or driver would take it down) in any
//! step whose plan feeds token `ID`. Unset — always, outside tests — it costs one
//! cached environment lookup per step.
//!
//! Used by the recovery tests to make a request that crashes its worker group every
//! time it runs (the engine must detect it and fail only that request).

use std::sync::OnceLock;

/// The environment variable that arms the hook.
pub const CRASH_ON_TOKEN: &str = "STRAL_FAULT_CRASH_ON_TOKEN";

fn armed() -> Option<u32> {
    static TOKEN: OnceLock<Option<u32>> = OnceLock::new();
    *TOKEN.get_or_init(|| std::env::var(CRASH_ON_TOKEN).ok()?.parse().ok())
}

/// Aborts the process when the hook is armed and any of `tokens` is its token.
pub fn crash_if_fed<'a>(mut tokens: impl Iterator<Item = &'a [u32]>) {
    if let Some(poison) = armed() {
        if tokens.any(|t| t.contains(&poison)) {
            eprintln!(
                "{CRASH_ON_TOKEN}={poison}: this step feeds token {poison}; aborting the worker"
            );
            std::process::abort();
        }
    }
}
