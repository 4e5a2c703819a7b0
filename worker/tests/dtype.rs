//! `--dtype` on the CPU backend: the same checkpoint stored as bf16 or int8 gives the
//! f32 logits within the weight rounding, teacher-forced (both fed the same tokens, so
//! one near-tie cannot make them compare different contexts), at TP 1 and 2.
//!
//! Tolerances, from the rounding of one weight: bf16 keeps 8 significant bits (each
//! weight off by ≤ 2⁻⁹ relative), int8 is off by ≤ amax/254 per output row. Over two
//! layers and the head this model shows a largest logit error of 3.2e-3 of the logit
//! range for bf16 and 7e-3 for int8 (means 4e-4 and 1e-3), top-1 agreement 0.98–0.99
//! over 300 positions; the bounds below leave about 3× margin over that.

use kernels::quant::WeightDtype;
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::{SeqChunk, StepInput};
use worker::safetensors_io::StoredDtype;
use worker::synth::{synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

const POSITIONS: usize = 300;

/// Logits `[POSITIONS, vocab]` of one teacher-forced prefill.
fn teacher_forced(ck: &Checkpoint, tp: usize, dtype: WeightDtype, tokens: &[u32]) -> Vec<f32> {
    let bs = 16;
    let mut g = LocalTpGroup::load_as(ck, tp, tokens.len().div_ceil(bs) + 1, bs, dtype).unwrap();
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

struct Agreement {
    max_abs: f32,
    mean_abs: f32,
    range: f32,
    top1: f64,
}

fn compare(got: &[f32], want: &[f32], vocab: usize) -> Agreement {
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

#[test]
fn bf16_and_int8_weights_give_the_f32_logits_within_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        n_layers: 2,
        dim: 128,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 16,
        hidden_dim: 256,
        vocab_size: 1024,
        ..ModelConfig::tiny()
    };
    synthesize(
        &SynthOptions {
            config: cfg.clone(),
            format: CheckpointFormat::Mistral,
            dtype: StoredDtype::F32,
            seed: 5,
            progress: false,
        },
        tmp.path(),
    )
    .unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let tokens: Vec<u32> = (0..POSITIONS)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let want = teacher_forced(&ck, 1, WeightDtype::F32, &tokens);
    for tp in [1, 2] {
        let f32_tp = teacher_forced(&ck, tp, WeightDtype::F32, &tokens);
        assert!(compare(&f32_tp, &want, cfg.vocab_size).max_abs < 1e-4);
        for (dtype, rel_max, rel_mean, min_top1) in [
            (WeightDtype::Bf16, 1e-2, 1e-3, 0.95),
            (WeightDtype::Int8, 2e-2, 3e-3, 0.90),
        ] {
            let got = teacher_forced(&ck, tp, dtype, &tokens);
            let a = compare(&got, &want, cfg.vocab_size);
            eprintln!(
                "{dtype:?} tp {tp}: max |Δ| {:.2e}, mean |Δ| {:.2e} (logit range {:.2}), top-1 agreement {:.3} over {POSITIONS} positions",
                a.max_abs, a.mean_abs, a.range, a.top1
            );
            assert!(
                a.max_abs < rel_max * a.range,
                "{dtype:?} tp {tp}: max {}",
                a.max_abs
            );
            assert!(
                a.mean_abs < rel_mean * a.range,
                "{dtype:?} tp {tp}: mean {}",
                a.mean_abs
            );
            assert!(a.top1 >= min_top1, "{dtype:?} tp {tp}: top-1 {}", a.top1);
        }
    }
}

#[test]
fn weights_take_4_2_and_1_bytes_per_value() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        n_layers: 1,
        dim: 64,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        hidden_dim: 128,
        vocab_size: 256,
        ..ModelConfig::tiny()
    };
    synthesize(
        &SynthOptions {
            config: cfg.clone(),
            seed: 1,
            progress: false,
            ..Default::default()
        },
        tmp.path(),
    )
    .unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let shard = worker::model::ShardSpec::default();
    let bytes = |d| {
        worker::model::RankWeights::load_as(&ck, shard, d, false)
            .unwrap()
            .bytes()
    };
    let (f, b, i) = (
        bytes(WeightDtype::F32),
        bytes(WeightDtype::Bf16),
        bytes(WeightDtype::Int8),
    );
    let norms = 4 * cfg.dim * (2 * cfg.n_layers + 1);
    assert_eq!(f, 4 * cfg.n_params() as usize);
    assert_eq!(b, (f - norms) / 2 + norms);
    assert!(i < b / 2 + b / 8, "int8 {i} vs bf16 {b}");
}
