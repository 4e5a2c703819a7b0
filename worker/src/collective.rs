//! Collectives between tensor-parallel ranks.
//!
//! The [`Collective`] trait is what the forward pass needs: an in-place sum
//! all-reduce (twice per layer) and a gather of vocab-parallel logits to rank 0.
//! [`LocalCollective`] implements it for ranks that are threads of one process;
//! the multi-process TCP and NCCL implementations sit behind the same trait.
//!
//! Invariant: every rank obtains bit-identical all-reduce results, because ranks'
//! contributions are summed in rank order everywhere. Every rank must call the
//! same collectives in the same order (the step plan guarantees it).

use std::sync::{Arc, Barrier, Mutex};

use crate::WorkerError;

/// Collective operations over the ranks of one tensor-parallel group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` across ranks, written back into `buf` on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), WorkerError>;
    /// Concatenation of every rank's `local` (in rank order) on rank 0; `None` elsewhere.
    /// All ranks must pass equally long slices.
    fn gather(&mut self, local: &[f32]) -> Result<Option<Vec<f32>>, WorkerError>;
}

/// A single rank: the identity collective.
pub struct SoloCollective;

impl Collective for SoloCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), WorkerError> {
        Ok(())
    }
    fn gather(&mut self, local: &[f32]) -> Result<Option<Vec<f32>>, WorkerError> {
        Ok(Some(local.to_vec()))
    }
}

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// Ranks as threads of one process, exchanging through shared memory.
pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCollective {
    /// One handle per rank of a new group of `world_size` ranks.
    pub fn group(world_size: usize) -> Vec<LocalCollective> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world_size]),
            barrier: Barrier::new(world_size),
        });
        (0..world_size)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn publish(&self, local: &[f32]) {
        let mut slots = self.shared.slots.lock().expect("collective lock");
        slots[self.rank].clear();
        slots[self.rank].extend_from_slice(local);
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.slots.lock().expect("collective lock").len()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        self.publish(buf);
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().expect("collective lock");
            if slots.iter().any(|s| s.len() != buf.len()) {
                return Err(WorkerError::Collective(
                    "all_reduce_sum: ranks passed buffers of different lengths".into(),
                ));
            }
            buf.copy_from_slice(&slots[0]);
            for s in &slots[1..] {
                for (b, v) in buf.iter_mut().zip(s) {
                    *b += v;
                }
            }
        }
        // Nobody may overwrite its slot before every rank has read all of them.
        self.shared.barrier.wait();
        Ok(())
    }

    fn gather(&mut self, local: &[f32]) -> Result<Option<Vec<f32>>, WorkerError> {
        self.publish(local);
        self.shared.barrier.wait();
        let out =
            (self.rank == 0).then(|| self.shared.slots.lock().expect("collective lock").concat());
        self.shared.barrier.wait();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_all_reduce_to_the_same_sum_and_gather_in_rank_order() {
        let handles: Vec<_> = LocalCollective::group(4)
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut buf = vec![r, 2.0 * r, 1.0];
                    c.all_reduce_sum(&mut buf).unwrap();
                    let g = c.gather(&[r, r]).unwrap();
                    (c.rank(), buf, g)
                })
            })
            .collect();
        for h in handles {
            let (rank, buf, g) = h.join().unwrap();
            assert_eq!(buf, vec![6.0, 12.0, 4.0]);
            if rank == 0 {
                assert_eq!(g.unwrap(), vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
            } else {
                assert!(g.is_none());
            }
        }
    }
}
