//! Synthetic checkpoints: deterministic random weights of a given shape, written in
//! either layout (`stral synth`).
//!
//! Invariant: the values of every tensor are a pure function of (seed, parameter,
//! shape) in the internal rotate-half convention; the Mistral layout applies the
//! inverse RoPE row permutation on write, so both layouts load to the *same model*.
//! Cost: one tensor in memory at a time; output streamed with a progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

use crate::checkpoint::{half_to_interleaved, Param};
use crate::config::{CheckpointFormat, ModelConfig};
use crate::safetensors_io::{SafetensorsWriter, StoredDtype, TensorSpec};
use crate::WorkerError;

/// What `stral synth` writes.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub config: ModelConfig,
    pub format: CheckpointFormat,
    pub dtype: StoredDtype,
    pub seed: u64,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            config: ModelConfig::tiny(),
            format: CheckpointFormat::Mistral,
            dtype: StoredDtype::Bf16,
            seed: 0,
            progress: true,
        }
    }
}

/// The values of parameter `p` (internal convention), deterministic in `seed`.
///
/// Projections are uniform with variance `1/in_features` (unit-variance outputs for
/// unit-variance inputs), embeddings uniform in ±1, norm gains `1 ± 0.1`.
pub fn param_values(cfg: &ModelConfig, p: Param, seed: u64) -> Vec<f32> {
    let shape = p.shape(cfg);
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(p.name(CheckpointFormat::Hf).as_bytes()));
    match p {
        Param::AttnNorm(_) | Param::FfnNorm(_) | Param::Norm => (0..n)
            .map(|_| 1.0 + rng.random_range(-0.1f32..0.1))
            .collect(),
        Param::Embed => (0..n).map(|_| rng.random_range(-1f32..1.0)).collect(),
        _ => {
            let a = (3.0 / shape[1] as f32).sqrt();
            (0..n).map(|_| rng.random_range(-a..a)).collect()
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes a checkpoint to `out` (created if needed).
pub fn synthesize(opts: &SynthOptions, out: &Path) -> Result<(), WorkerError> {
    let cfg = &opts.config;
    cfg.validate()?;
    std::fs::create_dir_all(out).map_err(|e| WorkerError::io(out, e))?;
    let params = Param::all(cfg);
    let bytes = |p: &Param| p.shape(cfg).iter().product::<usize>() * opts.dtype.size();
    let total: usize = params.iter().map(bytes).sum();
    let bar = if opts.progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!(
        "writing {} checkpoint",
        match opts.format {
            CheckpointFormat::Mistral => "mistral",
            CheckpointFormat::Hf => "hf",
        }
    ));
    let shards = shard_params(&params, bytes, total, opts.format);
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = match opts.format {
            CheckpointFormat::Mistral => "consolidated.safetensors".to_string(),
            CheckpointFormat::Hf => format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards),
        };
        let specs = shard
            .iter()
            .map(|p| TensorSpec {
                name: p.name(opts.format),
                shape: p.shape(cfg),
            })
            .collect();
        let mut w = SafetensorsWriter::create(&out.join(&file), specs, opts.dtype)?;
        for &p in shard {
            let mut v = param_values(cfg, p, opts.seed);
            if p.is_rotary() && opts.format == CheckpointFormat::Mistral {
                v = half_to_interleaved(&v, cfg.head_dim, cfg.dim);
            }
            w.write_next(&v)?;
            weight_map.insert(p.name(opts.format), serde_json::Value::String(file.clone()));
            bar.inc(bytes(&p) as u64);
        }
        w.finish()?;
    }
    bar.finish_and_clear();
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| WorkerError::io(&path, e))
    };
    match opts.format {
        CheckpointFormat::Mistral => write("params.json", cfg.to_params_json()),
        CheckpointFormat::Hf => {
            let dtype = match opts.dtype {
                StoredDtype::F32 => "float32",
                StoredDtype::Bf16 => "bfloat16",
                StoredDtype::F16 => "float16",
            };
            write("config.json", cfg.to_hf_config(dtype))?;
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            write(
                "model.safetensors.index.json",
                serde_json::to_string_pretty(&index).expect("json"),
            )
        }
    }
}

/// Mistral: one file. HF: shards of at most 4 GiB, and at least two so that the
/// sharded path is always exercised.
fn shard_params(
    params: &[Param],
    bytes: impl Fn(&Param) -> usize,
    total: usize,
    format: CheckpointFormat,
) -> Vec<Vec<Param>> {
    if format == CheckpointFormat::Mistral {
        return vec![params.to_vec()];
    }
    let limit = (total.div_ceil(2)).min(4 << 30);
    let mut shards: Vec<Vec<Param>> = vec![Vec::new()];
    let mut size = 0;
    for p in params {
        let b = bytes(p);
        if size > 0 && size + b > limit {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(*p);
        size += b;
    }
    shards
}
