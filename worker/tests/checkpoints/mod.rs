//! Shared by the worker's model tests: a small config shaped like the real model and
//! a seeded synthetic checkpoint of it.

#![allow(dead_code)]

use std::path::Path;

use worker::checkpoint::Checkpoint;
use worker::safetensors_io::StoredDtype;
use worker::synth::{synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

/// Small but shaped like the real thing: GQA ratio 2, splits at TP = 1, 2, 4.
pub fn small_config(sliding_window: Option<u32>) -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        dim: 128,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 16,
        hidden_dim: 256,
        vocab_size: 1024,
        sliding_window,
        ..ModelConfig::tiny()
    }
}

/// Writes a synthetic checkpoint of `config` into `dir` and opens it.
pub fn synth(
    dir: &Path,
    config: ModelConfig,
    format: CheckpointFormat,
    dtype: StoredDtype,
    seed: u64,
) -> Checkpoint {
    synthesize(
        &SynthOptions {
            config,
            format,
            dtype,
            seed,
            progress: false,
        },
        dir,
    )
    .unwrap();
    Checkpoint::open(dir).unwrap()
}
