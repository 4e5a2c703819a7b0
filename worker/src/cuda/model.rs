//! [`CudaModel`]: one rank's bf16 weights, KV cache and activation buffers on a GPU,
//! and the forward pass (the CPU reference's math, [`crate::model::CpuModel::forward`]).
//!
//! Loading: per layer, this rank's rows/columns are read from the memory-mapped
//! checkpoint exactly as the CPU loader packs them ([`pack_layer`]: fused `wq|wk|wv`
//! rows, fused `w1|w3` rows, `wo`/`w2` columns), converted to bf16 on the host and
//! uploaded; one log line per layer. `synthetic:<preset>` instead fills every tensor
//! on the device by copying from a 32 MiB random bf16 pool (norms are ones) — the
//! real shape and memory traffic, no file.
//!
//! Memory: activation buffers are allocated once for the largest step
//! (`max_tokens` tokens, `max_seqs` logit rows). [`CudaModel::new`] then runs that
//! step once on a temporary KV cache, reads free memory at its peak, and gives
//! `memory_utilization` of the total, minus everything in use at that peak, to the
//! KV cache ([`super::kv_blocks_for`]).
//!
//! The fused QKV weight is one allocation. By default it is applied as three GEMMs
//! over its row ranges (q, k, v into their own buffers), then `rope` and the KV
//! write; with [`CudaModelConfig::fused_qkv`] it is ONE GEMM into a `[n, q|k|v]`
//! buffer and one `rope_qkv_cache` kernel (RoPE and the KV write fused, bit-identical
//! to the two kernels on the same rows). The switch exists so one GPU run measures
//! both (`cuda_step_bench`); the default stays the path the GPU tests first check.
//! gate|up is one GEMM.
//! Per step: upload ids/positions/slots/logit rows, plan attention once, then per
//! layer 5 (fused: 3) GEMMs, rope, KV write, attention, 2 fused add-norms, swiglu and
//! (TP > 1) two all-reduces; the logit rows are gathered with the embedding kernel (a
//! row gather), projected to f32 logits, and gathered to rank 0 on the host.

use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use kernels::cuda::{AttnPlan, AttnPlanConfig, CudaKernels, PlanBuffers};
use kernels::reference::KvLayout;

use super::collective::DeviceCollective;
use super::gemm::Gemm;
use super::{driver_err, kernel_err, kv_blocks_for, kv_bytes_per_block, MemoryProfile};
use crate::backend::Logits;
use crate::checkpoint::{Checkpoint, Param};
use crate::config::ModelConfig;
use crate::model::{combine_argmax_pairs, reorder_logits};
use crate::model::{pack_layer, validate_step, Local, SeqChunk, ShardSpec, StepInput};
use crate::WorkerError;

/// How a [`CudaModel`] is sized.
#[derive(Clone, Debug)]
pub struct CudaModelConfig {
    /// Most tokens in one step (the scheduler's `max_num_batched_tokens`).
    pub max_tokens: usize,
    /// Most logit rows in one step (the scheduler's `max_num_seqs`).
    pub max_seqs: usize,
    /// Tokens per KV block (a power of two).
    pub block_size: usize,
    /// Fraction of GPU memory for weights, activations and KV, in (0, 1].
    pub memory_utilization: f64,
    /// Cap on KV blocks (e.g. for tests).
    pub max_kv_blocks: Option<u64>,
    /// One QKV GEMM and the fused RoPE + KV-write kernel instead of three GEMMs,
    /// `rope` and `reshape_and_cache` (default off; `STRAL_CUDA_FUSED_QKV=1` in a
    /// worker; [`CudaModel::set_fused_qkv`] switches a loaded model).
    pub fused_qkv: bool,
    /// Reuse the attention plan's device buffers (block tables, work lists, split-K
    /// workspace) from step to step instead of allocating them per step (default off;
    /// `STRAL_CUDA_REUSE_ATTN=1`; [`CudaModel::set_reuse_attn_buffers`]).
    pub reuse_attn_buffers: bool,
}

impl Default for CudaModelConfig {
    fn default() -> Self {
        Self {
            max_tokens: 8192,
            max_seqs: 256,
            block_size: 16,
            memory_utilization: super::DEFAULT_MEMORY_UTILIZATION,
            max_kv_blocks: None,
            fused_qkv: false,
            reuse_attn_buffers: false,
        }
    }
}

struct DeviceLayer {
    attn_norm: CudaSlice<bf16>,
    ffn_norm: CudaSlice<bf16>,
    wqkv: CudaSlice<bf16>,
    wo: CudaSlice<bf16>,
    w13: CudaSlice<bf16>,
    w2: CudaSlice<bf16>,
}

