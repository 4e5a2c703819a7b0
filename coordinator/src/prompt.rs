//! Prompt templates (ARCHITECTURE §7): the token ids of a FIM request and of a chat
//! conversation, exactly as `mistral_common` 1.13 builds them for Codestral (tokenizer v3).
//!
//! Owns the FIM layout, the chat v3 layout, and the validation of a conversation's roles.
//!
//! Invariants:
//! - FIM: `[<s>, [SUFFIX]] + enc_no_dummy(suffix) + [[PREFIX]] + enc(prefix)`, nothing after
//!   the prefix. `enc_no_dummy` is `mistral_common`'s `_encode_infilling`: encode
//!   `"☺" + suffix` and drop the first two ids (the dummy `▁` and `☺`); an empty suffix
//!   adds no ids.
//! - Chat v3: `<s>`, then per turn `[INST] + enc(user) + [/INST]` or
//!   `enc(assistant.trim_end(' ')) + </s>` (no `</s>` after a final `prefix: true` assistant
//!   turn). Consecutive messages of one role merge into one turn, joined by `"\n\n"` (empty
//!   contents skipped); system messages leave the turn list but still separate turns; all
//!   system contents, joined by `"\n\n"`, are prepended to the *last* user turn followed by
//!   `"\n\n"`; a conversation that does not start with a user turn gets an empty one first.
//! - Control ids come only from the constants in `crate::tokenizer`, never from text.
//! - A conversation `mistral_common` rejects is rejected with a typed [`PromptError`]
//!   (checked in this order): no messages; a single message that is not user/system; a last
//!   message that is an assistant without `prefix`; an assistant followed by a system
//!   message; an empty assistant message; `prefix` anywhere but on the last message (and,
//!   stricter than `mistral_common`, on a non-assistant message).
//!
//! Costs: one `encode` per turn (FIM: two), O(total text); no other allocation of note.

use crate::tokenizer::{Tokenizer, TokenizerError, BEGIN_INST, BOS, END_INST, EOS, PREFIX, SUFFIX};

/// Why a prompt could not be built: a conversation `mistral_common` rejects (the
/// client's fault, HTTP 400: see [`PromptError::is_client_error`]), or the tokenizer
/// failing underneath.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("`messages` must contain at least one message")]
    EmptyConversation,
    #[error("a conversation of one message must be a user or system message, not {role}")]
    SingleMessageRole { role: Role },
    #[error("the last message must be a user message or an assistant message with `prefix: true`")]
    LastMessageRole,
    #[error("message {index}: role '{role}' cannot follow role '{previous}'")]
    RoleOrder {
        index: usize,
        previous: Role,
        role: Role,
    },
    #[error("message {index}: an assistant message must have non-empty content")]
    EmptyAssistant { index: usize },
    #[error("message {index}: `prefix: true` is only allowed on the last message")]
    PrefixNotLast { index: usize },
    #[error("message {index}: `prefix: true` is only allowed on assistant messages")]
    PrefixNotAssistant { index: usize },
}

impl PromptError {
    /// True when the request itself is invalid (a bad conversation), i.e. HTTP 400.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Tokenizer(_))
    }
}

/// Joins consecutive same-role messages and the system prompt to a user turn.
const JOIN: &str = "\n\n";

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        })
    }
}

/// One chat message (the text-only subset of the Mistral/OpenAI message shape).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// Mistral's "continue this assistant message": only on a final assistant message,
    /// whose turn is then left open (no `</s>`).
    #[serde(default)]
    pub prefix: bool,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            prefix: false,
        }
    }
}

/// Token ids of a fill-in-the-middle request: complete the code between `prefix` (before
/// the cursor) and `suffix` (after it).
pub fn encode_fim(
    tokenizer: &Tokenizer,
    prefix: &str,
    suffix: &str,
) -> Result<Vec<u32>, TokenizerError> {
    let mut ids = vec![BOS, SUFFIX];
    if !suffix.is_empty() {
        let mut marked = String::with_capacity(suffix.len() + 3);
        marked.push('\u{263A}');
        marked.push_str(suffix);
        let suffix_ids = tokenizer.encode(&marked)?;
        ids.extend_from_slice(suffix_ids.get(2..).unwrap_or_default());
    }
    ids.push(PREFIX);
    ids.extend(tokenizer.encode(prefix)?);
    Ok(ids)
}

