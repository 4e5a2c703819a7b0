//! Model aliases and A/B splits: which backend serves a model name for a given key.
//!
//! An alias is declared as `--served-model-name NAME=SPEC`, where SPEC is a comma list of
//! `TARGET[@WEIGHT]` and TARGET is `local`, `fallback` (the `--fallback-url` upstream), or
//! an `http://` base URL; `TARGET#MODEL` sends the request upstream under another model
//! name. Example: `codestral-latest=local@90,fallback#codestral-2501@10`.
//!
//! Invariant: the pick is a pure function of (key digest, alias name), so it is sticky
//! per key across requests, restarts and replicas; over many keys the share of each
//! backend converges to its weight (the first 8 bytes of a SHA-256 are uniform). Cost:
//! one SHA-256 of 32 + len(name) bytes per request to a split alias.

use sha2::{Digest as _, Sha256};

use super::error::OpsError;
use super::keys::KeyDigest;

/// Where a request is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Local,
    /// The `--fallback-url` upstream.
    Fallback,
    /// Another upstream, by base URL.
    Url(String),
}

/// One weighted arm of an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arm {
    pub target: Target,
    /// Model name sent upstream (`None`: the alias itself).
    pub model: Option<String>,
    pub weight: u32,
}

/// One alias with its arms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRoute {
    pub name: String,
    pub arms: Vec<Arm>,
}

impl ModelRoute {
    /// Parses `NAME=SPEC`; a bare `NAME` is a plain local name (returns `None`).
    pub fn parse(text: &str) -> Result<Option<Self>, OpsError> {
        let Some((name, spec)) = text.split_once('=') else {
            return Ok(None);
        };
        let bad = |m: &str| OpsError::Alias(format!("'{text}': {m}"));
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("the alias name is empty"));
        }
        let mut arms = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let (rest, weight) = match part.rsplit_once('@') {
                Some((r, w)) => (
                    r,
                    w.parse::<u32>()
                        .map_err(|_| bad("a weight after '@' must be a whole number"))?,
                ),
                None => (part, 1),
            };
            let (target, model) = match rest.split_once('#') {
                Some((t, m)) if !m.is_empty() => (t, Some(m.to_string())),
                Some(_) => return Err(bad("'#' must be followed by a model name")),
                None => (rest, None),
            };
            let target = match target {
                "local" => Target::Local,
                "fallback" => Target::Fallback,
                u if u.starts_with("http://") => Target::Url(u.trim_end_matches('/').to_string()),
                u if u.starts_with("https://") => {
                    return Err(bad(&format!("{u}: https upstreams are not supported (this build has no TLS client); put a TLS-terminating proxy on http:// in front")))
                }
                other => {
                    return Err(bad(&format!(
                        "unknown target '{other}' (use local, fallback or an http:// URL)"
                    )))
                }
            };
            if target == Target::Local && model.is_some() {
                return Err(bad(
                    "a local target serves the one local model: drop '#MODEL'",
                ));
            }
            arms.push(Arm {
                target,
                model,
                weight,
            });
        }
        if arms.iter().map(|a| a.weight as u64).sum::<u64>() == 0 {
            return Err(bad("the weights add up to zero"));
        }
        Ok(Some(Self {
            name: name.to_string(),
            arms,
        }))
    }

    /// The arm serving `sticky` (a key digest) for this alias.
    pub fn pick(&self, sticky: &KeyDigest) -> &Arm {
        let total: u64 = self.arms.iter().map(|a| a.weight as u64).sum();
        if self.arms.len() == 1 {
            return &self.arms[0];
        }
        let mut h = Sha256::new();
        h.update(sticky);
        h.update(self.name.as_bytes());
        let d = h.finalize();
        let x = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % total;
        let mut acc = 0u64;
        for a in &self.arms {
            acc += a.weight as u64;
            if x < acc {
                return a;
            }
        }
        &self.arms[self.arms.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_models_and_weights() {
        let r = ModelRoute::parse(
            "codestral-latest=local@90, fallback#codestral-2501@10, http://10.0.0.2:8080/v1@5",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.name, "codestral-latest");
        assert_eq!(
            r.arms[0],
            Arm {
                target: Target::Local,
                model: None,
                weight: 90
            }
        );
        assert_eq!(r.arms[1].model.as_deref(), Some("codestral-2501"));
        assert_eq!(
            r.arms[2].target,
            Target::Url("http://10.0.0.2:8080/v1".into())
        );
        assert_eq!(ModelRoute::parse("plain-name").unwrap(), None);
        for bad in [
            "x=local@a",
            "x=ftp://h",
            "x=local#m",
            "x=local@0",
            "=local",
            "x=https://api",
        ] {
            assert!(ModelRoute::parse(bad).is_err(), "{bad}");
        }
    }
}
