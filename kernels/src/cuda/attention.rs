//! Paged attention on the GPU: the per-step plan and the per-layer launch.
//!
//! Owns: [`plan_work`], the host-side split of a step's [`AttnMeta`] into work items
//! (pure, tested without a GPU), [`AttnPlan`], its device copy plus the split-K
//! workspace, and [`CudaKernels::paged_attention`], which mirrors
//! [`crate::reference::paged_attention`].
//!
//! Plan once per step, run per layer (FlashInfer's plan/run): every layer of a step has
//! the same sequences, so the metadata is uploaded and the work list built once and
//! reused by all 56 layers.
//!
//! Work items: a sequence's query rows are packed with the `group` q heads of one kv
//! head (row = token·group + g), so each K/V page is read once per item for the group.
//! A sequence goes to the smallest block shape that holds all its rows — 16 rows
//! (1 warp: decodes), 64 (4 warps) — or, when it has more than 64 rows, is cut into
//! tiles of `⌊128/group⌋` tokens for 128-row blocks (8 warps). An item's keys are
//! `[window_start(first pos), last pos]`.
//!
//! Split-K (flash-decoding): when the step has less than [`MAX_SPLIT_WAVES`] waves of
//! blocks (a wave = SMs × resident blocks per SM, from the occupancy API), every item's
//! key range is cut into `s` chunks (multiples of 64 keys, at least
//! [`AttnPlanConfig::min_split_keys`]), with `s` chosen so the grid's last wave is as
//! full as possible; `attn_merge_bf16` combines the partial results. Items are ordered
//! longest first so the tail of the grid is short.
//!
//! Invariants of a plan (tested in `plan_covers_every_query_key_pair_once`): every
//! query row is in exactly one item per split index; a row's keys are covered by its
//! item's splits exactly once; `token_splits[t]` is the split count of the item that
//! holds token `t`; split indices are `< max_splits`.
//!
//! Costs: planning is O(n_items · max_splits) on the host plus one upload of the
//! metadata (a few KB); the workspace is `max_splits · n_tokens · n_heads · (d + 1)`
//! f32, allocated only when some item is split.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::bf16;

use super::ops::{expect_len, shape_err};
use super::{CudaKernels, Kernel};
use crate::reference::{AttnMeta, KvLayout};
use crate::KernelError;

/// Split chunks are multiples of this many keys (a multiple of every tier's tile).
const BLOCK_N: u32 = 64;
/// Threads of the merge kernel (`MERGE_THREADS`).
const MERGE_THREADS: u32 = 128;
/// `ATTN_NO_SPLIT`: the item writes bf16 output directly.
const NO_SPLIT: u32 = u32::MAX;
/// Most splits per item (`ATTN_MAX_SPLITS`, the merge kernel's shared array).
pub const MAX_SPLITS: u32 = 64;
/// Split key ranges only while the grid has fewer waves of blocks than this.
pub const MAX_SPLIT_WAVES: u64 = 4;

/// One block shape of the attention kernel (`ATTN_KERNEL` instantiations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Query rows per block (16 per warp).
    pub rows: u32,
    /// Keys per shared-memory tile, and tiles in the cp.async pipeline.
    pub block_n: u32,
    pub stages: u32,
    pub kernel_d128: Kernel,
    pub kernel_d64: Kernel,
}

/// Block shapes, smallest first.
pub const TIERS: [Tier; 3] = [
    Tier {
        rows: 16,
        block_n: 32,
        stages: 3,
        kernel_d128: Kernel::AttentionD128W1,
        kernel_d64: Kernel::AttentionD64W1,
    },
    Tier {
        rows: 64,
        block_n: 64,
        stages: 2,
        kernel_d128: Kernel::AttentionD128W4,
        kernel_d64: Kernel::AttentionD64W4,
    },
    Tier {
        rows: 128,
        block_n: 64,
        stages: 2,
        kernel_d128: Kernel::AttentionD128W8,
        kernel_d64: Kernel::AttentionD64W8,
    },
];

impl Tier {
    pub fn kernel(&self, head_dim: usize) -> Kernel {
        if head_dim == 128 {
            self.kernel_d128
        } else {
            self.kernel_d64
        }
    }

