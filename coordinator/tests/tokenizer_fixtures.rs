//! Token-exactness against `mistral_common` 1.13: the fixtures in
//! `fixtures/tokenizer_fixtures.json` were written by `scripts/tokenizer/make_fixtures.py`
//! from `mistral_common` itself (FIM and chat v3 request encoding, raw encode, decode).
//! No Python runs here.

use coordinator::detok::{Detokenizer, DetokenizerConfig};
use coordinator::prompt::{encode_chat, encode_fim, ChatMessage, PromptError};
use coordinator::tokenizer::Tokenizer;
use serde::Deserialize;
use std::sync::OnceLock;

#[derive(Deserialize)]
struct Fixtures {
    mistral_common: String,
    encode: Vec<EncodeCase>,
    fim: Vec<FimCase>,
    chat: Vec<ChatCase>,
    decode: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct FimCase {
    name: String,
    prefix: String,
    suffix: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    messages: Vec<ChatMessage>,
    ids: Option<Vec<u32>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct DecodeCase {
    name: String,
    ids: Vec<u32>,
    text: String,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        serde_json::from_str(include_str!("fixtures/tokenizer_fixtures.json"))
            .expect("fixtures parse")
    })
}

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::codestral().expect("embedded tokenizer loads"))
}

/// Fails with every mismatching case named, not just the first.
fn assert_no_failures(what: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} {what} case(s) differ from mistral_common:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_come_from_mistral_common_1_13_and_cover_every_section() {
    let f = fixtures();
    assert!(f.mistral_common.starts_with("1.13"), "{}", f.mistral_common);
    assert!(f.encode.len() >= 40, "encode cases: {}", f.encode.len());
    assert!(f.fim.len() >= 80, "fim cases: {}", f.fim.len());
    assert!(f.chat.len() >= 20, "chat cases: {}", f.chat.len());
    assert!(f.decode.len() >= 30, "decode cases: {}", f.decode.len());
    assert!(f.chat.iter().any(|c| c.error.is_some()));
}

#[test]
fn architecture_fim_example_is_token_exact() {
    let ids = encode_fim(tok(), "def add(a, b):\n    ", "\n\nprint(add(1,2))").unwrap();
    assert_eq!(
        ids,
        [
            1, 13, 781, 781, 2799, 29500, 1756, 29500, 29508, 29493, 29518, 1511, 11, 1569, 1735,
            29500, 29476, 29493, 1055, 2097, 781, 1028
        ]
    );
}

#[test]
fn raw_encode_is_token_exact() {
    let failures = fixtures()
        .encode
        .iter()
        .filter_map(|c| {
            let got = tok().encode(&c.text).unwrap();
            (got != c.ids).then(|| format!("{}: want {:?}\n  got {:?}", c.name, c.ids, got))
        })
        .collect();
    assert_no_failures("encode", failures);
}

#[test]
fn fim_prompts_are_token_exact() {
    let failures = fixtures()
        .fim
        .iter()
        .filter_map(|c| {
            let got = encode_fim(tok(), &c.prefix, &c.suffix).unwrap();
            (got != c.ids).then(|| format!("{}: want {:?}\n  got {:?}", c.name, c.ids, got))
        })
        .collect();
    assert_no_failures("fim", failures);
}

/// `mistral_common`'s exception class for each of our rejection variants.
fn mistral_common_exception(err: &PromptError) -> &'static str {
    match err {
        PromptError::EmptyConversation
        | PromptError::SingleMessageRole { .. }
        | PromptError::LastMessageRole
        | PromptError::RoleOrder { .. } => "InvalidMessageStructureException",
        PromptError::EmptyAssistant { .. } | PromptError::PrefixNotLast { .. } => {
            "InvalidAssistantMessageException"
        }
        _ => "not a mistral_common rejection",
    }
}

#[test]
fn chat_prompts_are_token_exact_and_rejected_where_mistral_common_rejects() {
    let failures = fixtures()
        .chat
        .iter()
        .filter_map(
            |c| match (encode_chat(tok(), &c.messages), &c.ids, &c.error) {
                (Ok(got), Some(want), None) if &got == want => None,
                (Err(err), None, Some(class))
                    if err.is_client_error() && mistral_common_exception(&err) == class =>
                {
                    None
                }
                (got, want, class) => Some(format!(
                    "{}: want {want:?} / {class:?}\n  got {got:?}",
                    c.name
                )),
            },
        )
        .collect();
    assert_no_failures("chat", failures);
}

#[test]
fn decode_matches_mistral_common() {
    let f = fixtures();
    let cases = f
        .encode
        .iter()
        .map(|c| (&c.name, &c.ids, &c.decoded))
        .chain(f.decode.iter().map(|c| (&c.name, &c.ids, &c.text)));
    let failures = cases
        .filter_map(|(name, ids, want)| {
            let got = tok().decode(ids);
            (&got != want).then(|| format!("{name}: want {want:?}\n  got {got:?}"))
        })
        .collect();
    assert_no_failures("decode", failures);
}

#[test]
fn streamed_detokenization_reproduces_every_fixture_decode() {
    let f = fixtures();
    let cases = f
        .encode
        .iter()
        .map(|c| (&c.name, &c.ids, &c.decoded))
        .chain(f.decode.iter().map(|c| (&c.name, &c.ids, &c.text)));
    let failures = cases
        .filter_map(|(name, ids, want)| {
            let mut d = Detokenizer::new(
                tok().clone(),
                DetokenizerConfig {
                    strip_leading_space: true,
                    ..DetokenizerConfig::default()
                },
            );
            let mut got: String = ids.iter().map(|&id| d.push(id).text).collect();
            got.push_str(&d.finish().text);
            (&got != want).then(|| format!("{name}: want {want:?}\n  got {got:?}"))
        })
        .collect();
    assert_no_failures("streamed decode", failures);
}
