//! Incremental detokenization for streaming (ARCHITECTURE §7): token ids in, text deltas
//! out, with stop strings matched across token boundaries.
//!
//! Owns one sequence's decode state: byte-fallback bytes still waiting for the rest of
//! their character, text held back because it may begin a stop string, and whether (and
//! which) stop string ended the stream.
//!
//! Invariants, for any ids pushed one at a time:
//! - Without a stop match, the concatenation of every delta (including [`Detokenizer::finish`])
//!   equals `Tokenizer::decode(ids)` (with `strip_leading_space`; without it, the same text
//!   keeping the first piece's leading space), so it does not depend on how the text was
//!   split into tokens.
//! - A delta never holds part of a character: byte pieces `<0xNN>` are emitted once their
//!   UTF-8 character is complete (invalid bytes become U+FFFD, one per byte, as in
//!   `decode`).
//! - With stop strings, the stream ends at the stop match that *ends* first in the full
//!   text (ties: the longest, then the first listed); the concatenated deltas are the text
//!   before that match, the match is never emitted, and nothing is emitted after it.
//!   Text that could still become the start of a stop string is held back until it can't.
//!   Empty stop strings are ignored.
//!
//! Costs per token: the piece's bytes, plus O(Σ stop length²) byte comparisons for the
//! held-back check and one substring search per stop over `held` (at most the longest stop
//! plus one piece); at most 3 bytes wait for a character. Callers should bound the number
//! and length of stop strings (OpenAI allows 4).

use crate::tokenizer::{Piece, PieceDecoder, Tokenizer};

/// How a sequence's text is produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetokenizerConfig {
    /// Stop strings: the stream ends before the first one and never contains it.
    pub stop: Vec<String>,
    /// Drop the leading space of the first piece, as SentencePiece's `decode` does. True for
    /// chat (the assistant turn starts with the dummy-prefix `▁`); false for FIM and plain
    /// completions, whose first piece's space is real text continuing the prompt.
    pub strip_leading_space: bool,
}

/// Text produced by one [`Detokenizer::push`] or [`Detokenizer::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextDelta {
    /// Text to send now; empty while the new text is incomplete or held back.
    pub text: String,
    /// Index in [`DetokenizerConfig::stop`] of the stop string that just ended the stream.
    pub stop: Option<usize>,
}

/// One token's share of the generated text, for logprobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenText {
    /// The text this token adds (before stop-string hold-back). The first piece's space
    /// follows [`DetokenizerConfig::strip_leading_space`]; a byte-fallback character is
    /// carried whole by the token that completes it, the tokens before it add `""`, so the
    /// texts of a sequence's tokens concatenate to its text.
    pub text: String,
    /// The token's own bytes: a byte-fallback token's single byte, otherwise `text`'s
    /// UTF-8. Concatenated over a sequence they are the text's bytes.
    pub bytes: Vec<u8>,
}

/// One sequence's incremental detokenizer.
#[derive(Debug)]
pub struct Detokenizer {
    tokenizer: Tokenizer,
    decoder: PieceDecoder,
    stop: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl Detokenizer {
    pub fn new(tokenizer: Tokenizer, config: DetokenizerConfig) -> Self {
        Self {
            tokenizer,
            decoder: PieceDecoder::new(config.strip_leading_space),
            stop: config.stop,
            held: String::new(),
            stopped: None,
        }
    }

    /// Adds the next generated token. After a stop match, returns empty deltas.
    pub fn push(&mut self, id: u32) -> TextDelta {
        if self.stopped.is_some() {
            return TextDelta::default();
        }
        self.decoder.push(self.tokenizer.piece(id), &mut self.held);
        self.release(false)
    }

    /// Ends the stream (EOS or length): bytes of an unfinished character become U+FFFD and
    /// held-back text is released (or cut at a stop string it completes).
    pub fn finish(&mut self) -> TextDelta {
        if self.stopped.is_some() {
            return TextDelta::default();
        }
        self.decoder.finish(&mut self.held);
        self.release(true)
    }

    /// What `id` would add if it were pushed next; the state is unchanged. Used for the
    /// chosen token (called before [`Self::push`]) and for its alternatives alike.
    pub fn token_text(&self, id: u32) -> TokenText {
        let piece = self.tokenizer.piece(id);
        let mut text = String::new();
        self.decoder.clone().push(piece, &mut text);
        let bytes = match piece {
            Piece::Byte(b) => vec![*b],
            _ => text.as_bytes().to_vec(),
        };
        TokenText { text, bytes }
    }

    /// The index of the stop string that ended the stream, if one did.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    fn release(&mut self, at_end: bool) -> TextDelta {
        if let Some((start, index)) = first_stop(&self.held, &self.stop) {
            self.held.truncate(start);
            self.stopped = Some(index);
            return TextDelta {
                text: std::mem::take(&mut self.held),
                stop: Some(index),
            };
        }
        let keep = if at_end {
            0
        } else {
            stop_prefix_len(&self.held, &self.stop)
        };
        let rest = self.held.split_off(self.held.len() - keep);
        TextDelta {
            text: std::mem::replace(&mut self.held, rest),
            stop: None,
        }
    }
}

