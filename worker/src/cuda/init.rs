//! `Init` for a CUDA device and the [`CudaBackend`] it produces: checks what only
//! CUDA needs of the request, opens the GPU (driver probe first), joins the
//! collective, loads the weights and sizes the KV cache; the checks every backend
//! shares and the `InitReply` are [`crate::init`]'s.
//!
//! Collective choice follows the bootstrap: an NCCL unique id → NCCL (one GPU per
//! rank); TCP peers → host-staged over [`TcpCollective`] (several ranks may share one
//! GPU); none → a single rank. The collective is joined before the weights load, so a
//! missing peer fails Init in seconds, not after minutes of uploading.
//!
//! Fails fast, with one line, when there is no driver ([`kernels::KernelError::NoDriver`]),
//! no NVRTC or headers, or the GPU is older than sm_80.

use std::path::Path;
use std::time::{Duration, Instant};

use kernels::cuda::CudaKernels;
use proto::v1::collective_bootstrap::Kind;
use proto::v1::InitRequest;

use super::{kernel_err, kv_bytes_per_block, synthetic_config, CudaDevice, DeviceCollective};
use super::{CudaModel, CudaModelConfig, WeightSource};
use crate::backend::{Backend, InitShape, Logits, Opened, Step};
use crate::checkpoint::Checkpoint;
use crate::model::ShardSpec;
use crate::tcp_collective::{TcpCollective, TcpGroup};
use crate::WorkerError;

/// A CUDA rank: the bf16 model on its GPU and its device-side collective.
pub struct CudaBackend {
    pub model: Box<CudaModel>,
    pub coll: DeviceCollective,
}

impl Backend for CudaBackend {
    fn validate(&self, step: &Step<'_>) -> Result<(), WorkerError> {
        if step.has_drafts() {
            // Its logits scratch is sized for one row per sequence, and its
            // multi-row path has never run on a GPU: refuse rather than guess.
            return Err(WorkerError::Step(
                "speculative drafts are not supported on the CUDA backend yet; serve with --speculative none".into(),
            ));
        }
        self.model.validate(step.input())
    }

    fn forward(&mut self, step: &Step<'_>) -> Result<Option<Logits>, WorkerError> {
        let (input, coll) = (step.input(), &mut self.coll);
        Ok(if step.argmax_only {
            self.model.forward_argmax(input, coll)?.map(Logits::Argmax)
        } else {
            self.model.forward(input, coll)?.map(Logits::Rows)
        })
    }

    fn describe(&self) -> String {
        format!("ready (cuda: {} KV tokens)", self.model.kv_tokens())
    }
}

/// [`load`] for [`crate::init`], with the step sizes it checked.
pub(crate) fn open(
    req: &InitRequest,
    dev: CudaDevice,
    shape: InitShape,
) -> Result<Opened, WorkerError> {
    let b = load(req, dev, shape.max_tokens, shape.max_seqs)?;
    let cfg = b.model.config().clone();
    Ok(Opened {
        num_blocks: b.model.num_blocks() as u64,
        kv_bytes_per_block: kv_bytes_per_block(&cfg, shape.tp, shape.block_size),
        backend: Box::new(b),
        cfg,
    })
}

/// Sets up a CUDA rank for `req` on `dev`; `max_tokens` / `max_seqs` size the
/// largest step (the Init's `max_num_batched_tokens` / `max_num_seqs`).
pub fn load(
    req: &InitRequest,
    dev: CudaDevice,
    max_tokens: usize,
    max_seqs: usize,
) -> Result<CudaBackend, WorkerError> {
    let InitShape {
        tp,
        rank,
        block_size: bs,
        ..
    } = InitShape::new(
        req.tp_world_size as usize,
        req.rank as usize,
        req.block_size as usize,
        max_tokens,
        max_seqs,
    )?;
    if !bs.is_power_of_two() {
        return Err(WorkerError::Config(format!(
            "block_size {bs} must be a power of two on CUDA"
        )));
    }
    if !matches!(req.dtype.as_str(), "" | "auto" | "bf16") {
        return Err(WorkerError::Config(format!(
            "dtype '{}': the CUDA backend computes in bf16",
            req.dtype
        )));
    }
    let ordinal = dev.ordinal.unwrap_or(0);
    let kernels =
        CudaKernels::new(ordinal).map_err(kernel_err(&format!("opening GPU {ordinal}")))?;
    let stream = kernels.stream().clone();
    let coll = match req.collective.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(Kind::NcclUniqueId(id)) => {
            tracing::info!(rank, tp, gpu = ordinal, "joining the NCCL group");
            DeviceCollective::nccl(stream, rank, tp, id)?
        }
        Some(Kind::Tcp(t)) if tp > 1 => {
            let group = TcpGroup::from_bootstrap(
                rank,
                tp,
                t,
                Duration::from_secs(20),
                Duration::from_secs(60),
            )?;
            tracing::info!(peers = ?t.peer_addrs, "joining the host-staged (TCP) collective");
            DeviceCollective::Host(Box::new(TcpCollective::connect(&group)?))
        }
        _ if tp > 1 => {
            return Err(WorkerError::Config(format!(
                "TP = {tp} needs a collective bootstrap (NCCL unique id or TCP peers)"
            )))
        }
        _ => DeviceCollective::solo(),
    };
    let sizing = CudaModelConfig {
        max_tokens,
        max_seqs,
        block_size: bs,
        memory_utilization: dev.memory_utilization,
        max_kv_blocks: req.max_kv_blocks.map(u64::from),
        // A measurement switch until a GPU run has timed both paths (worker/README.md).
        fused_qkv: std::env::var("STRAL_CUDA_FUSED_QKV").is_ok_and(|v| v == "1"),
        reuse_attn_buffers: std::env::var("STRAL_CUDA_REUSE_ATTN").is_ok_and(|v| v == "1"),
    };
    let shard = ShardSpec { tp, rank };
    let t0 = Instant::now();
    tracing::info!(model = %req.model_path, gpu = ordinal, arch = kernels.arch(), tp, rank, "loading shard onto the GPU");
    let model = match synthetic_config(&req.model_path)? {
        Some(cfg) => CudaModel::new(kernels, WeightSource::Synthetic(cfg), shard, sizing)?,
        None => {
            let ckpt = Checkpoint::open(Path::new(&req.model_path))?;
            CudaModel::new(kernels, WeightSource::Checkpoint(&ckpt), shard, sizing)?
        }
    };
    tracing::info!(
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        kv_blocks = model.num_blocks(),
        kv_tokens = model.kv_tokens(),
        "CUDA rank ready"
    );
    Ok(CudaBackend {
        model: Box::new(model),
        coll,
    })
}