struct DeviceWeights {
    embed: CudaSlice<bf16>,
    layers: Vec<DeviceLayer>,
    norm: CudaSlice<bf16>,
    lm_head: CudaSlice<bf16>,
}

/// Activation buffers for the largest step.
struct Scratch {
    residual: CudaSlice<bf16>,
    normed: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    /// `[n, q|k|v]`, the one QKV GEMM's output (fused path).
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    proj: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    ids: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    rows: CudaSlice<u32>,
    selected: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    /// `[m, 2]`: per logit row, this rank's shard maximum and where (greedy steps).
    argmax_pairs: CudaSlice<f32>,
}

fn upload(
    stream: &std::sync::Arc<CudaStream>,
    host: &[f32],
    what: &str,
) -> Result<CudaSlice<bf16>, WorkerError> {
    let b: Vec<bf16> = host.iter().map(|&v| bf16::from_f32(v)).collect();
    stream.clone_htod(&b).map_err(driver_err(&format!(
        "uploading {what} ({} MiB)",
        (b.len() * 2) >> 20
    )))
}

fn alloc_bf16(
    stream: &std::sync::Arc<CudaStream>,
    len: usize,
    what: &str,
) -> Result<CudaSlice<bf16>, WorkerError> {
    stream.alloc_zeros::<bf16>(len).map_err(driver_err(&format!(
        "allocating {what} ({} MiB)",
        (len * 2) >> 20
    )))
}

