//! The CPU reference model end to end: synthetic checkpoints in both layouts, the
//! loader, tensor parallelism, chunked prefill and mixed batches, and bad inputs.

mod checkpoints;

use checkpoints::{small_config, synth};
use worker::checkpoint::Checkpoint;
use worker::local::LocalTpGroup;
use worker::model::{SeqChunk, StepInput};
use worker::safetensors_io::StoredDtype;
use worker::{CheckpointFormat, ModelConfig};

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn same_seed_gives_the_same_model_in_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(None);
    let mi = synth(
        &tmp.path().join("m"),
        cfg.clone(),
        CheckpointFormat::Mistral,
        StoredDtype::Bf16,
        7,
    );
    let hf = synth(
        &tmp.path().join("h"),
        cfg.clone(),
        CheckpointFormat::Hf,
        StoredDtype::Bf16,
        7,
    );
    assert_eq!(mi.format, CheckpointFormat::Mistral);
    assert_eq!(hf.format, CheckpointFormat::Hf);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("h/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort();
    files.dedup();
    assert!(
        files.len() >= 2 && files[0].starts_with("model-00001-of-"),
        "HF layout must be sharded: {files:?}"
    );
    let p = prompt(21, cfg.vocab_size);
    let (tm, lm) = LocalTpGroup::load(&mi, 1, 16, 16)
        .unwrap()
        .generate_greedy(&p, 5, 64)
        .unwrap();
    let (th, lh) = LocalTpGroup::load(&hf, 1, 16, 16)
        .unwrap()
        .generate_greedy(&p, 5, 64)
        .unwrap();
    assert_eq!(tm, th);
    for (a, b) in lm.iter().zip(&lh) {
        assert_eq!(a, b, "identical weights must give bit-identical logits");
    }
    // A different seed is a different model.
    let other = synth(
        &tmp.path().join("o"),
        cfg,
        CheckpointFormat::Hf,
        StoredDtype::Bf16,
        8,
    );
    let (_, lo) = LocalTpGroup::load(&other, 1, 16, 16)
        .unwrap()
        .generate_greedy(&p, 1, 64)
        .unwrap();
    assert!(max_abs_diff(&lo[0], &lm[0]) > 1e-2);
}

#[test]
fn tensor_parallel_ranks_match_a_single_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(None);
    let ck = synth(
        tmp.path(),
        cfg.clone(),
        CheckpointFormat::Hf,
        StoredDtype::F32,
        3,
    );
    let p = prompt(37, cfg.vocab_size);
    let (t1, l1) = LocalTpGroup::load(&ck, 1, 8, 16)
        .unwrap()
        .generate_greedy(&p, 8, 16)
        .unwrap();
    for tp in [2, 4] {
        let (t, l) = LocalTpGroup::load(&ck, tp, 8, 16)
            .unwrap()
            .generate_greedy(&p, 8, 16)
            .unwrap();
        assert_eq!(t, t1, "TP={tp} greedy tokens");
        for (a, b) in l.iter().zip(&l1) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "TP={tp}: logits differ by {d}");
        }
    }
}

#[test]
fn the_tiny_preset_splits_four_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = synth(
        tmp.path(),
        ModelConfig::tiny(),
        CheckpointFormat::Mistral,
        StoredDtype::Bf16,
        0,
    );
    let p = prompt(19, 32768);
    let (t1, l1) = LocalTpGroup::load(&ck, 1, 4, 16)
        .unwrap()
        .generate_greedy(&p, 4, 19)
        .unwrap();
    let (t4, l4) = LocalTpGroup::load(&ck, 4, 4, 16)
        .unwrap()
        .generate_greedy(&p, 4, 19)
        .unwrap();
    assert_eq!(t1, t4);
    assert!(max_abs_diff(&l1[0], &l4[0]) < 1e-4);
}

