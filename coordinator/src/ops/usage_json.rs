//! The `/v1/usage` document: every key and team with its usage, limits and what is
//! left of them, and who may read it (admin keys, or anyone when authentication is off).

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::accounts::Caller;
use super::layer::Ops;
use super::limits::Account;
use crate::error::AppError;

impl Ops {
    /// The `/v1/usage` document.
    fn usage_json(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .principals()
            .iter()
            .map(|p| {
                let mut v = p.usage.json();
                v["name"] = json!(p.spec.name);
                v["team"] = json!(p.spec.team);
                v["limits"] = json!(p.spec.limits);
                v["remaining"] = remaining_json(&p.account);
                v
            })
            .collect();
        let teams: Vec<Value> = self
            .keys
            .teams()
            .iter()
            .map(|(name, (account, usage))| {
                let mut v = usage.json();
                v["name"] = json!(name);
                v["limits"] = json!(account.limits());
                v["remaining"] = remaining_json(account);
                v
            })
            .collect();
        json!({
            "object": "usage",
            "served": {"local": self.served_local.load(Ordering::Relaxed), "fallback": self.served_fallback.load(Ordering::Relaxed)},
            "keys": keys,
            "teams": teams,
        })
    }
}

fn remaining_json(account: &Account) -> Value {
    let (requests, tokens_minute, tokens_day, in_flight) = account.remaining();
    let floor = |x: Option<f64>| x.map(|v| v.max(0.0).floor() as u64);
    json!({"requests_per_minute": floor(requests), "tokens_per_minute": floor(tokens_minute), "tokens_per_day": floor(tokens_day), "in_flight": in_flight})
}

/// `GET /v1/usage` for `caller` (`None`: the request did not pass the ops gate).
pub fn usage_report(ops: Option<&Ops>, caller: Option<Caller>) -> Result<Value, AppError> {
    let Some(ops) = ops else {
        return Err(AppError::RouteNotFound(
            "GET /v1/usage (usage accounting needs --keys-config, --fallback-url or an alias)"
                .into(),
        ));
    };
    match caller {
        Some(Caller(Some(p))) if p.spec.admin => {}
        Some(Caller(None)) => {}
        _ => {
            return Err(AppError::Forbidden(
                "GET /v1/usage needs an admin key (admin = true in the key file)".into(),
            ))
        }
    }
    Ok(ops.usage_json())
}

#[cfg(test)]
mod tests {
    use super::super::limits::RateLimits;
    use super::*;

    #[test]
    fn limits_serialize_for_the_usage_document() {
        let v = json!(RateLimits {
            requests_per_minute: Some(3),
            ..Default::default()
        });
        assert_eq!(v["requests_per_minute"], 3);
        assert!(v["tokens_per_day"].is_null());
    }
}
