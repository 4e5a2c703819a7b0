//! Start-up step-cost profiling: after `Init` loaded the shard and allocated the KV
//! cache, a rank runs a few scratch steps of the shapes it will serve (prefill chunks
//! of two sizes, one of them deep into a context; decode batches of two sizes at two
//! context lengths), times them, and fits
//!
//! `step_ms ≈ fixed_ms + per_token_ms × tokens + per_context_token_ms × context_tokens`
//!
//! (`context_tokens` = Σ over the step's sequences of `position + tokens`, as
//! `scheduler::StepCost` defines it), reported in `InitReply.step_cost`. A backend
//! with a model of its own time ([`crate::backend::Backend::modelled_step_ms`]: sim,
//! null) is fitted on that model over the whole range of step sizes instead of being
//! run.
//!
//! Invariants:
//! - The scratch steps go through [`Rank`]'s one step path, so they are checked and
//!   computed exactly as the coordinator's will be. Their sequences are fresh
//!   (`reset`), their blocks are ids `1..=scratch` (block 0 stays the null block), and
//!   after the last step the rank forgets them: the rank mirrors no sequence and no
//!   block is held, as before profiling. KV contents are not restored — the
//!   coordinator has handed out no block yet, and a block's contents are written
//!   before they are read.
//! - Every rank of a TP group derives the same shapes, in the same order, from what
//!   is equal across the group (the Init's step sizes, block size, the model's
//!   context, and the KV block count capped at [`SCRATCH_BLOCKS`]), so the ranks make
//!   the same all-reduce calls and do not deadlock. For that reason the cost is
//!   bounded by a fixed amount of work, not by a wall-clock budget (a budget would
//!   stop each rank at a different step). The CUDA KV block count comes from each
//!   GPU's free memory; ranks agree as long as each holds at least [`SCRATCH_BLOCKS`].
//!
//! Cost: one warm-up step, then [`REPS`] rounds of at most six steps, together at
//! most `1.5 × MEASURED_PREFILL + 2.25 × MEASURED_DECODE_SEQS` new tokens per round
//! (13 steps and 132 tokens on the tiny model's CPU rank: measured 0.8–1.0 s on a
//! 2-core machine shared with builds and other tests, where a token cost 3–3.5 ms;
//! the same tokens cost about 0.4 ms on an idle machine, see `benches/RESULTS.md`);
//! a modelled backend evaluates its model for a few dozen shapes (microseconds). A
//! fit is O(shapes).

use std::time::Instant;

use proto::v1::{SamplingParams, ScheduledSeq, StepCostModel, StepPlan};

use crate::rank::Rank;
use crate::sim::SeqWork;
use crate::WorkerError;

/// Most KV blocks the scratch steps use (ids `1..=SCRATCH_BLOCKS`).
pub const SCRATCH_BLOCKS: usize = 256;
/// Timed rounds over the shapes (after one warm-up step of the largest); each shape's
/// median is fitted.
pub const REPS: usize = 2;
/// Largest prefill chunk a measured rank times (tokens).
pub const MEASURED_PREFILL: usize = 24;
/// Largest decode batch a measured rank times (sequences).
pub const MEASURED_DECODE_SEQS: usize = 8;
/// Deepest context a measured rank's decodes and chunk read (tokens).
pub const MEASURED_CONTEXT: usize = 1024;
/// Sequence ids of the scratch steps (the coordinator's ids are small).
const SCRATCH_SEQ_BASE: u64 = u64::MAX - 4096;

/// What bounds the shapes: equal on every rank of a group.
#[derive(Clone, Copy, Debug)]
pub struct ProfileLimits {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub block_size: usize,
    pub max_context: usize,
    /// KV blocks the scratch steps may use (ids 1..=scratch_blocks).
    pub scratch_blocks: usize,
}

/// One profiled step: `seqs` sequences, each computing `tokens` tokens at `position`
/// (a block multiple), all sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub seqs: usize,
    pub position: usize,
    pub tokens: usize,
}

