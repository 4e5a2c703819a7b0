//! `Init` for a CUDA device: checks the request, opens the GPU (driver probe first),
//! joins the collective, loads the weights and sizes the KV cache.
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
use proto::v1::{InitReply, InitRequest};

use super::{kernel_err, kv_bytes_per_block, synthetic_config, CudaDevice, DeviceCollective};
use super::{CudaModel, CudaModelConfig, WeightSource};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::model::ShardSpec;
use crate::tcp_collective::{TcpCollective, TcpGroup};
use crate::WorkerError;

/// What a CUDA Init produced.
pub struct CudaInit {
    pub cfg: ModelConfig,
    pub model: Box<CudaModel>,
    pub coll: DeviceCollective,
    pub reply: InitReply,
}

/// Sets up a CUDA rank for `req` on `dev`; `max_tokens` / `max_seqs` size the
/// largest step (the coordinator's scheduler defaults).
pub fn load(
    req: &InitRequest,
    dev: CudaDevice,
    max_tokens: usize,
    max_seqs: usize,
) -> Result<CudaInit, WorkerError> {
    let (tp, rank, bs) = (
        req.tp_world_size as usize,
        req.rank as usize,
        req.block_size as usize,
    );
    if tp == 0 || rank >= tp {
        return Err(WorkerError::Config(format!(
            "rank {rank} is outside a TP group of {tp}"
        )));
    }
    if bs == 0 || !bs.is_power_of_two() {
        return Err(WorkerError::Config(format!(
            "block_size {bs} must be a power of two on CUDA"
        )));
    }
    if !matches!(req.dtype.as_str(), "" | "bf16") {
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
            if t.peer_addrs.len() != tp {
                return Err(WorkerError::Config(format!(
                    "TP = {tp} needs TCP peer addresses for all {tp} ranks, got {}",
                    t.peer_addrs.len()
                )));
            }
            tracing::info!(peers = ?t.peer_addrs, "joining the host-staged (TCP) collective");
            DeviceCollective::Host(Box::new(TcpCollective::connect(&TcpGroup {
                rank,
                peers: t.peer_addrs.clone(),
                listen: (!t.listen_addr.is_empty()).then(|| t.listen_addr.clone()),
                group_id: t.group_id,
                connect_timeout: Duration::from_secs(20),
                op_timeout: Duration::from_secs(60),
            })?))
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
    let cfg = model.config().clone();
    tracing::info!(
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        kv_blocks = model.num_blocks(),
        kv_tokens = model.kv_tokens(),
        "CUDA rank ready"
    );
    let reply = crate::service::init_reply(
        &cfg,
        rank,
        tp,
        model.num_blocks() as u32,
        bs,
        kv_bytes_per_block(&cfg, tp, bs),
    );
    Ok(CudaInit {
        cfg,
        model: Box::new(model),
        coll,
        reply,
    })
}
