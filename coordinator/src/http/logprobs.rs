//! Logprobs in OpenAI's two shapes: chat `logprobs.content[]` and the legacy completions
//! object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
//!
//! Owns how one generated token and its alternatives are rendered for a client. Token
//! texts come from the sequence's [`Detokenizer`] *before* the token is pushed
//! ([`Detokenizer::token_text`]), so a token keeps the space a single-id decode would strip,
//! a byte-fallback character is carried by the token that completes it, and the texts of
//! a response's tokens concatenate to its text (before a stop string cuts it). A logprob
//! the worker did not compute (the sim backend has no logits) is `null`, never `0.0`.

use serde_json::{json, Map, Value};

use crate::detok::{Detokenizer, TokenText};
use crate::engine::TokenEvent;

/// One generated token as a client sees it in logprobs.
#[derive(Debug, Clone)]
pub(super) struct LoggedToken {
    token: TokenText,
    logprob: Option<f32>,
    top: Vec<(TokenText, f32)>,
}

impl LoggedToken {
    /// Renders `event` against `detok`'s state before `event` is pushed to it.
    pub(super) fn new(detok: &Detokenizer, event: &TokenEvent) -> Self {
        Self {
            token: detok.token_text(event.id),
            logprob: event.logprob,
            top: event
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (detok.token_text(id), lp))
                .collect(),
        }
    }

    /// OpenAI chat `logprobs.content[]` entry.
    pub(super) fn chat_entry(&self) -> Value {
        let top: Vec<Value> = self
            .top
            .iter()
            .map(|(t, lp)| json!({"token": t.text, "logprob": lp, "bytes": t.bytes}))
            .collect();
        json!({"token": self.token.text, "logprob": self.logprob, "bytes": self.token.bytes, "top_logprobs": top})
    }
}

/// OpenAI chat `logprobs` object for `tokens`.
pub(super) fn chat(tokens: &[LoggedToken]) -> Value {
    json!({"content": tokens.iter().map(LoggedToken::chat_entry).collect::<Vec<_>>()})
}

/// OpenAI legacy `logprobs` object for `tokens`. `offset` is the response text's length in
/// characters before the first of them (Unicode scalar values, so `text[offset:]` indexes
/// a Python string); it is advanced past them, which keeps streamed chunks' offsets running.
pub(super) fn legacy(tokens: &[LoggedToken], offset: &mut usize) -> Value {
    let (mut texts, mut lps, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        offsets.push(*offset);
        *offset += t.token.text.chars().count();
        texts.push(t.token.text.clone());
        lps.push(t.logprob);
        // A dict keyed by text: two alternatives that render alike (e.g. byte pieces
        // still waiting for their character) keep the more likely one's logprob.
        let mut top = Map::new();
        for (alt, lp) in &t.top {
            top.entry(alt.text.clone()).or_insert(json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
