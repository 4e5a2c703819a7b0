//! `--dtype` on the CPU backend: the same checkpoint stored as bf16, int8 or Q8_0 gives
//! the f32 logits within the weight rounding, teacher-forced (both fed the same
//! tokens, so one near-tie cannot make them compare different contexts), at TP 1 and 2.
//!
//! Tolerances, from the rounding of one weight: bf16 keeps 8 significant bits (each
//! weight off by ≤ 2⁻⁹ relative), int8 is off by ≤ amax/254 per output row, Q8_0 by
//! ≤ amax/254 per 32-block (plus 2⁻¹¹ relative for its f16 scale). Prefill runs the
//! dequantize-then-GEMM path, so it sees the weight rounding only; decode runs the
//! GEMVs, which for int8 and Q8_0 also round each activation to int8 per 32-block
//! (≤ amax/254 of the block), about doubling the error. Measured on this model (2
//! layers, 300 positions, TP 1 and 2), as fractions of the logit range:
//!
//! | dtype | prefill max / mean | decode max / mean | top-1 |
//! |---|---|---|---|
//! | bf16 | 3.2e-3 / 4.3e-4 | 3.2e-3 / 4.3e-4 | 0.987 |
//! | int8 | 7.1e-3 / 1.0e-3 | 1.2e-2 / 1.6e-3 | 0.973–0.987 |
//! | Q8_0 | 8.0e-3 / 9.7e-4 | 1.05e-2 / 1.6e-3 | 0.987–0.993 |
//!
//! The bounds below leave about 3× margin over that (2.5× for the prefill maxima).

mod checkpoints;
mod logit_agreement;

use checkpoints::{small_config, synth};
use kernels::quant::WeightDtype;
use logit_agreement::{compare, teacher_forced, teacher_forced_decode, tokens, Bounds};
use worker::checkpoint::Checkpoint;
use worker::safetensors_io::StoredDtype;
use worker::synth::{synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

#[test]
fn bf16_int8_and_q8_0_weights_give_the_f32_logits_within_their_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(None);
    let ck = synth(
        tmp.path(),
        cfg.clone(),
        CheckpointFormat::Mistral,
        StoredDtype::F32,
        5,
    );
    let tokens = tokens(cfg.vocab_size);
    // Prefill runs the dequantize-then-GEMM path (weight rounding only); decode the
    // GEMVs (weight and, for int8 and Q8_0, activation rounding).
    let run = |decode: bool, tp: usize, d: WeightDtype| {
        if decode {
            teacher_forced_decode(&ck, tp, d, &tokens)
        } else {
            teacher_forced(&ck, tp, d, &tokens)
        }
    };
    for decode in [false, true] {
        let want = run(decode, 1, WeightDtype::F32);
        let path = if decode { "decode" } else { "prefill" };
        for tp in [1, 2] {
            let f32_tp = run(decode, tp, WeightDtype::F32);
            assert!(compare(&f32_tp, &want, cfg.vocab_size).max_abs < 1e-4);
            // Activation rounding (decode) doubles the int8 and Q8_0 errors.
            let q = if decode { 2.0 } else { 1.0 };
            for (dtype, rel_max, rel_mean, min_top1) in [
                (WeightDtype::Bf16, 1e-2, 1e-3, 0.95),
                (WeightDtype::Int8, 2e-2 * q, 3e-3 * q, 0.90),
                (WeightDtype::Q8_0, 2e-2 * q, 3e-3 * q, 0.90),
            ] {
                let got = run(decode, tp, dtype);
                compare(&got, &want, cfg.vocab_size).check(
                    &format!("{dtype:?} {path} tp {tp}"),
                    &Bounds {
                        rel_max,
                        rel_mean,
                        min_top1,
                    },
                );
            }
        }
    }
}

#[test]
fn weights_take_4_2_1_and_34_over_32_bytes_per_value() {
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
    let (f, b, i, q) = (
        bytes(WeightDtype::F32),
        bytes(WeightDtype::Bf16),
        bytes(WeightDtype::Int8),
        bytes(WeightDtype::Q8_0),
    );
    let norms = 4 * cfg.dim * (2 * cfg.n_layers + 1);
    assert_eq!(f, 4 * cfg.n_params() as usize);
    assert_eq!(b, (f - norms) / 2 + norms);
    assert!(i < b / 2 + b / 8, "int8 {i} vs bf16 {b}");
    assert_eq!(q, (f - norms) / 4 / 32 * 34 + norms);
    // The memory check before loading counts the same bytes.
    for d in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Q8_0] {
        let planned = worker::model::WeightFormat::All(d)
            .rank_bytes(&ck, 1)
            .unwrap();
        assert_eq!(planned as usize, bytes(d), "{d:?}");
    }
}