    pub fn threads(&self) -> u32 {
        self.rows / 16 * 32
    }

    /// Dynamic shared memory: the Q tile plus `stages` K and V tiles.
    pub fn smem_bytes(&self, head_dim: usize) -> usize {
        (self.rows + 2 * self.stages * self.block_n) as usize
            * head_dim
            * std::mem::size_of::<bf16>()
    }
}

/// Tuning of the split-K decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnPlanConfig {
    /// Never split a key range into chunks shorter than this (rounded up to 64).
    pub min_split_keys: u32,
    /// Upper bound on splits per item (1 disables split-K; capped at [`MAX_SPLITS`]).
    pub max_splits: u32,
}

impl Default for AttnPlanConfig {
    fn default() -> Self {
        Self {
            min_split_keys: 256,
            max_splits: 64,
        }
    }
}

/// What the planner needs to know of the GPU: SMs, and resident blocks per SM of each
/// tier's kernel (for the head dim in use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridShape {
    pub sms: u32,
    pub blocks_per_sm: [u32; 3],
}

/// One work item, laid out as the kernel reads it (`ATTN_WORK_WORDS` u32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub seq: u32,
    /// Query tokens `[tok_begin, tok_end)`, counted from the sequence's first query row.
    pub tok_begin: u32,
    pub tok_end: u32,
    /// Key positions `[kv_begin, kv_end)`.
    pub kv_begin: u32,
    pub kv_end: u32,
    /// Index of this split, or `u32::MAX` when the item is not split.
    pub split: u32,
    /// Batch row of the sequence's first query token, and that token's position.
    pub q_start: u32,
    pub first_pos: u32,
}

/// The host-side work list of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkPlan {
    /// Work items per tier of [`TIERS`].
    pub tiers: [Vec<WorkItem>; 3],
    /// Per query token: how many splits its item has (1 = written directly).
    pub token_splits: Vec<u32>,
    /// 0 when nothing is split.
    pub max_splits: u32,
}

impl WorkPlan {
    pub fn n_items(&self) -> usize {
        self.tiers.iter().map(Vec::len).sum()
    }
}

/// Query tiles of one step: (tier, seq, tok_begin, tok_end, kv_begin, kv_end).
fn query_tiles(meta: &AttnMeta, group: u32) -> Vec<(usize, u32, u32, u32, u32, u32)> {
    let mut tiles = Vec::new();
    for s in 0..meta.n_seqs() {
        let q_len = meta.q_indptr[s + 1] - meta.q_indptr[s];
        let first_pos = meta.ctx_lens[s] - q_len;
        let tier = TIERS
            .iter()
            .position(|t| q_len * group <= t.rows)
            .unwrap_or(TIERS.len() - 1);
        let per_tile = TIERS[tier].rows / group;
        let mut tb = 0;
        while tb < q_len {
            let te = (tb + per_tile).min(q_len);
            let kv_begin = meta.window_start(first_pos + tb);
            tiles.push((tier, s as u32, tb, te, kv_begin, first_pos + te));
            tb = te;
        }
    }
    tiles
}

/// Splits per item: the `s` whose grid fills its last wave best (fewer splits on a
/// near tie), 1 when the unsplit grid already has [`MAX_SPLIT_WAVES`] waves.
fn choose_splits(
    caps: &[(usize, u32)],
    n_kv_heads: u32,
    grid: GridShape,
    config: AttnPlanConfig,
) -> u32 {
    let blocks = |s: u32| -> (u64, f64) {
        let (mut n, mut weighted) = (0u64, 0f64);
        for &(tier, cap) in caps {
            let b = (s.min(cap) * n_kv_heads) as u64;
            n += b;
            weighted += b as f64 * grid.blocks_per_sm[tier].max(1) as f64;
        }
        // Blocks per wave: SMs × resident blocks, averaged over the tiers in use.
        let wave = grid.sms as f64 * weighted / n.max(1) as f64;
        (n, wave)
    };
    let (base, wave) = blocks(1);
    if base == 0 || base as f64 >= MAX_SPLIT_WAVES as f64 * wave {
        return 1;
    }
    let fill = |s: u32| {
        let (n, wave) = blocks(s);
        n as f64 / ((n as f64 / wave).ceil() * wave)
    };
    let max_cap = caps.iter().map(|c| c.1).max().unwrap_or(1);
    let (mut best, mut best_fill) = (1, fill(1));
    for s in 2..=config.max_splits.min(MAX_SPLITS).min(max_cap) {
        if blocks(s).0 as f64 > MAX_SPLIT_WAVES as f64 * wave {
            break;
        }
        let f = fill(s);
        if f > best_fill + 0.01 {
            (best, best_fill) = (s, f);
        }
    }
    best
}

