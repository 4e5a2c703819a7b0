//! API keys: the key file (TOML or YAML), SHA-256 digests, and constant-time lookup.
//!
//! File format (every field but `name` and one of `key`/`sha256` optional); a file named
//! `*.yaml` or `*.yml` is read as YAML with the same fields, any other as TOML:
//!
//! ```toml
//! [[keys]]
//! name = "alice"              # shown in /v1/usage and (opt-in) metrics; never the key
//! team = "platform"           # default "default"
//! key = "sk-alice-..."        # or: sha256 = "<64 hex digits of SHA-256(key)>"
//! requests_per_minute = 60
//! tokens_per_minute = 40000   # prompt + generated
//! tokens_per_day = 2000000
//! max_concurrent = 4
//! admin = false               # may read GET /v1/usage
//! fallback = "auto"           # "auto" | "always" | "never" (upstream fallback rule)
//!
//! [teams.platform]            # optional limits shared by all keys of a team
//! tokens_per_minute = 200000
//! ```
//!
//! ```yaml
//! keys:
//!   - name: alice
//!     team: platform
//!     key: sk-alice-...
//!     requests_per_minute: 60
//! teams:
//!   platform:
//!     tokens_per_minute: 200000
//! ```
//!
//! Syntax and schema errors name the file, the line and the column.
//!
//! Invariant: only digests are kept in memory. A presented key is hashed once and looked
//! up by digest; the match is then confirmed with a constant-time comparison. Timing can
//! depend only on the digest (which reveals nothing usable about any key), never on how
//! many leading bytes of a stored key matched. Cost: one SHA-256 of the header value and
//! one hash-map probe per request.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::error::OpsError;
use super::limits::RateLimits;

/// SHA-256 of a key.
pub type KeyDigest = [u8; 32];

pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Per-key fallback rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FallbackRule {
    /// Forward when the local group is not ready or its queue would break the TTFT budget.
    #[default]
    Auto,
    /// Always serve this key from the fallback upstream.
    Always,
    /// Never forward this key's requests.
    Never,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyRecord>,
    #[serde(default)]
    teams: BTreeMap<String, RateLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    name: String,
    team: Option<String>,
    key: Option<String>,
    sha256: Option<String>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    max_concurrent: Option<u32>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    fallback: FallbackRule,
}

/// One configured key, as read from the file (no runtime state).
#[derive(Clone, Debug, PartialEq)]
pub struct KeySpec {
    pub digest: KeyDigest,
    pub name: String,
    pub team: String,
    pub limits: RateLimits,
    pub admin: bool,
    pub fallback: FallbackRule,
}

/// A parsed key file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeySet {
    pub keys: Vec<KeySpec>,
    pub teams: BTreeMap<String, RateLimits>,
}

pub const DEFAULT_TEAM: &str = "default";

/// The syntax of a key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFileFormat {
    Toml,
    Yaml,
}

impl KeyFileFormat {
    /// YAML for `.yaml`/`.yml` (any case), TOML otherwise.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Self::Yaml
            }
            _ => Self::Toml,
        }
    }

    fn read(self, text: &str) -> Result<KeyFile, String> {
        match self {
            Self::Toml => toml::from_str(text).map_err(|e| match e.span() {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    format!("{} at line {line} column {column}", e.message().trim_end())
                }
                None => e.message().trim_end().to_string(),
            }),
            // serde_yaml_ng's messages end with "at line L column C" already.
            Self::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string()),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

