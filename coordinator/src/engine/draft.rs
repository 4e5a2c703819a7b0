//! Prompt-lookup drafts for speculative decoding: per sequence, an index of the
//! n-grams of its tokens (prompt + output) that proposes, for the longest recent
//! n-gram at the end of the sequence that also occurred earlier, the tokens that
//! followed its latest earlier occurrence — and the per-sequence draft length policy.
//!
//! Owns: [`NgramIndex`] (one per speculating sequence) and [`DraftLength`] (k adapted
//! from recent acceptance). Invariant: the index holds, for every n in
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

/// A sequence's draft length: starts at the cap, grows by one after a step that
/// accepted every draft, and falls to one more than the accepted count otherwise, so
/// a sequence whose drafts keep failing spends at most one extra token per step.
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
            (self.k + 1).min(self.max)
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

    #[test]
    fn draft_length_grows_on_full_acceptance_and_falls_on_rejection() {
        let mut k = DraftLength::new(8);
        assert_eq!(k.get(), 8);
        k.observe(8, 2);
        assert_eq!(k.get(), 3);
        k.observe(3, 3);
        assert_eq!(k.get(), 4);
        k.observe(4, 0);
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
