//! The KV block pool: a fixed array of blocks, their reference counts, the free list
//! in eviction order, and the prefix-cache index over full blocks.
//!
//! Owns every block id in `0..num_blocks`. Block [`NULL_BLOCK`] (id 0) is the null
//! block: never allocated, never freed, never counted; block tables hold it where a
//! position's block was released (sliding window), and workers pad tables with it.
//! Sequences hold blocks through their block tables; the pool only counts them.
//!
//! The free list is a doubly linked list threaded through the block array
//! (`prev`/`next` as `u32`, [`NO_LINK`] = none): O(1) pop, push at either end, and
//! unlink from the middle (a cached free block reused by a prefix hit). Order, head
//! first: free blocks that hold no cached prefix (used first: nothing is lost), then
//! cached free blocks from least to most recently freed (LRU eviction from the head).
//!
//! A block is *cached* when it records a prefix hash, its parent link and its tokens,
//! and the prefix-cache index maps that hash to it. A cached block stays cached while
//! in use and while free, until it is evicted (allocated for new content) or replaced
//! in the index by a newer block of the same hash. Eviction does not touch the index
//! (that would be a random memory access per allocation): the entry goes stale, and
//! lookups ignore an entry whose block no longer records that hash. Stale entries are
//! overwritten by later registrations of their hash and purged once the index holds
//! twice as many entries as there are blocks. Lookups compare the tokens and the
//! parent link, so a hash collision costs a miss, never a wrong reuse: a parent link
//! names a block *and its epoch* (bumped each time the block is cached anew), so a
//! child cached under an evicted parent can never be reached through whatever now
//! occupies that block id. (The epoch is a `u32`: a wrong match would need one block
//! to be re-cached 2³² times while a stale child of it survives.)
//!
//! Invariants (for blocks `1..num_blocks`; checked by the crate's property tests):
//! - a block is in the free list iff its reference count is 0;
//! - free blocks + blocks with a non-zero count = `num_blocks - 1`;
//! - if block `b` is cached with hash `h` then `index[h] == b`;
//! - in the free list, every uncached block precedes every cached one.
//!
//! Costs: [`BlockPool::allocate`], [`BlockPool::release`] and [`BlockPool::acquire`]
//! are O(1) and touch no hash map; [`BlockPool::lookup`] and [`BlockPool::register`]
//! are one hash lookup plus a `block_size` token comparison or copy (a purge adds
//! amortized O(1) per registration). Memory: 40 bytes per block, `block_size` token
//! ids per block for the cached contents, and an index of up to 2 entries per block.

use std::collections::HashMap;

use crate::prefix_hash::IdBuildHasher;

/// Index of a KV block in every worker's cache.
pub type BlockId = u32;

/// The null block: a placeholder id that is never allocated.
pub const NULL_BLOCK: BlockId = 0;

/// "No block" in the free list's links and in [`PrefixLink::ROOT`].
pub const NO_LINK: u32 = u32::MAX;

/// The identity of a cached block as a parent in the prefix chain: the block and the
/// epoch at which it was cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixLink {
    block: BlockId,
    epoch: u32,
}

impl PrefixLink {
    /// The parent of a sequence's first block.
    pub const ROOT: PrefixLink = PrefixLink {
        block: NO_LINK,
        epoch: 0,
    };
}

#[derive(Clone, Copy, Debug)]
struct CachedPrefix {
    hash: u64,
    parent: PrefixLink,
}

#[derive(Clone, Debug)]
struct Block {
    ref_count: u32,
    prev: u32,
    next: u32,
    epoch: u32,
    cached: Option<CachedPrefix>,
}