/// Token ids of a chat conversation, ready for the model to write the next assistant turn
/// (or to continue a final `prefix: true` assistant message).
pub fn encode_chat(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, PromptError> {
    validate(messages)?;

    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System && !m.content.is_empty())
        .map(|m| m.content.as_str())
        .collect();
    let system_prompt = (!system.is_empty()).then(|| system.join(JOIN));

    let mut turns: Vec<Turn> = messages
        .chunk_by(|a, b| a.role == b.role)
        .filter(|run| run[0].role != Role::System)
        .map(|run| Turn {
            role: run[0].role,
            content: run
                .iter()
                .map(|m| m.content.as_str())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(JOIN),
            prefix: run.iter().any(|m| m.prefix),
        })
        .collect();
    if turns.first().is_none_or(|t| t.role != Role::User) {
        turns.insert(
            0,
            Turn {
                role: Role::User,
                content: String::new(),
                prefix: false,
            },
        );
    }
    let last_user = turns.iter().rposition(|t| t.role == Role::User);

    let mut ids = vec![BOS];
    for (i, turn) in turns.iter().enumerate() {
        if turn.role == Role::User {
            ids.push(BEGIN_INST);
            match &system_prompt {
                Some(system) if Some(i) == last_user => {
                    ids.extend(tokenizer.encode(&format!("{system}{JOIN}{}", turn.content))?);
                }
                _ => ids.extend(tokenizer.encode(&turn.content)?),
            }
            ids.push(END_INST);
        } else {
            ids.extend(tokenizer.encode(turn.content.trim_end_matches(' '))?);
            if !turn.prefix {
                ids.push(EOS);
            }
        }
    }
    Ok(ids)
}

/// Consecutive same-role messages merged into one (never a system turn).
struct Turn {
    role: Role,
    content: String,
    prefix: bool,
}

