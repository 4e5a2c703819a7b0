//! The CUDA backend against the CPU reference, teacher-forced. The GPU tests are
//! `#[ignore = "needs a GPU: STRAL_GPU=1"]` (a CPU run lists them as ignored);
//! `worker/scripts/device-run.sh` runs them with `--ignored` on the GPU machine.
//!
//! Teacher forcing: both backends get the same token sequences (never their own
//! greedy choices, which diverge after the first bf16 near-tie), in the same steps —
//! a 200-token prefill, a 100-token chunk on that cached prefix, then 20 single-token
//! decode steps, for two sequences batched together — and logits are compared at
//! every position: 2 × 320 = 640 positions.
//!
//! Tolerances. Both backends read the same bf16 weights; the CPU computes in f32, the
//! CUDA path stores every activation in bf16 (unit roundoff u = 2⁻⁹) with f32
//! accumulation. The tiny model is 4 layers of ~10 rounded ops each (~40 roundings on
//! the path to a logit). Relative errors of independent roundings add like a random
//! walk, √40·u ≈ 1.2 % of a value's scale, and at worst linearly, 40·u ≈ 8 %; a
//! logit is a dot product over 512 dims of such values, so its error scales with the
//! row's magnitude. We bound, per row, max |Δlogit| ≤ 0.05 + 2 % of max |logit|
//! (`LOGIT_TOL_ABS` + `LOGIT_TOL_REL`: above the random walk, below the worst case,
//! and an order of magnitude below a real bug such as a wrong position or KV slot,
//! which moves logits by O(range)); the mean |Δ| over all logits ≤ `MEAN_TOL` (0.01 +
//! 0.2 % of the mean |logit|: a systematic error shows in the mean long before the
//! max). Top-1 may flip only at near-ties: every position where the argmaxes differ
//! must have the CPU's logit of the GPU's choice within the row tolerance of the
//! CPU's best, and at least `MIN_TOP1` = 95 % of positions must agree.
//!
//! Without a driver, one test checks that a CUDA Init fails with a clear error.

use proto::v1::InitRequest;
use worker::checkpoint::Checkpoint;
use worker::collective::{LocalCollective, SoloCollective};
use worker::cuda::{CudaDevice, CudaModel, CudaModelConfig, DeviceCollective, WeightSource};
use worker::model::{CpuModel, RankWeights, SeqChunk, ShardSpec, StepInput};
use worker::synth::{synthesize, SynthOptions};

const LOGIT_TOL_ABS: f32 = 0.05;
const LOGIT_TOL_REL: f32 = 0.02;
const MEAN_TOL_ABS: f64 = 0.01;
const MEAN_TOL_REL: f64 = 0.002;
const MIN_TOP1: f64 = 0.95;
const BS: usize = 16;

/// Only `--ignored` runs reach this; without `STRAL_GPU=1` they fail, not pass.
fn gpu() {
    assert_eq!(
        std::env::var("STRAL_GPU").as_deref(),
        Ok("1"),
        "GPU test run without STRAL_GPU=1 (run it on a GPU machine: worker/scripts/device-run.sh)"
    );
}

fn tiny(dir: &std::path::Path) -> Checkpoint {
    synthesize(
        &SynthOptions {
            seed: 3,
            progress: false,
            ..Default::default()
        },
        dir,
    )
    .unwrap();
    Checkpoint::open(dir).unwrap()
}

fn sizing() -> CudaModelConfig {
    CudaModelConfig {
        max_tokens: 512,
        // Teacher forcing asks for the logits of every row of a step.
        max_seqs: 512,
        block_size: BS,
        memory_utilization: 0.5,
        max_kv_blocks: Some(256),
        fused_qkv: false,
        reuse_attn_buffers: false,
    }
}

fn cuda_model(ckpt: &Checkpoint, shard: ShardSpec) -> CudaModel {
    gpu();
    let k = kernels::cuda::CudaKernels::new(0).unwrap();
    CudaModel::new(k, WeightSource::Checkpoint(ckpt), shard, sizing()).unwrap()
}

/// The teacher sequence `seed`: `n` fixed token ids.
fn teacher(n: usize, seed: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % 32_000) as u32 + 700)
        .collect()
}

/// Step boundaries within each teacher sequence: prefill, chunk on a cached prefix,
/// then single-token decode steps.
fn schedule() -> Vec<(usize, usize)> {
    let mut s = vec![(0, 200), (200, 300)];
    s.extend((300..320).map(|p| (p, p + 1)));
    s
}

