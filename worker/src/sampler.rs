//! Rank 0's token sampler: one row of logits in, one token id (and optional
//! logprobs) out, per sequence.
//!
//! Owns each sequence's sampling parameters and its seeded RNG. Order of operations
//! (as vLLM): ban stop ids while fewer than `min_tokens` tokens were generated →
//! greedy argmax if `temperature == 0` (or `top_k == 1`) → otherwise divide by the
//! temperature, keep the `top_k` largest, keep the nucleus of mass `top_p` of what is
//! left, renormalise and draw. Logprobs are the log-softmax of the *raw* logits
//! (temperature 1, no bans), as OpenAI reports them.
//!
//! Invariants: the `i`-th generated token of a sequence is drawn with the uniform
//! number at word offset `2·i` of a ChaCha8 stream seeded once from the request's
//! seed, so sampling is a pure function of (seed, generated count, logits): a
//! sequence recomputed after preemption (with `generated_before`) continues exactly
//! as it would have. Greedy picks the first maximum, exactly as
//! `kernels::reference::argmax_rows`. Ties in the sorted orders break by lower id.
//!
//! Costs per token: O(vocab) for greedy and for plain temperature sampling;
//! top-k adds an O(vocab) selection and an O(k log k) sort; top-p sorts only the
//! tokens above a probability threshold that provably contains the nucleus
//! (typically a few hundred), falling back to a full sort for flat distributions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::WorkerError;

/// `</s>` in Mistral's tokenizers: banned before `min_tokens` when no stop ids are given.
pub const EOS_TOKEN_ID: u32 = 2;

/// How one sequence is sampled (validated by [`SeqSampler::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = no filtering.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 = no limit.
    pub top_k: u32,
    pub seed: u64,
    /// `stop_token_ids` are banned while fewer tokens than this were generated.
    pub min_tokens: u32,
    /// Banned before `min_tokens`; empty means `[EOS_TOKEN_ID]`.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report the sampled token's logprob and the `n` most likely tokens'.
    pub logprobs: Option<u32>,
    /// Tokens generated before this (re)start: they count toward `min_tokens` and
    /// advance the RNG.
    pub generated_before: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            logprobs: None,
            generated_before: 0,
        }
    }
}

impl From<&proto::v1::SamplingParams> for SamplingParams {
    /// The one conversion from the wire: `top_p` 0 (unset) means 1, no seed means a
    /// random one.
    fn from(p: &proto::v1::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
            top_k: p.top_k,
            seed: p.seed.unwrap_or_else(|| rand::rng().random()),
            min_tokens: p.min_tokens,
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs,
            generated_before: p.generated_before,
        }
    }
}

/// Most alternatives a request may ask logprobs for (OpenAI allows 20).
pub const MAX_LOGPROBS: u32 = 20;

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the raw logits, when asked for.
    pub logprob: Option<f32>,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// One sequence's sampler: its parameters, its seeded RNG and how many tokens it
/// has generated.
#[derive(Clone, Debug)]
pub struct SeqSampler {
    params: SamplingParams,
    /// Seeded once; every draw seeks a clone of it to the draw's word offset.
    rng: ChaCha8Rng,
    generated: u32,
}

