//! The Codestral v3 tokenizer (ARCHITECTURE §7): text ⇄ token ids, token-exact with the
//! SentencePiece model `mistral_common` 1.13 ships (`mistral_instruct_tokenizer_240323.model.v3`).
//!
//! Owns the embedded `assets/tokenizer.json` (made by `scripts/tokenizer/convert_tokenizer.py`,
//! provenance in `assets/TOKENIZER_LICENSE.md`), the control-token ids, the per-id decode
//! table, and [`TokenizerError`], the error type of the tokenizer, prompt and detokenizer
//! modules.
//!
//! Invariants:
//! - [`Tokenizer::encode`] is SentencePiece's `encode`: `[]` for `""`, otherwise BPE (with
//!   byte fallback) over `"▁" + text` with every space as `▁`. The dummy `▁` is added here,
//!   not by the JSON: `tokenizers` normalizes per segment and skips inputs that already start
//!   with `▁`, SentencePiece adds exactly one `▁` to the whole input.
//! - `encode` never yields a control id. Control tokens enter a prompt by id only
//!   (`crate::prompt`); a user typing `"[INST]"` gets the text `[INST]`. (The 20
//!   user-defined `[REFERENCE_DOC_n]` pieces *are* matched in text, as SentencePiece does.)
//! - [`Tokenizer::decode`] is SentencePiece's `decode`: control ids render as nothing, the
//!   first non-control piece loses one leading `▁`, `▁` renders as a space, a run of byte
//!   pieces `<0xNN>` is decoded as UTF-8 with one U+FFFD per invalid byte, `<unk>` renders
//!   as `" ⁇ "`.
//!
//! Costs: loading parses ~2 MB of JSON and builds 58,980 merges, ~0.2 s in a dev build, once
//! per process (`clone` is an `Arc` bump). `encode` runs one BPE pass over the whole text,
//! O(n log n) in its length (43k tokens of Rust source took 64 ms in a dev build); `decode`
//! is a table lookup per id, O(output bytes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `<unk>`: never produced by `encode` (byte fallback covers every character).
pub const UNK: u32 = 0;
/// `<s>`, beginning of every prompt.
pub const BOS: u32 = 1;
/// `</s>`, end of an assistant turn; the model's end-of-sequence token.
pub const EOS: u32 = 2;
/// `[INST]`, opens a user turn in chat prompts.
pub const BEGIN_INST: u32 = 3;
/// `[/INST]`, closes a user turn in chat prompts.
pub const END_INST: u32 = 4;
/// `[PREFIX]`, precedes the code before the cursor in FIM prompts.
pub const PREFIX: u32 = 11;
/// `[MIDDLE]`, part of the FIM vocabulary; Codestral's FIM prompt does not use it.
pub const MIDDLE: u32 = 12;
/// `[SUFFIX]`, precedes the code after the cursor in FIM prompts.
pub const SUFFIX: u32 = 13;

/// The control pieces this crate relies on, checked at load time.
const CONTROL_PIECES: [(u32, &str); 8] = [
    (UNK, "<unk>"),
    (BOS, "<s>"),
    (EOS, "</s>"),
    (BEGIN_INST, "[INST]"),
    (END_INST, "[/INST]"),
    (PREFIX, "[PREFIX]"),
    (MIDDLE, "[MIDDLE]"),
    (SUFFIX, "[SUFFIX]"),
];

/// SentencePiece's whitespace symbol U+2581.
const METASPACE: char = '\u{2581}';
/// What SentencePiece's `decode` renders for `<unk>` (`trainer_spec.unk_surface`).
const UNK_SURFACE: &str = " \u{2047} ";

static CODESTRAL_JSON: &[u8] = include_bytes!("../assets/tokenizer.json");

/// Everything that can go wrong loading the tokenizer and turning text into tokens.
///
/// None of these is the client's fault: `Read`, `Load` and `ControlToken` happen at
/// startup; `Encode` is internal. (A conversation the chat template rejects is a
/// `crate::prompt::PromptError`.)
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid tokenizer.json: {0}")]
    Load(String),
    #[error("tokenizer.json maps control id {id} to {found:?}, expected {expected:?} (special)")]
    ControlToken {
        id: u32,
        expected: &'static str,
        found: Option<String>,
    },
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// How one id renders in SentencePiece's `decode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A control token (`<s>`, `[INST]`, ...): renders as nothing.
    Control,
    /// `<unk>` (or an id outside the vocabulary): renders as `" ⁇ "`.
    Unknown,
    /// A byte-fallback piece `<0xNN>`.
    Byte(u8),
    /// Any other piece, with `▁` already replaced by `' '`.
    Text(Box<str>),
}

