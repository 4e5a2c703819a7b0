//! Draft sources for speculative decoding, per sequence: prompt lookup (an index of
//! the n-grams of its tokens, prompt + output, that proposes, for the longest recent
//! n-gram at the end of the sequence that also occurred earlier, the tokens that
//! followed its latest earlier occurrence), a request's predicted output
//! ([`PredictionDraft`]), and the per-sequence draft length policy.
//!
//! Rule: a request with a `prediction` drafts from it; when the prediction has
//! nothing to propose (exhausted, or the output's last n-gram is nowhere in it) the
//! sequence falls back to prompt lookup for that step ([`Drafter::draft`]).
//!
//! Owns: [`NgramIndex`] (one per speculating sequence), [`PredictionDraft`] (one per
//! request with a prediction), [`Drafter`] (both plus the length) and [`DraftLength`]
//! (k adapted from recent acceptance). What was accepted is counted where it reaches
//! the client (`crate::metrics::SpecCounters`). Invariant: the index holds, for every n in
//! `1..=MAX_NGRAM`, the latest end position of each n-gram that ends before the last
//! token, so a lookup never matches the sequence's own end.
//!
//! Costs: appending a token is `MAX_NGRAM` hash-map inserts (O(1) each, the n-gram
//! hashed incrementally from a rolling window); a lookup is at most `MAX_NGRAM`
//! probes, each verified against the tokens (O(n)), plus copying the draft: O(draft),
//! independent of the context length. Memory: O(MAX_NGRAM × tokens).

use std::collections::HashMap;

/// Longest n-gram the index matches.
pub const MAX_NGRAM: usize = 4;

/// Shortest n-gram a draft is proposed from (a single token matches too often).
pub const MIN_NGRAM: usize = 2;

/// The n-gram index of one sequence.
#[derive(Clone, Debug, Default)]
pub struct NgramIndex {
    tokens: Vec<u32>,
    /// Per n − 1: hash of an n-gram → the position of its last token.
    latest: [HashMap<u64, usize>; MAX_NGRAM],
}

fn ngram_hash(gram: &[u32]) -> u64 {
    gram.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl NgramIndex {
    /// An index over `tokens` (a prompt): O(MAX_NGRAM × tokens).
    pub fn new(tokens: &[u32]) -> Self {
        let mut index = Self::default();
        for &t in tokens {
            index.push(t);
        }
        index
    }

    /// Appends one token; the n-grams ending at the previous token become findable.
    pub fn push(&mut self, token: u32) {
        if let Some(end) = self.tokens.len().checked_sub(1) {
            for n in 1..=MAX_NGRAM.min(end + 1) {
                let gram = &self.tokens[end + 1 - n..=end];
                self.latest[n - 1].insert(ngram_hash(gram), end);
            }
        }
        self.tokens.push(token);
    }

    /// Tokens indexed so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Up to `k` tokens that followed the latest earlier occurrence of the longest
    /// n-gram (at least [`MIN_NGRAM`]) the sequence ends with; empty when none.
    pub fn draft(&self, k: usize) -> Vec<u32> {
        let len = self.tokens.len();
        if k == 0 {
            return Vec::new();
        }
        for n in (MIN_NGRAM..=MAX_NGRAM.min(len)).rev() {
            let gram = &self.tokens[len - n..];
            let Some(&end) = self.latest[n - 1].get(&ngram_hash(gram)) else {
                continue;
            };
            if &self.tokens[end + 1 - n..=end] != gram {
                continue; // a hash collision
            }
            let from = end + 1;
            return self.tokens[from..(from + k).min(len)].to_vec();
        }
        Vec::new()
    }
}

/// Longest output n-gram a [`PredictionDraft`] re-aligns on after a mismatch.
pub const REALIGN_NGRAM: usize = 3;

/// Which source proposed a draft (the label of the speculation metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraftSource {
    Prediction = 0,
    Ngram = 1,
}

impl DraftSource {
    pub const ALL: [Self; 2] = [Self::Prediction, Self::Ngram];

    pub fn label(self) -> &'static str {
        match self {
            Self::Prediction => "prediction",
            Self::Ngram => "ngram",
        }
    }
}

/// A request's predicted output, aligned with what was generated so far: `cursor` is
/// the prediction position expected next. A generated token equal to the expected
/// one advances the cursor; any other re-aligns it just past the earliest occurrence,
/// at or after the furthest cursor if there is one, of the longest of the output's last
/// 1..=[`REALIGN_NGRAM`] tokens in the prediction (none found: no cursor until an
/// n-gram matches again).
///
/// Costs: building is O(REALIGN_NGRAM × prediction); a token is O(1) when it matches,
/// otherwise at most REALIGN_NGRAM hash probes plus a binary search; a draft is O(k).
#[derive(Clone, Debug, Default)]
pub struct PredictionDraft {
    tokens: Vec<u32>,
    /// Per n − 1: hash of an n-gram of the prediction → its end positions, ascending.
    ends: [HashMap<u64, Vec<usize>>; REALIGN_NGRAM],
    cursor: Option<usize>,
    /// The furthest the cursor has been: re-alignment prefers occurrences past it.
    mark: usize,
    /// The last REALIGN_NGRAM generated tokens, oldest first.
    recent: Vec<u32>,
}