impl Shape {
    /// Tokens the step computes.
    pub fn step_tokens(&self) -> usize {
        self.seqs * self.tokens
    }

    /// KV positions its attention reads, as `scheduler::StepCost` counts them.
    pub fn context_tokens(&self) -> usize {
        self.seqs * (self.position + self.tokens)
    }

    /// Blocks the step holds: a shared prefix of `position / bs` blocks (never
    /// written: it stands for prefix-cached context) plus each sequence's own.
    fn blocks(&self, bs: usize) -> usize {
        self.position / bs + self.seqs * self.tokens.div_ceil(bs)
    }

    fn fits(&self, lim: &ProfileLimits) -> bool {
        self.seqs >= 1
            && self.tokens >= 1
            && self.seqs <= lim.max_seqs
            && self.step_tokens() <= lim.max_tokens
            && self.position + self.tokens <= lim.max_context
            && self.position % lim.block_size == 0
            && self.blocks(lim.block_size) <= lim.scratch_blocks
    }
}

/// How large the shapes get: small for a rank that runs them, the full range for one
/// that evaluates a model.
#[derive(Clone, Copy, Debug)]
struct Scale {
    prefill: usize,
    decode_seqs: usize,
    context: usize,
}

impl Scale {
    const MEASURED: Self = Self {
        prefill: MEASURED_PREFILL,
        decode_seqs: MEASURED_DECODE_SEQS,
        context: MEASURED_CONTEXT,
    };
    const MODELLED: Self = Self {
        prefill: usize::MAX,
        decode_seqs: usize::MAX,
        context: usize::MAX,
    };
}

/// The shapes to time, in order, deduplicated; every one fits `lim`.
fn shapes(lim: &ProfileLimits, scale: Scale) -> Vec<Shape> {
    let bs = lim.block_size;
    let prefill = scale.prefill.min(lim.max_tokens).min(lim.max_context);
    let small = (prefill / 4).max(1);
    let seqs = scale.decode_seqs.min(lim.max_seqs).min(lim.max_tokens);
    let few = (seqs / 4).max(1);
    // A typical context (a quarter of the model's), as far as the scratch blocks and
    // the context allow.
    let room = lim
        .scratch_blocks
        .saturating_sub(seqs.max(small.div_ceil(bs)));
    let deep = (lim.max_context / 4)
        .min(scale.context)
        .min(room * bs)
        .min(lim.max_context.saturating_sub(small))
        / bs
        * bs;
    let shallow = deep / 4 / bs * bs;
    let mut out: Vec<Shape> = Vec::new();
    let mut add = |seqs, position, tokens| {
        let s = Shape {
            seqs,
            position,
            tokens,
        };
        if s.fits(lim) && !out.contains(&s) {
            out.push(s);
        }
    };
    add(1, 0, prefill);
    add(1, 0, small);
    add(1, deep, small);
    add(seqs, deep, 1);
    add(few, deep, 1);
    add(seqs, shallow, 1);
    if scale.prefill == usize::MAX {
        // A modelled backend costs nothing to ask: cover the range between.
        for tokens in [prefill / 2, prefill / 8, prefill / 32] {
            add(1, 0, tokens);
            add(1, deep, tokens);
        }
        for n in [seqs / 2, seqs / 16] {
            add(n.max(1), deep, 1);
            add(n.max(1), shallow, 1);
        }
    }
    out
}