fn parse_hex_digest(s: &str) -> Option<KeyDigest> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl KeySet {
    /// Parses the TOML text of a key file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, OpsError> {
        Self::parse_as(text, origin, KeyFileFormat::Toml)
    }

    /// Parses the text of a key file in `format`; `origin` names it in errors.
    pub fn parse_as(text: &str, origin: &str, format: KeyFileFormat) -> Result<Self, OpsError> {
        let file = format.read(text).map_err(|message| OpsError::KeyFile {
            path: origin.to_string(),
            message,
        })?;
        let bad = |m: String| OpsError::KeyFile {
            path: origin.to_string(),
            message: m,
        };
        let mut keys = Vec::with_capacity(file.keys.len());
        let mut seen: HashMap<KeyDigest, String> = HashMap::new();
        for r in file.keys {
            let digest = match (&r.key, &r.sha256) {
                (Some(k), None) if !k.trim().is_empty() => digest(k.trim()),
                (None, Some(h)) => parse_hex_digest(h).ok_or_else(|| {
                    bad(format!(
                        "key '{}': sha256 must be 64 hex digits (sha256sum of the key)",
                        r.name
                    ))
                })?,
                _ => {
                    return Err(bad(format!(
                        "key '{}': give exactly one of 'key' or 'sha256'",
                        r.name
                    )))
                }
            };
            if let Some(other) = seen.insert(digest, r.name.clone()) {
                return Err(bad(format!(
                    "keys '{other}' and '{}' are the same key",
                    r.name
                )));
            }
            keys.push(KeySpec {
                digest,
                name: r.name,
                team: r.team.unwrap_or_else(|| DEFAULT_TEAM.to_string()),
                limits: RateLimits {
                    requests_per_minute: r.requests_per_minute,
                    tokens_per_minute: r.tokens_per_minute,
                    tokens_per_day: r.tokens_per_day,
                    max_concurrent: r.max_concurrent,
                },
                admin: r.admin,
                fallback: r.fallback,
            });
        }
        Ok(Self {
            keys,
            teams: file.teams,
        })
    }

    pub fn load(path: &Path) -> Result<Self, OpsError> {
        let text = std::fs::read_to_string(path).map_err(|e| OpsError::KeyFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse_as(&text, &path.display().to_string(), KeyFileFormat::of(path))
    }

    /// Adds plain keys (`--api-key`): unlimited, team "default", named `key-N`.
    pub fn with_plain_keys(mut self, plain: &[String]) -> Self {
        for (i, k) in plain.iter().enumerate() {
            let d = digest(k);
            if self.keys.iter().any(|s| s.digest == d) {
                continue;
            }
            self.keys.push(KeySpec {
                digest: d,
                name: format!("key-{}", i + 1),
                team: DEFAULT_TEAM.to_string(),
                limits: RateLimits::default(),
                admin: false,
                fallback: FallbackRule::Auto,
            });
        }
        self
    }
}

/// Finds the entry whose digest equals SHA-256(`presented`), confirming in constant time.
pub fn lookup<'a, T>(table: &'a HashMap<KeyDigest, T>, presented: &str) -> Option<&'a T> {
    let d = digest(presented);
    table
        .get_key_value(&d)
        .filter(|(k, _)| constant_time_eq(&k[..], &d))
        .map(|(_, v)| v)
}

