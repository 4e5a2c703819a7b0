//! The sim backend: a worker that does no math and instead takes as long as a GPU
//! would, so the real coordinator, scheduler and HTTP stack run at cluster scale on a
//! laptop, and `stral plan` can reason about capacity.
//!
//! Owns: the committed GPU coefficient table ([`gpu`], every number with its source
//! and whether it is datasheet, calibrated on our H100, or an estimate), the
//! step-time model ([`step_time`]), the `sim:<gpu>[:<memory utilization>]` device
//! string, [`SimBackend`] and its `Init` ([`open`]), config-only model sources (`synthetic:<preset>` or a checkpoint directory
//! of which only `params.json`/`config.json` is read), and the precise sleep.
//!
//! Invariants: a sim worker never reads or allocates weights or KV; its step times
//! are model outputs (labelled "modelled" wherever they are shown), never a CPU
//! measurement presented as a GPU one — there is no CPU entry in the GPU table.
//! Costs: O(sequences) per step to evaluate the model, then a sleep that spins at
//! most [`SPIN`] of it.

pub mod gpu;
pub mod step_time;

use std::path::Path;
use std::time::{Duration, Instant};

pub use gpu::{GpuKind, GpuSpec, Provenance};
pub use step_time::{SeqWork, SimWeights, StepBreakdown, StepTimeModel};

use proto::v1::InitRequest;

use crate::backend::{Backend, InitShape, Logits, Opened, Step};
use crate::config::ModelConfig;
use crate::WorkerError;

/// Prefix of a model source that names a preset shape instead of a directory.
pub const SYNTHETIC_PREFIX: &str = "synthetic:";

/// Default fraction of GPU memory a sim rank models as usable (as `serve`'s
/// `--gpu-memory-utilization`).
pub const DEFAULT_MEMORY_UTILIZATION: f64 = 0.90;

/// What a `sim:<gpu>[:<utilization>]` device string asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimDevice {
    pub gpu: GpuKind,
    /// Fraction of device memory for weights, activations and KV, in (0, 1].
    pub memory_utilization: f64,
}

impl SimDevice {
    /// Parses a worker device string: `Ok(None)` when it is not a sim device.
    pub fn parse(device: &str) -> Result<Option<Self>, WorkerError> {
        let Some(rest) = device.strip_prefix("sim") else {
            return Ok(None);
        };
        let rest = match rest.strip_prefix(':') {
            Some(r) => r,
            None if rest.is_empty() => {
                return Err(WorkerError::Config(
                    "device 'sim' needs a GPU type: sim:h100, sim:h200, sim:a100 or sim:l40s"
                        .into(),
                ))
            }
            None => return Ok(None),
        };
        let (gpu, util) = match rest.split_once(':') {
            Some((g, u)) => {
                let u: f64 = u.parse().map_err(|_| {
                    WorkerError::Config(format!("device '{device}': '{u}' is not a number"))
                })?;
                (g, u)
            }
            None => (rest, DEFAULT_MEMORY_UTILIZATION),
        };
        if !(util > 0.0 && util <= 1.0) {
            return Err(WorkerError::Config(format!(
                "device '{device}': memory utilization must be in (0, 1]"
            )));
        }
        Ok(Some(Self {
            gpu: gpu.parse()?,
            memory_utilization: util,
        }))
    }

    /// The device string `parse` reads back.
    pub fn device_string(&self) -> String {
        if self.memory_utilization == DEFAULT_MEMORY_UTILIZATION {
            format!("sim:{}", self.gpu)
        } else {
            format!("sim:{}:{}", self.gpu, self.memory_utilization)
        }
    }
}

