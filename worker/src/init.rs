//! `Init`: from an [`InitRequest`] to a ready [`Rank`] and its [`InitReply`].
//!
//! Owns the one place where a request's device is resolved against the device the
//! process was started for, the checks every backend shares ([`InitShape`]), the
//! choice of backend, the CPU and null backends' setup (checkpoint, KV budget bounded
//! by the memory this machine has, TCP collective), and the reply. Backends with a
//! device of their own are opened by their modules (`cuda::init::open`,
//! `sim::open`); adding one is one line in [`open`]. Once the rank is built, its
//! step cost model is fitted ([`profile::step_cost`]: scratch steps, all blocks
//! returned) and reported.
//!
//! Invariant: every size that would be allocated is checked first — a KV cache
//! larger than the memory available is an Init error, never an out-of-memory abort.

use std::path::Path;
use std::time::{Duration, Instant};

use kernels::quant::WeightDtype;
use proto::v1::collective_bootstrap::Kind;
use proto::v1::{InitReply, InitRequest, ModelFacts};

use crate::backend::{CpuBackend, InitShape, NullBackend, Opened};
use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, SoloCollective};
use crate::cuda::CudaDevice;
use crate::model::{CpuModel, RankWeights, ShardSpec, WeightFormat};
use crate::profile;
use crate::rank::{Rank, RankLimits};
use crate::sampler::EOS_TOKEN_ID;
use crate::sim::{self, SimDevice};
use crate::tcp_collective::{TcpCollective, TcpGroup};
use crate::WorkerError;

/// What the worker process contributes to every `Init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// The device the process was started for (`stral worker --backend`); `None`
    /// serves whatever each Init asks for.
    pub backend: Option<String>,
    pub collective_connect_timeout: Duration,
    pub collective_op_timeout: Duration,
}

/// Sets up a rank for `req`: the rank, and what `Init` answers.
pub fn init(opts: &InitOptions, req: &InitRequest) -> Result<(Rank, InitReply), WorkerError> {
    let req = resolve_device(opts, req)?;
    let shape = InitShape::new(
        req.tp_world_size as usize,
        req.rank as usize,
        req.block_size as usize,
        req.max_num_batched_tokens as usize,
        req.max_num_seqs as usize,
    )?;
    let opened = open(opts, &req, shape)?;
    let cfg = &opened.cfg;
    let num_blocks = opened.num_blocks.min(u64::from(u32::MAX)) as u32;
    let reply = InitReply {
        num_kv_blocks: num_blocks,
        block_size: shape.block_size as u32,
        kv_bytes_per_block: opened.kv_bytes_per_block,
        model: Some(ModelFacts {
            vocab_size: cfg.vocab_size as u32,
            n_layers: cfg.n_layers as u32,
            max_position_embeddings: cfg.max_position_embeddings as u32,
            sliding_window: cfg.sliding_window,
            eos_token_id: EOS_TOKEN_ID,
        }),
        rank: shape.rank as u32,
        tp_world_size: shape.tp as u32,
        step_cost: None,
    };
    let limits = RankLimits {
        num_blocks: num_blocks as usize,
        block_size: shape.block_size,
        vocab: cfg.vocab_size,
        max_context: cfg.max_position_embeddings,
        sliding_window: cfg.sliding_window,
        max_tokens: shape.max_tokens,
        max_seqs: shape.max_seqs,
    };
    let mut rank = Rank::new(opened.backend, shape.rank as u32, limits);
    let reply = InitReply {
        step_cost: Some(profile::step_cost(&mut rank)?),
        ..reply
    };
    Ok((rank, reply))
}

/// The backend for the request's device.
fn open(opts: &InitOptions, req: &InitRequest, shape: InitShape) -> Result<Opened, WorkerError> {
    if let Some(dev) = CudaDevice::parse(&req.device)? {
        return crate::cuda::init::open(req, dev, shape);
    }
    if let Some(dev) = SimDevice::parse(&req.device)? {
        return sim::open(req, dev, shape);
    }
    open_cpu(opts, req, shape)
}

