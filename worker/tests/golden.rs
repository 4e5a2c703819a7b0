//! The CPU model against Hugging Face `transformers` (`MistralForCausalLM`, f32):
//! fixtures in `fixtures/golden/` made by `scripts/fixtures/make_golden.py`.
//!
//! For each variant (full attention; sliding window 8 with a 40-token prompt), both
//! on-disk layouts of the same weights must reproduce HF's logits at every prompt
//! position within 1e-4, and HF's greedy continuation, at TP = 1, 2 and 4.

use std::path::PathBuf;

use serde_json::Value;
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::{SeqChunk, StepInput};

const TOL: f32 = 1e-4;

fn golden_dir(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/golden")
        .join(variant)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of every prompt position from one prefill step.
fn all_position_logits(g: &mut LocalTpGroup, prompt: &[u32]) -> Vec<f32> {
    let table: Vec<u32> = (0..prompt.len().div_ceil(16) as u32).collect();
    let mut step = StepInput::build(
        16,
        g.sliding_window(),
        &[SeqChunk {
            block_table: &table,
            cached: 0,
            tokens: prompt,
            sample: true,
        }],
    );
    step.logit_rows = (0..prompt.len() as u32).collect();
    g.forward(&step).unwrap()
}

fn check_variant(variant: &str) {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir(variant).join("logits.json")).unwrap(),
    )
    .unwrap();
    let prompts = fx["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 4);
    for layout in ["hf", "mistral"] {
        let ck = Checkpoint::open(&golden_dir(variant).join(layout)).unwrap();
        assert_eq!(
            ck.config.rope_theta as f64,
            fx["config"]["rope_theta"].as_f64().unwrap(),
            "{variant}/{layout}: rope_theta"
        );
        for tp in [1, 2, 4] {
            for p in prompts {
                let tokens = ids(&p["tokens"]);
                let want = floats(&p["logits"]);
                let mut g = LocalTpGroup::load(&ck, tp, 8, 16).unwrap();
                let got = all_position_logits(&mut g, &tokens);
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < TOL,
                    "{variant}/{layout} TP={tp} T={}: max |Δlogit| = {worst}",
                    tokens.len()
                );

                let cont = ids(&p["continuation"]);
                let mut g = LocalTpGroup::load(&ck, tp, 8, 16).unwrap();
                let (gen, step_logits) = g.generate_greedy(&tokens, cont.len(), 7).unwrap();
                assert_eq!(
                    gen,
                    cont,
                    "{variant}/{layout} TP={tp} T={}: greedy continuation",
                    tokens.len()
                );
                let want_cont = floats(&p["continuation_logits"]);
                let got_cont: Vec<f32> = step_logits.concat();
                let worst = got_cont
                    .iter()
                    .zip(&want_cont)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < TOL,
                    "{variant}/{layout} TP={tp}: continuation logits differ by {worst}"
                );
            }
        }
    }
}

#[test]
fn full_attention_matches_transformers_in_both_layouts_and_all_tp_sizes() {
    check_variant("full");
}

#[test]
fn sliding_window_matches_transformers_in_both_layouts_and_all_tp_sizes() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir("swa").join("logits.json")).unwrap(),
    )
    .unwrap();
    let window = fx["config"]["sliding_window"].as_u64().unwrap() as usize;
    assert!(
        fx["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["tokens"].as_array().unwrap().len() > window),
        "a prompt must exceed the window"
    );
    check_variant("swa");
}
