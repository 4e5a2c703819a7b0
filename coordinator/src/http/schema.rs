//! Request bodies of the HTTP API (Mistral FIM/chat, OpenAI chat/legacy completions)
//! and their validation into one [`Generation`] the handlers run.
//!
//! Invariant: every field is checked here, with a 400 naming the parameter; nothing
//! downstream re-validates user input. Unknown fields are ignored, as the hosted APIs do.

use serde::Deserialize;

use crate::engine::{Priority, SamplingParams};
use crate::error::AppError;
use crate::prompt::{ChatMessage, Role};

/// Most stop strings a request may give, and their longest length in characters (the
/// stop matcher is O(len²) per token).
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;

/// `stop`: a string or an array of strings.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling fields shared by every generation endpoint.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct SamplingFields {
    /// Parsed as f64 so the range checks see the number the client sent (an f32 would
    /// round 2.0000000000000004 down to 2 and 5e-324 down to 0).
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub min_tokens: Option<i64>,
    pub stop: Option<StopField>,
    pub random_seed: Option<u64>,
    pub seed: Option<u64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Predicted output (OpenAI/Mistral chat; a stral extension on FIM and legacy
    /// completions): `{"type": "content", "content": "..." | [{"type": "text", "text": "..."}]}`.
    /// Kept raw so a wrong shape is a 400 naming `prediction`, not a generic body error.
    pub prediction: Option<serde_json::Value>,
    /// stral extension: `false` opts this request out of speculative decoding (no
    /// drafts from the prediction or prompt lookup); absent or `true`: the server's
    /// `--speculative` setting. A non-boolean is a 400.
    pub speculative: Option<bool>,
}

#[derive(Debug, Deserialize, Default, Clone)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/fim/completions` (Mistral).
#[derive(Debug, Deserialize)]
pub struct FimRequest {
    pub model: String,
    pub prompt: String,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Message content: a string, or an array of typed chunks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Chunks(Vec<ContentChunk>),
}

#[derive(Debug, Deserialize)]
pub struct ContentChunk {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    #[serde(default)]
    pub prefix: Option<bool>,
}

/// `POST /v1/chat/completions` (Mistral and OpenAI).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// OpenAI: `true` asks for the chosen token's logprob.
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt` of the legacy endpoint: a string, or an array holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions` (OpenAI legacy; `suffix` makes it FIM).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    pub suffix: Option<String>,
    /// OpenAI: number of top logprobs per token (0–20).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A validated generation: what to sample, how much, where to stop.
#[derive(Debug, Clone)]
pub struct Generation {
    pub sampling: SamplingParams,
    /// `None`: the rest of the context.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage_in_stream: bool,
    pub priority: Priority,
    /// The predicted output's text (`prediction`), validated; `None` when absent.
    /// The sequence's draft source when it speculates (`engine::draft`).
    pub prediction: Option<String>,
    /// `false` when the request opted out of speculative decoding.
    pub speculative: bool,
}

impl SamplingFields {
    /// Validates the fields; `default_temperature` differs per API family.
    pub fn validate(
        &self,
        default_temperature: f32,
        priority: Priority,
        logprobs: Option<u32>,
    ) -> Result<Generation, AppError> {
        let (temperature, top_p, top_k) = self.sampler_knobs(default_temperature)?;
        let (max_tokens, min_tokens) = self.token_bounds()?;
        self.reject_unsupported()?;
        let stop = self.stop_strings()?;
        let prediction = self.prediction_text()?;
        Ok(Generation {
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: self.random_seed.or(self.seed),
                min_tokens,
                logprobs,
            },
            max_tokens,
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage_in_stream: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            priority,
            prediction,
            speculative: self.speculative.unwrap_or(true),
        })
    }

    /// `prediction`'s text: `type` must be `"content"`, `content` a string or an array
    /// of `{"type": "text", "text": ...}` parts (joined). Empty content is fine.
    fn prediction_text(&self) -> Result<Option<String>, AppError> {
        let Some(value) = &self.prediction else {
            return Ok(None);
        };
        if value.is_null() {
            return Ok(None);
        }
        let bad = |why: &str| AppError::bad_param("prediction", format!("prediction {why}"));
        let obj = value
            .as_object()
            .ok_or_else(|| bad("must be an object {\"type\": \"content\", \"content\": ...}"))?;
        match obj.get("type").and_then(|t| t.as_str()) {
            Some("content") => {}
            _ => return Err(bad("type must be \"content\"")),
        }
        match obj.get("content") {
            Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
            Some(serde_json::Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    let kind = part.get("type").and_then(|t| t.as_str());
                    match (kind, part.get("text").and_then(|t| t.as_str())) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(bad(
                                "content parts must be {\"type\": \"text\", \"text\": \"...\"}",
                            ));
                        }
                    }
                }
                Ok(Some(text))
            }
            _ => Err(bad("content must be a string or an array of text parts")),
        }
    }

    /// `(temperature, top_p, top_k)`, range-checked, in the sampler's terms.
    fn sampler_knobs(&self, default_temperature: f32) -> Result<(f32, f32, u32), AppError> {
        let temperature = self.temperature.unwrap_or(f64::from(default_temperature));
        if !(0.0..=2.0).contains(&temperature) || !temperature.is_finite() {
            return Err(AppError::bad_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(AppError::bad_param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        // The sampler works in f32: keep a tiny positive top_p positive (it keeps the top token).
        let top_p = (top_p as f32).max(f32::MIN_POSITIVE);
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) => u32_in(k, 1, "top_k", || {
                format!("top_k must be a positive integer (or 0/-1 to disable), got {k}")
            })?,
        };
        Ok((temperature as f32, top_p, top_k))
    }

    /// `(max_tokens, min_tokens)`: `max_completion_tokens` wins over `max_tokens`, and
    /// `min_tokens` may not exceed it.
    fn token_bounds(&self) -> Result<(Option<u32>, u32), AppError> {
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .map(|m| {
                u32_in(m, 1, "max_tokens", || {
                    format!("max_tokens must be at least 1, got {m}")
                })
            })
            .transpose()?;
        let min_tokens = self
            .min_tokens
            .map(|m| {
                u32_in(m, 0, "min_tokens", || {
                    format!("min_tokens must be non-negative, got {m}")
                })
            })
            .transpose()?
            .unwrap_or(0);
        if let Some(max) = max_tokens {
            if min_tokens > max {
                return Err(AppError::bad_param(
                    "min_tokens",
                    format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max})"),
                ));
            }
        }
        Ok((max_tokens, min_tokens))
    }

    /// Parameters accepted only at their no-op value: `n = 1`, zero penalties.
    fn reject_unsupported(&self) -> Result<(), AppError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(AppError::bad_param(
                    "n",
                    format!("only n = 1 is supported, got {n}"),
                ));
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(AppError::bad_param(
                    name,
                    format!("{name} is not supported (only 0)"),
                ));
            }
        }
        Ok(())
    }

    /// The stop strings (at most [`MAX_STOPS`] of at most [`MAX_STOP_LEN`] characters),
    /// empty ones dropped.
    fn stop_strings(&self) -> Result<Vec<String>, AppError> {
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.chars().count() > MAX_STOP_LEN) {
            return Err(AppError::bad_param(
                "stop",
                format!(
                    "at most {MAX_STOPS} stop strings of at most {MAX_STOP_LEN} characters each"
                ),
            ));
        }
        Ok(stop.into_iter().filter(|s| !s.is_empty()).collect())
    }
}

