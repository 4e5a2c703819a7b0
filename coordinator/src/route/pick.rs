//! Choosing a replica: the affinity key of a request, rendezvous hashing over it, and
//! the bounded-load spill. Pure (no I/O, no clock): the router passes in what it knows
//! of each replica.
//!
//! **Affinity key.** A replica's prefix cache holds the KV of prompt *starts*, so the
//! key is the API key plus a hash of the start of the rendered prompt:
//! - FIM (`/v1/fim/completions`, and `/v1/completions` with `suffix`): Codestral's FIM
//!   prompt is `[SUFFIX] suffix [PREFIX] prefix`, so the text hashed is the suffix, then
//!   the prefix. Within a line an IDE's suffix stays the same and the prefix only grows,
//!   so successive keystrokes share the key.
//! - `/v1/completions` without suffix: the prompt.
//! - chat: the first message(s) (role and content), which later turns only append to.
//!
//! The router does not tokenize: "block-aligned" is approximated in bytes. At most
//! `prefix_bytes` bytes are hashed, cut down to a multiple of [`KEY_BLOCK_BYTES`]
//! (≈ one 16-token KV block of code); a text shorter than one such block is hashed
//! whole. So the key of a growing prompt changes only while its start is shorter than
//! `prefix_bytes`, at block edges.
//!
//! **Rendezvous (HRW) hashing.** Each healthy replica scores `mix(key, replica id)`;
//! the highest wins. Adding or removing a replica moves only the keys it wins or won.
//!
//! **Bounded load.** The winner is skipped ("spill") when its last scraped queue depth
//! or KV usage is at the limit, or when its in-flight count from this router would
//! exceed `load_factor` × the fleet's mean (consistent hashing with bounded loads,
//! Mirrokni et al.); the request then goes to the least-loaded eligible replica.
//! Cost: O(replicas) per request, one hash of at most `prefix_bytes` bytes.

use serde_json::Value;

/// Bytes per "block" of the affinity key (≈ 16 tokens of code at ~4 bytes a token).
pub const KEY_BLOCK_BYTES: usize = 64;

/// How the router picks a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// HRW over API key + prompt start (prefix-cache affinity), bounded load.
    #[default]
    Affinity,
    /// HRW over the API key only (one developer → one replica), bounded load.
    Session,
    /// Next healthy replica in turn; ignores keys and load.
    RoundRobin,
}

/// What the chooser knows of one replica.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    /// Stable id (hash of the replica's URL): its HRW identity.
    pub id: u64,
    pub healthy: bool,
    /// `stral_queue_depth` at the last scrape.
    pub queue_depth: u64,
    /// `stral_kv_usage_ratio` at the last scrape.
    pub kv_usage: f64,
    /// Requests this router has in flight there now.
    pub in_flight: u64,
}

/// When the affine replica is too busy to take another request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadLimits {
    pub max_queue_depth: u64,
    pub max_kv_usage: f64,
    /// In-flight cap as a multiple of the fleet mean (≥ 1).
    pub load_factor: f64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_queue_depth: 16,
            max_kv_usage: 0.95,
            load_factor: 2.0,
        }
    }
}

/// Where a request goes, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The key's HRW winner.
    Affine(usize),
    /// The winner was over a load limit; this is the least-loaded eligible one.
    Spilled(usize),
    /// Round-robin (or a request with no key).
    Turn(usize),
}

impl Choice {
    pub fn index(self) -> usize {
        match self {
            Self::Affine(i) | Self::Spilled(i) | Self::Turn(i) => i,
        }
    }
}

/// FNV-1a, 64 bit: stable across processes and versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finalizer: a bijective mix, so `mix(key ^ id)` spreads well.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The HRW score of `key` on the replica `id`.
pub fn score(key: u64, id: u64) -> u64 {
    mix(key ^ mix(id))
}

/// The affinity key of a request to `path` with JSON `body`, or `None` when the policy
/// or the request gives nothing to hash (then the router takes turns).
pub fn affinity_key(
    policy: Policy,
    path: &str,
    api_key: Option<&str>,
    body: &Value,
    prefix_bytes: usize,
) -> Option<u64> {
    let api = fnv1a(api_key.unwrap_or("").as_bytes());
    match policy {
        Policy::RoundRobin => None,
        Policy::Session => api_key.map(|_| api),
        Policy::Affinity => {
            let start = prompt_start(path, body, prefix_bytes)?;
            Some(mix(api) ^ fnv1a(&start))
        }
    }
}