/// The shape of a model source without touching weights: `synthetic:<preset>` (e.g.
/// `synthetic:codestral-22b`), or a checkpoint directory whose `params.json` /
/// `config.json` alone is read.
pub fn model_config(source: &str) -> Result<ModelConfig, WorkerError> {
    let cfg = match source.strip_prefix(SYNTHETIC_PREFIX) {
        Some(preset) => ModelConfig::preset(preset)?,
        None => ModelConfig::from_dir(Path::new(source))?.0,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Whether a model source names a preset shape with no weights behind it.
pub fn is_synthetic(source: &str) -> bool {
    source.starts_with(SYNTHETIC_PREFIX)
}

/// A sim rank: no math, no weights; each step lasts its modelled GPU time from when
/// it began, and rank 0 answers pseudo-tokens.
pub struct SimBackend {
    model: StepTimeModel,
    device: String,
}

impl Backend for SimBackend {
    fn validate(&self, _: &Step<'_>) -> Result<(), WorkerError> {
        Ok(())
    }

    fn forward(&mut self, step: &Step<'_>) -> Result<Option<Logits>, WorkerError> {
        let work: Vec<SeqWork> = step
            .chunks
            .iter()
            .map(|c| SeqWork {
                new_tokens: c.tokens.len() as u32,
                cached: c.cached as u32,
                sample: c.sample,
            })
            .collect();
        let us = self.model.step(&work).total_us;
        sleep_until(step.started + Duration::from_secs_f64(us * 1e-6));
        Ok(None)
    }

    fn modelled_step_ms(&self, work: &[SeqWork]) -> Option<f64> {
        Some(self.model.step(work).total_us * 1e-3)
    }

    fn describe(&self) -> String {
        format!(
            "ready ({}: step times are modelled for that GPU, not measured; pseudo-tokens)",
            self.device
        )
    }
}

/// `Init` for a `sim:<gpu>` device: the model's shape only, the modelled KV capacity
/// (the modelled GPU's memory after weights and the activations of the largest step
/// `shape` allows; `kv_cache_bytes` is a CPU budget and is ignored), no collective.
pub fn open(req: &InitRequest, dev: SimDevice, shape: InitShape) -> Result<Opened, WorkerError> {
    let weights: SimWeights = req.dtype.parse()?;
    let cfg = model_config(&req.model_path)?;
    let model = StepTimeModel::new(cfg.clone(), dev.gpu.spec(), shape.tp)?.with_weights(weights)?;
    let bs = shape.block_size;
    let mut blocks =
        model.kv_capacity_blocks(bs, dev.memory_utilization, shape.max_tokens, shape.max_seqs)?;
    if let Some(m) = req.max_kv_blocks {
        blocks = blocks.min(u64::from(m));
    }
    if blocks == 0 {
        return Err(WorkerError::Config("max_kv_blocks must be > 0".into()));
    }
    let device = dev.device_string();
    tracing::info!(
        %device,
        model = %req.model_path,
        tp = shape.tp,
        rank = shape.rank,
        kv_blocks = blocks,
        weights = model.weights().name(),
        decode_step_us_batch1 = model.decode_step(1, 512).total_us,
        "sim worker: no weights loaded; step times are modelled, not measured"
    );
    Ok(Opened {
        kv_bytes_per_block: model.kv_bytes_per_block(bs),
        backend: Box::new(SimBackend { model, device }),
        cfg,
        num_blocks: blocks,
    })
}

/// How much of a sleep is spun instead of slept: `thread::sleep` wakes ~50–100 µs
/// late, more on a loaded machine.
pub const SPIN: Duration = Duration::from_micros(200);

/// Returns at `deadline` (at once if it passed): sleeps until [`SPIN`] before it, then
/// yields in a loop. Returns how late it woke.
pub fn sleep_until(deadline: Instant) -> Duration {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return now - deadline;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::thread::yield_now();
        }
    }
}

/// A plausible sampled token for a sim or null rank 0: varies with the sequence and
/// its length so detokenization does real work; never a control token (ids below
/// 1000 hold `<s>`, `</s>`, `[INST]`, `[PREFIX]` … and byte-fallback pieces), never
/// EOS, so requests end by length or by a stop string.
pub fn pseudo_token(seq_id: u64, cached: usize) -> u32 {
    1000 + ((seq_id.wrapping_mul(7919).wrapping_add(cached as u64)) % 30000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_device_strings_parse_and_round_trip() {
        assert_eq!(SimDevice::parse("cpu").unwrap(), None);
        assert_eq!(SimDevice::parse("").unwrap(), None);
        assert_eq!(SimDevice::parse("simple").unwrap(), None);
        let d = SimDevice::parse("sim:h100").unwrap().unwrap();
        assert_eq!(d.gpu, GpuKind::H100);
        assert_eq!(d.memory_utilization, DEFAULT_MEMORY_UTILIZATION);
        assert_eq!(d.device_string(), "sim:h100");
        let d = SimDevice::parse("sim:a100:0.8").unwrap().unwrap();
        assert_eq!((d.gpu, d.memory_utilization), (GpuKind::A100, 0.8));
        assert_eq!(SimDevice::parse(&d.device_string()).unwrap(), Some(d));
        for bad in ["sim", "sim:", "sim:cpu", "sim:h100:2", "sim:h100:x"] {
            assert!(SimDevice::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn synthetic_sources_name_presets_and_directories_are_read_for_config_only() {
        assert_eq!(
            model_config("synthetic:codestral-22b").unwrap(),
            ModelConfig::codestral_22b()
        );
        assert!(model_config("synthetic:gpt-5").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("params.json"),
            ModelConfig::tiny().to_params_json(),
        )
        .unwrap();
        // No weights in the directory: the config alone is enough.
        assert_eq!(
            model_config(dir.path().to_str().unwrap()).unwrap(),
            ModelConfig::tiny()
        );
    }

    #[test]
    fn pseudo_tokens_are_never_control_tokens_or_eos() {
        for id in [0u64, 1, 7, u64::MAX] {
            for cached in [0, 1, 31999, usize::MAX / 2] {
                let t = pseudo_token(id, cached);
                assert!((1000..31000).contains(&t), "{t}");
            }
        }
        assert_ne!(pseudo_token(3, 10), pseudo_token(3, 11));
    }
}
