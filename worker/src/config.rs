//! Model configuration: the Mistral architecture's numbers, parsed from either
//! checkpoint layout (`params.json` or Hugging Face `config.json`), validated, and
//! the two presets (`codestral-22b`, `tiny`).
//!
//! Invariant: a `ModelConfig` that passed [`ModelConfig::validate`] has heads that
//! divide evenly into kv-head groups and non-zero sizes; [`ModelConfig::check_tp`]
//! adds the tensor-parallel constraints. Every error names the offending field.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

use crate::WorkerError;

/// Which on-disk layout a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointFormat {
    /// `consolidated.safetensors` + `params.json`; RoPE on interleaved pairs.
    Mistral,
    /// `model-*.safetensors` (+ index) + `config.json`; q/k rows permuted to rotate-half.
    Hf,
}

impl std::str::FromStr for CheckpointFormat {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mistral" => Ok(Self::Mistral),
            "hf" => Ok(Self::Hf),
            other => Err(WorkerError::Config(format!(
                "unknown checkpoint format '{other}' (expected mistral or hf)"
            ))),
        }
    }
}

/// The numbers of a Mistral-architecture model (ARCHITECTURE §3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub n_layers: usize,
    /// Hidden size.
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// FFN inner size.
    pub hidden_dim: usize,
    pub vocab_size: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    /// `None` means full attention.
    pub sliding_window: Option<u32>,
    /// Longest context the model serves.
    pub max_position_embeddings: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::codestral_22b()
    }
}

impl ModelConfig {
    /// Codestral-22B v0.1.
    pub fn codestral_22b() -> Self {
        Self {
            n_layers: 56,
            dim: 6144,
            n_heads: 48,
            n_kv_heads: 8,
            head_dim: 128,
            hidden_dim: 16384,
            vocab_size: 32768,
            norm_eps: 1e-5,
            rope_theta: 1e6,
            sliding_window: None,
            max_position_embeddings: 32768,
        }
    }

    /// A small model with the real vocabulary, GQA ratio 2, and shapes that split
    /// evenly at TP = 1, 2, 4 (8 q heads, 4 kv heads, head_dim 64).
    pub fn tiny() -> Self {
        Self {
            n_layers: 4,
            dim: 512,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 64,
            hidden_dim: 1536,
            vocab_size: 32768,
            norm_eps: 1e-5,
            rope_theta: 1e6,
            sliding_window: None,
            max_position_embeddings: 32768,
        }
    }