fn chunked_logits_match_one_shot(window: Option<u32>) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(window);
    let ck = synth(
        tmp.path(),
        cfg.clone(),
        CheckpointFormat::Mistral,
        StoredDtype::F32,
        11,
    );
    let p = prompt(70, cfg.vocab_size);
    let (t_ref, l_ref) = LocalTpGroup::load(&ck, 1, 8, 16)
        .unwrap()
        .generate_greedy(&p, 6, 70)
        .unwrap();
    for chunk in [1, 7, 16, 33] {
        let (t, l) = LocalTpGroup::load(&ck, 2, 8, 16)
            .unwrap()
            .generate_greedy(&p, 6, chunk)
            .unwrap();
        assert_eq!(t, t_ref, "chunk {chunk}");
        for (a, b) in l.iter().zip(&l_ref) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "chunk {chunk}: logits differ by {d}");
        }
    }
}

#[test]
fn chunked_prefill_gives_the_same_logits_as_one_shot() {
    chunked_logits_match_one_shot(None);
}

#[test]
fn chunked_prefill_with_a_sliding_window_gives_the_same_logits_as_one_shot() {
    chunked_logits_match_one_shot(Some(24));
}

#[test]
fn sliding_window_changes_logits_only_beyond_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let full = synth(
        &tmp.path().join("f"),
        small_config(None),
        CheckpointFormat::Hf,
        StoredDtype::F32,
        5,
    );
    let swa = synth(
        &tmp.path().join("s"),
        small_config(Some(10)),
        CheckpointFormat::Hf,
        StoredDtype::F32,
        5,
    );
    let short = prompt(10, 1024);
    let long = prompt(30, 1024);
    let (_, a) = LocalTpGroup::load(&full, 1, 4, 16)
        .unwrap()
        .generate_greedy(&short, 1, 64)
        .unwrap();
    let (_, b) = LocalTpGroup::load(&swa, 1, 4, 16)
        .unwrap()
        .generate_greedy(&short, 1, 64)
        .unwrap();
    assert!(
        max_abs_diff(&a[0], &b[0]) < 1e-6,
        "within the window both models see the same keys"
    );
    let (_, a) = LocalTpGroup::load(&full, 1, 4, 16)
        .unwrap()
        .generate_greedy(&long, 1, 64)
        .unwrap();
    let (_, b) = LocalTpGroup::load(&swa, 1, 4, 16)
        .unwrap()
        .generate_greedy(&long, 1, 64)
        .unwrap();
    assert!(
        max_abs_diff(&a[0], &b[0]) > 1e-3,
        "beyond the window the models differ"
    );
}

#[test]
fn a_mixed_batch_of_prefill_chunks_and_decodes_matches_sequences_run_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(None);
    let ck = synth(
        tmp.path(),
        cfg.clone(),
        CheckpointFormat::Hf,
        StoredDtype::F32,
        9,
    );
    let (pa, pb) = (
        prompt(20, cfg.vocab_size),
        prompt(45, cfg.vocab_size)[5..].to_vec(),
    );
    // Alone: each sequence in its own group.
    let (_, la) = LocalTpGroup::load(&ck, 2, 8, 16)
        .unwrap()
        .generate_greedy(&pa, 1, 64)
        .unwrap();
    let (_, lb) = LocalTpGroup::load(&ck, 2, 8, 16)
        .unwrap()
        .generate_greedy(&pb, 1, 64)
        .unwrap();
    // Together: A prefills fully in step 1 while B's first chunk runs; in step 2 B finishes
    // its prompt while A decodes nothing new. Blocks are interleaved to make tables non-trivial.
    let mut g = LocalTpGroup::load(&ck, 2, 8, 16).unwrap();
    let (ta, tb) = (vec![6u32, 1], vec![0u32, 7, 3]);
    let s1 = StepInput::build(
        16,
        None,
        &[
            SeqChunk {
                block_table: &ta,
                cached: 0,
                tokens: &pa,
                sample: true,
            },
            SeqChunk {
                block_table: &tb,
                cached: 0,
                tokens: &pb[..17],
                sample: false,
            },
        ],
    );
    let l1 = g.forward(&s1).unwrap();
    assert_eq!(l1.len(), cfg.vocab_size, "only A wanted logits");
    assert!(max_abs_diff(&l1, &la[0]) < 1e-4);
    let s2 = StepInput::build(
        16,
        None,
        &[SeqChunk {
            block_table: &tb,
            cached: 17,
            tokens: &pb[17..],
            sample: true,
        }],
    );
    let l2 = g.forward(&s2).unwrap();
    assert!(max_abs_diff(&l2, &lb[0]) < 1e-4);
}