/// Bearer token of a request, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Lets tests and the README produce `sha256 = "..."` lines.
pub fn hex_digest(key: &str) -> String {
    digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_hashed_keys_with_limits_and_teams() {
        let text = format!(
            r#"
[[keys]]
name = "alice"
team = "platform"
key = "sk-a"
requests_per_minute = 60
max_concurrent = 2
admin = true

[[keys]]
name = "bob"
sha256 = "{}"
fallback = "always"

[teams.platform]
tokens_per_minute = 1000
"#,
            hex_digest("sk-b")
        );
        let set = KeySet::parse(&text, "keys.toml").unwrap();
        assert_eq!(set.keys.len(), 2);
        assert_eq!(set.keys[0].digest, digest("sk-a"));
        assert_eq!(set.keys[0].limits.requests_per_minute, Some(60));
        assert!(set.keys[0].admin);
        assert_eq!(set.keys[1].digest, digest("sk-b"));
        assert_eq!(set.keys[1].team, DEFAULT_TEAM);
        assert_eq!(set.keys[1].fallback, FallbackRule::Always);
        assert_eq!(set.teams["platform"].tokens_per_minute, Some(1000));
    }

    #[test]
    fn rejects_bad_files_with_one_line_errors() {
        for (text, want) in [
            ("[[keys]]\nname = \"a\"\n", "exactly one of"),
            (
                "[[keys]]\nname = \"a\"\nsha256 = \"abc\"\n",
                "64 hex digits",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\nrpm = 3\n",
                "unknown field",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\n[[keys]]\nname = \"b\"\nkey = \"k\"\n",
                "same key",
            ),
        ] {
            let e = KeySet::parse(text, "k.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.starts_with("key file k.toml"), "{e}");
        }
    }

    const TOML_KEYS: &str = r#"
[[keys]]
name = "alice"
team = "platform"
key = "sk-a"
requests_per_minute = 60
tokens_per_minute = 40000
tokens_per_day = 2000000
max_concurrent = 2
admin = true

[[keys]]
name = "bob"
sha256 = "1f9dbc3b4e3c1b3f6bd4bd0dd3a0c3f9bd1e1f5b8c16e6a0a7ad2a2f5ecb4d01"
fallback = "never"

[teams.platform]
tokens_per_minute = 1000

[teams.empty]
"#;

    const YAML_KEYS: &str = r#"
# The same keys as TOML_KEYS.
keys:
  - name: alice
    team: platform
    key: sk-a
    requests_per_minute: 60
    tokens_per_minute: 40000
    tokens_per_day: 2000000
    max_concurrent: 2
    admin: true
  - name: bob
    sha256: "1f9dbc3b4e3c1b3f6bd4bd0dd3a0c3f9bd1e1f5b8c16e6a0a7ad2a2f5ecb4d01"
    fallback: never
teams:
  platform:
    tokens_per_minute: 1000
  empty: {}
"#;

    #[test]
    fn yaml_and_toml_files_with_the_same_keys_parse_to_equal_sets() {
        let toml = KeySet::parse_as(TOML_KEYS, "k.toml", KeyFileFormat::Toml).unwrap();
        let yaml = KeySet::parse_as(YAML_KEYS, "k.yaml", KeyFileFormat::Yaml).unwrap();
        assert_eq!(toml, yaml);
        assert_eq!(yaml.keys.len(), 2);
        assert_eq!(yaml.keys[0].limits.tokens_per_day, Some(2_000_000));
        assert_eq!(yaml.keys[1].fallback, FallbackRule::Never);
        assert_eq!(yaml.teams["empty"], RateLimits::default());
    }

    #[test]
    fn the_format_follows_the_file_extension() {
        for (name, want) in [
            ("keys.yaml", KeyFileFormat::Yaml),
            ("keys.YML", KeyFileFormat::Yaml),
            ("keys.toml", KeyFileFormat::Toml),
            ("keys", KeyFileFormat::Toml),
            ("keys.yaml.bak", KeyFileFormat::Toml),
        ] {
            assert_eq!(KeyFileFormat::of(Path::new(name)), want, "{name}");
        }
        let dir = std::env::temp_dir().join(format!("stral-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (toml_path, yaml_path) = (dir.join("keys.toml"), dir.join("keys.yml"));
        std::fs::write(&toml_path, TOML_KEYS).unwrap();
        std::fs::write(&yaml_path, YAML_KEYS).unwrap();
        assert_eq!(
            KeySet::load(&yaml_path).unwrap(),
            KeySet::load(&toml_path).unwrap()
        );
        // YAML text in a .toml file is read as TOML, and fails as such.
        std::fs::write(&toml_path, YAML_KEYS).unwrap();
        assert!(KeySet::load(&toml_path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_yaml_and_toml_name_the_file_and_the_line() {
        for (format, origin, text, line, want) in [
            (
                KeyFileFormat::Yaml,
                "keys.yaml",
                "keys:\n  - name: a\n    key: k\n    rpm: 3\n",
                4,
                "unknown field `rpm`",
            ),
            (
                KeyFileFormat::Yaml,
                "keys.yaml",
                "keys:\n  - name: a\n\tkey: k\n",
                3,
                "tab character",
            ),
            (
                KeyFileFormat::Yaml,
                "keys.yaml",
                "keys:\n  - name: a\n    key: k\n    max_concurrent: lots\n",
                4,
                "max_concurrent",
            ),
            (
                KeyFileFormat::Toml,
                "keys.toml",
                "[[keys]]\nname = \"a\"\nkey = \"k\"\nrpm = 3\n",
                4,
                "unknown field `rpm`",
            ),
            (
                KeyFileFormat::Toml,
                "keys.toml",
                "[[keys]]\nname = \"a\"\nkey = \"k\n",
                3,
                "",
            ),
        ] {
            let e = KeySet::parse_as(text, origin, format)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("key file {origin}: ")), "{e}");
            assert!(
                e.contains(&format!("line {line} ")),
                "want line {line}: {e}"
            );
            assert!(e.contains(want), "{e}");
            assert_eq!(e.lines().count(), 1, "one-line error: {e}");
        }
    }

    #[test]
    fn lookup_finds_only_the_exact_key() {
        let mut t = HashMap::new();
        t.insert(digest("sk-secret"), 7);
        assert_eq!(lookup(&t, "sk-secret"), Some(&7));
        assert_eq!(lookup(&t, "sk-secreT"), None);
        assert_eq!(lookup(&t, "sk-secret "), None);
        assert_eq!(lookup(&t, ""), None);
    }
}
