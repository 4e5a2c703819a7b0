//! Collectives on device buffers for the CUDA forward pass.
//!
//! Owns: [`DeviceCollective`], the two ways a CUDA rank talks to its group —
//! - `Nccl`: NCCL over cudarc (`ncclAllReduce` in place on the bf16 activations,
//!   `ncclAllGather` of the f32 logits), queued on the worker's stream; bootstrapped
//!   from the unique id in `InitRequest.collective`;
//! - `Host`: any host [`Collective`] (TCP between processes, or the identity at TP = 1):
//!   copy device → host, convert bf16 → f32, all-reduce, convert back, copy host →
//!   device. This is how TP = 2 runs as two processes on one GPU (NCCL refuses two
//!   ranks on one device); it is a correctness path, not a fast one.
//!
//! Invariant: every rank calls the same collectives in the same order (the forward
//! pass does). Costs: NCCL — two all-reduces of `n·dim` bf16 per layer on the
//! stream; host — two synchronous round trips per layer plus the TCP exchange.

use cudarc::driver::{CudaStream, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use half::bf16;

use crate::collective::{Collective, SoloCollective};
use crate::WorkerError;

use super::driver_err;

/// A device-side collective (see the module docs).
pub enum DeviceCollective {
    Nccl(NcclComm),
    Host(Box<dyn Collective>),
}

/// An NCCL communicator that may move between threads.
pub struct NcclComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it
// are not concurrent; `DeviceCollective` is only used through `&mut` (the worker's
// engine sits behind a mutex), so they never are.
unsafe impl Send for NcclComm {}

impl std::ops::Deref for NcclComm {
    type Target = Comm;
    fn deref(&self) -> &Comm {
        &self.0
    }
}

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> WorkerError + '_ {
    move |e| WorkerError::Collective(format!("NCCL {what}: {e:?}"))
}

/// Whether libnccl can be loaded (cudarc panics on first use when it cannot).
pub fn nccl_available() -> bool {
    super::libs::probe(super::libs::CudaLib::Nccl).is_ok()
}

pub(crate) fn new_unique_id() -> Result<Vec<u8>, WorkerError> {
    super::libs::probe(super::libs::CudaLib::Nccl)?;
    let id = Id::new().map_err(nccl_err("unique id"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl DeviceCollective {
    /// The identity collective of a single rank.
    pub fn solo() -> Self {
        DeviceCollective::Host(Box::new(SoloCollective))
    }

    /// Joins an NCCL group of `world_size` ranks from the 128-byte unique id; blocks
    /// until every rank has joined.
    pub fn nccl(
        stream: std::sync::Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
    ) -> Result<Self, WorkerError> {
        super::libs::probe(super::libs::CudaLib::Nccl)?;
        let bytes: [u8; 128] = unique_id.try_into().map_err(|_| {
            WorkerError::Config(format!(
                "an NCCL unique id has 128 bytes, got {}",
                unique_id.len()
            ))
        })?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream, rank, world_size, id).map_err(nccl_err("init"))?;
        Ok(DeviceCollective::Nccl(NcclComm(comm)))
    }

    pub fn world_size(&self) -> usize {
        match self {
            DeviceCollective::Nccl(c) => c.world_size(),
            DeviceCollective::Host(c) => c.world_size(),
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            DeviceCollective::Nccl(c) => c.rank(),
            DeviceCollective::Host(c) => c.rank(),
        }
    }

    /// In-place sum of `buf` over the group.
    pub fn all_reduce_bf16(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        buf: &mut CudaViewMut<'_, bf16>,
    ) -> Result<(), WorkerError> {
        if self.world_size() == 1 {
            return Ok(());
        }
        match self {
            DeviceCollective::Nccl(c) => {
                c.all_reduce_in_place(buf, &ReduceOp::Sum)
                    .map_err(nccl_err("all-reduce"))?;
                Ok(())
            }
            DeviceCollective::Host(c) => {
                let host: Vec<bf16> = stream
                    .clone_dtoh(buf)
                    .map_err(driver_err("copying activations to the host"))?;
                let mut f: Vec<f32> = host.iter().map(|v| v.to_f32()).collect();
                c.all_reduce_sum(&mut f)?;
                let back: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
                stream
                    .memcpy_htod(&back, buf)
                    .map_err(driver_err("copying activations back to the GPU"))?;
                // `back` must outlive the asynchronous copy.
                stream
                    .synchronize()
                    .map_err(driver_err("waiting for the host-staged all-reduce"))
            }
        }
    }

    /// Concatenation of every rank's `local` f32 logits (in rank order) on rank 0, on
    /// the host; `None` elsewhere.
    pub fn gather_f32(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        local: &cudarc::driver::CudaView<'_, f32>,
    ) -> Result<Option<Vec<f32>>, WorkerError> {
        match self {
            DeviceCollective::Nccl(c) if c.world_size() > 1 => {
                let mut all = stream
                    .alloc_zeros::<f32>(local.len() * c.world_size())
                    .map_err(driver_err("allocating the gathered logits"))?;
                c.all_gather(local, &mut all)
                    .map_err(nccl_err("all-gather"))?;
                if c.rank() == 0 {
                    Ok(Some(
                        stream
                            .clone_dtoh(&all)
                            .map_err(driver_err("copying logits to the host"))?,
                    ))
                } else {
                    stream
                        .synchronize()
                        .map_err(driver_err("waiting for the all-gather"))?;
                    Ok(None)
                }
            }
            DeviceCollective::Nccl(_) => Ok(Some(
                stream
                    .clone_dtoh(local)
                    .map_err(driver_err("copying logits to the host"))?,
            )),
            DeviceCollective::Host(c) => {
                let host = stream
                    .clone_dtoh(local)
                    .map_err(driver_err("copying logits to the host"))?;
                c.gather(&host)
            }
        }
    }
}