/// The request with its device resolved: an Init with device "" gets the process's
/// device; one for another device is refused (a `cuda…` request on a `cuda:K`
/// process runs on GPU K with the request's utilization).
fn resolve_device(opts: &InitOptions, req: &InitRequest) -> Result<InitRequest, WorkerError> {
    let device = match (&opts.backend, req.device.as_str()) {
        (None, _) => return Ok(req.clone()),
        (Some(b), d) if d == b.as_str() => return Ok(req.clone()),
        (Some(b), "") => b.clone(),
        (Some(b), d) => match CudaDevice::for_worker(b, d)? {
            Some(dev) => dev.device_string(),
            None => {
                return Err(WorkerError::Config(format!(
                "device '{d}': this worker was started for device '{b}' (stral worker --backend)"
            )))
            }
        },
    };
    Ok(InitRequest {
        device,
        ..req.clone()
    })
}

/// Devices "cpu" (the f32 reference) and "null" (checked and mirrored, no math).
fn open_cpu(
    opts: &InitOptions,
    req: &InitRequest,
    shape: InitShape,
) -> Result<Opened, WorkerError> {
    let config_err = |m: String| Err(WorkerError::Config(m));
    if !matches!(req.device.as_str(), "" | "cpu" | "null") {
        return config_err(format!(
            "device '{}': this worker runs on the CPU (device \"cpu\", \"null\" to skip the math, or \"sim:<gpu>\" to model a GPU)",
            req.device
        ));
    }
    if sim::is_synthetic(&req.model_path) {
        return config_err(format!(
            "model '{}' is a shape without weights: only a sim device (\"sim:<gpu>\") can serve it",
            req.model_path
        ));
    }
    let null = req.device == "null";
    let requested = CpuDtype::parse(&req.dtype)?;
    let InitShape {
        tp,
        rank,
        block_size: bs,
        ..
    } = shape;
    let group = match req.collective.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(Kind::NcclUniqueId(_)) => {
            return config_err(
                "an NCCL bootstrap needs the CUDA backend; the CPU worker takes TCP peers".into(),
            )
        }
        Some(Kind::Tcp(t)) => Some(TcpGroup::from_bootstrap(
            rank,
            tp,
            t,
            opts.collective_connect_timeout,
            opts.collective_op_timeout,
        )?),
        None if tp > 1 => {
            return config_err(format!(
                "TP = {tp} needs TCP peer addresses for all {tp} ranks, got 0"
            ))
        }
        None => None,
    };

    let ckpt = Checkpoint::open(Path::new(&req.model_path))?;
    let cfg = ckpt.config.clone();
    cfg.check_tp(tp)?;
    let per_block = CpuModel::kv_bytes_per_block(&cfg, tp, bs) as u64;
    let by_budget = (req.kv_cache_bytes > 0).then(|| req.kv_cache_bytes / per_block);
    let blocks = match (by_budget, req.max_kv_blocks) {
        (Some(b), Some(m)) => b.min(u64::from(m)),
        (Some(b), None) => b,
        (None, Some(m)) => u64::from(m),
        (None, None) => return config_err("set kv_cache_bytes or max_kv_blocks".into()),
    }
    .min(u64::from(u32::MAX));
    if blocks == 0 {
        return config_err(format!(
            "a KV budget of {} bytes (max {:?} blocks) holds no block of {per_block} bytes",
            req.kv_cache_bytes, req.max_kv_blocks
        ));
    }
    if null {
        // No weights and no cache: the checkpoint was opened for its shape only.
        return Ok(Opened {
            backend: Box::new(NullBackend),
            cfg,
            num_blocks: blocks,
            kv_bytes_per_block: per_block,
        });
    }
    let format = requested.format();
    let weight_bytes = format.rank_bytes(&ckpt, tp)?;
    check_fits_in_memory(blocks * per_block, weight_bytes, available_memory())?;
    tracing::info!(
        model = %req.model_path,
        format = ?ckpt.format,
        layers = cfg.n_layers,
        params = cfg.n_params(),
        dtype = ?format,
        weight_mib = weight_bytes >> 20,
        "loading shard"
    );
    let four_bit = ckpt.four_bit_params();
    if format == WeightFormat::AsStored && !four_bit.is_empty() {
        tracing::warn!(
            tensors = four_bit.len(),
            "Q4_0/Q4_K tensors are dequantized and requantized to int8 rows (one scale per row): lossy on top of the file's 4-bit rounding"
        );
    }
    let t0 = Instant::now();
    let weights = RankWeights::load_as(&ckpt, ShardSpec { tp, rank }, format, false)?;
    tracing::info!(
        seconds = t0.elapsed().as_secs_f64(),
        weight_mib = weights.bytes() >> 20,
        kv_blocks = blocks,
        kv_bytes = blocks * per_block,
        "shard loaded; allocating the KV cache"
    );
    let model = CpuModel::try_new(weights, blocks as usize, bs)?;
    let coll: Box<dyn Collective> = match group {
        Some(g) if tp > 1 => {
            tracing::info!(peers = ?g.peers, "joining the TCP collective");
            Box::new(TcpCollective::connect(&g)?)
        }
        _ => Box::new(SoloCollective),
    };
    Ok(Opened {
        backend: Box::new(CpuBackend { model, coll }),
        cfg,
        num_blocks: blocks,
        kv_bytes_per_block: per_block,
    })
}