/// SentencePiece's `decode`, fed one piece at a time.
///
/// Byte pieces wait in `bytes` until they form a complete UTF-8 character, or turn out
/// not to (then one U+FFFD per invalid byte); at most 3 bytes ever wait.
#[derive(Debug, Clone)]
pub(crate) struct PieceDecoder {
    bytes: Vec<u8>,
    strip_next_space: bool,
}

impl PieceDecoder {
    /// `strip_leading_space`: drop the leading `▁` of the first non-control piece, as
    /// SentencePiece's `decode` does (true), or keep it because the text continues a prompt.
    pub(crate) fn new(strip_leading_space: bool) -> Self {
        Self {
            bytes: Vec::with_capacity(4),
            strip_next_space: strip_leading_space,
        }
    }

    /// Appends the text of `piece` that is complete so far to `out`.
    pub(crate) fn push(&mut self, piece: &Piece, out: &mut String) {
        match piece {
            Piece::Control => {}
            Piece::Byte(b) => {
                self.strip_next_space = false;
                self.bytes.push(*b);
                self.drain_bytes(out, false);
            }
            Piece::Unknown => {
                self.finish(out);
                self.strip_next_space = false;
                out.push_str(UNK_SURFACE);
            }
            Piece::Text(text) => {
                self.finish(out);
                let text = if std::mem::take(&mut self.strip_next_space) {
                    text.strip_prefix(' ').unwrap_or(text)
                } else {
                    text
                };
                out.push_str(text);
            }
        }
    }

    /// Ends a run of byte pieces: incomplete bytes become U+FFFD, one per byte.
    pub(crate) fn finish(&mut self, out: &mut String) {
        self.drain_bytes(out, true);
    }

    fn drain_bytes(&mut self, out: &mut String, end_of_run: bool) {
        let mut rest = self.bytes.as_slice();
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    rest = &[];
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    if err.error_len().is_none() && !end_of_run {
                        rest = after;
                        break;
                    }
                    out.push(char::REPLACEMENT_CHARACTER);
                    rest = &after[1..];
                }
            }
        }
        let keep = rest.len();
        self.bytes.drain(..self.bytes.len() - keep);
    }
}

struct Inner {
    bpe: tokenizers::Tokenizer,
    pieces: Vec<Piece>,
}

/// The Codestral v3 tokenizer. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// The embedded Codestral v3 tokenizer (`coordinator/assets/tokenizer.json`).
    pub fn codestral() -> Result<Self, TokenizerError> {
        Self::from_json_bytes(CODESTRAL_JSON)
    }

    /// A tokenizer.json written by `scripts/tokenizer/convert_tokenizer.py`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_bytes(&bytes)
    }

    fn from_json_bytes(json: &[u8]) -> Result<Self, TokenizerError> {
        let mut bpe = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        // Control-token text in user input stays text (SentencePiece never matches it).
        bpe.set_encode_special_tokens(true);
        let added = bpe.get_added_tokens_decoder();
        for (id, expected) in CONTROL_PIECES {
            let found = bpe.id_to_token(id);
            let special = added.get(&id).is_some_and(|t| t.special);
            if found.as_deref() != Some(expected) || !special {
                return Err(TokenizerError::ControlToken {
                    id,
                    expected,
                    found,
                });
            }
        }
        let vocab_size = u32::try_from(bpe.get_vocab_size(true))
            .map_err(|_| TokenizerError::Load("vocabulary larger than u32".into()))?;
        let pieces = (0..vocab_size)
            .map(|id| match bpe.id_to_token(id) {
                None => Piece::Unknown,
                Some(_) if id == UNK => Piece::Unknown,
                Some(_) if added.get(&id).is_some_and(|t| t.special) => Piece::Control,
                Some(token) => byte_piece(&token)
                    .map(Piece::Byte)
                    .unwrap_or_else(|| Piece::Text(token.replace(METASPACE, " ").into())),
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner { bpe, pieces }),
        })
    }

    /// Number of token ids (32768 for Codestral).
    pub fn vocab_size(&self) -> usize {
        self.inner.pieces.len()
    }

    /// SentencePiece `encode(text)`: no BOS/EOS, never a control id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = String::with_capacity(text.len() + 1);
        input.push(' ');
        input.push_str(text);
        let encoding = self
            .inner
            .bpe
            .encode_fast(input.as_str(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// SentencePiece `decode(ids)` (what `mistral_common`'s `decode` returns).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut decoder = PieceDecoder::new(true);
        for &id in ids {
            decoder.push(self.piece(id), &mut out);
        }
        decoder.finish(&mut out);
        out
    }

    /// How `id` renders; ids outside the vocabulary render like `<unk>`.
    pub(crate) fn piece(&self, id: u32) -> &Piece {
        static OUT_OF_VOCAB: Piece = Piece::Unknown;
        self.inner.pieces.get(id as usize).unwrap_or(&OUT_OF_VOCAB)
    }
}