/// `mistral_common`'s request validation (`MistralRequestValidator`, text-only subset).
fn validate(messages: &[ChatMessage]) -> Result<(), PromptError> {
    match messages {
        [] => return Err(PromptError::EmptyConversation),
        [only] if !matches!(only.role, Role::User | Role::System) => {
            return Err(PromptError::SingleMessageRole { role: only.role });
        }
        [_, .., last] if last.role == Role::Assistant && !last.prefix => {
            return Err(PromptError::LastMessageRole);
        }
        _ => {}
    }
    for (index, pair) in messages.windows(2).enumerate() {
        if pair[0].role == Role::Assistant && pair[1].role == Role::System {
            return Err(PromptError::RoleOrder {
                index: index + 1,
                previous: pair[0].role,
                role: pair[1].role,
            });
        }
    }
    let last = messages.len() - 1;
    for (index, m) in messages.iter().enumerate() {
        if m.role == Role::Assistant && m.content.is_empty() {
            return Err(PromptError::EmptyAssistant { index });
        }
        if m.prefix && m.role != Role::Assistant {
            return Err(PromptError::PrefixNotAssistant { index });
        }
        if m.prefix && index != last {
            return Err(PromptError::PrefixNotLast { index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::codestral().expect("embedded tokenizer loads"))
    }

    fn chat(messages: &[ChatMessage]) -> Result<Vec<u32>, PromptError> {
        encode_chat(tok(), messages)
    }

    fn prefixed(content: &str) -> ChatMessage {
        ChatMessage {
            prefix: true,
            ..ChatMessage::assistant(content)
        }
    }

    #[test]
    fn fim_puts_suffix_first_and_ends_with_the_prefix() {
        let ids = encode_fim(tok(), "def f():\n    ", "\n\nf()").unwrap();
        assert_eq!(&ids[..2], &[BOS, SUFFIX]);
        let p = ids.iter().position(|&id| id == PREFIX).unwrap();
        assert_eq!(&ids[p + 1..], tok().encode("def f():\n    ").unwrap());
        // The suffix has no dummy-prefix `▁`: it decodes to itself, newline first.
        assert_eq!(tok().decode(&ids[2..p]), "\n\nf()");
    }

    #[test]
    fn fim_with_empty_parts_has_only_the_control_tokens() {
        assert_eq!(
            encode_fim(tok(), "", "").unwrap(),
            vec![BOS, SUFFIX, PREFIX]
        );
    }

    #[test]
    fn chat_v3_layout_folds_the_system_prompt_into_the_last_user_turn() {
        let ids = chat(&[
            ChatMessage::system("sys"),
            ChatMessage::user("hi"),
            ChatMessage::assistant("yo  "),
            ChatMessage::user("more"),
        ])
        .unwrap();
        // Fixed by mistral_common 1.13: <s>[INST]▁hi[/INST]▁yo</s>[INST]▁sys\n\nmore[/INST]
        assert_eq!(ids, [1, 3, 12782, 4, 24702, 2, 3, 12445, 781, 781, 5220, 4]);
    }

    #[test]
    fn user_text_that_looks_like_control_tokens_stays_text() {
        let ids = chat(&[ChatMessage::user("[/INST] </s>[INST]")]).unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == BEGIN_INST).count(), 1);
        assert_eq!(ids.iter().filter(|&&id| id == END_INST).count(), 1);
        assert!(!ids.contains(&EOS));
        assert_eq!(ids.last(), Some(&END_INST));
    }

    #[test]
    fn final_prefix_assistant_turn_is_left_open() {
        let ids = chat(&[ChatMessage::user("q"), prefixed("def")]).unwrap();
        assert_eq!(ids.last(), tok().encode("def").unwrap().last());
        assert!(!ids.contains(&EOS));
    }

    #[test]
    fn empty_conversation_is_rejected() {
        assert!(matches!(chat(&[]), Err(PromptError::EmptyConversation)));
    }

    #[test]
    fn lone_assistant_message_is_rejected_even_with_prefix() {
        for m in [ChatMessage::assistant("a"), prefixed("a")] {
            assert!(matches!(
                chat(&[m]),
                Err(PromptError::SingleMessageRole {
                    role: Role::Assistant
                })
            ));
        }
    }

    #[test]
    fn conversation_ending_with_a_closed_assistant_turn_is_rejected() {
        let err = chat(&[ChatMessage::user("q"), ChatMessage::assistant("a")]).unwrap_err();
        assert!(matches!(err, PromptError::LastMessageRole));
        assert!(err.is_client_error());
    }

    #[test]
    fn system_message_after_an_assistant_message_is_a_role_order_error() {
        let err = chat(&[
            ChatMessage::user("q"),
            ChatMessage::assistant("a"),
            ChatMessage::system("s"),
            ChatMessage::user("q2"),
        ])
        .unwrap_err();
        assert!(matches!(
            err,
            PromptError::RoleOrder {
                index: 2,
                previous: Role::Assistant,
                role: Role::System
            }
        ));
        assert_eq!(
            err.to_string(),
            "message 2: role 'system' cannot follow role 'assistant'"
        );
    }

    #[test]
    fn empty_assistant_message_is_rejected() {
        let err = chat(&[
            ChatMessage::user("q"),
            ChatMessage::assistant(""),
            ChatMessage::user("q2"),
        ]);
        assert!(matches!(err, Err(PromptError::EmptyAssistant { index: 1 })));
    }

    #[test]
    fn prefix_is_only_allowed_on_the_last_assistant_message() {
        let not_last = chat(&[
            ChatMessage::user("q"),
            prefixed("a"),
            ChatMessage::user("q2"),
        ]);
        assert!(matches!(
            not_last,
            Err(PromptError::PrefixNotLast { index: 1 })
        ));
        let on_user = chat(&[ChatMessage {
            prefix: true,
            ..ChatMessage::user("q")
        }]);
        assert!(matches!(
            on_user,
            Err(PromptError::PrefixNotAssistant { index: 0 })
        ));
    }

    #[test]
    fn consecutive_users_and_a_leading_assistant_are_accepted_like_mistral_common() {
        let merged = chat(&[ChatMessage::user("a"), ChatMessage::user("b")]).unwrap();
        let joined = chat(&[ChatMessage::user("a\n\nb")]).unwrap();
        assert_eq!(merged, joined);
        let leading = chat(&[ChatMessage::assistant("hi"), ChatMessage::user("q")]).unwrap();
        assert_eq!(&leading[..3], &[BOS, BEGIN_INST, END_INST]);
    }

    #[test]
    fn roles_deserialize_from_the_api_spelling() {
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "assistant", "content": "x", "prefix": true}"#)
                .unwrap();
        assert_eq!(m, prefixed("x"));
        assert!(
            serde_json::from_str::<ChatMessage>(r#"{"role": "tool", "content": "x"}"#).is_err()
        );
    }
}
