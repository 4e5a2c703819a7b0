//! The embedded default model: a deterministic tiny Mistral-architecture checkpoint
//! with the real 32768 vocabulary, built once and cached on disk.
//!
//! Invariant: the cached directory is complete or absent — it is written to a
//! temporary sibling and renamed into place.

use std::path::{Path, PathBuf};

use crate::config::{CheckpointFormat, ModelConfig};
use crate::safetensors_io::StoredDtype;
use crate::synth::{synthesize, SynthOptions};
use crate::WorkerError;

/// Seed of the embedded model (changing it changes every default output).
pub const EMBEDDED_SEED: u64 = 0;

/// Where stral caches what it builds: `$STRAL_CACHE_DIR`, else `$XDG_CACHE_HOME/stral`,
/// else `~/.cache/stral`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRAL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("stral")
}

/// Path of the embedded tiny checkpoint, building it first if it is not cached.
pub fn ensure_embedded_model() -> Result<PathBuf, WorkerError> {
    ensure_embedded_model_in(&cache_dir())
}

/// [`ensure_embedded_model`] under an explicit cache directory.
pub fn ensure_embedded_model_in(cache: &Path) -> Result<PathBuf, WorkerError> {
    let dir = cache.join(format!("models/tiny-seed{EMBEDDED_SEED}-mistral-bf16"));
    if dir.join("params.json").is_file() {
        return Ok(dir);
    }
    let parent = dir.parent().expect("has parent");
    std::fs::create_dir_all(parent).map_err(|e| WorkerError::io(parent, e))?;
    let tmp = parent.join(format!(".tiny-building-{}", std::process::id()));
    let opts = SynthOptions {
        config: ModelConfig::tiny(),
        format: CheckpointFormat::Mistral,
        dtype: StoredDtype::Bf16,
        seed: EMBEDDED_SEED,
        progress: true,
    };
    synthesize(&opts, &tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished first: keep its copy.
        Err(_) if dir.join("params.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(WorkerError::io(&dir, e)),
    }
}