/// The stop match in `text` that ends first (ties: starts first, then listed first):
/// `(start byte, stop index)`.
fn first_stop(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(i, s)| {
            text.find(s.as_str())
                .map(|start| (start + s.len(), start, i))
        })
        .min()
        .map(|(_, start, i)| (start, i))
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
///
/// Compared as bytes: `text` is valid UTF-8 ending on a character boundary and a stop
/// prefix starts on one, so a matching suffix starts on a boundary of `text`.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let text = text.as_bytes();
    stops
        .iter()
        .filter_map(|s| {
            let s = s.as_bytes();
            (1..s.len().min(text.len() + 1))
                .rev()
                .find(|&k| text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::codestral().expect("embedded tokenizer loads"))
    }

    fn detok(stop: &[&str], strip_leading_space: bool) -> Detokenizer {
        Detokenizer::new(
            tok().clone(),
            DetokenizerConfig {
                stop: stop.iter().map(|s| s.to_string()).collect(),
                strip_leading_space,
            },
        )
    }

    /// Streams `ids` one at a time; returns the non-empty deltas, in order, and the stop.
    fn stream(d: &mut Detokenizer, ids: &[u32]) -> (Vec<String>, Option<usize>) {
        let mut deltas = Vec::new();
        let mut stop = None;
        for &id in ids {
            let delta = d.push(id);
            stop = stop.or(delta.stop);
            deltas.push(delta.text);
        }
        let last = d.finish();
        stop = stop.or(last.stop);
        deltas.push(last.text);
        deltas.retain(|t| !t.is_empty());
        (deltas, stop)
    }

    fn byte(b: u8) -> u32 {
        771 + u32::from(b)
    }

    const TEXTS: &[&str] = &[
        "fn main() {\n\tprintln!(\"héllo 🦀\");\n}\n",
        "  leading spaces and trailing  ",
        "稀有字 𠀀𪚥 and emoji 👨\u{200d}👩\u{200d}👧 🇫🇷",
        "x = 1\r\ny = 2\r\n[INST] not a token [/INST]",
    ];

    #[test]
    fn streamed_text_concatenates_to_the_full_decode() {
        for text in TEXTS {
            let ids = tok().encode(text).unwrap();
            let (deltas, stop) = stream(&mut detok(&[], true), &ids);
            assert_eq!(deltas.concat(), tok().decode(&ids), "{text:?}");
            assert_eq!(stop, None);
        }
    }

    /// Texts and bytes of each token, taken before it is pushed, as the HTTP logprobs do.
    fn token_texts(d: &mut Detokenizer, ids: &[u32]) -> (String, Vec<u8>) {
        let (mut text, mut bytes) = (String::new(), Vec::new());
        for &id in ids {
            let t = d.token_text(id);
            text.push_str(&t.text);
            bytes.extend_from_slice(&t.bytes);
            d.push(id);
        }
        (text, bytes)
    }

    #[test]
    fn token_texts_concatenate_to_the_text_in_both_space_modes() {
        for text in TEXTS {
            let ids = tok().encode(text).unwrap();
            for strip in [true, false] {
                let (deltas, _) = stream(&mut detok(&[], strip), &ids);
                let (texts, bytes) = token_texts(&mut detok(&[], strip), &ids);
                assert_eq!(texts, deltas.concat(), "{text:?} strip={strip}");
                assert_eq!(
                    bytes,
                    deltas.concat().into_bytes(),
                    "{text:?} strip={strip}"
                );
            }
        }
        // A continuation keeps the space a single-id decode would strip.
        let ids = tok().encode("return a").unwrap();
        assert_eq!(detok(&[], false).token_text(ids[0]).text, " return");
        assert_eq!(tok().decode(&ids[..1]), "return");
    }

    #[test]
    fn a_byte_fallback_character_is_carried_by_the_token_that_completes_it() {
        let mut d = detok(&[], true);
        let mut got = Vec::new();
        for b in [0xF0, 0x9F, 0xA6, 0xAB] {
            let t = d.token_text(byte(b));
            assert_eq!(t.bytes, vec![b]);
            got.push(t.text);
            d.push(byte(b));
        }
        assert_eq!(got, ["", "", "", "🦫"]);
        assert_eq!(
            d.token_text(byte(0x41)),
            d.token_text(byte(0x41)),
            "no state change"
        );
    }

    #[test]
    fn continuation_mode_keeps_the_first_pieces_space() {
        let ids = tok().encode("return a + b").unwrap();
        let (deltas, _) = stream(&mut detok(&[], false), &ids);
        assert_eq!(deltas.concat(), " return a + b");
    }

    #[test]
    fn emoji_from_byte_fallback_is_emitted_whole_once_complete() {
        let mut d = detok(&[], true);
        assert_eq!(d.push(byte(0xF0)).text, "");
        assert_eq!(d.push(byte(0x9F)).text, "");
        assert_eq!(d.push(byte(0xA6)).text, "");
        assert_eq!(d.push(byte(0xAB)).text, "🦫");
        assert_eq!(d.finish(), TextDelta::default());
    }

    #[test]
    fn unfinished_or_invalid_bytes_become_replacement_characters_like_decode() {
        let mut d = detok(&[], true);
        assert_eq!(d.push(byte(0xE4)).text, "");
        assert_eq!(d.push(byte(0xB8)).text, "");
        assert_eq!(d.push(byte(0xFF)).text, "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(d.push(byte(0xE4)).text, "");
        assert_eq!(d.finish().text, "\u{FFFD}");
    }

    #[test]
    fn stop_string_split_across_tokens_is_not_emitted() {
        let text = "let x = 1;\n// END\nlet y = 2;";
        let ids = tok().encode(text).unwrap();
        let mut d = detok(&["// END"], true);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), "let x = 1;\n");
        assert_eq!(stop, Some(0));
        assert_eq!(d.stopped(), Some(0));
        assert!(ids.len() > 3, "the stop spans several tokens: {ids:?}");
    }

    #[test]
    fn stop_at_the_very_start_emits_nothing() {
        let ids = tok().encode("\n\nclass A: pass").unwrap();
        let (deltas, stop) = stream(&mut detok(&["\n\n"], true), &ids);
        assert_eq!(deltas, Vec::<String>::new());
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn nothing_is_emitted_after_a_stop() {
        let mut d = detok(&["b"], true);
        let ids = tok().encode("a b c d").unwrap();
        let (deltas, _) = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), "a ");
        assert_eq!(d.push(ids[0]), TextDelta::default());
    }

    #[test]
    fn held_back_stop_prefix_is_released_when_the_stop_does_not_follow() {
        let mut d = detok(&["```\n"], true);
        let mut out = String::new();
        for id in tok().encode("x ```").unwrap() {
            out.push_str(&d.push(id).text);
        }
        assert_eq!(out, "x ", "the possible start of the stop is held back");
        for id in tok().encode("y").unwrap() {
            out.push_str(&d.push(id).text);
        }
        out.push_str(&d.finish().text);
        assert_eq!(out, "x ``` y");
        assert_eq!(d.stopped(), None);
    }

    #[test]
    fn stop_that_ends_first_wins_and_is_reported_by_index() {
        let ids = tok().encode("alpha beta gamma").unwrap();
        let (deltas, stop) = stream(&mut detok(&["gamma", "a b", "beta"], true), &ids);
        assert_eq!(deltas.concat(), "alph");
        assert_eq!(stop, Some(1));
        let (deltas, stop) = stream(&mut detok(&["ta", "beta"], true), &ids);
        assert_eq!(deltas.concat(), "alpha ");
        assert_eq!(stop, Some(1), "same end: the longer stop wins");
    }

    #[test]
    fn stop_made_of_byte_fallback_characters_matches() {
        let text = "ok 𠀀 done";
        let ids = tok().encode(text).unwrap();
        let (deltas, stop) = stream(&mut detok(&["𠀀"], true), &ids);
        assert_eq!(deltas.concat(), "ok ");
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let ids = tok().encode("abc").unwrap();
        let (deltas, stop) = stream(&mut detok(&["", "c"], true), &ids);
        assert_eq!(deltas.concat(), "ab");
        assert_eq!(stop, Some(1));
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "a", "b", "ab", " ", "  ", "\n", "\t", "\r\n", "::", "fn", "é", "中", "𠀀", "🦀", "👍🏽",
            "[INST]", "▁", "0", "12",
        ]);
        prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn any_text_streams_to_its_decode(text in text_strategy(), strip in any::<bool>()) {
            let ids = tok().encode(&text).unwrap();
            let (deltas, stop) = stream(&mut detok(&[], strip), &ids);
            let full = tok().decode(&ids);
            // Without stripping, the dummy-prefix `▁` every encoding starts with stays.
            let want = if strip || text.is_empty() { full } else { format!(" {full}") };
            prop_assert_eq!(deltas.concat(), want);
            prop_assert_eq!(stop, None);
        }

        #[test]
        fn stops_cut_the_decode_before_the_first_match_and_never_leak(
            text in text_strategy(),
            stops in prop::collection::vec(text_strategy(), 1..4),
        ) {
            let stops: Vec<String> = stops.into_iter().map(|s| s.chars().take(3).collect()).collect();
            let refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let ids = tok().encode(&text).unwrap();
            let full = tok().decode(&ids);
            let (deltas, stop) = stream(&mut detok(&refs, true), &ids);
            let streamed = deltas.concat();
            match first_stop(&full, &stops) {
                Some((start, index)) => {
                    prop_assert_eq!(&streamed, &full[..start]);
                    prop_assert_eq!(stop, Some(index));
                }
                None => {
                    prop_assert_eq!(&streamed, &full);
                    prop_assert_eq!(stop, None);
                }
            }
            for s in stops.iter().filter(|s| !s.is_empty()) {
                prop_assert!(!streamed.contains(s.as_str()), "{:?} leaked in {:?}", s, streamed);
            }
        }
    }
}