/// The scratch plan of one shape: fresh sequences (`reset`) on scratch blocks.
fn plan(shape: Shape, bs: usize, vocab: usize, step: u64) -> StepPlan {
    let shared: Vec<u32> = (1..=shape.position / bs).map(|b| b as u32).collect();
    let own = shape.tokens.div_ceil(bs);
    let seqs = (0..shape.seqs)
        .map(|i| {
            let first = shared.len() + 1 + i * own;
            let mut new_blocks = shared.clone();
            new_blocks.extend((first..first + own).map(|b| b as u32));
            ScheduledSeq {
                seq_id: SCRATCH_SEQ_BASE + i as u64,
                tokens: (0..shape.tokens)
                    .map(|t| ((t * 7919 + i * 104_729 + 13) % vocab) as u32)
                    .collect(),
                position_start: shape.position as u32,
                new_blocks,
                sample: true,
                sampling: Some(SamplingParams::default()),
                reset: true,
                num_drafts: 0,
            }
        })
        .collect();
    StepPlan {
        truncated: Vec::new(),
        step,
        seqs,
        freed: Vec::new(),
    }
}

/// One fitted sample: a shape and its step time.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub tokens: f64,
    pub context_tokens: f64,
    pub ms: f64,
}

/// The rank's step cost model: modelled by its backend, or measured on scratch
/// steps. Leaves the rank with no mirrored sequence. A rank that fails a scratch step
/// fails the Init; a shape every rank rejects alike (plan checks) is skipped.
pub fn step_cost(rank: &mut Rank) -> Result<StepCostModel, WorkerError> {
    let lim = rank.limits();
    // A modelled step holds no block: only the KV capacity bounds its shapes.
    let modelled_limits = ProfileLimits {
        max_tokens: lim.max_tokens,
        max_seqs: lim.max_seqs,
        block_size: lim.block_size,
        max_context: lim.max_context,
        scratch_blocks: lim.num_blocks.saturating_sub(1),
    };
    let limits = ProfileLimits {
        scratch_blocks: modelled_limits.scratch_blocks.min(SCRATCH_BLOCKS),
        ..modelled_limits
    };
    let t0 = Instant::now();
    let modelled: Option<Vec<Sample>> = shapes(&modelled_limits, Scale::MODELLED)
        .iter()
        .map(|s| rank.modelled_step_ms(&work(s)).map(|ms| sample(s, ms)))
        .collect();
    let cost = match modelled {
        Some(m) => fit(&m),
        None => fit(&measure(rank, &limits)?),
    };
    tracing::info!(
        rank = rank.rank(),
        fixed_ms = cost.fixed_ms,
        per_token_ms = cost.per_token_ms,
        per_context_token_ms = cost.per_context_token_ms,
        shapes = cost.shapes,
        seconds = t0.elapsed().as_secs_f64(),
        "step cost model fitted"
    );
    Ok(cost)
}

/// The cost model a backend with a model of its step time (`step_ms`: the sim's
/// [`crate::sim::step_time::StepTimeModel`]) reports for `limits`: the same shapes and
/// fit as [`step_cost`] — what `stral plan` uses to schedule as `stral serve` would.
pub fn modelled_cost(
    limits: &ProfileLimits,
    mut step_ms: impl FnMut(&[SeqWork]) -> f64,
) -> StepCostModel {
    let samples: Vec<Sample> = shapes(limits, Scale::MODELLED)
        .iter()
        .map(|s| sample(s, step_ms(&work(s))))
        .collect();
    fit(&samples)
}

/// The work of one profiling shape: `seqs` equal entries.
fn work(s: &Shape) -> Vec<SeqWork> {
    vec![
        SeqWork {
            new_tokens: s.tokens as u32,
            cached: s.position as u32,
            sample: true,
        };
        s.seqs
    ]
}

fn sample(s: &Shape, ms: f64) -> Sample {
    Sample {
        tokens: s.step_tokens() as f64,
        context_tokens: s.context_tokens() as f64,
        ms,
    }
}

