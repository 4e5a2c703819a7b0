//! One request's sequence — its tokens, its progress through the KV cache, its block
//! table and its place in the prefix chain — and [`Sequences`], the slab that holds
//! them all.
//!
//! Invariants:
//! - `num_computed <= tokens.len()`; the tokens `..num_computed` have their KV in the
//!   blocks of `table` (those outside the sliding window excepted);
//! - a running sequence's table covers `num_computed` tokens; a waiting one's is empty;
//! - `block_hashes[i]` is the prefix hash of full block `i` of `tokens`;
//! - the leading `num_registered` full blocks are in the prefix chain, which continues
//!   at `cache_parent`;
//! - table entries `..num_released` are [`NULL_BLOCK`] (released by the window);
//! - `tokens` holds committed tokens only: drafts live in `draft` and in the plan, and
//!   `block_hashes` never covers a draft.
//!
//! Costs: appending a token is O(1) plus one [`prefix_hash()`] per filled block;
//! releasing a table is O(blocks). The slab gives O(1) access by slot (what the step
//! loop uses) and one hash lookup by id.

use std::collections::HashMap;

use crate::block_pool::{BlockId, BlockPool, PrefixLink, NULL_BLOCK};
use crate::prefix_hash::{prefix_hash, IdBuildHasher, ROOT_HASH};
use crate::{Priority, SeqId};

/// The KV blocks of one sequence, in position order: block `i` holds positions
/// `i * block_size .. (i + 1) * block_size`. Append-only while the sequence runs.
#[derive(Clone, Debug, Default)]
pub(crate) struct BlockTable(Vec<BlockId>);

impl BlockTable {
    pub(crate) fn blocks(&self) -> &[BlockId] {
        &self.0
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn push(&mut self, block: BlockId) {
        self.0.push(block);
    }

    /// Releases every block, last first, so that a sequence's tail blocks (the least
    /// likely to be shared) are evicted before its head.
    pub(crate) fn release_all(&mut self, pool: &mut BlockPool) {
        for &b in self.0.iter().rev().filter(|&&b| b != NULL_BLOCK) {
            pool.release(b);
        }
        self.0.clear();
    }

    /// Releases the entries from `len` on, last first.
    pub(crate) fn truncate(&mut self, len: usize, pool: &mut BlockPool) {
        while self.0.len() > len {
            let b = self.0.pop().expect("longer than len");
            if b != NULL_BLOCK {
                pool.release(b);
            }
        }
    }

    /// Releases entry `i` and leaves the null block in its place.
    fn release_entry(&mut self, i: usize, pool: &mut BlockPool) {
        let b = std::mem::replace(&mut self.0[i], NULL_BLOCK);
        if b != NULL_BLOCK {
            pool.release(b);
        }
    }
}

/// Whether a sequence waits for admission or holds blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SeqState {
    Waiting,
    Running,
}

#[derive(Clone, Debug)]
pub(crate) struct Sequence {
    pub(crate) id: SeqId,
    /// Prompt then generated tokens.
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Already clamped to what fits.
    pub(crate) max_tokens: usize,
    pub(crate) priority: Priority,
    pub(crate) arrival: u64,
    pub(crate) state: SeqState,
    pub(crate) num_computed: usize,
    pub(crate) table: BlockTable,
    pub(crate) block_hashes: Vec<u64>,
    pub(crate) num_registered: usize,
    pub(crate) cache_parent: PrefixLink,
    pub(crate) num_released: usize,
    /// Workers hold state for this id (it appeared in a plan since its last reset).
    pub(crate) on_workers: bool,
    /// It was preempted at least once: while waiting, it goes before fresh requests
    /// of its (aged) class.
    pub(crate) requeued: bool,
    /// Draft tokens proposed for the next step (consumed by `schedule`).
    pub(crate) draft: Vec<u32>,
    /// Drafts of the plan in flight: the tokens that come back are accepted drafts
    /// (a prefix of these) and then one more.
    pub(crate) in_flight_drafts: Vec<u32>,
}