/// The block array, its free list and the prefix-cache index.
#[derive(Clone, Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Token ids of each cached block, `block_size` per block.
    contents: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    num_cached: usize,
    /// Prefix hash → block; may hold stale entries (see the module docs).
    index: HashMap<u64, BlockId, IdBuildHasher>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks (the null block included), all free.
    ///
    /// # Panics
    /// If `num_blocks < 2`, `num_blocks > u32::MAX` or `block_size == 0`
    /// ([`crate::SchedulerConfig::validate`] rejects these first).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(
            num_blocks >= 2 && num_blocks < NO_LINK as usize,
            "num_blocks out of range"
        );
        assert!(block_size > 0, "block_size must be positive");
        let block = Block {
            ref_count: 0,
            prev: NO_LINK,
            next: NO_LINK,
            epoch: 0,
            cached: None,
        };
        let mut pool = BlockPool {
            block_size,
            blocks: vec![block; num_blocks],
            contents: vec![0; num_blocks * block_size],
            head: NO_LINK,
            tail: NO_LINK,
            num_free: 0,
            num_cached: 0,
            index: HashMap::default(),
        };
        for b in 1..num_blocks as u32 {
            pool.push_back(b);
        }
        pool
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be allocated at all: every block but the null block.
    pub fn num_usable(&self) -> usize {
        self.blocks.len() - 1
    }

    /// Blocks with reference count 0 (cached or not): what allocation can use.
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks holding a cached prefix, free or in use.
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }

    /// How many block tables hold `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block as usize].ref_count
    }

    /// Whether `block` holds a cached prefix.
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.blocks[block as usize].cached.is_some()
    }

    /// The free list from head (allocated next) to tail.
    pub fn free_blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        std::iter::successors((self.head != NO_LINK).then_some(self.head), |&b| {
            let next = self.blocks[b as usize].next;
            (next != NO_LINK).then_some(next)
        })
    }

    /// Takes the head of the free list with reference count 1, evicting its cached
    /// prefix if it had one; `None` when no block is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NO_LINK {
            return None;
        }
        self.unlink(b);
        self.uncache(b);
        self.blocks[b as usize].ref_count = 1;
        Some(b)
    }

    /// Adds a holder to `block` (a prefix-cache hit), taking it off the free list if
    /// it was free.
    pub fn acquire(&mut self, block: BlockId) {
        debug_assert_ne!(block, NULL_BLOCK);
        if self.blocks[block as usize].ref_count == 0 {
            self.unlink(block);
        }
        self.blocks[block as usize].ref_count += 1;
    }

    /// Drops one holder of `block`; at zero the block joins the free list: at the
    /// tail (most recently used) if cached, at the head otherwise.
    pub fn release(&mut self, block: BlockId) {
        let blk = &mut self.blocks[block as usize];
        debug_assert!(
            block != NULL_BLOCK && blk.ref_count > 0,
            "release of a block nobody holds"
        );
        blk.ref_count -= 1;
        if blk.ref_count == 0 {
            if blk.cached.is_some() {
                self.push_back(block);
            } else {
                self.push_front(block);
            }
        }
    }

    /// The cached block that continues the chain at `parent` with exactly `tokens`
    /// under `hash`, and its link for the next lookup.
    pub fn lookup(
        &self,
        parent: PrefixLink,
        hash: u64,
        tokens: &[u32],
    ) -> Option<(BlockId, PrefixLink)> {
        let &b = self.index.get(&hash)?;
        let cached = self.blocks[b as usize].cached?;
        (cached.hash == hash && cached.parent == parent && self.contents_of(b) == tokens)
            .then(|| (b, self.link(b)))
    }

    /// Records that `block`, held by the caller and uncached, now holds the KV of
    /// `tokens` continuing the chain at `parent`. Returns the link the chain continues
    /// from: `block`'s own, or that of an equal block already cached (then `block`
    /// stays private). An index entry of the same hash but other contents is
    /// replaced.
    pub fn register(
        &mut self,
        block: BlockId,
        parent: PrefixLink,
        hash: u64,
        tokens: &[u32],
    ) -> PrefixLink {
        debug_assert!(
            self.blocks[block as usize].ref_count > 0
                && self.blocks[block as usize].cached.is_none()
        );
        debug_assert_eq!(tokens.len(), self.block_size);
        if let Some(&existing) = self.index.get(&hash) {
            if let Some((_, link)) = self.lookup(parent, hash, tokens) {
                return link;
            }
            if self.blocks[existing as usize]
                .cached
                .is_some_and(|c| c.hash == hash)
            {
                self.uncache(existing);
                if self.blocks[existing as usize].ref_count == 0 {
                    // No longer cached: it belongs with the uncached free blocks.
                    self.unlink(existing);
                    self.push_front(existing);
                }
            }
        }
        let blk = &mut self.blocks[block as usize];
        blk.epoch = blk.epoch.wrapping_add(1);
        blk.cached = Some(CachedPrefix { hash, parent });
        self.num_cached += 1;
        let start = block as usize * self.block_size;
        self.contents[start..start + self.block_size].copy_from_slice(tokens);
        self.index.insert(hash, block);
        if self.index.len() > 2 * self.blocks.len() {
            let blocks = &self.blocks;
            self.index
                .retain(|&h, &mut b| blocks[b as usize].cached.is_some_and(|c| c.hash == h));
        }
        self.link(block)
    }

    fn link(&self, block: BlockId) -> PrefixLink {
        PrefixLink {
            block,
            epoch: self.blocks[block as usize].epoch,
        }
    }

    fn contents_of(&self, block: BlockId) -> &[u32] {
        let start = block as usize * self.block_size;
        &self.contents[start..start + self.block_size]
    }

    /// Forgets the block's cached prefix; its index entry goes stale.
    fn uncache(&mut self, block: BlockId) {
        if self.blocks[block as usize].cached.take().is_some() {
            self.num_cached -= 1;
        }
    }

    fn push_front(&mut self, b: BlockId) {
        let old = self.head;
        let blk = &mut self.blocks[b as usize];
        blk.prev = NO_LINK;
        blk.next = old;
        if old == NO_LINK {
            self.tail = b;
        } else {
            self.blocks[old as usize].prev = b;
        }
        self.head = b;
        self.num_free += 1;
    }

    fn push_back(&mut self, b: BlockId) {
        let old = self.tail;
        let blk = &mut self.blocks[b as usize];
        blk.prev = old;
        blk.next = NO_LINK;
        if old == NO_LINK {
            self.head = b;
        } else {
            self.blocks[old as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: BlockId) {
        let Block { prev, next, .. } = self.blocks[b as usize];
        if prev == NO_LINK {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NO_LINK {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NO_LINK;
        blk.next = NO_LINK;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(tokens: &[u32]) -> u64 {
        crate::prefix_hash::prefix_hash(crate::prefix_hash::ROOT_HASH, tokens)
    }

    #[test]
    fn null_block_is_never_allocated() {
        let mut pool = BlockPool::new(4, 2);
        let got: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(pool.num_usable(), 3);
        assert_eq!(pool.num_free(), 0);
    }

    #[test]
    fn uncached_free_blocks_are_used_before_cached_ones_which_go_in_lru_order() {
        let mut pool = BlockPool::new(5, 2);
        let (a, b, c) = (
            pool.allocate().unwrap(),
            pool.allocate().unwrap(),
            pool.allocate().unwrap(),
        );
        pool.register(a, PrefixLink::ROOT, hash(&[1, 1]), &[1, 1]);
        pool.register(b, PrefixLink::ROOT, hash(&[2, 2]), &[2, 2]);
        pool.release(b);
        pool.release(c);
        pool.release(a);
        // c is uncached: head; then b (freed before a), then a.
        assert_eq!(pool.free_blocks().collect::<Vec<_>>(), vec![c, 4, b, a]);
        assert_eq!(pool.allocate(), Some(c));
        assert_eq!(pool.allocate(), Some(4));
        assert_eq!(pool.allocate(), Some(b));
        assert!(!pool.is_cached(b), "allocation evicts the cached prefix");
        assert_eq!(pool.lookup(PrefixLink::ROOT, hash(&[2, 2]), &[2, 2]), None);
        assert!(pool
            .lookup(PrefixLink::ROOT, hash(&[1, 1]), &[1, 1])
            .is_some());
    }

    #[test]
    fn a_prefix_hit_takes_a_cached_block_out_of_the_middle_of_the_free_list() {
        let mut pool = BlockPool::new(5, 1);
        let ids: Vec<_> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        for (i, &b) in ids.iter().enumerate() {
            pool.register(b, PrefixLink::ROOT, hash(&[i as u32]), &[i as u32]);
            pool.release(b);
        }
        let (hit, _) = pool.lookup(PrefixLink::ROOT, hash(&[2]), &[2]).unwrap();
        pool.acquire(hit);
        assert_eq!(pool.ref_count(hit), 1);
        assert_eq!(
            pool.free_blocks().collect::<Vec<_>>(),
            vec![ids[0], ids[1], ids[3]]
        );
        pool.acquire(hit);
        pool.release(hit);
        assert_eq!(pool.num_free(), 3);
    }

    #[test]
    fn a_hash_collision_is_a_miss_not_a_wrong_reuse() {
        let mut pool = BlockPool::new(3, 2);
        let a = pool.allocate().unwrap();
        pool.register(a, PrefixLink::ROOT, 42, &[1, 2]);
        assert_eq!(
            pool.lookup(PrefixLink::ROOT, 42, &[3, 4]),
            None,
            "same hash, other tokens"
        );
        let b = pool.allocate().unwrap();
        let link_a = pool.register(b, PrefixLink::ROOT, 7, &[5, 6]);
        assert_eq!(
            pool.lookup(link_a, 42, &[1, 2]),
            None,
            "same hash and tokens, other parent"
        );
    }

    #[test]
    fn a_child_of_an_evicted_parent_is_unreachable_even_if_the_id_is_cached_again() {
        let mut pool = BlockPool::new(3, 1);
        let parent = pool.allocate().unwrap();
        let link = pool.register(parent, PrefixLink::ROOT, hash(&[1]), &[1]);
        let child = pool.allocate().unwrap();
        pool.register(child, link, hash(&[2]), &[2]);
        pool.release(parent);
        pool.release(child);
        // Evict the parent (it is the LRU head) and cache other contents in that id.
        assert_eq!(pool.allocate(), Some(parent));
        let new_link = pool.register(parent, PrefixLink::ROOT, hash(&[9]), &[9]);
        assert_eq!(new_link.block, link.block);
        assert_eq!(pool.lookup(new_link, hash(&[2]), &[2]), None);
    }

    #[test]
    fn eviction_leaves_stale_index_entries_which_are_ignored_and_purged() {
        let mut pool = BlockPool::new(4, 1);
        for round in 0..100u32 {
            let b = pool.allocate().unwrap();
            pool.register(b, PrefixLink::ROOT, hash(&[round]), &[round]);
            pool.release(b);
            // Uncached blocks go first, so after 3 rounds each allocation evicts.
            assert!(pool.num_cached() <= 3);
            assert!(
                pool.index.len() <= 2 * 4,
                "purged: {} entries",
                pool.index.len()
            );
        }
        assert_eq!(
            pool.lookup(PrefixLink::ROOT, hash(&[0]), &[0]),
            None,
            "evicted long ago"
        );
        assert!(pool.lookup(PrefixLink::ROOT, hash(&[99]), &[99]).is_some());
    }

    #[test]
    fn registering_an_already_cached_prefix_keeps_the_first_block() {
        let mut pool = BlockPool::new(3, 1);
        let first = pool.allocate().unwrap();
        let second = pool.allocate().unwrap();
        let l1 = pool.register(first, PrefixLink::ROOT, hash(&[1]), &[1]);
        let l2 = pool.register(second, PrefixLink::ROOT, hash(&[1]), &[1]);
        assert_eq!(l1, l2);
        assert!(!pool.is_cached(second));
        assert_eq!(pool.num_cached(), 1);
    }
}