impl PredictionDraft {
    /// The prediction `tokens`, aligned with the start of the output.
    pub fn new(tokens: Vec<u32>) -> Self {
        let mut ends: [HashMap<u64, Vec<usize>>; REALIGN_NGRAM] = Default::default();
        for end in 0..tokens.len() {
            for n in 1..=REALIGN_NGRAM.min(end + 1) {
                let gram = &tokens[end + 1 - n..=end];
                ends[n - 1].entry(ngram_hash(gram)).or_default().push(end);
            }
        }
        Self {
            tokens,
            ends,
            cursor: Some(0),
            mark: 0,
            recent: Vec::with_capacity(REALIGN_NGRAM),
        }
    }

    /// Learns one generated token.
    pub fn push(&mut self, token: u32) {
        if self.recent.len() == REALIGN_NGRAM {
            self.recent.remove(0);
        }
        self.recent.push(token);
        self.cursor = match self.cursor {
            Some(c) if self.tokens.get(c) == Some(&token) => Some(c + 1),
            _ => self.realign(),
        };
        if let Some(c) = self.cursor {
            self.mark = self.mark.max(c);
        }
    }

    /// The position after the earliest occurrence (past `mark` if possible) of the
    /// longest suffix of `recent` found in the prediction.
    fn realign(&self) -> Option<usize> {
        for n in (1..=self.recent.len()).rev() {
            let gram = &self.recent[self.recent.len() - n..];
            let Some(ends) = self.ends[n - 1].get(&ngram_hash(gram)) else {
                continue;
            };
            let verified = |&&end: &&usize| &self.tokens[end + 1 - n..=end] == gram;
            let after = ends.partition_point(|&e| e < self.mark);
            if let Some(&end) = ends[after..]
                .iter()
                .find(verified)
                .or_else(|| ends.iter().find(verified))
            {
                return Some(end + 1);
            }
        }
        None
    }

    /// Up to `k` predicted tokens from the cursor; empty when not aligned or at the end.
    pub fn draft(&self, k: usize) -> &[u32] {
        match self.cursor {
            Some(c) if c < self.tokens.len() => &self.tokens[c..(c + k).min(self.tokens.len())],
            _ => &[],
        }
    }
}

/// The draft state of one speculating sequence: prompt lookup, the prediction when
/// the request has one, and the adaptive draft length.
#[derive(Clone, Debug)]
pub struct Drafter {
    pub ngram: NgramIndex,
    pub prediction: Option<PredictionDraft>,
    pub length: DraftLength,
}

impl Drafter {
    /// Drafts for a sequence with `prompt`, an optional tokenized prediction, and a
    /// draft length capped at `k`.
    pub fn new(prompt: &[u32], prediction: Option<Vec<u32>>, k: usize) -> Self {
        Self {
            ngram: NgramIndex::new(prompt),
            prediction: prediction.map(PredictionDraft::new),
            length: DraftLength::new(k),
        }
    }

    /// Learns one generated token.
    pub fn push(&mut self, token: u32) {
        self.ngram.push(token);
        if let Some(p) = &mut self.prediction {
            p.push(token);
        }
    }

    /// Up to `k` draft tokens and their source: the prediction's when it proposes
    /// any, prompt lookup's otherwise.
    pub fn draft(&self, k: usize) -> (Vec<u32>, DraftSource) {
        if let Some(p) = &self.prediction {
            let d = p.draft(k);
            if !d.is_empty() {
                return (d.to_vec(), DraftSource::Prediction);
            }
        }
        (self.ngram.draft(k), DraftSource::Ngram)
    }
}

/// A sequence's draft length: starts at the cap, doubles after a step that accepted
/// every draft, and falls to one more than the accepted count otherwise, so a sequence
/// whose drafts keep failing spends at most one extra token per step, and one whose
/// drafts fail once (a prediction's changed token, then re-aligned) is back at the cap
/// within log2(cap) steps.
#[derive(Clone, Copy, Debug)]
pub struct DraftLength {
    k: usize,
    max: usize,
}

impl DraftLength {
    pub fn new(max: usize) -> Self {
        Self { k: max, max }
    }

    /// The draft length to propose next.
    pub fn get(&self) -> usize {
        self.k
    }

    /// Learns from a verified draft of `proposed` tokens of which `accepted` passed.
    pub fn observe(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.k = if accepted == proposed {
            (self.k * 2).min(self.max)
        } else {
            (accepted + 1).min(self.max)
        };
    }
}