impl Sequence {
    pub(crate) fn new(
        id: SeqId,
        prompt: Vec<u32>,
        max_tokens: usize,
        priority: Priority,
        arrival: u64,
        block_size: usize,
    ) -> Self {
        let mut parent = ROOT_HASH;
        let block_hashes = prompt
            .chunks_exact(block_size)
            .map(|block| {
                parent = prefix_hash(parent, block);
                parent
            })
            .collect();
        Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens,
            priority,
            arrival,
            state: SeqState::Waiting,
            num_computed: 0,
            table: BlockTable::default(),
            block_hashes,
            num_registered: 0,
            cache_parent: PrefixLink::ROOT,
            num_released: 0,
            on_workers: false,
            requeued: false,
            draft: Vec::new(),
            in_flight_drafts: Vec::new(),
        }
    }

    pub(crate) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Appends a sampled token, hashing the block it completes.
    pub(crate) fn push_token(&mut self, token: u32, block_size: usize) {
        self.tokens.push(token);
        if self.tokens.len().is_multiple_of(block_size) {
            let parent = self.block_hashes.last().copied().unwrap_or(ROOT_HASH);
            let block = &self.tokens[self.tokens.len() - block_size..];
            self.block_hashes.push(prefix_hash(parent, block));
        }
    }

    /// Puts the leading `full_blocks` computed full blocks into the prefix cache
    /// (those not there yet). Stops at a block the window already released: the chain
    /// cannot continue past a block that is not held.
    pub(crate) fn register_computed(&mut self, full_blocks: usize, pool: &mut BlockPool) {
        let bs = pool.block_size();
        while self.num_registered < full_blocks {
            let i = self.num_registered;
            let block = self.table.blocks()[i];
            if block == NULL_BLOCK {
                return;
            }
            let tokens = &self.tokens[i * bs..(i + 1) * bs];
            self.cache_parent =
                pool.register(block, self.cache_parent, self.block_hashes[i], tokens);
            self.num_registered += 1;
        }
    }

    /// Releases the blocks that no future query of this sequence reads: those wholly
    /// before the window of the next position to compute.
    pub(crate) fn release_outside_window(&mut self, window: usize, pool: &mut BlockPool) {
        let keep_from = ((self.num_computed + 1).saturating_sub(window) / pool.block_size())
            .min(self.table.len());
        while self.num_released < keep_from {
            self.table.release_entry(self.num_released, pool);
            self.num_released += 1;
        }
    }

    /// Frees every block and rewinds to "nothing computed": preemption by recompute.
    /// The tokens (generated ones included) are kept and recomputed on re-admission.
    pub(crate) fn rewind(&mut self, pool: &mut BlockPool) {
        self.table.release_all(pool);
        self.state = SeqState::Waiting;
        self.num_computed = 0;
        self.num_registered = 0;
        self.cache_parent = PrefixLink::ROOT;
        self.num_released = 0;
        self.requeued = true;
        self.draft.clear();
        self.in_flight_drafts.clear();
    }
}

/// Every known sequence, in reusable slots, with an index by id.
///
/// Invariant: `index[id] == slot` iff `slots[slot]` holds the sequence `id`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sequences {
    slots: Vec<Option<Sequence>>,
    vacant: Vec<u32>,
    index: HashMap<SeqId, u32, IdBuildHasher>,
}

impl Sequences {
    pub(crate) fn contains(&self, id: SeqId) -> bool {
        self.index.contains_key(&id)
    }

    pub(crate) fn slot_of(&self, id: SeqId) -> Option<u32> {
        self.index.get(&id).copied()
    }

    pub(crate) fn insert(&mut self, seq: Sequence) -> u32 {
        let id = seq.id;
        let slot = match self.vacant.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(seq);
                slot
            }
            None => {
                self.slots.push(Some(seq));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        slot
    }

    pub(crate) fn remove(&mut self, slot: u32) -> Sequence {
        let seq = self.slots[slot as usize]
            .take()
            .expect("slot holds a sequence");
        self.index.remove(&seq.id);
        self.vacant.push(slot);
        seq
    }

    pub(crate) fn get(&self, slot: u32) -> &Sequence {
        self.slots[slot as usize]
            .as_ref()
            .expect("slot holds a sequence")
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> &mut Sequence {
        self.slots[slot as usize]
            .as_mut()
            .expect("slot holds a sequence")
    }

    /// The sequence in `slot` if it is still `id` and running: what a plan entry or a
    /// sampled token may act on.
    pub(crate) fn running_mut(&mut self, slot: u32, id: SeqId) -> Option<&mut Sequence> {
        self.slots
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|s| s.id == id && s.state == SeqState::Running)
    }
}