/// The block-aligned start of the rendered prompt, in bytes (see the module docs).
fn prompt_start(path: &str, body: &Value, prefix_bytes: usize) -> Option<Vec<u8>> {
    let mut text = Vec::with_capacity(prefix_bytes + 8);
    let mut push = |s: &str| {
        let room = prefix_bytes.saturating_sub(text.len());
        text.extend_from_slice(&s.as_bytes()[..s.len().min(room)]);
    };
    let prompt = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    match path {
        "/v1/fim/completions" | "/v1/completions" => {
            if let Some(suffix) = body.get("suffix").and_then(Value::as_str) {
                push("[SUFFIX]");
                push(suffix);
                push("[PREFIX]");
            }
            push(&prompt(body.get("prompt")?)?);
        }
        "/v1/chat/completions" => {
            for m in body.get("messages")?.as_array()? {
                push(m.get("role").and_then(Value::as_str).unwrap_or(""));
                push(":");
                match m.get("content") {
                    Some(Value::String(s)) => push(s),
                    Some(other) => push(&other.to_string()),
                    None => {}
                }
                push("\n");
            }
        }
        _ => return None,
    }
    if text.len() >= KEY_BLOCK_BYTES {
        text.truncate(text.len() / KEY_BLOCK_BYTES * KEY_BLOCK_BYTES);
    }
    Some(text)
}

