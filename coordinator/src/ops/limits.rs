//! Token-bucket accounting per key and per team: requests/minute, tokens/minute,
//! tokens/day and concurrent requests.
//!
//! An [`Account`] is one mutex around its buckets. Admission locks the key's account
//! and then its team's (always in that order, so two admissions cannot deadlock),
//! checks every limit of both, and only then charges both: one request, the prompt
//! tokens, one concurrency slot, and a *reservation* of the tokens the request may still
//! generate (`max_tokens`). Generated tokens are charged one by one as they stream and
//! consume the reservation; whatever is left of it is released when the request ends.
//!
//! Invariants: a request is admitted only while `level - reserved >= 1` for every token
//! bucket and `level >= 1` for the request bucket, so concurrent admissions can overrun a
//! budget by at most one request's worth (its prompt plus its `max_tokens`); `reserved`
//! equals the sum of the live [`Permit`]s' unspent reservations and `in_flight` their
//! number (both are returned by `Drop`, so an early `?` cannot leak them). A reload
//! swaps an account's limits under the same lock and keeps what was used, so requests in
//! flight are never dropped. Cost: two uncontended mutex
//! acquisitions and a few float operations per admission and per generated token.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Rate limits and quotas of one key or team; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub max_concurrent: Option<u32>,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    TokensPerMinute,
    TokensPerDay,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TokensPerDay => "tokens_per_day",
            Self::Concurrency => "max_concurrent",
        }
    }
}

/// A refused admission: what, whose, and when to retry.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub kind: LimitKind,
    /// `"key"` or `"team"`.
    pub scope: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
    pub headers: RateHeaders,
}

/// The values of the `x-ratelimit-*` headers (the key's own limits, else its team's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateHeaders {
    /// (limit, remaining, seconds until full)
    pub requests: Option<(u64, u64, f64)>,
    pub tokens: Option<(u64, u64, f64)>,
}

impl RateHeaders {
    /// Sets the `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
    pub fn insert_into(&self, h: &mut axum::http::HeaderMap) {
        use axum::http::{HeaderName, HeaderValue};
        for (kind, v) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some((limit, remaining, reset_s)) = v else {
                continue;
            };
            for (name, value) in [
                (format!("x-ratelimit-limit-{kind}"), limit.to_string()),
                (
                    format!("x-ratelimit-remaining-{kind}"),
                    remaining.to_string(),
                ),
                (format!("x-ratelimit-reset-{kind}"), reset_string(reset_s)),
            ] {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    h.insert(n, v);
                }
            }
        }
    }
}

/// OpenAI's reset format: `1s`, `6m0s`, `250ms`.
fn reset_string(seconds: f64) -> String {
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0).ceil() as u64);
    }
    let s = seconds.ceil() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
}

impl Bucket {
    fn full(capacity: u64) -> Self {
        Self {
            level: capacity as f64,
        }
    }
}

#[derive(Debug)]
struct AccountState {
    limits: RateLimits,
    last: Instant,
    requests: Bucket,
    minute: Bucket,
    day: Bucket,
    reserved: f64,
    in_flight: u32,
}

/// One key's or one team's buckets.
#[derive(Debug)]
pub struct Account {
    state: Mutex<AccountState>,
}

fn rate_per_s(capacity: u64, window_s: f64) -> f64 {
    capacity as f64 / window_s
}