fn alloc_u32(
    stream: &std::sync::Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<u32>, WorkerError> {
    stream
        .alloc_zeros::<u32>(len)
        .map_err(driver_err("allocating step metadata"))
}

/// Random bf16 weights of the right shapes, filled on the device.
struct SyntheticFill {
    pool: CudaSlice<bf16>,
    ones: CudaSlice<bf16>,
    offset: usize,
}

const POOL: usize = 16 << 20;

impl SyntheticFill {
    fn new(stream: &std::sync::Arc<CudaStream>, dim: usize) -> Result<Self, WorkerError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let host: Vec<bf16> = (0..POOL)
            .map(|_| bf16::from_f32(rng.random_range(-0.02f32..0.02)))
            .collect();
        let pool = stream
            .clone_htod(&host)
            .map_err(driver_err("uploading the synthetic weight pool"))?;
        let ones = stream
            .clone_htod(&vec![bf16::ONE; dim])
            .map_err(driver_err("uploading the synthetic norm weights"))?;
        Ok(Self {
            pool,
            ones,
            offset: 0,
        })
    }

    fn tensor(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<bf16>, WorkerError> {
        let mut t = alloc_bf16(stream, len, what)?;
        let mut done = 0;
        while done < len {
            // Start at a varying 8-aligned pool offset so tensors differ.
            let start = self.offset % (POOL / 2) & !7;
            let n = (len - done).min(POOL - start);
            stream
                .memcpy_dtod(
                    &self.pool.slice(start..start + n),
                    &mut t.slice_mut(done..done + n),
                )
                .map_err(driver_err(&format!("filling {what}")))?;
            done += n;
            self.offset = self.offset.wrapping_add(7919 * 8 + n);
        }
        Ok(t)
    }

    fn norm(&self, stream: &std::sync::Arc<CudaStream>) -> Result<CudaSlice<bf16>, WorkerError> {
        let mut t = alloc_bf16(stream, self.ones.len(), "a norm weight")?;
        stream
            .memcpy_dtod(&self.ones, &mut t)
            .map_err(driver_err("filling a norm weight"))?;
        Ok(t)
    }
}

/// Where the weights come from.
pub enum WeightSource<'a> {
    Checkpoint(&'a Checkpoint),
    /// Random weights of this shape, filled on the device.
    Synthetic(ModelConfig),
}

/// One rank of the model on one GPU.
pub struct CudaModel {
    kernels: CudaKernels,
    gemm: Gemm,
    cfg: ModelConfig,
    shard: ShardSpec,
    local: Local,
    layout: KvLayout,
    kv: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    weights: DeviceWeights,
    scratch: Scratch,
    sizing: CudaModelConfig,
    profile: MemoryProfile,
    /// The last step's attention buffers, when they are reused.
    plan_bufs: Option<PlanBuffers>,
}

impl CudaModel {
    /// Loads this rank's weights onto the GPU of `kernels`, profiles the largest step,
    /// and allocates the KV cache from what the memory budget leaves.
    pub fn new(
        kernels: CudaKernels,
        source: WeightSource<'_>,
        shard: ShardSpec,
        sizing: CudaModelConfig,
    ) -> Result<Self, WorkerError> {
        let cfg = match &source {
            WeightSource::Checkpoint(c) => c.config.clone(),
            WeightSource::Synthetic(c) => c.clone(),
        };
        cfg.check_tp(shard.tp)?;
        if shard.rank >= shard.tp {
            return Err(WorkerError::Config(format!(
                "rank {} is outside a TP group of {}",
                shard.rank, shard.tp
            )));
        }
        if !sizing.block_size.is_power_of_two() {
            return Err(WorkerError::Config(format!(
                "block_size {} must be a power of two on CUDA",
                sizing.block_size
            )));
        }
        let stream = kernels.stream().clone();
        let gemm = Gemm::new(stream.clone(), kernels.arch())?;
        let local = Local::new(&cfg, shard);
        let weights = load_weights(&stream, &cfg, shard, local, source)?;
        let scratch = alloc_scratch(&stream, &cfg, local, &sizing)?;
        let layout = KvLayout {
            num_blocks: 0,
            n_kv_heads: local.kv_heads,
            block_size: sizing.block_size,
            head_dim: cfg.head_dim,
        };
        let mut model = Self {
            kernels,
            gemm,
            cfg,
            shard,
            local,
            layout,
            kv: Vec::new(),
            weights,
            scratch,
            sizing,
            profile: MemoryProfile {
                total: 0,
                used_at_peak: 0,
                profiling_kv: 0,
            },
            plan_bufs: None,
        };
        model.profile_and_allocate_kv()?;
        Ok(model)
    }

    fn alloc_kv(&mut self, blocks: usize, what: &str) -> Result<(), WorkerError> {
        self.kv.clear();
        self.layout.num_blocks = blocks;
        let stream = self.kernels.stream().clone();
        for _ in 0..self.cfg.n_layers {
            let k = alloc_bf16(&stream, self.layout.len(), what)?;
            let v = alloc_bf16(&stream, self.layout.len(), what)?;
            self.kv.push((k, v));
        }
        Ok(())
    }

    /// Runs the largest step on a temporary cache, then sizes the real one.
    fn profile_and_allocate_kv(&mut self) -> Result<(), WorkerError> {
        let bs = self.sizing.block_size;
        let n = self.sizing.max_tokens;
        let seqs = self.sizing.max_seqs.clamp(1, n);
        // `seqs` sequences sharing the token budget, each sampling its last token.
        let per = n / seqs;
        let blocks_per_seq = (per + n % seqs).div_ceil(bs);
        let profiling_blocks = seqs * blocks_per_seq;
        self.alloc_kv(profiling_blocks, "the profiling KV cache")?;
        let tables: Vec<Vec<u32>> = (0..seqs)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let tokens: Vec<Vec<u32>> = (0..seqs)
            .map(|s| vec![1; per + if s == 0 { n % seqs } else { 0 }])
            .collect();
        let chunks: Vec<SeqChunk<'_>> = (0..seqs)
            .map(|s| SeqChunk {
                block_table: &tables[s],
                cached: 0,
                tokens: &tokens[s],
                sample: true,
            })
            .collect();
        let step = StepInput::build(bs, self.cfg.sliding_window, &chunks);
        let mut peak_free = u64::MAX;
        let started = Instant::now();
        self.run(
            &step,
            &mut DeviceCollective::solo(),
            Some(&mut peak_free),
            false,
        )?;
        let ctx = self.kernels.context().clone();
        let (_, total) = ctx
            .mem_get_info()
            .map_err(driver_err("reading GPU memory"))?;
        self.profile = MemoryProfile {
            total: total as u64,
            used_at_peak: total as u64 - peak_free.min(total as u64),
            profiling_kv: profiling_blocks as u64
                * kv_bytes_per_block(&self.cfg, self.shard.tp, bs),
        };
        self.kv.clear();
        self.kernels
            .synchronize()
            .map_err(kernel_err("freeing the profiling cache"))?;
        let per_block = kv_bytes_per_block(&self.cfg, self.shard.tp, bs);
        let blocks = kv_blocks_for(
            self.profile,
            self.sizing.memory_utilization,
            per_block,
            self.sizing.max_kv_blocks,
        )
        .min(u64::from(u32::MAX));
        tracing::info!(
            step_tokens = n,
            step_seqs = seqs,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            total_mib = self.profile.total >> 20,
            used_at_peak_mib = (self.profile.used_at_peak - self.profile.profiling_kv) >> 20,
            utilization = self.sizing.memory_utilization,
            "profiled the largest step"
        );
        if blocks < 2 {
            return Err(WorkerError::Config(format!(
                "no room for a KV cache: {} MiB of {} MiB are needed for weights and the largest step ({n} tokens), and --gpu-memory-utilization {} allows {} MiB; lower --max-num-batched-tokens or raise --tp",
                (self.profile.used_at_peak - self.profile.profiling_kv) >> 20,
                self.profile.total >> 20,
                self.sizing.memory_utilization,
                (self.profile.total as f64 * self.sizing.memory_utilization) as u64 >> 20
            )));
        }
        self.alloc_kv(
            blocks as usize,
            &format!("the KV cache ({blocks} blocks of {per_block} bytes)"),
        )?;
        tracing::info!(
            kv_blocks = blocks,
            kv_tokens = blocks as usize * bs,
            kv_mib = (blocks * per_block) >> 20,
            "KV cache allocated"
        );
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn num_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    /// KV capacity in tokens.
    pub fn kv_tokens(&self) -> usize {
        self.layout.num_blocks * self.layout.block_size
    }

    pub fn memory_profile(&self) -> MemoryProfile {
        self.profile
    }

    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    /// Switches between one QKV GEMM + the fused RoPE/KV-write kernel (`true`) and
    /// three GEMMs + `rope` + `reshape_and_cache` (`false`); both use the same weights
    /// and buffers, so a benchmark can time both on one loaded model.
    pub fn set_fused_qkv(&mut self, on: bool) {
        self.sizing.fused_qkv = on;
    }

    /// Switches reuse of the attention plan's device buffers across steps on or off
    /// (off drops the kept buffers: every step then allocates its own).
    pub fn set_reuse_attn_buffers(&mut self, on: bool) {
        self.sizing.reuse_attn_buffers = on;
        if !on {
            self.plan_bufs = None;
        }
    }

    /// Device allocations the reused attention buffers have needed so far (0 when
    /// reuse is off); constant once every step shape seen fits them.
    pub fn attn_buffer_allocations(&self) -> u64 {
        self.plan_bufs.as_ref().map_or(0, |b| b.allocations)
    }

    /// GEMM shapes planned so far (each got its algorithm once).
    pub fn planned_gemm_shapes(&self) -> usize {
        self.gemm.planned_shapes()
    }

    /// Rejects a step this rank cannot execute.
    pub fn validate(&self, step: &StepInput) -> Result<(), WorkerError> {
        validate_step(&self.cfg, self.layout, step)?;
        if step.tokens.len() > self.sizing.max_tokens
            || step.logit_rows.len() > self.sizing.max_seqs
        {
            return Err(WorkerError::Step(format!(
                "{} tokens and {} logit rows exceed this worker's step size ({} tokens, {} rows)",
                step.tokens.len(),
                step.logit_rows.len(),
                self.sizing.max_tokens,
                self.sizing.max_seqs
            )));
        }
        Ok(())
    }

    /// Runs one step: `[logit_rows.len(), vocab]` f32 logits on rank 0, `None` on
    /// other ranks. Every rank of the group must run the same step.
    pub fn forward(
        &mut self,
        step: &StepInput,
        coll: &mut DeviceCollective,
    ) -> Result<Option<Vec<f32>>, WorkerError> {
        Ok(self.step(step, coll, false)?.map(|l| match l {
            Logits::Rows(rows) => rows,
            Logits::Argmax(_) => unreachable!("a full step returns rows"),
        }))
    }

    /// [`Self::forward`] for a greedy step: the first argmax of every logit row on
    /// rank 0, found on the GPU; each rank moves 2 floats per row instead of its
    /// `vocab / tp` logits (no `[m, vocab]` copy to the host).
    pub fn forward_argmax(
        &mut self,
        step: &StepInput,
        coll: &mut DeviceCollective,
    ) -> Result<Option<Vec<u32>>, WorkerError> {
        Ok(self.step(step, coll, true)?.map(|l| match l {
            Logits::Argmax(ids) => ids,
            Logits::Rows(_) => unreachable!("a greedy step returns argmax ids"),
        }))
    }

    fn step(
        &mut self,
        step: &StepInput,
        coll: &mut DeviceCollective,
        argmax_only: bool,
    ) -> Result<Option<Logits>, WorkerError> {
        self.validate(step)?;
        // `stral worker` runs steps on its runtime thread, not the thread that loaded
        // the model; raw cuBLASLt and NCCL calls need the context current here.
        self.kernels
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context to the step thread"))?;
        self.run(step, coll, None, argmax_only)
    }

    /// The forward pass: upload the step, plan attention once, embed, then per layer
    /// an attention and an MLP block, then the sampled rows' logits. With
    /// `peak_free`, records the free memory at the peak (the profiling step); with
    /// `argmax_only`, rank 0 gets the rows' argmax instead of their logits.
    fn run(
        &mut self,
        step: &StepInput,
        coll: &mut DeviceCollective,
        peak_free: Option<&mut u64>,
        argmax_only: bool,
    ) -> Result<Option<Logits>, WorkerError> {
        let mut pass = Pass {
            k: &self.kernels,
            gemm: &mut self.gemm,
            s: &mut self.scratch,
            stream: self.kernels.stream().clone(),
            cfg: &self.cfg,
            l: self.local,
            layout: self.layout,
            n: step.tokens.len(),
            fused_qkv: self.sizing.fused_qkv,
        };
        pass.upload(step)?;
        let bufs = match self.sizing.reuse_attn_buffers {
            true => self.plan_bufs.take().unwrap_or_default(),
            false => PlanBuffers::default(),
        };
        let plan = pass
            .k
            .plan_attention_in(
                &step.meta,
                pass.l.heads,
                self.layout,
                AttnPlanConfig::default(),
                bufs,
            )
            .map_err(kernel_err("planning attention"))?;
        if let Some(p) = peak_free {
            *p = (*p).min(pass.free_memory()?);
        }
        let w = &self.weights;
        pass.embed(w)?;
        for (i, lw) in w.layers.iter().enumerate() {
            pass.attention(lw, &mut self.kv[i], &plan, coll)?;
            let next_norm = w.layers.get(i + 1).map_or(&w.norm, |nl| &nl.attn_norm);
            pass.mlp(lw, next_norm, coll)?;
        }
        let logits = pass.logits(w, step.logit_rows.len(), coll, argmax_only);
        if self.sizing.reuse_attn_buffers {
            self.plan_bufs = Some(plan.into_buffers());
        }
        logits
    }
}

/// One step's launches over the borrowed parts of a [`CudaModel`]; every buffer is
/// used for its first `n` tokens (or `m` rows).
struct Pass<'a> {
    k: &'a CudaKernels,
    gemm: &'a mut Gemm,
    s: &'a mut Scratch,
    stream: std::sync::Arc<CudaStream>,
    cfg: &'a ModelConfig,
    l: Local,
    layout: KvLayout,
    /// Tokens in the step.
    n: usize,
    /// One QKV GEMM + `rope_qkv_cache` ([`CudaModelConfig::fused_qkv`]).
    fused_qkv: bool,
}

impl Pass<'_> {
    fn dims(&self) -> (usize, usize, usize) {
        let hd = self.cfg.head_dim;
        (self.cfg.dim, self.l.heads * hd, self.l.kv_heads * hd)
    }

    /// Token ids, positions, KV slots and logit rows to the device.
    fn upload(&mut self, step: &StepInput) -> Result<(), WorkerError> {
        let (n, m, s) = (self.n, step.logit_rows.len(), &mut *self.s);
        let up = driver_err("uploading step metadata");
        let stream = &self.stream;
        stream
            .memcpy_htod(&step.tokens, &mut s.ids.slice_mut(0..n))
            .map_err(&up)?;
        stream
            .memcpy_htod(&step.meta.positions(), &mut s.positions.slice_mut(0..n))
            .map_err(&up)?;
        stream
            .memcpy_htod(&step.meta.slot_mapping(), &mut s.slots.slice_mut(0..n))
            .map_err(&up)?;
        stream
            .memcpy_htod(&step.logit_rows, &mut s.rows.slice_mut(0..m))
            .map_err(&up)?;
        Ok(())
    }

    /// Free device memory once everything launched so far has finished.
    fn free_memory(&self) -> Result<u64, WorkerError> {
        self.k.synchronize().map_err(kernel_err("profiling"))?;
        let (free, _) = self
            .k
            .context()
            .mem_get_info()
            .map_err(driver_err("reading GPU memory"))?;
        Ok(free as u64)
    }

    /// `residual` = the token embeddings; `normed` = the first layer's attention norm.
    fn embed(&mut self, w: &DeviceWeights) -> Result<(), WorkerError> {
        let (n, (dim, _, _), s) = (self.n, self.dims(), &mut *self.s);
        let ke = kernel_err("forward");
        self.k
            .embedding(
                &s.ids.slice(0..n),
                &w.embed,
                dim,
                &mut s.residual.slice_mut(0..n * dim),
            )
            .map_err(&ke)?;
        if let Some(first) = w.layers.first() {
            self.k
                .rms_norm(
                    &s.residual.slice(0..n * dim),
                    &first.attn_norm,
                    self.cfg.norm_eps,
                    dim,
                    &mut s.normed.slice_mut(0..n * dim),
                )
                .map_err(&ke)?;
        }
        Ok(())
    }

    /// q, k, v from `normed`; RoPE; the KV write; paged attention; `wo` and its
    /// all-reduce; then `residual += proj` and `normed` = the FFN norm of it.
    fn attention(
        &mut self,
        lw: &DeviceLayer,
        (kc, vc): &mut (CudaSlice<bf16>, CudaSlice<bf16>),
        plan: &AttnPlan,
        coll: &mut DeviceCollective,
    ) -> Result<(), WorkerError> {
        if self.fused_qkv {
            self.qkv_fused(lw, kc, vc)?;
        } else {
            self.qkv_unfused(lw, kc, vc)?;
        }
        let (n, (dim, qd, _), k, s) = (self.n, self.dims(), self.k, &mut *self.s);
        k.paged_attention(
            &s.q.slice(0..n * qd),
            kc,
            vc,
            plan,
            &mut s.attn.slice_mut(0..n * qd),
        )
        .map_err(kernel_err("forward"))?;
        self.gemm.linear(
            &s.attn.slice(0..n * qd),
            &lw.wo,
            n,
            qd,
            dim,
            &mut s.proj.slice_mut(0..n * dim),
        )?;
        self.reduce_add_norm(&lw.ffn_norm, coll)
    }

    /// One GEMM into `[n, q|k|v]`, then `rope_qkv_cache`: rotated q into `q`, rotated k
    /// and v into the caches.
    fn qkv_fused(
        &mut self,
        lw: &DeviceLayer,
        kc: &mut CudaSlice<bf16>,
        vc: &mut CudaSlice<bf16>,
    ) -> Result<(), WorkerError> {
        let (n, (dim, qd, kvd), s) = (self.n, self.dims(), &mut *self.s);
        let row = qd + 2 * kvd;
        self.gemm.linear(
            &s.normed.slice(0..n * dim),
            &lw.wqkv,
            n,
            dim,
            row,
            &mut s.qkv.slice_mut(0..n * row),
        )?;
        self.k
            .rope_qkv_cache(
                &s.qkv.slice(0..n * row),
                &mut s.q.slice_mut(0..n * qd),
                kc,
                vc,
                &s.positions.slice(0..n),
                &s.slots.slice(0..n),
                self.l.heads,
                self.layout,
                self.cfg.rope_theta,
            )
            .map_err(kernel_err("forward"))
    }

    /// Three GEMMs over the fused weight's row ranges into `q`, `k`, `v`; `rope`; the
    /// KV write.
    fn qkv_unfused(
        &mut self,
        lw: &DeviceLayer,
        kc: &mut CudaSlice<bf16>,
        vc: &mut CudaSlice<bf16>,
    ) -> Result<(), WorkerError> {
        let (n, (dim, qd, kvd), l) = (self.n, self.dims(), self.l);
        let (k, s, gemm) = (self.k, &mut *self.s, &mut *self.gemm);
        let ke = kernel_err("forward");
        let normed = s.normed.slice(0..n * dim);
        let ranges = [(0, qd), (qd, kvd), (qd + kvd, kvd)];
        for ((from, rows), out) in ranges.into_iter().zip([&mut s.q, &mut s.k, &mut s.v]) {
            gemm.linear(
                &normed,
                &lw.wqkv.slice(from * dim..(from + rows) * dim),
                n,
                dim,
                rows,
                &mut out.slice_mut(0..n * rows),
            )?;
        }
        drop(normed);
        k.rope(
            &mut s.q.slice_mut(0..n * qd),
            &mut s.k.slice_mut(0..n * kvd),
            &s.positions.slice(0..n),
            l.heads,
            l.kv_heads,
            self.cfg.head_dim,
            self.cfg.rope_theta,
        )
        .map_err(&ke)?;
        k.reshape_and_cache(
            &s.k.slice(0..n * kvd),
            &s.v.slice(0..n * kvd),
            kc,
            vc,
            &s.slots.slice(0..n),
            self.layout,
        )
        .map_err(&ke)
    }

    /// gate|up, SwiGLU, `w2` and its all-reduce; then `residual += proj` and
    /// `normed` = `next_norm` of it (the next layer's attention norm, or the final norm).
    fn mlp(
        &mut self,
        lw: &DeviceLayer,
        next_norm: &CudaSlice<bf16>,
        coll: &mut DeviceCollective,
    ) -> Result<(), WorkerError> {
        let (n, (dim, _, _), ffn) = (self.n, self.dims(), self.l.ffn);
        let (s, gemm) = (&mut *self.s, &mut *self.gemm);
        gemm.linear(
            &s.normed.slice(0..n * dim),
            &lw.w13,
            n,
            dim,
            2 * ffn,
            &mut s.gate_up.slice_mut(0..n * 2 * ffn),
        )?;
        self.k
            .swiglu(
                &s.gate_up.slice(0..n * 2 * ffn),
                ffn,
                &mut s.act.slice_mut(0..n * ffn),
            )
            .map_err(kernel_err("forward"))?;
        gemm.linear(
            &s.act.slice(0..n * ffn),
            &lw.w2,
            n,
            ffn,
            dim,
            &mut s.proj.slice_mut(0..n * dim),
        )?;
        self.reduce_add_norm(next_norm, coll)
    }

    /// All-reduces `proj` over the group, adds it to `residual` and norms the sum
    /// into `normed` with `norm`.
    fn reduce_add_norm(
        &mut self,
        norm: &CudaSlice<bf16>,
        coll: &mut DeviceCollective,
    ) -> Result<(), WorkerError> {
        let (n, dim, s) = (self.n, self.cfg.dim, &mut *self.s);
        coll.all_reduce_bf16(&self.stream, &mut s.proj.slice_mut(0..n * dim))?;
        self.k
            .fused_add_rms_norm(
                &mut s.residual.slice_mut(0..n * dim),
                &s.proj.slice(0..n * dim),
                norm,
                self.cfg.norm_eps,
                dim,
                &mut s.normed.slice_mut(0..n * dim),
            )
            .map_err(kernel_err("forward"))
    }

    /// The `m` logit rows of `normed` through `lm_head`, gathered to rank 0 as
    /// `[m][vocab]` f32, or with `argmax_only` as each row's first argmax (reduced on
    /// the GPU per shard, combined on the host); `None` on other ranks.
    fn logits(
        &mut self,
        w: &DeviceWeights,
        m: usize,
        coll: &mut DeviceCollective,
        argmax_only: bool,
    ) -> Result<Option<Logits>, WorkerError> {
        let (n, (dim, _, _), vocab, s) = (self.n, self.dims(), self.l.vocab, &mut *self.s);
        let ke = kernel_err("forward");
        if m == 0 {
            self.k.synchronize().map_err(&ke)?;
            let empty = match argmax_only {
                true => Logits::Argmax(Vec::new()),
                false => Logits::Rows(Vec::new()),
            };
            return Ok((coll.rank() == 0).then_some(empty));
        }
        // Row gather: the embedding kernel with `normed` as the table.
        self.k
            .embedding(
                &s.rows.slice(0..m),
                &s.normed.slice(0..n * dim),
                dim,
                &mut s.selected.slice_mut(0..m * dim),
            )
            .map_err(&ke)?;
        self.gemm.linear_f32(
            &s.selected.slice(0..m * dim),
            &w.lm_head,
            m,
            dim,
            vocab,
            &mut s.logits.slice_mut(0..m * vocab),
        )?;
        let tp = coll.world_size();
        if argmax_only {
            self.k
                .argmax_pairs(
                    &s.logits.slice(0..m * vocab),
                    vocab,
                    &mut s.argmax_pairs.slice_mut(0..2 * m),
                )
                .map_err(&ke)?;
            let gathered = coll.gather_f32(&self.stream, &s.argmax_pairs.slice(0..2 * m))?;
            return Ok(gathered.map(|g| Logits::Argmax(combine_argmax_pairs(&g, tp, m, vocab))));
        }
        let gathered = coll.gather_f32(&self.stream, &s.logits.slice(0..m * vocab))?;
        Ok(gathered.map(|g| Logits::Rows(reorder_logits(&g, tp, m, vocab))))
    }
}