/// `v` as a `u32` when it is in `min..=u32::MAX`; else a 400 on `param`.
fn u32_in(
    v: i64,
    min: i64,
    param: &str,
    message: impl FnOnce() -> String,
) -> Result<u32, AppError> {
    if (min..=u32::MAX as i64).contains(&v) {
        Ok(v as u32)
    } else {
        Err(AppError::bad_param(param, message()))
    }
}

impl ChatRequest {
    /// The conversation as prompt-builder messages; a 400 for unsupported roles or content.
    pub fn conversation(&self) -> Result<Vec<ChatMessage>, AppError> {
        if self
            .tools
            .as_ref()
            .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(AppError::bad_param(
                "tools",
                "tool calling is not supported by this server",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => return Err(AppError::bad_param("messages", format!("messages[{i}].role '{other}' is not supported (system, user, assistant)"))),
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Chunks(chunks)) => {
                        let mut parts = Vec::new();
                        for c in chunks {
                            if c.kind != "text" {
                                return Err(AppError::bad_param("messages", format!("messages[{i}]: content chunks of type '{}' are not supported", c.kind)));
                            }
                            if let Some(t) = c.text.as_deref().filter(|t| !t.is_empty()) {
                                parts.push(t.to_string());
                            }
                        }
                        parts.join("\n\n")
                    }
                };
                let mut msg = match role {
                    Role::System => ChatMessage::system(content),
                    Role::User => ChatMessage::user(content),
                    Role::Assistant => ChatMessage::assistant(content),
                };
                msg.prefix = m.prefix.unwrap_or(false);
                Ok(msg)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(value: serde_json::Value) -> Result<Option<String>, AppError> {
        let fields: SamplingFields =
            serde_json::from_value(serde_json::json!({ "prediction": value })).unwrap();
        fields
            .validate(0.0, Priority::Chat, None)
            .map(|g| g.prediction)
    }

    #[test]
    fn prediction_shapes() {
        use serde_json::json;
        assert_eq!(
            prediction(json!({"type": "content", "content": "abc"})).unwrap(),
            Some("abc".into())
        );
        assert_eq!(
            prediction(json!({"type": "content", "content": ""})).unwrap(),
            Some(String::new())
        );
        assert_eq!(
            prediction(json!({"type": "content", "content": [
                {"type": "text", "text": "ab"}, {"type": "text", "text": "c"}
            ]}))
            .unwrap(),
            Some("abc".into())
        );
        assert_eq!(prediction(json!(null)).unwrap(), None);
        for bad in [
            json!("abc"),
            json!(3),
            json!({"content": "abc"}),
            json!({"type": "text", "content": "abc"}),
            json!({"type": "content"}),
            json!({"type": "content", "content": 5}),
            json!({"type": "content", "content": [{"type": "image", "text": "x"}]}),
            json!({"type": "content", "content": ["abc"]}),
        ] {
            let err = prediction(bad.clone()).expect_err(&bad.to_string());
            assert!(
                matches!(&err, AppError::BadRequest { param, .. } if param.as_deref() == Some("prediction")),
                "{bad}: {err:?}"
            );
        }
    }
}