/// Chooses among `replicas` (never one in `exclude`, never an unhealthy one).
/// `turn` is a counter the caller increments per request (round-robin and keyless
/// requests). `None` when no replica is eligible.
pub fn choose(
    key: Option<u64>,
    replicas: &[Candidate],
    limits: &LoadLimits,
    turn: u64,
    exclude: &[usize],
) -> Option<Choice> {
    let eligible: Vec<usize> = (0..replicas.len())
        .filter(|i| replicas[*i].healthy && !exclude.contains(i))
        .collect();
    if eligible.is_empty() {
        return None;
    }
    let Some(key) = key else {
        return Some(Choice::Turn(
            eligible[(turn % eligible.len() as u64) as usize],
        ));
    };
    let winner = *eligible
        .iter()
        .max_by_key(|i| score(key, replicas[**i].id))
        .expect("eligible is not empty");
    let total: u64 = eligible.iter().map(|i| replicas[*i].in_flight).sum();
    let cap = (limits.load_factor.max(1.0) * (total + 1) as f64 / eligible.len() as f64).ceil();
    let over = |c: &Candidate| {
        c.queue_depth >= limits.max_queue_depth
            || c.kv_usage >= limits.max_kv_usage
            || (c.in_flight + 1) as f64 > cap
    };
    if !over(&replicas[winner]) {
        return Some(Choice::Affine(winner));
    }
    let least = *eligible
        .iter()
        .min_by(|a, b| {
            let load = |i: usize| {
                let c = &replicas[i];
                (c.queue_depth + c.in_flight, (c.kv_usage * 1e6) as u64)
            };
            load(**a).cmp(&load(**b))
        })
        .expect("eligible is not empty");
    Some(if least == winner {
        Choice::Affine(winner)
    } else {
        Choice::Spilled(least)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fleet(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: fnv1a(format!("http://10.0.0.{i}:8080").as_bytes()),
                healthy: true,
                ..Default::default()
            })
            .collect()
    }

    fn fim(prefix: &str, suffix: &str) -> Value {
        json!({"model": "codestral", "prompt": prefix, "suffix": suffix})
    }

    #[test]
    fn successive_keystrokes_in_one_line_share_the_fim_key() {
        let suffix = "\n    return total\n\n".repeat(20);
        let a = fim(&"x = 1\n".repeat(40), &suffix);
        let b = fim(&format!("{}y = ", "x = 1\n".repeat(40)), &suffix);
        let ka = affinity_key(Policy::Affinity, "/v1/fim/completions", Some("k"), &a, 256);
        let kb = affinity_key(Policy::Affinity, "/v1/fim/completions", Some("k"), &b, 256);
        assert!(ka.is_some());
        assert_eq!(ka, kb);
    }

    #[test]
    fn the_fim_key_depends_on_the_suffix_and_the_api_key() {
        let p = "def f():\n".repeat(30);
        let k = |key: &str, suffix: &str| {
            affinity_key(
                Policy::Affinity,
                "/v1/fim/completions",
                Some(key),
                &fim(&p, suffix),
                256,
            )
        };
        let long = |c: &str| c.repeat(100);
        assert_ne!(k("a", &long("x")), k("a", &long("y")));
        assert_ne!(k("a", &long("x")), k("b", &long("x")));
        assert_eq!(k("a", &long("x")), k("a", &long("x")));
    }

    #[test]
    fn a_short_prompt_changes_key_only_at_block_edges() {
        let k = |prefix: &str| {
            affinity_key(
                Policy::Affinity,
                "/v1/completions",
                None,
                &json!({"prompt": prefix}),
                256,
            )
        };
        let base = "a".repeat(KEY_BLOCK_BYTES);
        assert_eq!(k(&format!("{base}b")), k(&format!("{base}bcd")));
        assert_ne!(k(&base), k(&format!("{base}{base}")));
    }

    #[test]
    fn chat_keys_follow_the_first_messages() {
        let first = json!({"role": "system", "content": "You are a careful reviewer. ".repeat(10)});
        let one = json!({"messages": [first, {"role": "user", "content": "hi"}]});
        let two = json!({"messages": [first, {"role": "user", "content": "hello there"}]});
        let k =
            |b: &Value| affinity_key(Policy::Affinity, "/v1/chat/completions", Some("k"), b, 256);
        assert_eq!(k(&one), k(&two));
        assert!(k(&json!({"messages": "nope"})).is_none());
    }

    #[test]
    fn session_keys_only_on_the_api_key_and_round_robin_never_keys() {
        let a = fim("abc", "x");
        let b = fim("zzz", "y");
        let s = |b: &Value, key| affinity_key(Policy::Session, "/v1/fim/completions", key, b, 256);
        assert_eq!(s(&a, Some("dev1")), s(&b, Some("dev1")));
        assert_ne!(s(&a, Some("dev1")), s(&a, Some("dev2")));
        assert_eq!(s(&a, None), None);
        assert_eq!(
            affinity_key(
                Policy::RoundRobin,
                "/v1/fim/completions",
                Some("k"),
                &a,
                256
            ),
            None
        );
    }

    #[test]
    fn removing_a_replica_moves_only_the_keys_it_won() {
        let mut f = fleet(4);
        let limits = LoadLimits::default();
        let before: Vec<usize> = (0..2000u64)
            .map(|k| choose(Some(mix(k)), &f, &limits, 0, &[]).unwrap().index())
            .collect();
        f[2].healthy = false;
        for (k, was) in before.iter().enumerate() {
            let now = choose(Some(mix(k as u64)), &f, &limits, 0, &[])
                .unwrap()
                .index();
            if *was != 2 {
                assert_eq!(now, *was, "key {k} moved off a replica that stayed");
            } else {
                assert_ne!(now, 2);
            }
        }
        // And the keys spread over all replicas (each within 2x of fair).
        let mut counts = [0usize; 4];
        before.iter().for_each(|i| counts[*i] += 1);
        assert!(counts.iter().all(|c| *c > 250 && *c < 1000), "{counts:?}");
    }

    #[test]
    fn a_busy_affine_replica_spills_to_the_least_loaded() {
        let mut f = fleet(3);
        let limits = LoadLimits::default();
        let key = Some(42);
        let Choice::Affine(w) = choose(key, &f, &limits, 0, &[]).unwrap() else {
            panic!("idle fleet must be affine")
        };
        f[w].queue_depth = limits.max_queue_depth;
        let other = (w + 1) % 3;
        f[(w + 2) % 3].in_flight = 3;
        assert_eq!(
            choose(key, &f, &limits, 0, &[]),
            Some(Choice::Spilled(other))
        );
        f[w].queue_depth = 0;
        f[w].kv_usage = 0.99;
        assert_eq!(
            choose(key, &f, &limits, 0, &[]),
            Some(Choice::Spilled(other))
        );
        // In-flight over load_factor x the mean spills too.
        f[w].kv_usage = 0.0;
        f[(w + 2) % 3].in_flight = 0;
        f[w].in_flight = 4;
        assert_eq!(
            choose(key, &f, &limits, 0, &[]),
            Some(Choice::Spilled(other))
        );
        f[w].in_flight = 1;
        assert_eq!(choose(key, &f, &limits, 0, &[]), Some(Choice::Affine(w)));
    }

    #[test]
    fn excluded_and_unhealthy_replicas_are_never_chosen() {
        let mut f = fleet(3);
        let limits = LoadLimits::default();
        f[0].healthy = false;
        for turn in 0..10 {
            let c = choose(None, &f, &limits, turn, &[1]).unwrap();
            assert_eq!(c, Choice::Turn(2));
            assert_ne!(choose(Some(turn), &f, &limits, 0, &[2]).unwrap().index(), 0);
        }
        f[2].healthy = false;
        assert_eq!(choose(Some(7), &f, &limits, 0, &[1]), None);
    }

    #[test]
    fn round_robin_takes_turns_over_the_healthy() {
        let f = fleet(3);
        let picks: Vec<usize> = (0..6)
            .map(|t| {
                choose(None, &f, &LoadLimits::default(), t, &[])
                    .unwrap()
                    .index()
            })
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