/// Splits a step into work items (see the module docs).
pub fn plan_work(
    meta: &AttnMeta,
    group: u32,
    n_kv_heads: u32,
    grid: GridShape,
    config: AttnPlanConfig,
) -> WorkPlan {
    let tiles = query_tiles(meta, group);
    let min_keys = config.min_split_keys.max(1).next_multiple_of(BLOCK_N);
    let caps: Vec<(usize, u32)> = tiles
        .iter()
        .map(|t| (t.0, (t.5 - t.4).div_ceil(min_keys)))
        .collect();
    let desired = choose_splits(&caps, n_kv_heads, grid, config);

    let mut plan = WorkPlan {
        token_splits: vec![1; meta.n_tokens()],
        ..Default::default()
    };
    for (tier, seq, tb, te, kv_begin, kv_end) in tiles {
        let q_start = meta.q_indptr[seq as usize];
        let first_pos = meta.ctx_lens[seq as usize] - (meta.q_indptr[seq as usize + 1] - q_start);
        let keys = kv_end - kv_begin;
        let splits = desired.min(keys.div_ceil(min_keys)).max(1);
        let chunk = keys.div_ceil(splits).next_multiple_of(BLOCK_N);
        let splits = keys.div_ceil(chunk);
        for i in 0..splits {
            plan.tiers[tier].push(WorkItem {
                seq,
                tok_begin: tb,
                tok_end: te,
                kv_begin: kv_begin + i * chunk,
                kv_end: (kv_begin + (i + 1) * chunk).min(kv_end),
                split: if splits == 1 { NO_SPLIT } else { i },
                q_start,
                first_pos,
            });
        }
        if splits > 1 {
            for t in tb..te {
                plan.token_splits[(q_start + t) as usize] = splits;
            }
            plan.max_splits = plan.max_splits.max(splits);
        }
    }
    // Longest first: the last wave of blocks is then the shortest.
    for list in &mut plan.tiers {
        list.sort_by_key(|w| std::cmp::Reverse(w.kv_end - w.kv_begin));
    }
    plan
}

/// Kernel parameters, passed by value; mirrors `struct AttnParams` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnParams {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    out: u64,
    part_o: u64,
    part_lse: u64,
    work: u64,
    block_tables: u64,
    max_blocks: u32,
    block_shift: u32,
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    n_tokens: u32,
    window: u32,
    scale_log2: f32,
}

// SAFETY: `AttnParams` is `repr(C)`, `Copy`, holds only integers and device addresses,
// and matches the field order and types of the CUDA struct.
unsafe impl DeviceRepr for AttnParams {}

/// The device buffers an [`AttnPlan`] fills: block tables, one work list per tier,
/// and the split-K workspace. Each is used for a prefix of its length. Handing a
/// finished plan's buffers ([`AttnPlan::into_buffers`]) to the next
/// [`CudaKernels::plan_attention_in`] reuses them — one host-to-device copy per list
/// and no allocation unless a step needs more than any before it (then the buffer
/// grows by at least half).
#[derive(Default)]
pub struct PlanBuffers {
    block_tables: Option<CudaSlice<u32>>,
    tiers: [Option<CudaSlice<u32>>; 3],
    token_splits: Option<CudaSlice<u32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
    /// Allocations made so far (a reused set stops growing once warm).
    pub allocations: u64,
}

