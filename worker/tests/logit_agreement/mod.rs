//! Shared by the weight-format tests (`dtype.rs`, `gguf.rs`): teacher-forced logits of
//! one long prefill (every position's logits from the same fed tokens, so one near-tie
//! cannot make two formats compare different contexts) and how close two sets are.

use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::{SeqChunk, StepInput, WeightFormat};

/// Positions every comparison covers (the issue asks for ≥ 256).
pub const POSITIONS: usize = 300;

/// The teacher-forced prompt for a vocabulary of `vocab`.
pub fn tokens(vocab: usize) -> Vec<u32> {
    (0..POSITIONS)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect()
}

/// Logits `[tokens.len(), vocab]` of one teacher-forced prefill at TP `tp`.
pub fn teacher_forced(
    ck: &Checkpoint,
    tp: usize,
    format: impl Into<WeightFormat>,
    tokens: &[u32],
) -> Vec<f32> {
    let bs = 16;
    let mut g = LocalTpGroup::load_as(ck, tp, tokens.len().div_ceil(bs) + 1, bs, format).unwrap();
    let table: Vec<u32> = (0..tokens.len().div_ceil(bs) as u32).collect();
    let mut step = StepInput::build(
        bs,
        g.sliding_window(),
        &[SeqChunk {
            block_table: &table,
            cached: 0,
            tokens,
            sample: true,
        }],
    );
    step.logit_rows = (0..tokens.len() as u32).collect();
    g.forward(&step).unwrap()
}

/// Logits `[tokens.len(), vocab]` of the same teacher forcing run as decode steps, one
/// token per step (the GEMV path, where int8 and Q8_0 also quantize activations).
pub fn teacher_forced_decode(
    ck: &Checkpoint,
    tp: usize,
    format: impl Into<WeightFormat>,
    tokens: &[u32],
) -> Vec<f32> {
    let bs = 16;
    let mut g = LocalTpGroup::load_as(ck, tp, tokens.len().div_ceil(bs) + 1, bs, format).unwrap();
    let table: Vec<u32> = (0..tokens.len().div_ceil(bs) as u32).collect();
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let step = StepInput::build(
            bs,
            g.sliding_window(),
            &[SeqChunk {
                block_table: &table,
                cached: i,
                tokens: std::slice::from_ref(t),
                sample: true,
            }],
        );
        out.extend(g.forward(&step).unwrap());
    }
    out
}

/// How close `got` is to the reference `want`.
pub struct Agreement {
    pub max_abs: f32,
    pub mean_abs: f32,
    /// max − min of the reference logits.
    pub range: f32,
    /// Share of positions whose argmax is the same.
    pub top1: f64,
}

pub fn compare(got: &[f32], want: &[f32], vocab: usize) -> Agreement {
    let am = |l: &[f32]| kernels::reference::argmax_rows(l, vocab);
    let (a, b) = (am(got), am(want));
    let diff: Vec<f32> = got.iter().zip(want).map(|(x, y)| (x - y).abs()).collect();
    let (lo, hi) = want
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    Agreement {
        max_abs: diff.iter().copied().fold(0.0, f32::max),
        mean_abs: diff.iter().sum::<f32>() / diff.len() as f32,
        range: hi - lo,
        top1: a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64,
    }
}

/// Bounds on an [`Agreement`]: max and mean |Δ| as fractions of the logit range, and
/// the least top-1 agreement.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub rel_max: f32,
    pub rel_mean: f32,
    pub min_top1: f64,
}

impl Agreement {
    /// Prints the measurement (`cargo test -- --nocapture` shows it) and asserts `b`.
    pub fn check(&self, what: &str, b: &Bounds) {
        eprintln!(
            "{what}: max |Δ| {:.2e} ({:.2e} of the logit range {:.2}), mean |Δ| {:.2e} ({:.2e}), top-1 agreement {:.3} over {POSITIONS} positions",
            self.max_abs,
            self.max_abs / self.range,
            self.range,
            self.mean_abs,
            self.mean_abs / self.range,
            self.top1
        );
        assert!(
            self.max_abs < b.rel_max * self.range,
            "{what}: max |Δ| {} ≥ {} of the range {}",
            self.max_abs,
            b.rel_max,
            self.range
        );
        assert!(
            self.mean_abs < b.rel_mean * self.range,
            "{what}: mean |Δ| {} ≥ {} of the range {}",
            self.mean_abs,
            b.rel_mean,
            self.range
        );
        assert!(
            self.top1 >= b.min_top1,
            "{what}: top-1 agreement {} < {}",
            self.top1,
            b.min_top1
        );
    }
}