/// `"<0x0A>"` -> `Some(0x0A)`: the byte-fallback pieces, named as `tokenizers`' BPE names them.
fn byte_piece(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::codestral().expect("embedded tokenizer loads"))
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn embedded_tokenizer_has_the_codestral_vocabulary_and_control_ids() {
        assert_eq!(tok().vocab_size(), 32768);
        for (id, _) in CONTROL_PIECES.iter().skip(1) {
            assert_eq!(tok().piece(*id), &Piece::Control, "id {id}");
        }
        assert_eq!(tok().piece(UNK), &Piece::Unknown);
        assert_eq!(tok().piece(771 + 0x0A), &Piece::Byte(0x0A));
        assert_eq!(tok().piece(40_000), &Piece::Unknown);
    }

    #[test]
    fn empty_text_encodes_to_no_tokens_and_space_to_the_dummy_prefix_piece() {
        assert_eq!(tok().encode("").unwrap(), Vec::<u32>::new());
        let space = tok().encode(" ").unwrap();
        assert_eq!(space.len(), 1);
        assert_eq!(tok().decode(&space), " ");
    }

    #[test]
    fn control_token_text_in_user_input_stays_text() {
        for text in [
            "[INST]",
            "</s>",
            "<s>[INST] hi [/INST]",
            "[SUFFIX]x[PREFIX]",
            "<unk>",
        ] {
            let ids = tok().encode(text).unwrap();
            assert!(
                ids.iter().all(|&id| tok().piece(id) != &Piece::Control),
                "{text:?} -> {ids:?}"
            );
            assert_eq!(tok().decode(&ids), text);
        }
    }

    #[test]
    fn decode_renders_controls_as_nothing_and_strips_one_leading_space() {
        let ids = tok().encode("  x").unwrap();
        let mut with_controls = vec![BOS, BEGIN_INST];
        with_controls.extend(&ids);
        with_controls.push(EOS);
        assert_eq!(tok().decode(&with_controls), "  x");
        assert_eq!(tok().decode(&[BOS, EOS]), "");
    }

    #[test]
    fn byte_runs_decode_with_one_replacement_char_per_invalid_byte() {
        let b = |x: u8| 771 + u32::from(x);
        assert_eq!(tok().decode(&[b(0xE4), b(0xB8), b(0xAD)]), "中");
        assert_eq!(tok().decode(&[b(0xE4), b(0xB8)]), "\u{FFFD}\u{FFFD}");
        assert_eq!(
            tok().decode(&[b(0xE4), b(0xB8), b(0xAD), b(0xFF), b(0x41)]),
            "中\u{FFFD}A"
        );
    }

    #[test]
    fn from_file_loads_the_same_tokenizer_and_bad_files_are_typed_errors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer.json");
        let from_file = Tokenizer::from_file(&path).unwrap();
        let text = "fn main() { println!(\"🦀\"); }";
        assert_eq!(from_file.encode(text).unwrap(), tok().encode(text).unwrap());
        assert!(matches!(
            Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")),
            Err(TokenizerError::Read { .. })
        ));
        assert!(matches!(
            Tokenizer::from_json_bytes(b"{\"not\": \"a tokenizer\"}"),
            Err(TokenizerError::Load(_))
        ));
    }

    #[test]
    fn a_tokenizer_without_the_control_pieces_is_rejected() {
        let json = r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,
            "post_processor":null,"decoder":null,"truncation":null,"padding":null,
            "model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}}"#;
        let err = Tokenizer::from_json_bytes(json.as_bytes()).unwrap_err();
        assert!(
            matches!(err, TokenizerError::ControlToken { id: 0, .. }),
            "{err}"
        );
        assert!(!crate::prompt::PromptError::from(err).is_client_error());
    }
}