/// The CPU backend's `dtype` choices: `auto` (also `""`) stores each tensor as the
/// checkpoint does where the CPU supports that (safetensors: f32, bf16, f16 widens to
/// f32; GGUF: F32 → f32, F16/BF16 → bf16, Q8_0 kept as its blocks, Q4_0/Q4_K → int8
/// rows, lossy), or one format (`f32`, `bf16`, `int8`, `q8_0`) for every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuDtype {
    Auto,
    Fixed(WeightDtype),
}

impl CpuDtype {
    fn parse(s: &str) -> Result<Self, WorkerError> {
        match s {
            "" | "auto" => Ok(Self::Auto),
            other => other.parse().map(Self::Fixed).map_err(|_| {
                WorkerError::Config(format!(
                    "dtype '{other}': the CPU backend stores weights as auto, f32, bf16, int8 or q8_0"
                ))
            }),
        }
    }

    fn format(self) -> WeightFormat {
        match self {
            Self::Fixed(d) => WeightFormat::All(d),
            Self::Auto => WeightFormat::AsStored,
        }
    }
}

/// Bytes this machine can still give a process (`MemAvailable` in /proc/meminfo);
/// `None` where that is not known.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a KV cache that, next to this rank's weights, needs more memory than is
/// available (unknown availability passes; the allocation itself is fallible).
fn check_fits_in_memory(
    kv_bytes: u64,
    weight_bytes: u64,
    available: Option<u64>,
) -> Result<(), WorkerError> {
    match available {
        Some(avail) if kv_bytes.saturating_add(weight_bytes) > avail => {
            Err(WorkerError::Config(format!(
                "a KV cache of {} MiB plus {} MiB of weights does not fit the {} MiB of memory available; lower kv_cache_bytes or max_kv_blocks",
                kv_bytes >> 20,
                weight_bytes >> 20,
                avail >> 20
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_cache_beyond_available_memory_is_refused_before_allocation() {
        let gib = 1u64 << 30;
        assert!(check_fits_in_memory(gib, gib, Some(4 * gib)).is_ok());
        let e = check_fits_in_memory(3 * gib, 2 * gib, Some(4 * gib)).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(check_fits_in_memory(u64::MAX, u64::MAX, Some(gib)).is_err());
        assert!(check_fits_in_memory(gib, 0, None).is_ok());
        assert!(available_memory().is_some_and(|b| b > 0));
    }

    #[test]
    fn cpu_dtypes_parse_and_unknown_ones_name_the_choices() {
        assert_eq!(CpuDtype::parse("").unwrap(), CpuDtype::Auto);
        assert_eq!(CpuDtype::parse("auto").unwrap(), CpuDtype::Auto);
        assert_eq!(
            CpuDtype::parse("int8").unwrap(),
            CpuDtype::Fixed(WeightDtype::Int8)
        );
        assert_eq!(
            CpuDtype::parse("bf16").unwrap(),
            CpuDtype::Fixed(WeightDtype::Bf16)
        );
        assert_eq!(
            CpuDtype::parse("q8_0").unwrap(),
            CpuDtype::Fixed(WeightDtype::Q8_0)
        );
        assert_eq!(
            CpuDtype::parse("auto").unwrap().format(),
            WeightFormat::AsStored
        );
        let e = CpuDtype::parse("fp8").unwrap_err().to_string();
        assert!(e.contains("'fp8'") && e.contains("q8_0"), "{e}");
    }
}