impl PlanBuffers {
    /// `slot` holds at least `len` elements afterwards (contents unspecified).
    fn reserve<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        stream: &Arc<CudaStream>,
        slot: &mut Option<CudaSlice<T>>,
        len: usize,
        allocations: &mut u64,
    ) -> Result<(), KernelError> {
        let have = slot.as_ref().map_or(0, |b| b.len());
        if have < len.max(1) {
            *slot = None; // free first: the old buffer is not needed
            *slot = Some(stream.alloc_zeros::<T>(len.max(1).max(have + have / 2))?);
            *allocations += 1;
        }
        Ok(())
    }

    /// Copies `data` into the start of `slot` (grown as needed).
    fn put(
        stream: &Arc<CudaStream>,
        slot: &mut Option<CudaSlice<u32>>,
        data: &[u32],
        allocations: &mut u64,
    ) -> Result<(), KernelError> {
        Self::reserve(stream, slot, data.len(), allocations)?;
        if !data.is_empty() {
            let buf = slot.as_mut().expect("reserved");
            stream.memcpy_htod(data, &mut buf.slice_mut(0..data.len()))?;
        }
        Ok(())
    }
}

/// A step's attention metadata on the device, plus its work list and workspace.
/// Build with [`CudaKernels::plan_attention`] (fresh buffers) or
/// [`CudaKernels::plan_attention_in`] (reused ones); use for every layer of the step.
pub struct AttnPlan {
    n_heads: usize,
    layout: KvLayout,
    n_tokens: usize,
    max_blocks: u32,
    window: u32,
    /// Work items per tier (0: the tier does not launch).
    items: [u32; 3],
    /// Some item is split: the merge kernel runs over the workspace.
    split: bool,
    bufs: PlanBuffers,
    work: WorkPlan,
}

impl AttnPlan {
    /// The host-side work list this plan runs.
    pub fn work(&self) -> &WorkPlan {
        &self.work
    }

    /// The device buffers, for the next step's [`CudaKernels::plan_attention_in`].
    pub fn into_buffers(self) -> PlanBuffers {
        self.bufs
    }
}

fn flatten(items: &[WorkItem]) -> Vec<u32> {
    items
        .iter()
        .flat_map(|w| {
            [
                w.seq,
                w.tok_begin,
                w.tok_end,
                w.kv_begin,
                w.kv_end,
                w.split,
                w.q_start,
                w.first_pos,
            ]
        })
        .collect()
}

impl CudaKernels {
    /// Validates `meta` against the shapes and uploads it with its work list (see the
    /// module docs). Requirements beyond the reference op's: `head_dim` 64 or 128,
    /// `n_heads / n_kv_heads ≤ 16`, a power-of-two block size.
    pub fn plan_attention(
        &self,
        meta: &AttnMeta,
        n_heads: usize,
        layout: KvLayout,
        config: AttnPlanConfig,
    ) -> Result<AttnPlan, KernelError> {
        self.plan_attention_in(meta, n_heads, layout, config, PlanBuffers::default())
    }