    /// A preset by name: `tiny` or `codestral-22b`.
    pub fn preset(name: &str) -> Result<Self, WorkerError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "codestral-22b" => Ok(Self::codestral_22b()),
            other => Err(WorkerError::Config(format!(
                "unknown preset '{other}' (expected tiny or codestral-22b)"
            ))),
        }
    }

    /// Parses a Mistral `params.json`.
    pub fn from_params_json(text: &str) -> Result<Self, WorkerError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| WorkerError::Config(format!("params.json: {e}")))?;
        let f = Fields {
            v: &v,
            file: "params.json",
        };
        let dim = f.usize("dim")?;
        let n_heads = f.usize("n_heads")?;
        let cfg = Self {
            n_layers: f.usize("n_layers")?,
            dim,
            n_heads,
            n_kv_heads: f.opt_usize("n_kv_heads")?.unwrap_or(n_heads),
            head_dim: f.opt_usize("head_dim")?.unwrap_or(dim / n_heads.max(1)),
            hidden_dim: f.usize("hidden_dim")?,
            vocab_size: f.usize("vocab_size")?,
            norm_eps: f.opt_f32("norm_eps")?.unwrap_or(1e-5),
            rope_theta: f.opt_f32("rope_theta")?.unwrap_or(1e6),
            sliding_window: f.opt_usize("sliding_window")?.map(|w| w as u32),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a Hugging Face `config.json` (`MistralForCausalLM`).
    pub fn from_hf_config(text: &str) -> Result<Self, WorkerError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| WorkerError::Config(format!("config.json: {e}")))?;
        let f = Fields {
            v: &v,
            file: "config.json",
        };
        let dim = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let cfg = Self {
            n_layers: f.usize("num_hidden_layers")?,
            dim,
            n_heads,
            n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: f.opt_usize("head_dim")?.unwrap_or(dim / n_heads.max(1)),
            hidden_dim: f.usize("intermediate_size")?,
            vocab_size: f.usize("vocab_size")?,
            norm_eps: f.opt_f32("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta: Self::hf_rope_theta(&v)?,
            sliding_window: f.opt_usize("sliding_window")?.map(|w| w as u32),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
        };
        if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
            return Err(WorkerError::Config(
                "config.json: tie_word_embeddings = true is not a Mistral checkpoint (expected an untied lm_head)".into(),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// RoPE θ from `rope_theta` (transformers 4) or `rope_parameters.rope_theta`
    /// (transformers 5); scaled RoPE variants are refused rather than misread.
    fn hf_rope_theta(v: &Value) -> Result<f32, WorkerError> {
        let top = Fields {
            v,
            file: "config.json",
        }
        .opt_f32("rope_theta")?;
        let params = v
            .get("rope_parameters")
            .or_else(|| v.get("rope_scaling"))
            .filter(|p| !p.is_null());
        let Some(params) = params else {
            return Ok(top.unwrap_or(1e6));
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(WorkerError::Config(format!(
                "config.json: rope_type '{kind}' is not supported (only default RoPE)"
            )));
        }
        let nested = Fields {
            v: params,
            file: "config.json",
        }
        .opt_f32("rope_theta")?;
        Ok(top.or(nested).unwrap_or(1e6))
    }

    /// Reads the config of a checkpoint directory and tells its layout.
    pub fn from_dir(dir: &Path) -> Result<(Self, CheckpointFormat), WorkerError> {
        let params = dir.join("params.json");
        let hf = dir.join("config.json");
        if params.is_file() {
            let text = std::fs::read_to_string(&params).map_err(|e| WorkerError::io(&params, e))?;
            Ok((Self::from_params_json(&text)?, CheckpointFormat::Mistral))
        } else if hf.is_file() {
            let text = std::fs::read_to_string(&hf).map_err(|e| WorkerError::io(&hf, e))?;
            Ok((Self::from_hf_config(&text)?, CheckpointFormat::Hf))
        } else if !dir.is_dir() {
            Err(WorkerError::Config(format!(
                "model directory {} does not exist",
                dir.display()
            )))
        } else {
            Err(WorkerError::Config(format!(
                "{} holds neither params.json (Mistral layout) nor config.json (Hugging Face layout)",
                dir.display()
            )))
        }
    }

    /// Checks internal consistency; the error names the field.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let positive = [
            ("n_layers", self.n_layers),
            ("dim", self.dim),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("hidden_dim", self.hidden_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(WorkerError::Config(format!("{name} must be positive")));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(WorkerError::Config(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(WorkerError::Config(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            )));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(WorkerError::Config(format!(
                "norm_eps ({}) must be a positive number",
                self.norm_eps
            )));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(WorkerError::Config(format!(
                "rope_theta ({}) must be a positive number",
                self.rope_theta
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(WorkerError::Config(
                "sliding_window must be positive when set".into(),
            ));
        }
        Ok(())
    }

    /// Bytes of KV cache one block of `block_size` tokens takes on one of `tp` ranks:
    /// K and V, all layers, `elem_bytes` per value (4 for the CPU's f32, 2 for bf16).
    pub fn kv_bytes_per_block(&self, tp: usize, block_size: usize, elem_bytes: usize) -> u64 {
        (2 * self.n_layers * (self.n_kv_heads / tp) * block_size * self.head_dim * elem_bytes)
            as u64
    }

    /// Checks that `tp` ranks can split this model (Megatron-style, by kv heads).
    pub fn check_tp(&self, tp: usize) -> Result<(), WorkerError> {
        if !matches!(tp, 1 | 2 | 4 | 8) {
            return Err(WorkerError::Config(format!(
                "--tp {tp} is not supported: tensor parallelism must be 1, 2, 4 or 8"
            )));
        }
        let checks = [
            ("n_kv_heads", self.n_kv_heads),
            ("n_heads", self.n_heads),
            ("hidden_dim", self.hidden_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in checks {
            if v % tp != 0 {
                return Err(WorkerError::Config(format!(
                    "--tp {tp} must divide {name} ({v})"
                )));
            }
        }
        Ok(())
    }

    /// Width of the attention projection (`n_heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of one of K or V (`n_kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Total parameter count.
    pub fn n_params(&self) -> u64 {
        let per_layer = self.dim * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.dim
            + 3 * self.dim * self.hidden_dim
            + 2 * self.dim;
        (self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim) as u64
    }

    /// `params.json` text for this config.
    pub fn to_params_json(&self) -> String {
        let mut v = json!({
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
        });
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = json!(w);
        }
        serde_json::to_string_pretty(&v).expect("json")
    }

    /// Hugging Face `config.json` text for this config.
    pub fn to_hf_config(&self, torch_dtype: &str) -> String {
        let v = json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": torch_dtype,
        });
        serde_json::to_string_pretty(&v).expect("json")
    }
}

/// Typed field access on a JSON config that names the file and field in errors.
struct Fields<'a> {
    v: &'a Value,
    file: &'static str,
}

impl Fields<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, WorkerError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                WorkerError::Config(format!(
                    "{}: field '{key}' must be a non-negative integer, got {x}",
                    self.file
                ))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, WorkerError> {
        self.opt_usize(key)?
            .ok_or_else(|| WorkerError::Config(format!("{}: missing field '{key}'", self.file)))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>, WorkerError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(|n| Some(n as f32)).ok_or_else(|| {
                WorkerError::Config(format!(
                    "{}: field '{key}' must be a number, got {x}",
                    self.file
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_codestral_has_22b_parameters() {
        ModelConfig::tiny().validate().unwrap();
        let c = ModelConfig::codestral_22b();
        c.validate().unwrap();
        let b = c.n_params() as f64 / 1e9;
        assert!((22.0..22.5).contains(&b), "{b}");
        for tp in [1, 2, 4, 8] {
            c.check_tp(tp).unwrap();
        }
        for tp in [1, 2, 4] {
            ModelConfig::tiny().check_tp(tp).unwrap();
        }
    }

    #[test]
    fn both_json_layouts_round_trip() {
        let mut c = ModelConfig::tiny();
        c.sliding_window = Some(64);
        assert_eq!(
            ModelConfig::from_params_json(&c.to_params_json()).unwrap(),
            c
        );
        assert_eq!(
            ModelConfig::from_hf_config(&c.to_hf_config("float32")).unwrap(),
            c
        );
        let full = ModelConfig::tiny();
        assert_eq!(
            ModelConfig::from_hf_config(&full.to_hf_config("bfloat16"))
                .unwrap()
                .sliding_window,
            None
        );
    }

    #[test]
    fn tp_three_is_rejected_naming_the_flag() {
        let e = ModelConfig::codestral_22b()
            .check_tp(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tp 3"), "{e}");
        let mut c = ModelConfig::tiny();
        c.n_kv_heads = 2;
        c.n_heads = 8;
        let e = c.check_tp(4).unwrap_err().to_string();
        assert!(e.contains("n_kv_heads"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelConfig::from_params_json(r#"{"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 3, "hidden_dim": 10, "vocab_size": 5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_kv_heads"), "{e}");
        let e = ModelConfig::from_params_json(r#"{"dim": 64, "n_heads": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'n_layers'"), "{e}");
        let e = ModelConfig::from_hf_config(r#"{"hidden_size": "big"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'hidden_size'"), "{e}");
    }
}