#[test]
fn bad_checkpoints_give_errors_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |dir: &std::path::Path| {
        Checkpoint::open(dir)
            .and_then(|c| LocalTpGroup::load(&c, 1, 1, 16).map(|_| ()))
            .unwrap_err()
            .to_string()
    };

    let e = err(&tmp.path().join("nope"));
    assert!(e.contains("does not exist"), "{e}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = err(&empty);
    assert!(
        e.contains("params.json") && e.contains("config.json"),
        "{e}"
    );

    // A checkpoint whose config promises a bigger model than its tensors hold.
    let dir = tmp.path().join("shape");
    synth(
        &dir,
        small_config(None),
        CheckpointFormat::Mistral,
        StoredDtype::Bf16,
        1,
    );
    let mut bigger = small_config(None);
    bigger.hidden_dim = 512;
    std::fs::write(dir.join("params.json"), bigger.to_params_json()).unwrap();
    let e = err(&dir);
    assert!(
        e.contains("layers.0.feed_forward.w1.weight") && e.contains("[512, 128]"),
        "{e}"
    );

    // A missing tensor.
    let dir = tmp.path().join("missing");
    synth(
        &dir,
        small_config(None),
        CheckpointFormat::Mistral,
        StoredDtype::Bf16,
        1,
    );
    let mut more = small_config(None);
    more.n_layers = 3;
    std::fs::write(dir.join("params.json"), more.to_params_json()).unwrap();
    let e = err(&dir);
    assert!(
        e.contains("missing tensor layers.2.attention.wq.weight"),
        "{e}"
    );

    // An unsupported dtype.
    let dir = tmp.path().join("dtype");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("params.json"), small_config(None).to_params_json()).unwrap();
    let data = vec![0u8; 8 * 1024 * 128];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1024, 128], &data)
            .unwrap();
    safetensors::serialize_to_file(
        [("tok_embeddings.weight", view)],
        None,
        &dir.join("consolidated.safetensors"),
    )
    .unwrap();
    let e = err(&dir);
    assert!(
        e.contains("tok_embeddings.weight") && e.contains("I64"),
        "{e}"
    );

    // TP = 3.
    let ck = Checkpoint::open(&tmp.path().join("missing")).unwrap();
    let e = LocalTpGroup::load(&ck, 3, 1, 16)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tp 3"), "{e}");
}

#[test]
fn steps_the_cache_cannot_hold_are_rejected_not_executed() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = synth(
        tmp.path(),
        small_config(None),
        CheckpointFormat::Hf,
        StoredDtype::Bf16,
        2,
    );
    let mut g = LocalTpGroup::load(&ck, 1, 2, 16).unwrap();
    let toks = prompt(5, 1024);
    let bad_block = StepInput::build(
        16,
        None,
        &[SeqChunk {
            block_table: &[5],
            cached: 0,
            tokens: &toks,
            sample: true,
        }],
    );
    assert!(g
        .forward(&bad_block)
        .unwrap_err()
        .to_string()
        .contains("block 5 is outside"));
    let too_long = StepInput::build(
        16,
        None,
        &[SeqChunk {
            block_table: &[0],
            cached: 14,
            tokens: &toks,
            sample: true,
        }],
    );
    assert!(g
        .forward(&too_long)
        .unwrap_err()
        .to_string()
        .contains("does not fit"));
    let bad_token = StepInput::build(
        16,
        None,
        &[SeqChunk {
            block_table: &[0],
            cached: 0,
            tokens: &[4096],
            sample: true,
        }],
    );
    assert!(g
        .forward(&bad_token)
        .unwrap_err()
        .to_string()
        .contains("token id 4096"));
    // The group still works afterwards.
    let ok = StepInput::build(
        16,
        None,
        &[SeqChunk {
            block_table: &[1],
            cached: 0,
            tokens: &toks,
            sample: true,
        }],
    );
    assert_eq!(g.forward(&ok).unwrap().len(), 1024);
}