    /// As [`CudaKernels::plan_attention`], filling `bufs` (a previous plan's, see
    /// [`PlanBuffers`]) instead of allocating. The copies are ordered on this stream
    /// after every launch of the plan the buffers came from.
    pub fn plan_attention_in(
        &self,
        meta: &AttnMeta,
        n_heads: usize,
        layout: KvLayout,
        config: AttnPlanConfig,
        mut bufs: PlanBuffers,
    ) -> Result<AttnPlan, KernelError> {
        const OP: &str = "plan_attention";
        if layout.head_dim != 64 && layout.head_dim != 128 {
            return Err(shape_err(
                OP,
                format!("head_dim {} (supported: 64, 128)", layout.head_dim),
            ));
        }
        if layout.n_kv_heads == 0 || !n_heads.is_multiple_of(layout.n_kv_heads) {
            return Err(shape_err(
                OP,
                format!("{n_heads} q heads over {} kv heads", layout.n_kv_heads),
            ));
        }
        let group = n_heads / layout.n_kv_heads;
        if group > TIERS[0].rows as usize {
            return Err(shape_err(
                OP,
                format!("GQA group {group} > {}", TIERS[0].rows),
            ));
        }
        if meta.block_size != layout.block_size || !layout.block_size.is_power_of_two() {
            return Err(shape_err(
                OP,
                format!(
                    "block size {} (layout {}), must match and be a power of two",
                    meta.block_size, layout.block_size
                ),
            ));
        }
        let n_seqs = meta.n_seqs();
        expect_len(OP, "q_indptr", meta.q_indptr.len(), n_seqs + 1)?;
        expect_len(
            OP,
            "block_tables",
            meta.block_tables.len(),
            n_seqs * meta.max_blocks,
        )?;
        for s in 0..n_seqs {
            let (q_len, ctx) = (
                meta.q_indptr[s + 1].wrapping_sub(meta.q_indptr[s]),
                meta.ctx_lens[s],
            );
            if meta.q_indptr[s + 1] < meta.q_indptr[s] || q_len > ctx {
                return Err(shape_err(
                    OP,
                    format!("seq {s}: q_len {q_len} > ctx_len {ctx}"),
                ));
            }
            if (ctx as usize).div_ceil(meta.block_size) > meta.max_blocks {
                return Err(shape_err(
                    OP,
                    format!(
                        "seq {s}: ctx_len {ctx} exceeds max_blocks {}",
                        meta.max_blocks
                    ),
                ));
            }
        }
        let grid = self.attention_grid(layout.head_dim);
        let work = plan_work(meta, group as u32, layout.n_kv_heads as u32, grid, config);
        let n_tokens = meta.n_tokens();
        let stream = &self.stream;
        let allocs = &mut bufs.allocations;
        let split = work.max_splits > 0;
        if split {
            let rows = work.max_splits as usize * n_tokens * n_heads;
            PlanBuffers::put(stream, &mut bufs.token_splits, &work.token_splits, allocs)?;
            PlanBuffers::reserve(stream, &mut bufs.part_o, rows * layout.head_dim, allocs)?;
            PlanBuffers::reserve(stream, &mut bufs.part_lse, rows, allocs)?;
        }
        // An empty step still gets a (one-entry, unused) table: zero-length buffers are
        // not allowed.
        PlanBuffers::put(stream, &mut bufs.block_tables, &meta.block_tables, allocs)?;
        let mut items = [0u32; 3];
        for (t, list) in work.tiers.iter().enumerate() {
            if !list.is_empty() {
                PlanBuffers::put(stream, &mut bufs.tiers[t], &flatten(list), allocs)?;
                items[t] = list.len() as u32;
            }
        }
        Ok(AttnPlan {
            n_heads,
            layout,
            n_tokens,
            max_blocks: meta.max_blocks as u32,
            window: meta.sliding_window.unwrap_or(0),
            items,
            split,
            bufs,
            work,
        })
    }