/// The draft length a step can afford: none when the batch is large or the drafts of
/// every running sequence would take more than half the token budget (the step is
/// then compute-bound, and drafts only slow it).
pub fn affordable(k: usize, running: usize, max_batched_tokens: usize) -> usize {
    const MAX_SPECULATIVE_BATCH: usize = 32;
    if running > MAX_SPECULATIVE_BATCH || running * (1 + k) > max_batched_tokens / 2 {
        0
    } else {
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_repeated_ngram_proposes_what_followed_it_last_time() {
        // "a b c d e | x b c d" → the 3-gram "b c d" occurred before, followed by e.
        let index = NgramIndex::new(&[1, 2, 3, 4, 5, 9, 2, 3, 4]);
        assert_eq!(index.draft(3), vec![5, 9, 2]);
        assert_eq!(index.draft(1), vec![5]);
    }

    #[test]
    fn the_latest_occurrence_wins_and_the_draft_stops_at_the_end() {
        let mut index = NgramIndex::new(&[7, 8, 1, 7, 8, 2, 7]);
        index.push(8);
        assert_eq!(index.draft(8), vec![2, 7, 8], "after the latest 7 8 came 2");
    }

    #[test]
    fn no_draft_without_an_earlier_occurrence_or_for_k_zero() {
        assert!(NgramIndex::new(&[1, 2, 3, 4]).draft(4).is_empty());
        assert!(NgramIndex::new(&[1, 2, 1, 2]).draft(0).is_empty());
        // A single repeated token is below MIN_NGRAM.
        assert!(NgramIndex::new(&[5, 1, 2, 5]).draft(4).is_empty());
    }

    #[test]
    fn pushing_tokens_equals_indexing_them_at_once() {
        let tokens: Vec<u32> = (0..200).map(|i| (i * 7 % 13) as u32).collect();
        let mut grown = NgramIndex::new(&tokens[..50]);
        for &t in &tokens[50..] {
            grown.push(t);
        }
        let whole = NgramIndex::new(&tokens);
        for k in [1, 4, 8] {
            assert_eq!(grown.draft(k), whole.draft(k));
        }
        assert_eq!(whole.draft(4).len(), 4);
    }

    fn predicted(prediction: &[u32], generated: &[u32]) -> PredictionDraft {
        let mut p = PredictionDraft::new(prediction.to_vec());
        for &t in generated {
            p.push(t);
        }
        p
    }

    #[test]
    fn a_prediction_drafts_its_next_tokens_while_the_output_follows_it() {
        let p = predicted(&[10, 11, 12, 13, 14], &[]);
        assert_eq!(p.draft(3), [10, 11, 12]);
        let p = predicted(&[10, 11, 12, 13, 14], &[10, 11]);
        assert_eq!(
            p.draft(8),
            [12, 13, 14],
            "the draft stops at the prediction's end"
        );
        assert!(predicted(&[10, 11], &[10, 11]).draft(4).is_empty());
    }

    #[test]
    fn after_a_changed_token_the_prediction_realigns_on_the_last_ngram() {
        // Output replaced 12 by 99, then went on with 13: re-aligned after "13".
        let p = predicted(&[10, 11, 12, 13, 14, 15], &[10, 11, 99, 13]);
        assert_eq!(p.draft(2), [14, 15]);
        // An inserted token: "11 77" is unknown, but the next "12" realigns.
        let p = predicted(&[10, 11, 12, 13, 14], &[10, 11, 77, 12]);
        assert_eq!(p.draft(2), [13, 14]);
        // Garbage proposes nothing.
        assert!(predicted(&[10, 11, 12], &[50, 51]).draft(4).is_empty());
    }

    #[test]
    fn realignment_prefers_the_occurrence_after_the_cursor() {
        // "5 6" occurs twice; having passed the first, the output resumes at the second.
        let p = predicted(&[5, 6, 1, 2, 5, 6, 3], &[5, 6, 1, 2, 9, 5, 6]);
        assert_eq!(p.draft(1), [3]);
    }

    #[test]
    fn a_drafter_falls_back_to_prompt_lookup_when_the_prediction_is_silent() {
        let mut d = Drafter::new(&[1, 2, 3, 4, 1, 2], Some(vec![3, 8]), 4);
        assert_eq!(d.draft(4), (vec![3, 8], DraftSource::Prediction));
        for t in [3, 8] {
            d.push(t);
        }
        // Prediction exhausted: prompt + output = 1 2 3 4 1 2 3 8 has no repeat of "3 8".
        assert_eq!(d.draft(4), (vec![], DraftSource::Ngram));
        d.push(1);
        d.push(2);
        assert_eq!(d.draft(2), (vec![3, 8], DraftSource::Ngram));
    }

    #[test]
    fn draft_length_doubles_on_full_acceptance_and_falls_on_rejection() {
        let mut k = DraftLength::new(8);
        assert_eq!(k.get(), 8);
        k.observe(8, 2);
        assert_eq!(k.get(), 3);
        k.observe(3, 3);
        assert_eq!(k.get(), 6);
        k.observe(6, 6);
        assert_eq!(k.get(), 8, "capped");
        k.observe(8, 0);
        assert_eq!(k.get(), 1);
        k.observe(0, 0);
        assert_eq!(k.get(), 1, "no draft, nothing learned");
    }

    #[test]
    fn large_batches_get_no_drafts() {
        assert_eq!(affordable(8, 1, 8192), 8);
        assert_eq!(affordable(8, 33, 8192), 0);
        assert_eq!(affordable(8, 4, 64), 0);
    }
}