/// Times every shape [`REPS`] times (rounds over all shapes, after one untimed step
/// of the first, largest, which faults in the activations) and returns each shape's
/// median; forgets the scratch sequences.
fn measure(rank: &mut Rank, lim: &ProfileLimits) -> Result<Vec<Sample>, WorkerError> {
    let vocab = rank.limits().vocab;
    let mut shapes = shapes(lim, Scale::MEASURED);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    let mut step = 0;
    for round in 0..=REPS {
        let mut i = 0;
        while i < shapes.len() && (round > 0 || i == 0) {
            step += 1;
            let t = Instant::now();
            let ran = rank.scratch_step(&plan(shapes[i], lim.block_size, vocab, step));
            let ms = t.elapsed().as_secs_f64() * 1e3;
            match ran {
                Ok(()) => {
                    if round > 0 {
                        times[i].push(ms);
                    }
                    i += 1;
                }
                Err(e) if rank.failed().is_none() => {
                    tracing::warn!(shape = ?shapes[i], error = %e, "profiling: shape rejected; skipped");
                    shapes.remove(i);
                    times.remove(i);
                }
                Err(e) => {
                    rank.forget_sequences();
                    return Err(e);
                }
            }
        }
    }
    rank.forget_sequences();
    Ok(shapes
        .iter()
        .zip(&mut times)
        .map(|(s, t)| sample(s, median(t)))
        .collect())
}

/// The median of `xs` (0 when empty).
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// Least squares on relative error (each sample weighted by 1/ms², so a short decode
/// step counts as much as a long prefill), with every coefficient ≥ 0: the best of
/// the fits over each subset of the three terms whose coefficients all come out
/// non-negative (exact for three unknowns). Zeros when nothing fits.
pub fn fit(samples: &[Sample]) -> StepCostModel {
    let rows: Vec<([f64; 3], f64, f64)> = samples
        .iter()
        .map(|s| {
            let w = if s.ms > 0.0 { 1.0 / s.ms } else { 1.0 };
            ([1.0, s.tokens, s.context_tokens], s.ms, w)
        })
        .collect();
    let mut best: Option<([f64; 3], f64)> = None;
    for mask in 1u8..8 {
        let terms: Vec<usize> = (0..3).filter(|t| mask & (1 << t) != 0).collect();
        let Some(coef) = solve_subset(&rows, &terms) else {
            continue;
        };
        if coef.iter().any(|c| *c < 0.0 || !c.is_finite()) {
            continue;
        }
        let sse: f64 = rows
            .iter()
            .map(|(x, y, w)| {
                let pred: f64 = x.iter().zip(&coef).map(|(a, b)| a * b).sum();
                ((pred - y) * w).powi(2)
            })
            .sum();
        if best.is_none_or(|(_, b)| sse < b) {
            best = Some((coef, sse));
        }
    }
    let [fixed_ms, per_token_ms, per_context_token_ms] = best.map(|b| b.0).unwrap_or_default();
    StepCostModel {
        fixed_ms,
        per_token_ms,
        per_context_token_ms,
        shapes: samples.len() as u32,
    }
}