    /// Causal paged attention of the step's query rows `q [n_tokens, n_heads·d]` over
    /// the caches into `out` (same shape); see [`crate::reference::paged_attention`].
    pub fn paged_attention(
        &self,
        q: &impl DevicePtr<bf16>,
        k_cache: &impl DevicePtr<bf16>,
        v_cache: &impl DevicePtr<bf16>,
        plan: &AttnPlan,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const OP: &str = "paged_attention";
        let layout = plan.layout;
        let d = layout.head_dim;
        expect_len(OP, "q", q.len(), plan.n_tokens * plan.n_heads * d)?;
        expect_len(OP, "out", out.len(), q.len())?;
        expect_len(OP, "k_cache", k_cache.len(), layout.len())?;
        expect_len(OP, "v_cache", v_cache.len(), layout.len())?;
        if plan.n_tokens == 0 {
            return Ok(());
        }
        let b = &plan.bufs;
        let (part_o, part_lse) = match (plan.split, &b.part_o, &b.part_lse) {
            (true, Some(o), Some(l)) => (self.ptr(o), self.ptr(l)),
            _ => (0, 0),
        };
        let group = plan.n_heads / layout.n_kv_heads;
        let mut params = AttnParams {
            q: self.ptr(q),
            k_cache: self.ptr(k_cache),
            v_cache: self.ptr(v_cache),
            out: self.ptr_mut(out),
            part_o,
            part_lse,
            work: 0,
            block_tables: self.ptr(b.block_tables.as_ref().expect("planned")),
            max_blocks: plan.max_blocks,
            block_shift: layout.block_size.trailing_zeros(),
            n_heads: plan.n_heads as u32,
            n_kv_heads: layout.n_kv_heads as u32,
            group: group as u32,
            n_tokens: plan.n_tokens as u32,
            window: plan.window,
            scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
        };
        if [params.q, params.k_cache, params.v_cache, params.out]
            .iter()
            .any(|p| p % 16 != 0)
        {
            return Err(shape_err(OP, "buffers must be 16-byte aligned".into()));
        }
        for ((work, &n_items), tier) in b.tiers.iter().zip(&plan.items).zip(&TIERS) {
            let Some(work) = work.as_ref().filter(|_| n_items > 0) else {
                continue;
            };
            let kernel = tier.kernel(d);
            params.work = self.ptr(work);
            let cfg = LaunchConfig {
                grid_dim: (n_items, layout.n_kv_heads as u32, 1),
                block_dim: (tier.threads(), 1, 1),
                shared_mem_bytes: tier.smem_bytes(d) as u32,
            };
            let mut launch = self.stream.launch_builder(self.function(kernel));
            launch.arg(&params);
            // SAFETY: `params` matches the kernel's `AttnParams`; q/out hold n_tokens
            // rows and the caches `layout.len()` elements (checked above); the work list
            // was built by `plan_work` from the validated metadata uploaded with it, so
            // every query row, page-table entry (ctx ≤ max_blocks·block_size) and split
            // index (< max_splits, inside the workspace) it names is in bounds; block
            // tables pointing inside the cache are the caller's contract. The dynamic
            // shared memory was opted into at load time.
            unsafe { launch.launch(cfg) }?;
        }
        if let (true, Some(token_splits)) = (plan.split, &b.token_splits) {
            let (tp, po, pl, op) = (self.ptr(token_splits), part_o, part_lse, params.out);
            let (n_tokens, n_heads, d32) = (plan.n_tokens as u32, plan.n_heads as u32, d as u32);
            let mut launch = self
                .stream
                .launch_builder(self.function(Kernel::AttentionMerge));
            launch
                .arg(&po)
                .arg(&pl)
                .arg(&tp)
                .arg(&op)
                .arg(&n_tokens)
                .arg(&n_heads)
                .arg(&d32);
            let cfg = LaunchConfig {
                grid_dim: (n_tokens, n_heads, 1),
                block_dim: (MERGE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument types match `attn_merge_bf16`; the workspace holds
            // max_splits·n_tokens·n_heads rows and token_splits[t] ≤ max_splits; out
            // holds n_tokens·n_heads·d bf16.
            unsafe { launch.launch(cfg) }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(q_lens: &[u32], ctx_lens: &[u32], window: Option<u32>) -> AttnMeta {
        let bs = 16;
        let max_blocks = ctx_lens
            .iter()
            .map(|&c| (c as usize).div_ceil(bs))
            .max()
            .unwrap_or(1);
        let mut q_indptr = vec![0];
        for &q in q_lens {
            q_indptr.push(q_indptr.last().unwrap() + q);
        }
        AttnMeta {
            block_size: bs,
            q_indptr,
            ctx_lens: ctx_lens.to_vec(),
            block_tables: vec![0; ctx_lens.len() * max_blocks],
            max_blocks,
            sliding_window: window,
        }
    }

    /// Checks the plan's invariants by counting, for every (token, key) pair the
    /// reference attends to, how many items cover it.
    fn check_plan(m: &AttnMeta, group: u32, plan: &WorkPlan) {
        let mut covered = std::collections::HashMap::<(u32, u32), u32>::new();
        for (tier, w) in plan
            .tiers
            .iter()
            .enumerate()
            .flat_map(|(t, l)| l.iter().map(move |w| (t, w)))
        {
            let rows = (w.tok_end - w.tok_begin) * group;
            assert!(rows <= TIERS[tier].rows, "{w:?}");
            assert!(w.split == NO_SPLIT || w.split < plan.max_splits);
            let q0 = m.q_indptr[w.seq as usize];
            let q_len = m.q_indptr[w.seq as usize + 1] - q0;
            let first = m.ctx_lens[w.seq as usize] - q_len;
            for t in w.tok_begin..w.tok_end {
                let tok = q0 + t;
                assert_eq!(w.split == NO_SPLIT, plan.token_splits[tok as usize] == 1);
                let pos = first + t;
                for key in w.kv_begin..w.kv_end {
                    if key <= pos && key >= m.window_start(pos) {
                        *covered.entry((tok, key)).or_default() += 1;
                    }
                }
            }
        }
        for s in 0..m.n_seqs() {
            let q0 = m.q_indptr[s];
            let q_len = m.q_indptr[s + 1] - q0;
            for t in 0..q_len {
                let pos = m.ctx_lens[s] - q_len + t;
                for key in m.window_start(pos)..=pos {
                    assert_eq!(
                        covered.get(&(q0 + t, key)),
                        Some(&1),
                        "seq {s} token {t} key {key}"
                    );
                }
            }
        }
    }

    const H100: GridShape = GridShape {
        sms: 132,
        blocks_per_sm: [3, 2, 1],
    };

    #[test]
    fn plan_covers_every_query_key_pair_once() {
        let cases = [
            (vec![1], vec![1], None),
            (vec![1, 1, 1], vec![15, 16, 17], None),
            (vec![17, 1, 40], vec![17, 4095, 300], None),
            (vec![33, 5], vec![2000, 1500], Some(100)),
            (
                vec![1; 17],
                (0..17).map(|i| 1 + i * 250).collect(),
                Some(1024),
            ),
            (vec![3], vec![5000], None),
            (vec![300, 2], vec![300, 9000], Some(4096)),
        ];
        let small = GridShape {
            sms: 8,
            blocks_per_sm: [3, 2, 1],
        };
        for group in [1, 2, 6, 16] {
            for (q, c, w) in &cases {
                let m = meta(q, c, *w);
                for cfg in [
                    AttnPlanConfig::default(),
                    AttnPlanConfig {
                        min_split_keys: 64,
                        max_splits: 64,
                    },
                ] {
                    for grid in [small, H100] {
                        check_plan(&m, group, &plan_work(&m, group, 2, grid, cfg));
                    }
                }
            }
        }
    }

    #[test]
    fn decodes_short_chunks_and_long_prompts_get_16_64_and_128_row_blocks() {
        let m = meta(&[1, 10, 100], &[10, 10, 100], None);
        let plan = plan_work(
            &m,
            6,
            8,
            H100,
            AttnPlanConfig {
                max_splits: 1,
                ..Default::default()
            },
        );
        assert_eq!(plan.tiers[0].len(), 1);
        assert_eq!(plan.tiers[1].len(), 1); // 10 tokens × 6 heads = 60 rows
        assert_eq!(plan.tiers[2].len(), 5); // 100 tokens in tiles of ⌊128/6⌋ = 21
        assert!(plan.tiers[2].iter().all(|w| w.tok_end - w.tok_begin <= 21));
        assert_eq!(plan.max_splits, 0);
    }

    #[test]
    fn split_k_fills_the_last_wave_and_stops_when_the_grid_is_full() {
        // One 32K decode on 8 kv heads: split until ~one wave of 132 × 3 blocks.
        let plan = plan_work(
            &meta(&[1], &[32768], None),
            6,
            8,
            H100,
            AttnPlanConfig::default(),
        );
        let blocks = plan.n_items() * 8;
        assert!(blocks > 300 && blocks <= 396, "{blocks} blocks");
        assert_eq!(plan.token_splits, vec![plan.max_splits]);
        // 16 × 4K: 128 blocks unsplit; 3 splits make 384 ≤ 396, one full wave.
        let plan = plan_work(
            &meta(&[1; 16], &[4096; 16], None),
            6,
            8,
            H100,
            AttnPlanConfig::default(),
        );
        assert_eq!(plan.max_splits, 3);
        // 256 × 4K: 2048 blocks are over four waves already.
        let plan = plan_work(
            &meta(&[1; 256], &[4096; 256], None),
            6,
            8,
            H100,
            AttnPlanConfig::default(),
        );
        assert_eq!(plan.max_splits, 0);
        // Short contexts are never cut below min_split_keys.
        let plan = plan_work(
            &meta(&[1], &[200], None),
            6,
            8,
            H100,
            AttnPlanConfig::default(),
        );
        assert_eq!(plan.max_splits, 0);
    }

    #[test]
    fn params_struct_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<AttnParams>(), 8 * 8 + 8 * 4);
        assert_eq!(std::mem::align_of::<AttnParams>(), 8);
    }
}