/// Runs `run` on both ranks of a host-staged TP 2 group on one GPU (a thread per
/// rank, the same steps on each: teacher forcing needs no token exchange) and returns
/// rank 0's result.
fn host_staged_tp2<T: Send + 'static>(
    ckpt: &std::sync::Arc<Checkpoint>,
    run: impl Fn(&mut CudaModel, &mut DeviceCollective) -> T + Send + Clone + 'static,
) -> T {
    let handles: Vec<_> = LocalCollective::group(2)
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let (ckpt, run) = (ckpt.clone(), run.clone());
            std::thread::spawn(move || {
                let mut m = cuda_model(&ckpt, ShardSpec { tp: 2, rank });
                let mut coll = DeviceCollective::Host(Box::new(c));
                run(&mut m, &mut coll)
            })
        })
        .collect();
    let mut results = handles.into_iter().map(|h| h.join().unwrap());
    let rank0 = results.next().unwrap();
    results.for_each(drop);
    rank0
}

/// Feeds two teacher sequences through `step` on [`schedule`], asking for logits at
/// every row; returns them position by position (`[positions][vocab]`, rank 0).
fn teacher_forced(
    mut step: impl FnMut(&StepInput) -> Option<Vec<f32>>,
    vocab: usize,
) -> Vec<Vec<f32>> {
    let seqs = [teacher(320, 1), teacher(320, 2)];
    let tables: Vec<Vec<u32>> = (0..seqs.len())
        .map(|s| ((s * 32) as u32..(s * 32 + 32) as u32).collect())
        .collect();
    let mut per_seq = vec![Vec::new(); seqs.len()];
    for (a, b) in schedule() {
        let chunks: Vec<SeqChunk<'_>> = (0..seqs.len())
            .map(|i| SeqChunk {
                block_table: &tables[i],
                cached: a,
                tokens: &seqs[i][a..b],
                sample: true,
            })
            .collect();
        let mut input = StepInput::build(BS, None, &chunks);
        input.logit_rows = (0..input.tokens.len() as u32).collect();
        let logits = step(&input).expect("rank 0 returns logits");
        assert_eq!(logits.len(), input.tokens.len() * vocab);
        for (r, row) in logits.chunks(vocab).enumerate() {
            per_seq[r / (b - a)].push(row.to_vec());
        }
    }
    per_seq.into_iter().flatten().collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (j, &v)| if v > b.1 { (j, v) } else { b })
        .0
}

/// Compares `got` against `want` (the reference) position by position under the
/// module's tolerances; prints and returns (max |Δ|, mean |Δ|, top-1 agreement).
fn compare(what: &str, want: &[Vec<f32>], got: &[Vec<f32>]) -> (f32, f64, f64) {
    assert_eq!(want.len(), got.len(), "{what}: positions");
    assert!(want.len() >= 256, "{what}: only {} positions", want.len());
    let (mut worst, mut sum_abs, mut sum_ref, mut n, mut same) = (0f32, 0f64, 0f64, 0usize, 0usize);
    for (pos, (w, g)) in want.iter().zip(got).enumerate() {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what}: non-finite logit at position {pos}"
        );
        let range = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = LOGIT_TOL_ABS + LOGIT_TOL_REL * range;
        let diff = w
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= tol,
            "{what}: position {pos}: max |Δlogit| {diff} > {tol}"
        );
        worst = worst.max(diff);
        sum_abs += w
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>();
        sum_ref += w.iter().map(|a| a.abs() as f64).sum::<f64>();
        n += w.len();
        let (tw, tg) = (argmax(w), argmax(g));
        if tw == tg {
            same += 1;
        } else {
            assert!(
                w[tg] >= w[tw] - tol,
                "{what}: position {pos}: top-1 {tg} vs reference {tw} is no near-tie ({} vs {})",
                w[tg],
                w[tw]
            );
        }
    }
    let mean = sum_abs / n as f64;
    let mean_tol = MEAN_TOL_ABS + MEAN_TOL_REL * sum_ref / n as f64;
    let top1 = same as f64 / want.len() as f64;
    eprintln!(
        "{what}: {} positions: max |Δlogit| {worst:.4}, mean |Δlogit| {mean:.5} (≤ {mean_tol:.5}), top-1 agreement {same}/{} = {top1:.4}",
        want.len(),
        want.len()
    );
    assert!(
        mean <= mean_tol,
        "{what}: mean |Δlogit| {mean} > {mean_tol}"
    );
    assert!(
        top1 >= MIN_TOP1,
        "{what}: top-1 agreement {top1} < {MIN_TOP1}"
    );
    (worst, mean, top1)
}

#[test]
fn cuda_init_without_a_driver_is_one_clear_error() {
    if kernels::cuda::driver_available() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let req = InitRequest {
        model_path: "synthetic:tiny".into(),
        device: "cuda".into(),
        tp_world_size: 1,
        block_size: 16,
        ..Default::default()
    };
    let dev = CudaDevice::parse("cuda:0").unwrap().unwrap();
    let err = match worker::cuda::init::load(&req, dev, 64, 4) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("Init succeeded without a driver"),
    };
    assert!(err.contains("no CUDA driver"), "{err}");
}