impl AccountState {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        let l = self.limits;
        if let Some(c) = l.requests_per_minute {
            self.requests.level = (self.requests.level + dt * rate_per_s(c, 60.0)).min(c as f64);
        }
        if let Some(c) = l.tokens_per_minute {
            self.minute.level = (self.minute.level + dt * rate_per_s(c, 60.0)).min(c as f64);
        }
        if let Some(c) = l.tokens_per_day {
            self.day.level = (self.day.level + dt * rate_per_s(c, 86400.0)).min(c as f64);
        }
    }

    /// The first limit that refuses one more request, with the wait until it would not.
    fn refusal(&self) -> Option<(LimitKind, u64, Duration)> {
        let l = self.limits;
        let wait = |missing: f64, cap: u64, window: f64| {
            Duration::from_secs_f64((missing / rate_per_s(cap.max(1), window)).max(0.0))
        };
        if let Some(c) = l.max_concurrent {
            if self.in_flight >= c {
                return Some((LimitKind::Concurrency, c as u64, Duration::from_secs(1)));
            }
        }
        if let Some(c) = l.requests_per_minute {
            if self.requests.level < 1.0 {
                return Some((
                    LimitKind::Requests,
                    c,
                    wait(1.0 - self.requests.level, c, 60.0),
                ));
            }
        }
        if let Some(c) = l.tokens_per_minute {
            let avail = self.minute.level - self.reserved;
            if avail < 1.0 {
                return Some((LimitKind::TokensPerMinute, c, wait(1.0 - avail, c, 60.0)));
            }
        }
        if let Some(c) = l.tokens_per_day {
            let avail = self.day.level - self.reserved;
            if avail < 1.0 {
                return Some((LimitKind::TokensPerDay, c, wait(1.0 - avail, c, 86400.0)));
            }
        }
        None
    }

    fn charge_tokens(&mut self, n: f64) {
        self.minute.level -= n;
        self.day.level -= n;
    }

    fn headers(&self) -> RateHeaders {
        let l = self.limits;
        let until_full = |level: f64, cap: u64, window: f64| {
            ((cap as f64 - level).max(0.0) / rate_per_s(cap.max(1), window)).max(0.0)
        };
        RateHeaders {
            requests: l.requests_per_minute.map(|c| {
                (
                    c,
                    self.requests.level.max(0.0) as u64,
                    until_full(self.requests.level, c, 60.0),
                )
            }),
            tokens: l.tokens_per_minute.map(|c| {
                (
                    c,
                    (self.minute.level - self.reserved).max(0.0) as u64,
                    until_full(self.minute.level - self.reserved, c, 60.0),
                )
            }),
        }
    }
}