/// Weighted least squares over the columns in `terms` (the others 0), by the normal
/// equations and Gaussian elimination; `None` when they are singular.
fn solve_subset(rows: &[([f64; 3], f64, f64)], terms: &[usize]) -> Option<[f64; 3]> {
    let n = terms.len();
    let mut a = vec![vec![0.0; n + 1]; n];
    for (x, y, w) in rows {
        let w2 = w * w;
        for (i, &ti) in terms.iter().enumerate() {
            for (j, &tj) in terms.iter().enumerate() {
                a[i][j] += w2 * x[ti] * x[tj];
            }
            a[i][n] += w2 * x[ti] * y;
        }
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        let scale = a.iter().map(|r| r[col].abs()).fold(0.0, f64::max);
        if a[pivot][col].abs() <= 1e-12 * scale.max(1e-300) {
            return None;
        }
        a.swap(col, pivot);
        for r in 0..n {
            if r != col {
                let f = a[r][col] / a[col][col];
                for c in col..=n {
                    a[r][c] -= f * a[col][c];
                }
            }
        }
    }
    let mut coef = [0.0; 3];
    for (i, &t) in terms.iter().enumerate() {
        coef[t] = a[i][n] / a[i][i];
    }
    Some(coef)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(
        max_tokens: usize,
        max_seqs: usize,
        bs: usize,
        ctx: usize,
        blocks: usize,
    ) -> ProfileLimits {
        ProfileLimits {
            max_tokens,
            max_seqs,
            block_size: bs,
            max_context: ctx,
            scratch_blocks: blocks,
        }
    }

    #[test]
    fn shapes_fit_their_limits_even_when_they_are_tight() {
        for l in [
            lim(8192, 256, 16, 32768, SCRATCH_BLOCKS),
            lim(8192, 256, 4, 32768, 63),
            lim(16, 2, 4, 64, 3),
            lim(1, 1, 16, 2, 1),
        ] {
            for scale in [Scale::MEASURED, Scale::MODELLED] {
                let s = shapes(&l, scale);
                assert!(!s.is_empty(), "{l:?}");
                assert!(s.iter().all(|s| s.fits(&l)), "{l:?}: {s:?}");
            }
        }
    }

    #[test]
    fn measured_shapes_separate_tokens_from_context() {
        let s = shapes(&lim(8192, 256, 16, 32768, SCRATCH_BLOCKS), Scale::MEASURED);
        assert_eq!(s.len(), 6, "{s:?}");
        assert!(s.contains(&Shape {
            seqs: 1,
            position: 0,
            tokens: MEASURED_PREFILL
        }));
        assert!(s.contains(&Shape {
            seqs: MEASURED_DECODE_SEQS,
            position: MEASURED_CONTEXT,
            tokens: 1
        }));
        let work: usize = s.iter().map(Shape::step_tokens).sum();
        assert!(
            work <= 5 * MEASURED_PREFILL + 2 * MEASURED_DECODE_SEQS,
            "{work}"
        );
    }

    #[test]
    fn scratch_plans_use_their_own_blocks_past_a_shared_prefix() {
        let p = plan(
            Shape {
                seqs: 3,
                position: 8,
                tokens: 1,
            },
            4,
            100,
            1,
        );
        let tables: Vec<_> = p.seqs.iter().map(|s| s.new_blocks.clone()).collect();
        assert_eq!(tables, [vec![1, 2, 3], vec![1, 2, 4], vec![1, 2, 5]]);
        assert!(p
            .seqs
            .iter()
            .all(|s| s.reset && s.position_start == 8 && s.sample));
    }

    #[test]
    fn the_fit_recovers_a_linear_model_and_never_goes_negative() {
        let truth = |t: f64, c: f64| 2.0 + 0.5 * t + 0.01 * c;
        let pts = [
            (1.0, 100.0),
            (8.0, 800.0),
            (48.0, 48.0),
            (12.0, 12.0),
            (12.0, 1036.0),
        ];
        let samples: Vec<_> = pts
            .iter()
            .map(|&(t, c)| Sample {
                tokens: t,
                context_tokens: c,
                ms: truth(t, c),
            })
            .collect();
        let m = fit(&samples);
        assert!((m.fixed_ms - 2.0).abs() < 1e-6, "{m:?}");
        assert!((m.per_token_ms - 0.5).abs() < 1e-6, "{m:?}");
        assert!((m.per_context_token_ms - 0.01).abs() < 1e-6, "{m:?}");
        // Time falling with context would need a negative coefficient: clamped to 0.
        let samples: Vec<_> = pts
            .iter()
            .map(|&(t, c)| Sample {
                tokens: t,
                context_tokens: c,
                ms: 5.0 + t - 0.001 * c,
            })
            .collect();
        let m = fit(&samples);
        assert!(
            m.fixed_ms >= 0.0 && m.per_token_ms > 0.0 && m.per_context_token_ms == 0.0,
            "{m:?}"
        );
        let zeros = fit(&[Sample {
            tokens: 1.0,
            context_tokens: 1.0,
            ms: 0.0,
        }; 3]);
        assert_eq!(
            (
                zeros.fixed_ms,
                zeros.per_token_ms,
                zeros.per_context_token_ms
            ),
            (0.0, 0.0, 0.0)
        );
    }
}