/// The CPU f32 reference's teacher-forced logits (TP = 1).
fn cpu_reference(ckpt: &Checkpoint) -> Vec<Vec<f32>> {
    let shard = ShardSpec::default();
    let mut cpu = CpuModel::new(RankWeights::load(ckpt, shard, false).unwrap(), 256, BS);
    teacher_forced(
        |s| cpu.forward(s, &mut SoloCollective).unwrap(),
        ckpt.config.vocab_size,
    )
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn tiny_model_on_cuda_matches_the_cpu_reference_teacher_forced() {
    gpu();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny(dir.path());
    let vocab = ckpt.config.vocab_size;
    let shard = ShardSpec::default();
    let want = cpu_reference(&ckpt);
    let mut gpu = cuda_model(&ckpt, shard);
    let mut coll = DeviceCollective::solo();
    let got = teacher_forced(|s| gpu.forward(s, &mut coll).unwrap(), vocab);
    compare("CUDA vs CPU", &want, &got);
    assert!(gpu.planned_gemm_shapes() > 0);
}

/// The fast paths (one QKV GEMM + `rope_qkv_cache`; attention buffers reused across
/// steps) against the CPU reference under the same tolerances, and against the
/// default path on the same loaded model: one GEMM over the whole fused weight may
/// pick another cuBLASLt algorithm than three over its row ranges, so the two differ
/// by bf16 rounding at most, never by O(range). Reused buffers stop allocating once
/// the largest step of the schedule has been seen.
#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn fast_paths_match_the_cpu_reference_and_the_default_path() {
    gpu();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny(dir.path());
    let vocab = ckpt.config.vocab_size;
    let shard = ShardSpec::default();
    let want = cpu_reference(&ckpt);
    let mut gpu = cuda_model(&ckpt, shard);
    let mut coll = DeviceCollective::solo();
    let unfused = teacher_forced(|s| gpu.forward(s, &mut coll).unwrap(), vocab);
    gpu.set_fused_qkv(true);
    let fused = teacher_forced(|s| gpu.forward(s, &mut coll).unwrap(), vocab);
    compare("CUDA fused QKV vs CPU", &want, &fused);
    compare("CUDA fused QKV vs unfused", &unfused, &fused);
    gpu.set_fused_qkv(false);
    gpu.set_reuse_attn_buffers(true);
    let reused = teacher_forced(|s| gpu.forward(s, &mut coll).unwrap(), vocab);
    let warm = gpu.attn_buffer_allocations();
    assert!(warm > 0, "reuse on, but no buffer was ever allocated");
    // The same schedule again fits the buffers it grew: no allocation at all.
    let again = teacher_forced(|s| gpu.forward(s, &mut coll).unwrap(), vocab);
    assert_eq!(gpu.attn_buffer_allocations(), warm, "a warm step allocated");
    // Reuse changes where the metadata lives, not what is computed (a stale table or
    // work list would move logits by O(range), far outside the tolerances).
    compare("CUDA reused attention buffers vs fresh", &unfused, &reused);
    compare(
        "CUDA reused attention buffers (warm) vs fresh",
        &unfused,
        &again,
    );
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn host_staged_tp2_on_one_gpu_equals_tp1_teacher_forced() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = std::sync::Arc::new(tiny(dir.path()));
    let vocab = ckpt.config.vocab_size;
    let mut tp1 = cuda_model(&ckpt, ShardSpec::default());
    let mut solo = DeviceCollective::solo();
    let want = teacher_forced(|s| tp1.forward(s, &mut solo).unwrap(), vocab);
    drop(tp1);
    // Both ranks run the same steps (teacher forcing needs no token exchange); only
    // rank 0 returns logits, the other hands back empty rows that are dropped.
    let got = host_staged_tp2(&ckpt, move |m, coll| {
        teacher_forced(
            |s| {
                let l = m.forward(s, coll).unwrap();
                Some(l.unwrap_or_else(|| vec![0.0; s.logit_rows.len() * vocab]))
            },
            vocab,
        )
    });
    compare("host-staged TP=2 vs TP=1", &want, &got);
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn nccl_with_world_size_one_runs_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny(dir.path());
    let vocab = ckpt.config.vocab_size;
    let mut m = cuda_model(&ckpt, ShardSpec::default());
    let id = worker::cuda::nccl_unique_id().unwrap();
    let mut nccl = DeviceCollective::nccl(m.kernels().stream().clone(), 0, 1, &id).unwrap();
    let a = teacher_forced(|s| m.forward(s, &mut nccl).unwrap(), vocab);
    let mut m2 = cuda_model(&ckpt, ShardSpec::default());
    let mut solo = DeviceCollective::solo();
    let b = teacher_forced(|s| m2.forward(s, &mut solo).unwrap(), vocab);
    assert!(a == b, "NCCL world size 1 must be the identity");
}