fn alloc_scratch(
    stream: &std::sync::Arc<CudaStream>,
    cfg: &ModelConfig,
    l: Local,
    sizing: &CudaModelConfig,
) -> Result<Scratch, WorkerError> {
    let (n, m) = (sizing.max_tokens, sizing.max_seqs);
    let (qd, kvd) = (l.heads * cfg.head_dim, l.kv_heads * cfg.head_dim);
    let a = |len: usize| alloc_bf16(stream, len, "activation buffers");
    Ok(Scratch {
        residual: a(n * cfg.dim)?,
        normed: a(n * cfg.dim)?,
        q: a(n * qd)?,
        k: a(n * kvd)?,
        v: a(n * kvd)?,
        qkv: a(n * (qd + 2 * kvd))?,
        attn: a(n * qd)?,
        proj: a(n * cfg.dim)?,
        gate_up: a(n * 2 * l.ffn)?,
        act: a(n * l.ffn)?,
        ids: alloc_u32(stream, n)?,
        positions: alloc_u32(stream, n)?,
        slots: alloc_u32(stream, n)?,
        rows: alloc_u32(stream, m)?,
        selected: a(m * cfg.dim)?,
        logits: stream
            .alloc_zeros::<f32>(m * l.vocab)
            .map_err(driver_err("allocating the logits buffer"))?,
        argmax_pairs: stream
            .alloc_zeros::<f32>(2 * m)
            .map_err(driver_err("allocating the argmax buffer"))?,
    })
}