impl Account {
    pub fn new(limits: RateLimits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(AccountState {
                limits,
                last: Instant::now(),
                requests: Bucket::full(limits.requests_per_minute.unwrap_or(0)),
                minute: Bucket::full(limits.tokens_per_minute.unwrap_or(0)),
                day: Bucket::full(limits.tokens_per_day.unwrap_or(0)),
                reserved: 0.0,
                in_flight: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AccountState> {
        // A panic while holding this lock leaves plain numbers behind: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the limits (a reload). What was used stays used: a bucket's level moves
    /// by the change in capacity (raising 10/min to 100/min with 4 used leaves 96). A
    /// limit that appears starts full; in-flight accounting is untouched.
    pub fn set_limits(&self, limits: RateLimits) {
        let mut s = self.lock();
        s.refill(Instant::now());
        let old = s.limits;
        let adjust = |b: &mut Bucket, old: Option<u64>, new: Option<u64>| match (old, new) {
            (_, None) => {}
            (None, Some(c)) => *b = Bucket::full(c),
            (Some(o), Some(c)) => b.level = (b.level + c as f64 - o as f64).min(c as f64),
        };
        adjust(
            &mut s.requests,
            old.requests_per_minute,
            limits.requests_per_minute,
        );
        adjust(
            &mut s.minute,
            old.tokens_per_minute,
            limits.tokens_per_minute,
        );
        adjust(&mut s.day, old.tokens_per_day, limits.tokens_per_day);
        s.limits = limits;
    }

    pub fn limits(&self) -> RateLimits {
        self.lock().limits
    }

    /// (requests left, tokens left this minute, tokens left today, in flight) after refill.
    pub fn remaining(&self) -> (Option<f64>, Option<f64>, Option<f64>, u32) {
        let mut s = self.lock();
        s.refill(Instant::now());
        let l = s.limits;
        (
            l.requests_per_minute.map(|_| s.requests.level),
            l.tokens_per_minute.map(|_| s.minute.level - s.reserved),
            l.tokens_per_day.map(|_| s.day.level - s.reserved),
            s.in_flight,
        )
    }
}

/// Admits one request against a key's account and optionally its team's, atomically.
/// `prompt` tokens are charged now; `reserve` tokens (what the request may still
/// generate) are held until charged or released by the [`Permit`].
pub fn admit(
    key: &Arc<Account>,
    team: Option<&Arc<Account>>,
    prompt: u64,
    reserve: u64,
) -> Result<Permit, Rejection> {
    let now = Instant::now();
    let mut ks = key.lock();
    let mut ts = team.map(|t| t.lock());
    ks.refill(now);
    if let Some(t) = ts.as_deref_mut() {
        t.refill(now);
    }
    let headers_of = |ks: &AccountState, ts: Option<&AccountState>| {
        let h = ks.headers();
        match ts {
            Some(t) if h.requests.is_none() && h.tokens.is_none() => t.headers(),
            _ => h,
        }
    };
    let refusal = ks
        .refusal()
        .map(|r| ("key", r))
        .or_else(|| ts.as_deref().and_then(|t| t.refusal()).map(|r| ("team", r)));
    if let Some((scope, (kind, limit, retry_after))) = refusal {
        return Err(Rejection {
            kind,
            scope,
            limit,
            retry_after,
            headers: headers_of(&ks, ts.as_deref()),
        });
    }
    for s in std::iter::once(&mut *ks).chain(ts.as_deref_mut()) {
        s.requests.level -= 1.0;
        s.charge_tokens(prompt as f64);
        s.reserved += reserve as f64;
        s.in_flight += 1;
    }
    let headers = headers_of(&ks, ts.as_deref());
    drop(ts);
    drop(ks);
    Ok(Permit {
        key: key.clone(),
        team: team.cloned(),
        prompt,
        reserved: reserve,
        generated: 0,
        headers,
    })
}

/// One admitted request's hold on its accounts. Dropping it releases the concurrency
/// slot and the unspent reservation.
#[derive(Debug)]
pub struct Permit {
    key: Arc<Account>,
    team: Option<Arc<Account>>,
    prompt: u64,
    reserved: u64,
    generated: u64,
    headers: RateHeaders,
}

impl Permit {
    fn each(&self, mut f: impl FnMut(&mut AccountState)) {
        f(&mut self.key.lock());
        if let Some(t) = &self.team {
            f(&mut t.lock());
        }
    }

    /// Charges `n` generated tokens (first from the reservation).
    pub fn charge_generated(&mut self, n: u64) {
        let from_reservation = n.min(self.reserved);
        self.reserved -= from_reservation;
        self.generated += n;
        self.each(|s| {
            s.charge_tokens(n as f64);
            s.reserved -= from_reservation as f64;
        });
    }

    /// Charges prompt tokens learned after admission (an upstream's reported usage).
    pub fn charge_prompt(&mut self, n: u64) {
        self.prompt += n;
        self.each(|s| s.charge_tokens(n as f64));
    }

    /// Gives back everything this request was charged (it was never served).
    pub fn refund(&mut self) {
        let (prompt, generated) = (self.prompt as f64, self.generated as f64);
        self.each(|s| {
            s.requests.level += 1.0;
            s.charge_tokens(-(prompt + generated));
        });
        self.prompt = 0;
        self.generated = 0;
    }

    pub fn prompt_tokens(&self) -> u64 {
        self.prompt
    }

    pub fn generated_tokens(&self) -> u64 {
        self.generated
    }

    pub fn headers(&self) -> &RateHeaders {
        &self.headers
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let reserved = self.reserved as f64;
        self.each(|s| {
            s.reserved = (s.reserved - reserved).max(0.0);
            s.in_flight = s.in_flight.saturating_sub(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_strings_look_like_openais() {
        assert_eq!(reset_string(0.25), "250ms");
        assert_eq!(reset_string(1.0), "1s");
        assert_eq!(reset_string(360.0), "6m0s");
        assert_eq!(reset_string(3725.0), "1h2m5s");
    }

    fn limits(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u32>) -> RateLimits {
        RateLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            tokens_per_day: None,
            max_concurrent: conc,
        }
    }

    #[test]
    fn requests_per_minute_admits_exactly_the_budget() {
        let a = Account::new(limits(Some(5), None, None));
        let permits: Vec<_> = (0..5).map(|_| admit(&a, None, 1, 0).unwrap()).collect();
        let r = admit(&a, None, 1, 0).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        // 1 request per 12 s refills.
        assert!(
            r.retry_after > Duration::from_secs(11) && r.retry_after <= Duration::from_secs(12)
        );
        drop(permits);
        assert!(
            admit(&a, None, 1, 0).is_err(),
            "dropping permits does not refill requests"
        );
    }

    #[test]
    fn reservations_stop_concurrent_over_admission() {
        let a = Account::new(limits(None, Some(100), None));
        let p1 = admit(&a, None, 10, 40).unwrap(); // 50 committed
        let _p2 = admit(&a, None, 10, 40).unwrap(); // 100 committed
        let r = admit(&a, None, 10, 40).unwrap_err();
        assert_eq!(r.kind, LimitKind::TokensPerMinute);
        drop(p1); // its 40 unspent tokens come back
        let p3 = admit(&a, None, 10, 40).unwrap();
        assert_eq!(p3.headers().tokens.unwrap().1, 0);
    }

    #[test]
    fn generated_tokens_consume_the_reservation_and_the_rest_is_released() {
        let a = Account::new(limits(None, Some(100), None));
        let mut p = admit(&a, None, 10, 50).unwrap();
        p.charge_generated(5);
        assert_eq!(a.remaining().1.unwrap().round() as i64, 100 - 10 - 5 - 45);
        drop(p);
        assert_eq!(a.remaining().1.unwrap().round() as i64, 85);
    }

    #[test]
    fn team_limit_applies_across_keys_and_refusal_names_the_team() {
        let team = Account::new(limits(None, None, Some(1)));
        let (k1, k2) = (
            Account::new(RateLimits::default()),
            Account::new(RateLimits::default()),
        );
        let p = admit(&k1, Some(&team), 1, 0).unwrap();
        let r = admit(&k2, Some(&team), 1, 0).unwrap_err();
        assert_eq!((r.kind, r.scope), (LimitKind::Concurrency, "team"));
        drop(p);
        admit(&k2, Some(&team), 1, 0).unwrap();
    }

    #[test]
    fn a_refused_team_charges_nothing_to_the_key() {
        let team = Account::new(limits(Some(1), None, None));
        let key = Account::new(limits(Some(10), None, None));
        let _p = admit(&key, Some(&team), 0, 0).unwrap();
        assert!(admit(&key, Some(&team), 0, 0).is_err());
        assert_eq!(key.remaining().0.unwrap().round() as i64, 9);
    }

    #[test]
    fn reload_keeps_levels_and_in_flight() {
        let a = Account::new(limits(Some(10), None, Some(2)));
        let _p = admit(&a, None, 0, 0).unwrap();
        a.set_limits(limits(Some(3), None, Some(1)));
        let (req, _, _, in_flight) = a.remaining();
        assert_eq!((req.unwrap().round() as i64, in_flight), (2, 1));
        assert_eq!(
            admit(&a, None, 0, 0).unwrap_err().kind,
            LimitKind::Concurrency
        );
    }

    #[test]
    fn refund_returns_the_request_and_its_tokens() {
        let a = Account::new(limits(Some(1), Some(10), None));
        let mut p = admit(&a, None, 7, 0).unwrap();
        p.refund();
        drop(p);
        let (req, tok, _, _) = a.remaining();
        assert_eq!(
            (req.unwrap().round() as i64, tok.unwrap().round() as i64),
            (1, 10)
        );
    }
}