/// Greedy steps (`forward_argmax`: the argmax found on the GPU, per shard, 2 floats
/// per row moved) against the argmax of the logits `forward` returns, at TP 1 and
/// host-staged TP 2, teacher-forced: the argmax may differ from the TP 1 logits'
/// only at their near-ties (as in [`compare`]; TP 1 runs both forms of each step on
/// one model, so any difference there is a kernel rounding differently between two
/// runs of a step, and the count is printed).
#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn greedy_steps_take_the_argmax_of_the_logits_at_tp_1_and_2() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = std::sync::Arc::new(tiny(dir.path()));
    let vocab = ckpt.config.vocab_size;
    let mut m = cuda_model(&ckpt, ShardSpec::default());
    let mut solo = DeviceCollective::solo();
    let mut tp1_argmax = Vec::new();
    let want = teacher_forced(
        |s| {
            let l = m.forward(s, &mut solo).unwrap();
            tp1_argmax.extend(m.forward_argmax(s, &mut solo).unwrap().unwrap());
            l
        },
        vocab,
    );
    drop(m);
    let near_tie = |what: &str, ids: &[u32]| {
        assert_eq!(ids.len(), want.len(), "{what}: one id per position");
        let mut same = 0;
        for (pos, (w, &id)) in want.iter().zip(ids).enumerate() {
            let best = argmax(w);
            let tol = LOGIT_TOL_ABS + LOGIT_TOL_REL * w.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                w[id as usize] >= w[best] - tol,
                "{what}: position {pos}: argmax {id} vs {best} is no near-tie"
            );
            same += usize::from(id as usize == best);
        }
        eprintln!(
            "{what}: argmax equals the logits' at {same} of {} positions",
            ids.len()
        );
        same
    };
    let same = near_tie("TP 1", &tp1_argmax);
    assert!(same as f64 >= MIN_TOP1 * want.len() as f64);
    let ids = host_staged_tp2(&ckpt, move |m, coll| {
        let mut ids = Vec::new();
        teacher_forced(
            |s| {
                ids.extend(m.forward_argmax(s, coll).unwrap().unwrap_or_default());
                Some(vec![0.0; s.logit_rows.len() * vocab])
            },
            vocab,
        );
        ids
    });
    let same = near_tie("host-staged TP 2", &ids);
    assert!(same as f64 >= MIN_TOP1 * want.len() as f64);
}

/// One short forward (a 17-token prefill and one decode step) for
/// `compute-sanitizer --tool memcheck` (device-run.sh runs this test alone under it).
#[test]
#[ignore = "needs a GPU: STRAL_GPU=1"]
fn one_short_forward() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny(dir.path());
    let vocab = ckpt.config.vocab_size;
    let mut m = cuda_model(&ckpt, ShardSpec::default());
    let mut solo = DeviceCollective::solo();
    let toks = teacher(18, 5);
    let table: Vec<u32> = (0..2).collect();
    for (a, b) in [(0, 17), (17, 18)] {
        let input = StepInput::build(
            BS,
            None,
            &[SeqChunk {
                block_table: &table,
                cached: a,
                tokens: &toks[a..b],
                sample: true,
            }],
        );
        let l = m.forward(&input, &mut solo).unwrap().unwrap();
        assert_eq!(l.len(), vocab);
        assert!(l.iter().all(|v| v.is_finite()));
    }
}

#[test]
#[ignore = "needs a GPU: STRAL_GPU=1 STRAL_GPU_BIG=1 (44.5 GB of weights)"]
fn synthetic_codestral_shape_fills_on_the_device() {
    gpu();
    assert_eq!(
        std::env::var("STRAL_GPU_BIG").as_deref(),
        Ok("1"),
        "needs STRAL_GPU_BIG=1 (44.5 GB of weights)"
    );
    let cfg = worker::cuda::synthetic_config("synthetic:codestral-22b")
        .unwrap()
        .unwrap();
    let k = kernels::cuda::CudaKernels::new(0).unwrap();
    let m = CudaModel::new(
        k,
        WeightSource::Synthetic(cfg),
        ShardSpec::default(),
        CudaModelConfig::default(),
    )
    .unwrap();
    eprintln!(
        "KV capacity {} tokens; profile {:?}",
        m.kv_tokens(),
        m.memory_profile()
    );
    assert!(m.kv_tokens() > 0);
}