#[test]
fn greedy_argmax_steps_equal_the_argmax_of_the_gathered_logits_at_tp_1_2_and_4() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_config(None);
    let ck = synth(
        tmp.path(),
        cfg.clone(),
        CheckpointFormat::Hf,
        StoredDtype::F32,
        4,
    );
    let (pa, pb, pc) = (
        prompt(30, cfg.vocab_size),
        prompt(9, cfg.vocab_size)[2..].to_vec(),
        prompt(50, cfg.vocab_size)[40..].to_vec(),
    );
    let (ta, tb, tc) = (vec![0u32, 1], vec![2u32], vec![3u32, 4]);
    let chunks = [
        SeqChunk {
            block_table: &ta,
            cached: 0,
            tokens: &pa,
            sample: true,
        },
        SeqChunk {
            block_table: &tb,
            cached: 0,
            tokens: &pb,
            sample: false,
        },
        SeqChunk {
            block_table: &tc,
            cached: 0,
            tokens: &pc,
            sample: true,
        },
    ];
    // A's last 4 tokens are "drafts": 5 logit rows, then C's 1 (and B's none).
    let step = StepInput::build_speculative(16, None, &chunks, &[4, 0, 0]);
    assert_eq!(step.logit_rows.len(), 6);
    for tp in [1, 2, 4] {
        let mut g = LocalTpGroup::load(&ck, tp, 8, 16).unwrap();
        let logits = g.forward(&step).unwrap();
        let want = kernels::reference::argmax_rows(&logits, cfg.vocab_size);
        // The same step again writes the same KV; only the answer's form differs.
        assert_eq!(g.forward_argmax(&step).unwrap(), want, "TP {tp}");
    }
}

#[test]
fn combined_shard_argmax_pairs_are_the_first_maximum_of_the_whole_row() {
    use kernels::reference::{argmax_pairs, argmax_rows};
    let (m, vocab) = (7usize, 48usize);
    let mut rows: Vec<f32> = (0..m * vocab)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 100.0)
        .collect();
    // Ties: row 1's maximum twice in one shard's range, row 2's in the last and first
    // shard, row 3 all equal, row 4 a maximum at the last id.
    rows[vocab + 20] = 50.0;
    rows[vocab + 21] = 50.0;
    rows[2 * vocab + 47] = 60.0;
    rows[2 * vocab + 3] = 60.0;
    rows[3 * vocab..4 * vocab].fill(1.5);
    rows[4 * vocab + 47] = 70.0;
    let want = argmax_rows(&rows, vocab);
    for tp in [1usize, 2, 3, 4, 6] {
        let local = vocab / tp;
        // Rank-major, as the gather delivers it: [tp][m][2].
        let gathered: Vec<f32> = (0..tp)
            .flat_map(|r| {
                let shard: Vec<f32> = rows
                    .chunks_exact(vocab)
                    .flat_map(|row| row[r * local..(r + 1) * local].to_vec())
                    .collect();
                argmax_pairs(&shard, local)
            })
            .collect();
        assert_eq!(
            worker::model::combine_argmax_pairs(&gathered, tp, m, local),
            want,
            "TP {tp}"
        );
    }
}
