//! The block pool side by side with a reference model built from plain `Vec`s
//! (linear scans, `Vec::remove`): seeded random runs of allocate / release / register
//! / lookup-and-acquire (32 cases of 2,000 operations), with deliberately colliding
//! hashes. After every operation both must agree on every block's reference count and
//! cached state, on the whole free list in order, and on every result.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed};
use scheduler::{BlockId, BlockPool, PrefixLink};

const BLOCK_SIZE: usize = 2;
const ROOT: ModelLink = (u32::MAX, 0);

/// A parent in the model: (block, epoch).
type ModelLink = (u32, u32);

#[derive(Clone, Debug, PartialEq)]
struct ModelEntry {
    hash: u64,
    parent: ModelLink,
    tokens: Vec<u32>,
}

/// The reference: the same policy, written the obvious way.
struct ModelPool {
    refs: Vec<u32>,
    /// Head (allocated next) first.
    free: Vec<BlockId>,
    cached: Vec<Option<ModelEntry>>,
    epochs: Vec<u32>,
}

impl ModelPool {
    fn new(num_blocks: usize) -> Self {
        ModelPool {
            refs: vec![0; num_blocks],
            free: (1..num_blocks as BlockId).collect(),
            cached: vec![None; num_blocks],
            epochs: vec![0; num_blocks],
        }
    }

    fn allocate(&mut self) -> Option<BlockId> {
        if self.free.is_empty() {
            return None;
        }
        let b = self.free.remove(0);
        self.cached[b as usize] = None;
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn acquire(&mut self, b: BlockId) {
        if self.refs[b as usize] == 0 {
            self.free.retain(|&f| f != b);
        }
        self.refs[b as usize] += 1;
    }

    fn release(&mut self, b: BlockId) {
        self.refs[b as usize] -= 1;
        if self.refs[b as usize] == 0 {
            if self.cached[b as usize].is_some() {
                self.free.push(b);
            } else {
                self.free.insert(0, b);
            }
        }
    }

    fn holder_of(&self, hash: u64) -> Option<BlockId> {
        self.cached
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.hash == hash))
            .map(|b| b as BlockId)
    }

    fn lookup(&self, parent: ModelLink, hash: u64, tokens: &[u32]) -> Option<(BlockId, ModelLink)> {
        let b = self.holder_of(hash)?;
        let wanted = ModelEntry {
            hash,
            parent,
            tokens: tokens.to_vec(),
        };
        (self.cached[b as usize].as_ref() == Some(&wanted))
            .then_some((b, (b, self.epochs[b as usize])))
    }

    fn register(&mut self, b: BlockId, parent: ModelLink, hash: u64, tokens: &[u32]) -> ModelLink {
        if let Some(existing) = self.holder_of(hash) {
            if let Some((_, link)) = self.lookup(parent, hash, tokens) {
                return link;
            }
            self.cached[existing as usize] = None;
            if self.refs[existing as usize] == 0 {
                self.free.retain(|&f| f != existing);
                self.free.insert(0, existing);
            }
        }
        self.epochs[b as usize] += 1;
        self.cached[b as usize] = Some(ModelEntry {
            hash,
            parent,
            tokens: tokens.to_vec(),
        });
        (b, self.epochs[b as usize])
    }
}

#[derive(Clone, Debug)]
enum PoolOp {
    Allocate,
    Release(Index),
    Register {
        held: Index,
        parent: Index,
        content: u8,
    },
    LookupAcquire {
        parent: Index,
        content: u8,
    },
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        3 => Just(PoolOp::Allocate),
        3 => any::<Index>().prop_map(PoolOp::Release),
        2 => (any::<Index>(), any::<Index>(), 0u8..12).prop_map(|(held, parent, content)| PoolOp::Register { held, parent, content }),
        3 => (any::<Index>(), 0u8..12).prop_map(|(parent, content)| PoolOp::LookupAcquire { parent, content }),
    ]
}

/// Contents `c` and `c + 5` share a hash: collisions on purpose.
fn key(content: u8) -> (u64, Vec<u32>) {
    (
        u64::from(content % 5),
        vec![u32::from(content % 3), u32::from(content / 3)],
    )
}

fn run(num_blocks: usize, ops: &[PoolOp]) {
    let mut pool = BlockPool::new(num_blocks, BLOCK_SIZE);
    let mut model = ModelPool::new(num_blocks);
    // Holds taken by the test (a block appears once per hold), and links seen so far.
    let mut held: Vec<BlockId> = Vec::new();
    let mut links: Vec<(PrefixLink, ModelLink)> = vec![(PrefixLink::ROOT, ROOT)];
    for op in ops {
        match op {
            PoolOp::Allocate => {
                let got = pool.allocate();
                assert_eq!(got, model.allocate());
                held.extend(got);
            }
            PoolOp::Release(i) if !held.is_empty() => {
                let b = held.swap_remove(i.index(held.len()));
                pool.release(b);
                model.release(b);
            }
            PoolOp::Register {
                held: i,
                parent,
                content,
            } => {
                let candidates: Vec<BlockId> = held
                    .iter()
                    .copied()
                    .filter(|&b| !pool.is_cached(b))
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let b = candidates[i.index(candidates.len())];
                let (parent, model_parent) = links[parent.index(links.len())];
                let (hash, tokens) = key(*content);
                let link = pool.register(b, parent, hash, &tokens);
                let model_link = model.register(b, model_parent, hash, &tokens);
                links.push((link, model_link));
            }
            PoolOp::LookupAcquire { parent, content } => {
                let (parent, model_parent) = links[parent.index(links.len())];
                let (hash, tokens) = key(*content);
                let got = pool.lookup(parent, hash, &tokens);
                let expected = model.lookup(model_parent, hash, &tokens);
                assert_eq!(
                    got.map(|(b, _)| b),
                    expected.map(|(b, _)| b),
                    "lookup of {content} under {model_parent:?}"
                );
                if let (Some((b, link)), Some((_, model_link))) = (got, expected) {
                    pool.acquire(b);
                    model.acquire(b);
                    held.push(b);
                    links.push((link, model_link));
                }
            }
            PoolOp::Release(_) => {}
        }
        assert_eq!(
            pool.free_blocks().collect::<Vec<_>>(),
            model.free,
            "free list, head first"
        );
        assert_eq!(pool.num_free(), model.free.len());
        assert_eq!(
            pool.num_cached(),
            model.cached.iter().filter(|c| c.is_some()).count()
        );
        for b in 1..num_blocks {
            assert_eq!(
                pool.ref_count(b as BlockId),
                model.refs[b],
                "refcount of {b}"
            );
            assert_eq!(
                pool.is_cached(b as BlockId),
                model.cached[b].is_some(),
                "cached state of {b}"
            );
        }
        assert_eq!(
            pool.num_free() + model.refs.iter().filter(|&&r| r > 0).count(),
            num_blocks - 1
        );
    }
    for b in held {
        pool.release(b);
    }
    assert_eq!(
        pool.num_free(),
        num_blocks - 1,
        "every hold returned: every block free"
    );
}

proptest! {
    #![proptest_config(Config { cases: 32, rng_seed: RngSeed::Fixed(0xb10c_9001), ..Config::default() })]

    #[test]
    fn block_pool_matches_a_vec_based_reference_model(num_blocks in 2usize..24, ops in prop::collection::vec(pool_op(), 2000)) {
        run(num_blocks, &ops);
    }
}