fn load_weights(
    stream: &std::sync::Arc<CudaStream>,
    cfg: &ModelConfig,
    shard: ShardSpec,
    l: Local,
    source: WeightSource<'_>,
) -> Result<DeviceWeights, WorkerError> {
    let started = Instant::now();
    let hd = cfg.head_dim;
    let (qkv_rows, dim) = ((l.heads + 2 * l.kv_heads) * hd, cfg.dim);
    let mut bytes = 0usize;
    let mut log_layer = |i: usize, layer_bytes: usize| {
        bytes += layer_bytes;
        tracing::info!(
            rank = shard.rank,
            tp = shard.tp,
            layer = i + 1,
            of = cfg.n_layers,
            mib = bytes >> 20,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "uploading shard"
        );
    };
    let sync = |what: &str| {
        stream
            .synchronize()
            .map_err(driver_err(&format!("uploading {what}")))
    };
    let mut layers = Vec::with_capacity(cfg.n_layers);
    let weights = match source {
        WeightSource::Checkpoint(ckpt) => {
            let embed = upload(
                stream,
                &ckpt.load_rows(Param::Embed, 0..cfg.vocab_size)?,
                "the embedding",
            )?;
            for i in 0..cfg.n_layers {
                let h = pack_layer(ckpt, shard, i)?;
                let what = format!("layer {i}");
                let layer = DeviceLayer {
                    attn_norm: upload(stream, &h.attn_norm, &what)?,
                    ffn_norm: upload(stream, &h.ffn_norm, &what)?,
                    wqkv: upload(stream, &h.wqkv, &what)?,
                    wo: upload(stream, &h.wo, &what)?,
                    w13: upload(stream, &h.w13, &what)?,
                    w2: upload(stream, &h.w2, &what)?,
                };
                sync(&what)?;
                log_layer(
                    i,
                    2 * (h.wqkv.len() + h.wo.len() + h.w13.len() + h.w2.len() + 2 * dim),
                );
                layers.push(layer);
            }
            let norm = upload(
                stream,
                &ckpt.load_rows(Param::Norm, 0..dim)?,
                "the final norm",
            )?;
            let lm_head = upload(
                stream,
                &ckpt.load_rows(
                    Param::Output,
                    shard.rank * l.vocab..(shard.rank + 1) * l.vocab,
                )?,
                "lm_head",
            )?;
            DeviceWeights {
                embed,
                layers,
                norm,
                lm_head,
            }
        }
        WeightSource::Synthetic(_) => {
            let mut fill = SyntheticFill::new(stream, dim)?;
            let embed = fill.tensor(stream, cfg.vocab_size * dim, "the embedding")?;
            for i in 0..cfg.n_layers {
                let what = format!("layer {i}");
                let layer = DeviceLayer {
                    attn_norm: fill.norm(stream)?,
                    ffn_norm: fill.norm(stream)?,
                    wqkv: fill.tensor(stream, qkv_rows * dim, &what)?,
                    wo: fill.tensor(stream, dim * l.heads * hd, &what)?,
                    w13: fill.tensor(stream, 2 * l.ffn * dim, &what)?,
                    w2: fill.tensor(stream, dim * l.ffn, &what)?,
                };
                sync(&what)?;
                log_layer(
                    i,
                    2 * (qkv_rows * dim + dim * l.heads * hd + 3 * l.ffn * dim + 2 * dim),
                );
                layers.push(layer);
            }
            DeviceWeights {
                embed,
                layers,
                norm: fill.norm(stream)?,
                lm_head: fill.tensor(stream, l.vocab * dim, "lm_head")?,
            }
        }
    };
    sync("the weights")?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_logits_are_reordered_rank_major_to_row_major() {
        // tp = 2, m = 2 rows, 3 local vocab entries: rank r row i holds r*10 + i*3 + j.
        let g: Vec<f32> = (0..2)
            .flat_map(|r| {
                (0..2).flat_map(move |i| (0..3).map(move |j| (r * 10 + i * 3 + j) as f32))
            })
            .collect();
        let l = reorder_logits(&g, 2, 2, 3);
        assert_eq!(
            l,
            vec![0., 1., 2., 10., 11., 12., 3., 4., 5., 13., 14., 15.]
        );
    }
}