impl SeqSampler {
    /// Validates `params` against a vocabulary of `vocab` ids.
    pub fn new(mut params: SamplingParams, vocab: usize) -> Result<Self, WorkerError> {
        let bad = |msg: String| Err(WorkerError::Step(format!("sampling params: {msg}")));
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return bad(format!(
                "temperature {} must be finite and ≥ 0",
                params.temperature
            ));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", params.top_p));
        }
        if let Some(&t) = params.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!(
                "stop token id {t} is outside the vocabulary of {vocab}"
            ));
        }
        if params.stop_token_ids.is_empty() {
            params.stop_token_ids.push(EOS_TOKEN_ID);
        }
        params.stop_token_ids.sort_unstable();
        params.stop_token_ids.dedup();
        if params.min_tokens > 0 && params.stop_token_ids.len() >= vocab {
            return bad("stop_token_ids ban the whole vocabulary".into());
        }
        if let Some(n) = params.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return bad(format!(
                "logprobs {n} exceeds the maximum of {MAX_LOGPROBS}"
            ));
        }
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            generated: params.generated_before,
            params,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Tokens generated so far (including `generated_before`).
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Samples the next token from one row of logits and counts it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let s = self.peek(logits);
        self.advance();
        s
    }

    /// Counts one more generated token (after [`peek`](Self::peek)).
    pub fn advance(&mut self) {
        self.generated += 1;
    }

    /// The token [`sample`](Self::sample) would return, without counting it: a pure
    /// function of (seed, generated count, logits), so rows can be sampled in parallel.
    pub fn peek(&self, logits: &[f32]) -> Sampled {
        let p = &self.params;
        let banned = self.banned();
        let token = if self.greedy() {
            argmax_allowed(logits, banned)
        } else {
            draw(logits, banned, p, self.uniform(0))
        };
        self.with_logprobs(logits, token)
    }

    /// Verifies `drafts` (speculative decoding) from `rows`: `1 + drafts.len()` rows
    /// of logits, row `i` at the position after draft `i - 1` (row 0 after the last
    /// committed token). Returns the accepted drafts and then one more token, and
    /// counts them all as generated.
    ///
    /// Greedy: drafts are accepted while each equals the argmax of its row, then the
    /// argmax of the next row follows — exactly the tokens plain greedy decoding
    /// gives. Sampling: standard speculative rejection sampling with a deterministic
    /// draft (q one-hot): draft `d` is accepted with probability `p(d)`, `p` the row's
    /// distribution after temperature, top-k and top-p exactly as [`Self::sample`]
    /// filters it; on rejection the token is drawn from `p` without `d`, renormalised
    /// (`normalize(max(p − q, 0))`); after all drafts, the last row is sampled
    /// plainly. Each emitted token is thus distributed exactly as plain sampling's.
    /// The acceptance draw of generated token `g` uses the uniform at word `2·g` of
    /// stream 1 of the request's ChaCha8 generator, the token draw the same offset of
    /// stream 0 (plain sampling's), so a seeded request is reproducible and a step
    /// without drafts samples exactly as [`Self::sample`].
    pub fn verify(&mut self, rows: &[f32], drafts: &[u32]) -> Vec<Sampled> {
        let vocab = rows.len() / (drafts.len() + 1);
        debug_assert_eq!(rows.len(), vocab * (drafts.len() + 1));
        let mut out = Vec::with_capacity(drafts.len() + 1);
        for (i, row) in rows.chunks_exact(vocab).enumerate() {
            let draft = drafts.get(i).copied();
            let banned = self.banned();
            let token = if self.greedy() {
                argmax_allowed(row, banned)
            } else {
                match candidates(row, banned, &self.params) {
                    None => argmax_allowed(row, banned),
                    Some(mut cands) => {
                        let accepted = draft.filter(|&d| {
                            let mass: f64 = cands.iter().map(|c| c.1 as f64).sum();
                            let p_d = cands.iter().find(|c| c.0 == d).map_or(0.0, |c| c.1 as f64);
                            self.uniform(1) * mass < p_d
                        });
                        match accepted {
                            Some(d) => d,
                            None => {
                                if let Some(d) = draft {
                                    cands.retain(|c| c.0 != d);
                                }
                                pick(&cands, self.uniform(0))
                                    .unwrap_or_else(|| argmax_allowed(row, banned))
                            }
                        }
                    }
                }
            };
            out.push(self.with_logprobs(row, token));
            self.advance();
            if draft != Some(token) {
                break;
            }
        }
        out
    }

    /// Whether every token of this sequence is its row's first argmax: greedy, no
    /// logprobs, and no stop id ever banned by `min_tokens`. Decided from the
    /// parameters alone (not the generated count, which only rank 0 keeps exactly
    /// under speculation), so every rank of a group decides alike.
    pub fn argmax_suffices(&self) -> bool {
        let p = &self.params;
        self.greedy() && p.logprobs.is_none() && p.min_tokens <= p.generated_before
    }

    fn greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == 1
    }

    /// Stop ids banned for the next token (before `min_tokens`), sorted.
    fn banned(&self) -> &[u32] {
        if self.generated < self.params.min_tokens {
            &self.params.stop_token_ids
        } else {
            &[]
        }
    }

    /// The uniform number in [0, 1) for the next generated token on `stream`.
    fn uniform(&self, stream: u64) -> f64 {
        let mut rng = self.rng.clone();
        rng.set_stream(stream);
        rng.set_word_pos(2 * u128::from(self.generated));
        rng.random()
    }

    fn with_logprobs(&self, logits: &[f32], token: u32) -> Sampled {
        let p = &self.params;
        let (logprob, top_logprobs) = match p.logprobs {
            Some(n) => {
                let lse = log_sum_exp(logits);
                let top = top_ids(logits, n as usize)
                    .into_iter()
                    .map(|id| (id, logits[id as usize] - lse))
                    .collect();
                (Some(logits[token as usize] - lse), top)
            }
            None => (None, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }
}

/// The first maximum among ids not in `banned` (sorted). With nothing banned this is
/// `argmax_rows` exactly (NaNs never win unless at index 0).
fn argmax_allowed(logits: &[f32], banned: &[u32]) -> u32 {
    let allowed = |i: usize| banned.binary_search(&(i as u32)).is_err();
    let mut best = (0..logits.len()).find(|&i| allowed(i)).unwrap_or(0);
    for (i, &v) in logits.iter().enumerate().skip(best + 1) {
        if v > logits[best] && allowed(i) {
            best = i;
        }
    }
    best as u32
}

/// Draws with uniform `u ∈ [0, 1)` from the temperature/top-k/top-p filtered
/// distribution. Non-finite logits never get sampled.
fn draw(logits: &[f32], banned: &[u32], p: &SamplingParams, u: f64) -> u32 {
    match candidates(logits, banned, p) {
        Some(cands) => pick(&cands, u).unwrap_or_else(|| argmax_allowed(logits, banned)),
        None => argmax_allowed(logits, banned),
    }
}

/// The token whose cumulative weight first exceeds `u ×` the total; the last one
/// when rounding leaves `u ×` total unreached; `None` when there are none.
fn pick(cands: &[(u32, f32)], u: f64) -> Option<u32> {
    let mass: f64 = cands.iter().map(|c| c.1 as f64).sum();
    let target = u * mass;
    let mut acc = 0.0;
    for &(id, w) in cands {
        acc += w as f64;
        if acc > target {
            return Some(id);
        }
    }
    cands.last().map(|c| c.0)
}

/// The temperature/top-k/top-p filtered distribution as `(id, unnormalised weight)`;
/// `None` when no allowed logit is finite.
fn candidates(logits: &[f32], banned: &[u32], p: &SamplingParams) -> Option<Vec<(u32, f32)>> {
    let allowed = |i: usize| logits[i].is_finite() && banned.binary_search(&(i as u32)).is_err();
    let max = (0..logits.len())
        .filter(|&i| allowed(i))
        .map(|i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let inv_t = 1.0 / p.temperature;
    // Unnormalised probabilities; the maximum has weight 1.
    let weight = |i: usize| ((logits[i] - max) * inv_t).exp();
    let by_weight_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut cands: Vec<(u32, f32)> = Vec::new();
    let top_k = p.top_k as usize;
    let n_allowed = (0..logits.len()).filter(|&i| allowed(i)).count();
    if top_k > 0 && top_k < n_allowed {
        cands.extend(
            (0..logits.len())
                .filter(|&i| allowed(i))
                .map(|i| (i as u32, weight(i))),
        );
        cands.select_nth_unstable_by(top_k - 1, by_weight_desc);
        cands.truncate(top_k);
        cands.sort_unstable_by(by_weight_desc);
    } else if p.top_p < 1.0 {
        // The tokens with weight ≥ t form a prefix of the descending order; once
        // their mass reaches top_p·total, the nucleus lies inside them.
        let total: f64 = (0..logits.len())
            .filter(|&i| allowed(i))
            .map(|i| weight(i) as f64)
            .sum();
        let mut t = 1e-3f32;
        loop {
            cands.clear();
            cands.extend(
                (0..logits.len())
                    .filter(|&i| allowed(i))
                    .map(|i| (i as u32, weight(i)))
                    .filter(|c| c.1 >= t),
            );
            let mass: f64 = cands.iter().map(|c| c.1 as f64).sum();
            if mass >= p.top_p as f64 * total || t == 0.0 {
                break;
            }
            t = if t < 1e-30 { 0.0 } else { t * 1e-3 };
        }
        cands.sort_unstable_by(by_weight_desc);
    } else {
        cands.extend(
            (0..logits.len())
                .filter(|&i| allowed(i))
                .map(|i| (i as u32, weight(i))),
        );
    }
    if p.top_p < 1.0 {
        // `cands` is sorted: cut the smallest prefix with mass ≥ top_p of the rest.
        let mass: f64 = cands.iter().map(|c| c.1 as f64).sum();
        let target = p.top_p as f64 * mass;
        let mut acc = 0.0;
        let keep = cands
            .iter()
            .position(|c| {
                acc += c.1 as f64;
                acc >= target
            })
            .map_or(cands.len(), |i| i + 1);
        cands.truncate(keep);
    }
    Some(cands)
}

/// `ln Σ exp(logits)`, in f64.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` largest logits' ids, largest first (lower id first on ties).
fn top_ids(logits: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.select_nth_unstable_by(n - 1, order);
    ids.truncate(n);
    ids.sort_unstable_by(order);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (((l - m) / t) as f64).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    }

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = SeqSampler::new(params, logits.len()).unwrap();
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits).token as usize] += 1;
        }
        c
    }

    /// Pearson's χ² of observed counts against expected probabilities. Entries with
    /// zero expected probability must have zero counts (else +∞).
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                if e == 0.0 {
                    if c == 0 {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                } else {
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    /// χ² critical value at p = 0.001 for 7 degrees of freedom.
    const CHI2_7_DOF_P001: f64 = 24.32;

    const LOGITS: [f32; 8] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];

    fn params(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn temperature_one_draws_follow_the_softmax() {
        let c = counts(params(1.0, 1.0, 0, 11), &LOGITS, 20_000);
        let chi = chi_square(&c, &softmax(&LOGITS, 1.0));
        assert!(chi < CHI2_7_DOF_P001, "χ² = {chi}, counts {c:?}");
    }

    #[test]
    fn temperature_sharpens_and_flattens_the_distribution() {
        for t in [0.5f32, 2.0] {
            let c = counts(params(t, 1.0, 0, 5), &LOGITS, 20_000);
            let chi = chi_square(&c, &softmax(&LOGITS, t));
            assert!(chi < CHI2_7_DOF_P001, "T={t}: χ² = {chi}, counts {c:?}");
            // The same draws judged against the untempered softmax are far off.
            let wrong = chi_square(&c, &softmax(&LOGITS, 1.0));
            assert!(
                wrong > 10.0 * CHI2_7_DOF_P001,
                "T={t}: χ² vs T=1 only {wrong}"
            );
        }
    }

    #[test]
    fn top_k_keeps_only_the_k_best_renormalised() {
        let c = counts(params(1.0, 1.0, 3, 3), &LOGITS, 20_000);
        assert!(c[3..].iter().all(|&x| x == 0), "{c:?}");
        let mut p = softmax(&LOGITS[..3], 1.0);
        p.extend([0.0; 5]);
        let chi = chi_square(&c, &p);
        // 2 degrees of freedom: critical value 13.82 at p = 0.001.
        assert!(chi < 13.82, "χ² = {chi}, counts {c:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_reaching_the_mass() {
        // Probabilities 1/2, 1/4, 1/8, ...: top_p 0.7 keeps {0, 1}, i.e. 2/3 and 1/3.
        let logits: Vec<f32> = (0..8)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect();
        let c = counts(params(1.0, 0.7, 0, 9), &logits, 20_000);
        assert!(c[2..].iter().all(|&x| x == 0), "{c:?}");
        let chi = chi_square(&c, &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // 1 degree of freedom: critical value 10.83 at p = 0.001.
        assert!(chi < 10.83, "χ² = {chi}, counts {c:?}");
    }

    #[test]
    fn top_p_widens_its_search_when_the_nucleus_has_a_long_tail() {
        // One strong token (weight 1) and 32767 weak ones (weight e^-10 each, 60% of
        // the mass together): the nucleus of 0.5 is token 0 plus the first k weak
        // ones, all far below the first probability threshold.
        let mut logits = vec![0f32; 32768];
        logits[0] = 10.0;
        let w = (-10f32).exp() as f64;
        let k = ((0.5 * (1.0 + 32767.0 * w) - 1.0) / w).ceil() as usize;
        let c = counts(params(1.0, 0.5, 0, 1), &logits, 1500);
        let max_id = c.iter().rposition(|&x| x > 0).unwrap();
        assert!(
            max_id <= k && max_id > k / 2,
            "largest id drawn {max_id}, nucleus 0..={k}"
        );
        // p0 ≈ 0.8: σ of the frequency ≈ 0.01.
        let p0 = 1.0 / (1.0 + k as f64 * w);
        let f0 = c[0] as f64 / 1500.0;
        assert!((f0 - p0).abs() < 0.05, "token 0 drawn {f0}, expected {p0}");
    }

    #[test]
    fn top_k_then_top_p_apply_in_that_order() {
        // top_k 4 renormalises 1/2,1/4,1/8,1/16 to 8/15,4/15,2/15,1/15; top_p 0.75
        // then needs {0, 1} (12/15 ≥ 0.75).
        let logits: Vec<f32> = (0..8)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect();
        let c = counts(params(1.0, 0.75, 4, 2), &logits, 5000);
        assert!(
            c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0),
            "{c:?}"
        );
    }

    /// The distribution plain sampling draws from, computed independently: softmax
    /// at temperature `t`, the `top_k` best kept, then the smallest nucleus of mass
    /// `top_p`, renormalised.
    fn filtered_probs(logits: &[f32], t: f32, top_k: usize, top_p: f64) -> Vec<f64> {
        let p = softmax(logits, t);
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        order.truncate(top_k);
        let kept: f64 = order.iter().map(|&i| p[i]).sum();
        let mut out = vec![0.0; p.len()];
        let mut acc = 0.0;
        for &i in &order {
            out[i] = p[i] / kept;
            acc += p[i] / kept;
            if acc >= top_p {
                break;
            }
        }
        let mass: f64 = out.iter().sum();
        out.into_iter().map(|x| x / mass).collect()
    }

    /// χ² critical values at p = 0.001 for 1..=7 degrees of freedom.
    const CHI2_P001: [f64; 7] = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32];

    fn chi_square_ok(counts: &[usize], probs: &[f64]) -> (f64, f64) {
        let dof = probs.iter().filter(|&&p| p > 0.0).count() - 1;
        (chi_square(counts, probs), CHI2_P001[dof - 1])
    }

    #[test]
    fn greedy_verification_takes_the_argmax_prefix_then_the_next_argmax() {
        let mut rows = Vec::new();
        for best in [3usize, 5, 1, 6] {
            let mut row = vec![0f32; 8];
            row[best] = 4.0;
            rows.extend(row);
        }
        let mut s = SeqSampler::new(params(0.0, 1.0, 0, 0), 8).unwrap();
        let tokens: Vec<u32> = s
            .verify(&rows, &[3, 5, 2])
            .iter()
            .map(|t| t.token)
            .collect();
        assert_eq!(
            tokens,
            vec![3, 5, 1],
            "two drafts accepted, the third replaced"
        );
        assert_eq!(s.generated(), 3);
        let mut s = SeqSampler::new(params(0.0, 1.0, 0, 0), 8).unwrap();
        let tokens: Vec<u32> = s
            .verify(&rows, &[3, 5, 1])
            .iter()
            .map(|t| t.token)
            .collect();
        assert_eq!(
            tokens,
            vec![3, 5, 1, 6],
            "every draft accepted, then the bonus token"
        );
        let mut s = SeqSampler::new(params(0.0, 1.0, 0, 0), 8).unwrap();
        assert_eq!(
            s.verify(&rows[..16], &[0])[0].token,
            3,
            "a wrong first draft"
        );
    }

    #[test]
    fn rejection_sampling_draws_exactly_the_plain_distribution_with_top_k_and_top_p() {
        // Two drafts: row 0 after the committed token, row 1 after draft 0. The
        // drafts come from another distribution (uniform over the vocabulary, also
        // over tokens top-k/top-p filter out). Token 0 must follow row 0's filtered
        // distribution, and token 1 — emitted only when draft 0 was accepted — row 1's.
        let row0 = LOGITS;
        let row1: [f32; 8] = [-1.0, 0.0, 2.5, 0.3, 1.2, -0.2, 0.8, 1.9];
        let (t, top_k, top_p) = (0.8f32, 6u32, 0.9f32);
        // Row 2 (after draft 1) only matters when both drafts are accepted.
        let rows: Vec<f32> = row0
            .iter()
            .chain(&row1)
            .chain(row0.iter().rev())
            .copied()
            .collect();
        let mut first = vec![0usize; 8];
        let mut second = vec![0usize; 8];
        let (mut accepted, mut rejected) = (0, 0);
        let mut draft_rng = ChaCha8Rng::seed_from_u64(77);
        for seed in 0..40_000 {
            let d0 = (draft_rng.random::<u32>() % 8) as u32;
            let d1 = (draft_rng.random::<u32>() % 8) as u32;
            let mut s = SeqSampler::new(params(t, top_p, top_k, seed), 8).unwrap();
            let out = s.verify(&rows, &[d0, d1]);
            first[out[0].token as usize] += 1;
            if out[0].token == d0 {
                accepted += 1;
                second[out[1].token as usize] += 1;
            } else {
                rejected += 1;
                assert_eq!(out.len(), 1, "nothing after a rejection");
            }
        }
        assert!(
            accepted > 5_000 && rejected > 5_000,
            "{accepted} / {rejected}"
        );
        let p0 = filtered_probs(&row0, t, top_k as usize, top_p as f64);
        let p1 = filtered_probs(&row1, t, top_k as usize, top_p as f64);
        for (counts, p) in [(&first, &p0), (&second, &p1)] {
            let (chi, critical) = chi_square_ok(counts, p);
            assert!(
                chi < critical,
                "χ² = {chi} ≥ {critical}: {counts:?} vs {p:?}"
            );
        }
        // The same draws against the unfiltered softmax are far off: the test can fail.
        let (chi, critical) = chi_square_ok(&first, &softmax(&row0, t));
        assert!(
            chi > 10.0 * critical,
            "χ² against the wrong distribution only {chi}"
        );
    }

    #[test]
    fn verification_is_reproducible_per_seed_and_without_drafts_equals_sampling() {
        let rows: Vec<f32> = LOGITS.iter().chain(LOGITS.iter().rev()).copied().collect();
        let run = |seed| {
            let mut s = SeqSampler::new(params(1.0, 1.0, 0, seed), 8).unwrap();
            (0..20)
                .flat_map(|_| s.verify(&rows, &[1]))
                .map(|t| t.token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(4), run(4));
        assert_ne!(run(4), run(5));
        let mut plain = SeqSampler::new(params(1.0, 1.0, 0, 9), 8).unwrap();
        let mut verified = SeqSampler::new(params(1.0, 1.0, 0, 9), 8).unwrap();
        for _ in 0..50 {
            assert_eq!(
                plain.sample(&LOGITS),
                verified.verify(&LOGITS, &[]).remove(0)
            );
        }
    }

    #[test]
    fn greedy_is_the_first_maximum_like_argmax_rows() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        let mut s = SeqSampler::new(params(0.0, 1.0, 0, 0), logits.len()).unwrap();
        assert_eq!(
            s.sample(&logits).token,
            kernels::reference::argmax_rows(&logits, 5)[0]
        );
        assert_eq!(s.sample(&logits).token, 1);
        let mut k1 = SeqSampler::new(params(1.5, 1.0, 1, 0), logits.len()).unwrap();
        assert_eq!(k1.sample(&logits).token, 1, "top_k 1 is greedy");
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let run = |seed| {
            let mut s = SeqSampler::new(params(1.0, 0.95, 0, seed), LOGITS.len()).unwrap();
            (0..64).map(|_| s.sample(&LOGITS).token).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn generated_before_resumes_the_random_stream_exactly() {
        let mut full = SeqSampler::new(params(0.9, 1.0, 0, 77), LOGITS.len()).unwrap();
        let all: Vec<u32> = (0..20).map(|_| full.sample(&LOGITS).token).collect();
        let resumed = SeqSampler::new(
            SamplingParams {
                generated_before: 12,
                ..params(0.9, 1.0, 0, 77)
            },
            LOGITS.len(),
        )
        .unwrap();
        let mut resumed = resumed;
        let tail: Vec<u32> = (0..8).map(|_| resumed.sample(&LOGITS).token).collect();
        assert_eq!(tail, all[12..]);
    }

    #[test]
    fn min_tokens_bans_eos_and_stop_ids_until_reached() {
        // EOS (2) is the argmax, stop id 5 the runner-up, then 0.
        let logits = [1.0, -1.0, 9.0, -1.0, -1.0, 8.0];
        let mut s = SeqSampler::new(
            SamplingParams {
                min_tokens: 3,
                stop_token_ids: vec![EOS_TOKEN_ID, 5],
                ..Default::default()
            },
            logits.len(),
        )
        .unwrap();
        let toks: Vec<u32> = (0..4).map(|_| s.sample(&logits).token).collect();
        assert_eq!(toks, [0, 0, 0, 2]);
        // Default ban list is EOS alone; with sampling the ban is absolute too.
        let mut d = SeqSampler::new(
            SamplingParams {
                min_tokens: 500,
                ..params(1.0, 1.0, 0, 4)
            },
            logits.len(),
        )
        .unwrap();
        assert!((0..500).all(|_| d.sample(&logits).token != EOS_TOKEN_ID));
        assert_eq!(d.sample(&[0.0, 0.0, 50.0, 0.0, 0.0, 0.0]).token, 2);
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_with_top_alternatives() {
        let mut s = SeqSampler::new(
            SamplingParams {
                logprobs: Some(3),
                ..params(0.3, 1.0, 0, 8)
            },
            LOGITS.len(),
        )
        .unwrap();
        let out = s.sample(&LOGITS);
        let p = softmax(&LOGITS, 1.0);
        let lp = out.logprob.unwrap();
        assert!((lp as f64 - p[out.token as usize].ln()).abs() < 1e-5);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, [0, 1, 2]);
        for &(id, l) in &out.top_logprobs {
            assert!((l as f64 - p[id as usize].ln()).abs() < 1e-5, "{id}: {l}");
        }
        let none = SeqSampler::new(params(0.0, 1.0, 0, 0), 8)
            .unwrap()
            .sample(&LOGITS);
        assert!(none.logprob.is_none() && none.top_logprobs.is_empty());
    }

    #[test]
    fn invalid_params_are_rejected_with_the_field_named() {
        let check = |p: SamplingParams, field: &str| {
            let e = SeqSampler::new(p, 8).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        check(params(-1.0, 1.0, 0, 0), "temperature");
        check(params(f32::NAN, 1.0, 0, 0), "temperature");
        check(params(1.0, 0.0, 0, 0), "top_p");
        check(params(1.0, 1.5, 0, 0), "top_p");
        check(
            SamplingParams {
                stop_token_ids: vec![8],
                ..Default::default()
            },
            "stop token id 8",
        );
        check(
            SamplingParams {
                logprobs: Some(21),
                ..Default::default()
            },
            "logprobs",
        );
        check(
            SamplingParams {
                min_tokens: 1,
                stop_token_ids: (0..8).collect(),
                ..Default::default()
            },
            "whole vocabulary",
        );
    }
}
