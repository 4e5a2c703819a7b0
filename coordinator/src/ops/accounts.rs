//! Who is calling and what one admitted request owes: a [`Principal`] (a configured key
//! with its own and its team's buckets and usage counters), the [`Caller`] of a request,
//! and the [`Admission`] that charges a request as it streams and records its usage when
//! dropped.
//!
//! Invariant: an admission dropped unfinished with nothing generated is refunded (the
//! request failed before serving anything and may be retried upstream); every other
//! admission is recorded exactly once, in the key's and the team's usage.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::keys::KeySpec;
use super::limits::{self, Account, Permit, RateHeaders, Rejection};
use super::usage::Usage;
use crate::error::AppError;

/// One key's or team's buckets and usage counters.
pub(super) type Ledger = (Arc<Account>, Arc<Usage>);

/// A configured key with its live accounts.
#[derive(Debug)]
pub struct Principal {
    pub spec: KeySpec,
    pub(super) account: Arc<Account>,
    pub(super) team_account: Arc<Account>,
    pub(super) usage: Arc<Usage>,
    pub(super) team_usage: Arc<Usage>,
}

/// The authenticated caller of a request (`None`: authentication is off).
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<Principal>>);

impl Caller {
    /// Admits one request (`Ok(None)`: no accounting, authentication is off). A refusal
    /// comes with the rate headers to send along with it.
    pub(super) fn admit(
        &self,
        prompt: u64,
        reserve: u64,
        fallback: bool,
    ) -> Result<Option<Admission>, (AppError, RateHeaders)> {
        let Some(p) = &self.0 else {
            return Ok(None);
        };
        match limits::admit(&p.account, Some(&p.team_account), prompt, reserve) {
            Ok(permit) => Ok(Some(Admission {
                permit,
                principal: p.clone(),
                arrival: Instant::now(),
                fallback,
                finished: false,
            })),
            Err(r) => {
                p.usage.rejected.fetch_add(1, Ordering::Relaxed);
                p.team_usage.rejected.fetch_add(1, Ordering::Relaxed);
                let headers = r.headers.clone();
                Err((rate_limited(&p.spec, r), headers))
            }
        }
    }
}

fn rate_limited(spec: &KeySpec, r: Rejection) -> AppError {
    let whose = match r.scope {
        "team" => format!("team '{}'", spec.team),
        _ => format!("key '{}'", spec.name),
    };
    let retry_after_s = r.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    AppError::RateLimited {
        message: format!(
            "rate limit reached for {whose}: {} = {}; retry after {retry_after_s} s",
            r.kind.as_str(),
            r.limit
        ),
        retry_after_s,
    }
}

/// One admitted request's accounting: charges as it streams; records usage when dropped.
#[derive(Debug)]
pub struct Admission {
    pub(super) permit: Permit,
    principal: Arc<Principal>,
    arrival: Instant,
    fallback: bool,
    finished: bool,
}

impl Admission {
    /// Charges generated tokens (call as they stream).
    pub fn charge_generated(&mut self, n: u64) {
        self.permit.charge_generated(n);
    }

    /// Marks the request served (a request dropped unfinished with nothing generated is
    /// refunded: it failed before serving anything, and may be retried upstream).
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The rate-limit headers this admission's buckets report.
    pub(super) fn rate_headers(&self) -> RateHeaders {
        self.permit.headers().clone()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.finished && self.permit.generated_tokens() == 0 {
            self.permit.refund();
            return;
        }
        let seconds = self.arrival.elapsed().as_secs_f64();
        let (prompt, generated) = (self.permit.prompt_tokens(), self.permit.generated_tokens());
        for u in [&self.principal.usage, &self.principal.team_usage] {
            u.record(self.fallback, prompt, generated, seconds);
        }
    }
}
