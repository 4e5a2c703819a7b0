//! GGUF checkpoints: the tiny synthetic model written as GGUF (F32, F16, Q8_0, Q4_0,
//! with llama.cpp's q/k row permutation) loads to the same f32 weights as its
//! safetensors twin at TP 1 and 2; under `--dtype auto` a rank serves the file's Q8_0
//! blocks bit for bit (and `--dtype q8_0` on the safetensors twin quantizes to the
//! same blocks); its logits stay within each format's rounding of the f32 model's;
//! metadata gives the model facts; the tokenizer check refuses foreign special
//! tokens; malformed files give one-line errors and random corruption never panics.
//!
//! `fixtures/gguf/types.gguf` (written by `scripts/gguf/make_fixture.py` with gguf-py
//! 0.17.1) holds one tensor per supported type; its JSON twin holds gguf-py's own
//! dequantized values, the independent reference for stral's decoders.
//!
//! The model files are written by a small GGUF v3 writer below, which follows gguf-py's
//! layout (header, key/values, tensor infos, data aligned to 32).

mod logit_agreement;

use half::f16;
use kernels::quant::{QMatrix, WeightDtype};
use logit_agreement::{compare, teacher_forced, teacher_forced_decode, tokens, Bounds};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::checkpoint::{half_to_interleaved, Checkpoint, Param};
use worker::gguf::GgufFile;
use worker::model::{RankWeights, ShardSpec, WeightFormat};
use worker::safetensors_io::StoredDtype;
use worker::synth::{param_values, synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;
const Q4_0: u32 = 2;

/// A minimal GGUF v3 writer (test-only).
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn f32(&mut self, k: &str, v: f32) -> &mut Self {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k, 8);
        put_str(&mut self.kv, v);
        self
    }
    fn tokens(&mut self, n: usize) -> &mut Self {
        self.key("tokenizer.ggml.tokens", 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((n as u64).to_le_bytes());
        for i in 0..n {
            put_str(&mut self.kv, &format!("<t{i}>"));
        }
        self
    }
    /// A row-major `[rows, cols]` (or 1-D) tensor encoded as `ty`.
    fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, values: &[f32]) {
        let mut data = Vec::new();
        match ty {
            F32 => values.iter().for_each(|v| data.extend(v.to_le_bytes())),
            F16 => values
                .iter()
                .for_each(|v| data.extend(f16::from_f32(*v).to_le_bytes())),
            Q8_0 => {
                for b in values.chunks(32) {
                    let (d, q) = q8_0(b);
                    data.extend(f16::from_f32(d).to_le_bytes());
                    data.extend(q.iter().map(|&x| x as u8));
                }
            }
            Q4_0 => {
                for b in values.chunks(32) {
                    let (d, q) = q4_0(b);
                    data.extend(f16::from_f32(d).to_le_bytes());
                    data.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                }
            }
            _ => unreachable!("test writer type {ty}"),
        }
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, data));
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).div_ceil(32) * 32;
        }
        for (_, _, _, data) in &self.tensors {
            while out.len() % 32 != 0 {
                out.push(0);
            }
            out.extend(data);
        }
        out
    }
}

/// gguf-py's Q8_0: `d = max|x| / 127`, `q = round(x / d)`.
fn q8_0(b: &[f32]) -> (f32, Vec<i8>) {
    let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    (d, b.iter().map(|x| (x * id).round() as i8).collect())
}

/// gguf-py's Q4_0: `d = x_m / -8` for the value `x_m` of largest magnitude,
/// `q = min(15, trunc(x / d + 8.5))`.
fn q4_0(b: &[f32]) -> (f32, Vec<u8>) {
    let m = b
        .iter()
        .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
    let d = m / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    (
        d,
        b.iter().map(|x| ((x * id + 8.5) as u8).min(15)).collect(),
    )
}

fn config() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        vocab_size: 1024,
        sliding_window: Some(4096),
        ..ModelConfig::tiny()
    }
}

/// The tiny model as llama.cpp would convert it: GGUF names, interleaved q/k rows.
fn model_writer(cfg: &ModelConfig, ty: u32) -> Writer {
    model_writer_typed(cfg, |_| ty)
}

/// [`model_writer`] with each matrix in the type `ty_of` gives it (norms stay F32).
fn model_writer_typed(cfg: &ModelConfig, ty_of: impl Fn(Param) -> u32) -> Writer {
    let mut w = Writer::default();
    w.str("general.architecture", "llama")
        .u32("llama.block_count", cfg.n_layers as u32)
        .u32("llama.context_length", cfg.max_position_embeddings as u32)
        .u32("llama.embedding_length", cfg.dim as u32)
        .u32("llama.feed_forward_length", cfg.hidden_dim as u32)
        .u32("llama.attention.head_count", cfg.n_heads as u32)
        .u32("llama.attention.head_count_kv", cfg.n_kv_heads as u32)
        .f32("llama.rope.freq_base", cfg.rope_theta)
        .f32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
        .u32("llama.attention.sliding_window", 4096)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .tokens(cfg.vocab_size);
    for p in Param::all(cfg) {
        let mut v = param_values(cfg, p, 7);
        if p.is_rotary() {
            v = half_to_interleaved(&v, cfg.head_dim, cfg.dim);
        }
        let shape = p.shape(cfg);
        let t = if shape.len() == 1 { F32 } else { ty_of(p) };
        w.tensor(&p.gguf_name(), &shape, t, &v);
    }
    w
}

fn write(dir: &std::path::Path, w: &Writer) -> std::path::PathBuf {
    let path = dir.join("model.gguf");
    std::fs::write(&path, w.bytes()).unwrap();
    path
}

/// A GGUF checkpoint of `cfg` stored as `ty` and its f32 safetensors twin, opened,
/// with the folders that hold them.
fn gguf_and_twin(cfg: &ModelConfig, ty: u32) -> (Checkpoint, Checkpoint, [tempfile::TempDir; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    write(dirs[0].path(), &model_writer(cfg, ty));
    let g = Checkpoint::open(dirs[0].path()).unwrap();
    let s = safetensors_twin(dirs[1].path(), cfg);
    (g, s, dirs)
}

fn safetensors_twin(dir: &std::path::Path, cfg: &ModelConfig) -> Checkpoint {
    synthesize(
        &SynthOptions {
            config: cfg.clone(),
            format: CheckpointFormat::Hf,
            dtype: StoredDtype::F32,
            seed: 7,
            progress: false,
        },
        dir,
    )
    .unwrap();
    Checkpoint::open(dir).unwrap()
}

/// Every `Param`'s rank slices at TP 1 and 2, as `(what, gguf, safetensors)`.
fn slices(g: &Checkpoint, s: &Checkpoint) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let mut out = Vec::new();
    for p in Param::all(&g.config) {
        let shape = p.shape(&g.config);
        for tp in [1, 2] {
            for rank in 0..tp {
                let n = shape[0] / tp;
                let rows = rank * n..(rank + 1) * n;
                let what = format!("{p:?} rows {rows:?}");
                out.push((
                    what,
                    g.load_rows(p, rows.clone()).unwrap(),
                    s.load_rows(p, rows).unwrap(),
                ));
                if shape.len() == 2 {
                    let n = shape[1] / tp;
                    let cols = rank * n..(rank + 1) * n;
                    let what = format!("{p:?} cols {cols:?}");
                    out.push((
                        what,
                        g.load_cols(p, cols.clone()).unwrap(),
                        s.load_cols(p, cols).unwrap(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn f32_gguf_weights_equal_the_safetensors_checkpoint_at_tp_1_and_2() {
    let cfg = config();
    let (g, s, _dirs) = gguf_and_twin(&cfg, F32);
    for (what, a, b) in slices(&g, &s) {
        assert_eq!(a, b, "{what}");
    }
}

#[test]
fn f16_and_q8_0_gguf_weights_are_within_their_rounding_of_the_safetensors_checkpoint() {
    let cfg = config();
    let st = tempfile::tempdir().unwrap();
    let s = safetensors_twin(st.path(), &cfg);
    for ty in [F16, Q8_0] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &model_writer(&cfg, ty));
        let g = Checkpoint::open(dir.path()).unwrap();
        for (what, a, b) in slices(&g, &s) {
            let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            // f16: half an ulp (2^-11 relative); Q8_0: half a step of max|block|/127,
            // bounded here by the slice's max (plus the f16 rounding of the scale).
            let tol = if ty == F16 {
                2f32.powi(-11)
            } else {
                0.51 / 127.0 + 1e-3
            } * amax;
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= tol, "type {ty} {what}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn model_facts_come_from_llama_metadata_and_the_token_list() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &model_writer(&cfg, F32));
    assert_eq!(Checkpoint::open(&path).unwrap().config, cfg);
}

#[test]
fn a_tp_degree_whose_columns_cut_a_q8_0_block_is_refused() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &model_writer(&cfg, Q8_0));
    let g = Checkpoint::open(dir.path()).unwrap();
    let e = g.load_cols(Param::W2(0), 0..16).unwrap_err().to_string();
    assert!(e.contains("cut a 32-element Q8_0 block"), "{e}");
    assert!(g.load_cols(Param::W2(0), 0..32).is_ok());
}

#[test]
fn special_tokens_other_than_codestral_v3s_are_refused() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let mut w = model_writer(&cfg, F32);
    w.u32("tokenizer.ggml.eos_token_id", 32000);
    let e = Checkpoint::open(&write(dir.path(), &w))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tokenizer.ggml.eos_token_id is 32000"), "{e}");
}

/// A small valid file with one tensor of each written type.
fn small() -> Vec<u8> {
    let mut w = Writer::default();
    w.str("general.architecture", "llama");
    let v: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    w.tensor("a", &[2, 32], F32, &v);
    w.tensor("b", &[2, 32], F16, &v);
    w.tensor("c", &[2, 32], Q8_0, &v);
    w.bytes()
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path).map_err(|e| e.to_string())
}

fn refused(bytes: &[u8], needle: &str) {
    let e = open_bytes(bytes).err().expect("malformed file accepted");
    assert!(e.contains(needle), "expected '{needle}' in: {e}");
    assert!(!e.contains('\n'), "multi-line error: {e}");
}

/// Offset of the first tensor info (after the single metadata key/value).
fn info_start(bytes: &[u8]) -> usize {
    let klen = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let vstart = 32 + klen + 4;
    let vlen = u64::from_le_bytes(bytes[vstart..vstart + 8].try_into().unwrap()) as usize;
    vstart + 8 + vlen
}

#[test]
fn small_file_decodes_every_type() {
    let g = open_bytes(&small()).unwrap();
    let v: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
    let t = g.tensor_info("a").unwrap();
    assert_eq!(g.rows("a", t, 0..2).unwrap(), v);
    let t = g.tensor_info("b").unwrap();
    let f: Vec<f32> = v.iter().map(|x| f16::from_f32(*x).to_f32()).collect();
    assert_eq!(g.rows("b", t, 0..2).unwrap(), f);
    let t = g.tensor_info("c").unwrap();
    let q: Vec<f32> = v
        .chunks(32)
        .flat_map(|b| {
            let (d, q) = q8_0(b);
            let d = f16::from_f32(d).to_f32();
            q.into_iter().map(move |x| d * f32::from(x))
        })
        .collect();
    assert_eq!(g.rows("c", t, 0..2).unwrap(), q);
}

#[test]
fn malformed_files_give_one_line_errors() {
    let good = small();
    refused(&good[..10], "truncated");
    refused(b"GGML\x03\0\0\0", "bad magic");
    let mut b = good.clone();
    b[4] = 9;
    refused(&b, "unsupported GGUF version 9");
    refused(&good[..good.len() - 1], "runs past the end");
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&b, "tensor count");
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    refused(&b, "metadata key/value count");
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    refused(&b, "truncated: metadata key needs");
    // First tensor info: name "a" (8 + 1 bytes), n_dims, dims[2], type, offset.
    let i = info_start(&good);
    let (dims, ty, off) = (i + 13, i + 29, i + 33);
    let mut b = good.clone();
    b[dims..dims + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    refused(&b, "are absurd");
    let mut b = good.clone();
    b[ty..ty + 4].copy_from_slice(&23u32.to_le_bytes());
    refused(&b, "tensor a has GGML type 23");
    let mut b = good.clone();
    b[off..off + 8].copy_from_slice(&4u64.to_le_bytes());
    refused(&b, "not a multiple of the alignment 32");
    let mut b = good.clone();
    b[i + 9..i + 13].copy_from_slice(&u32::MAX.to_le_bytes());
    refused(&b, "dimensions (1 to 4 allowed)");
}

#[test]
fn random_corruption_never_panics() {
    let good = small();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    for _ in 0..3000 {
        let mut b = good.clone();
        if rng.random_bool(0.2) {
            b.truncate(rng.random_range(0..b.len()));
        }
        for _ in 0..rng.random_range(1..4) {
            if b.is_empty() {
                break;
            }
            let at = rng.random_range(0..b.len().min(200));
            b[at] = rng.random();
        }
        std::fs::write(&path, &b).unwrap();
        let r = std::panic::catch_unwind(|| {
            if let Ok(g) = GgufFile::open(&path) {
                for name in ["a", "b", "c"] {
                    if let Some(t) = g.tensor_info(name) {
                        let _ = g.rows(name, t, 0..t.shape[0]);
                    }
                }
            }
        });
        assert!(r.is_ok(), "panic on mutated file {b:?}");
    }
}

#[test]
fn every_type_decodes_to_gguf_py_dequantize() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let g = GgufFile::open(&dir.join("types.gguf")).unwrap();
    let text = std::fs::read_to_string(dir.join("types.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, want) in doc.as_object().unwrap() {
        let ty = want["type"].as_str().unwrap();
        let values: Vec<f32> = want["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let t = g.tensor_info(name).unwrap();
        assert_eq!(
            format!("{:?}", t.ty).to_uppercase().replace("4K", "4_K"),
            ty,
            "{name}"
        );
        let got = g.rows(name, t, 0..t.shape[0]).unwrap();
        assert_eq!(got.len(), values.len(), "{name}");
        let tol = if ty.starts_with('Q') { 1e-6 } else { 0.0 };
        for (i, (a, b)) in got.iter().zip(&values).enumerate() {
            assert!((a - b).abs() <= tol, "{name}[{i}]: stral {a}, gguf-py {b}");
        }
        // A rank's half of the columns is the same values.
        let half = t.shape[1] / 2;
        let right = g.cols(name, t, half..t.shape[1]).unwrap();
        let expect: Vec<f32> = got
            .chunks(t.shape[1])
            .flat_map(|r| r[half..].to_vec())
            .collect();
        assert_eq!(right, expect, "{name} columns");
    }
}

#[test]
fn the_cpu_model_on_the_f32_gguf_gives_the_safetensors_logits() {
    let cfg = config();
    let (g, s, _dirs) = gguf_and_twin(&cfg, F32);
    assert_eq!(g.format, worker::checkpoint::Layout::Gguf);
    let prompt: Vec<u32> = (0..19).map(|i| (i * 7919 + 13) % 1024).collect();
    for tp in [1, 2] {
        let (tg, lg) = worker::local::LocalTpGroup::load(&g, tp, 16, 16)
            .unwrap()
            .generate_greedy(&prompt, 4, 64)
            .unwrap();
        let (ts, ls) = worker::local::LocalTpGroup::load(&s, tp, 16, 16)
            .unwrap()
            .generate_greedy(&prompt, 4, 64)
            .unwrap();
        assert_eq!(tg, ts, "tp {tp}");
        for (a, b) in lg.iter().zip(&ls) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5, "tp {tp}: {x} vs {y}");
            }
        }
    }
}

/// The Q8_0 blocks llama.cpp writes for `values` (whole rows of whole blocks).
fn q8_0_blocks(values: &[f32]) -> (Vec<i8>, Vec<u16>) {
    let (mut q, mut d) = (Vec::new(), Vec::new());
    for b in values.chunks_exact(32) {
        let (s, v) = q8_0(b);
        d.push(f16::from_f32(s).to_bits());
        q.extend(v);
    }
    (q, d)
}

/// Rows `rows` of `p`'s synthetic values (internal order), or columns `cols` of every row.
fn rows_of(cfg: &ModelConfig, p: Param, rows: std::ops::Range<usize>) -> Vec<f32> {
    let c = p.shape(cfg)[1];
    param_values(cfg, p, 7)[rows.start * c..rows.end * c].to_vec()
}

fn cols_of(cfg: &ModelConfig, p: Param, cols: std::ops::Range<usize>) -> Vec<f32> {
    let c = p.shape(cfg)[1];
    param_values(cfg, p, 7)
        .chunks_exact(c)
        .flat_map(|r| r[cols.clone()].to_vec())
        .collect()
}

/// Every matrix a rank serves, with the synthetic values it stands for.
fn served(cfg: &ModelConfig, w: &RankWeights) -> Vec<(String, QMatrix, Vec<f32>)> {
    let (tp, r) = (w.shard.tp, w.shard.rank);
    let part = |n: usize| r * n / tp..(r + 1) * n / tp;
    let (q, kv, ffn) = (cfg.q_dim(), cfg.kv_dim(), cfg.hidden_dim);
    let mut out = vec![
        (
            "embed".to_string(),
            w.embed.clone(),
            rows_of(cfg, Param::Embed, 0..cfg.vocab_size),
        ),
        (
            "lm_head".into(),
            w.lm_head.clone(),
            rows_of(cfg, Param::Output, part(cfg.vocab_size)),
        ),
    ];
    for (i, l) in w.layers.iter().enumerate() {
        let mut qkv = rows_of(cfg, Param::Wq(i), part(q));
        qkv.extend(rows_of(cfg, Param::Wk(i), part(kv)));
        qkv.extend(rows_of(cfg, Param::Wv(i), part(kv)));
        let mut w13 = rows_of(cfg, Param::W1(i), part(ffn));
        w13.extend(rows_of(cfg, Param::W3(i), part(ffn)));
        out.extend([
            (format!("layer {i} wqkv"), l.wqkv.clone(), qkv),
            (
                format!("layer {i} wo"),
                l.wo.clone(),
                cols_of(cfg, Param::Wo(i), part(q)),
            ),
            (format!("layer {i} w13"), l.w13.clone(), w13),
            (
                format!("layer {i} w2"),
                l.w2.clone(),
                cols_of(cfg, Param::W2(i), part(ffn)),
            ),
        ]);
    }
    out
}

#[test]
fn auto_serves_a_q8_0_gguf_as_its_stored_blocks_and_q8_0_at_load_quantizes_to_the_same() {
    let cfg = config();
    let (g, s, _dirs) = gguf_and_twin(&cfg, Q8_0);
    for (ck, format, what) in [
        (&g, WeightFormat::AsStored, "Q8_0 GGUF, auto"),
        (
            &s,
            WeightFormat::All(WeightDtype::Q8_0),
            "f32 safetensors, q8_0",
        ),
    ] {
        for tp in [1, 2] {
            for rank in 0..tp {
                let w = RankWeights::load_as(ck, ShardSpec { tp, rank }, format, false).unwrap();
                for (name, m, values) in served(&cfg, &w) {
                    let (q, d) = m.q8_0_blocks().unwrap_or_else(|| {
                        panic!("{what} tp {tp} rank {rank} {name}: {:?}", m.dtype())
                    });
                    let (want_q, want_d) = q8_0_blocks(&values);
                    assert!(
                        q == want_q.as_slice() && d == want_d.as_slice(),
                        "{what} tp {tp} rank {rank} {name}: blocks differ from the file's"
                    );
                }
            }
        }
    }
}

#[test]
fn auto_keeps_each_gguf_type_where_the_cpu_has_it() {
    let cfg = config();
    let shard = ShardSpec { tp: 2, rank: 1 };
    for (ty, want) in [
        (F32, WeightDtype::F32),
        (F16, WeightDtype::Bf16),
        (Q8_0, WeightDtype::Q8_0),
        (Q4_0, WeightDtype::Int8),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &model_writer(&cfg, ty));
        let g = Checkpoint::open(dir.path()).unwrap();
        let w = RankWeights::load_as(&g, shard, WeightFormat::AsStored, false).unwrap();
        for (name, m, _) in served(&cfg, &w) {
            assert_eq!(m.dtype(), want, "type {ty} {name}");
        }
        assert_eq!(g.four_bit_params().is_empty(), ty != Q4_0, "type {ty}");
    }
    // A fused matrix takes the most precise of its parts' formats: an F16 wk makes
    // wq|wk|wv bf16 while the rest stays Q8_0.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &model_writer_typed(&cfg, |p| if matches!(p, Param::Wk(_)) { F16 } else { Q8_0 }),
    );
    let g = Checkpoint::open(dir.path()).unwrap();
    let w = RankWeights::load_as(&g, shard, WeightFormat::AsStored, false).unwrap();
    for l in &w.layers {
        assert_eq!(l.wqkv.dtype(), WeightDtype::Bf16);
        assert_eq!(l.wo.dtype(), WeightDtype::Q8_0);
        assert_eq!(l.w13.dtype(), WeightDtype::Q8_0);
    }
    let planned = WeightFormat::AsStored.rank_bytes(&g, 2).unwrap();
    let loaded = w.bytes() as u64;
    assert!(
        planned.abs_diff(loaded) * 100 < loaded,
        "memory check {planned} vs loaded {loaded}"
    );
}

#[test]
fn gguf_f16_q8_0_and_q4_0_logits_stay_within_their_rounding_of_f32_at_tp_1_and_2() {
    let cfg = config();
    let st = tempfile::tempdir().unwrap();
    let s = safetensors_twin(st.path(), &cfg);
    let tokens = tokens(cfg.vocab_size);
    // Prefill (dequantize-then-GEMM) and decode (GEMVs, int8 activations for int8/Q8_0).
    let run = |ck: &Checkpoint, decode: bool, tp: usize, f: WeightFormat| {
        if decode {
            teacher_forced_decode(ck, tp, f, &tokens)
        } else {
            teacher_forced(ck, tp, f, &tokens)
        }
    };
    let files: Vec<(u32, tempfile::TempDir)> = [F16, Q8_0, Q4_0]
        .into_iter()
        .map(|ty| {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), &model_writer(&cfg, ty));
            (ty, dir)
        })
        .collect();
    for decode in [false, true] {
        let path = if decode { "decode" } else { "prefill" };
        let want = run(&s, decode, 1, WeightFormat::All(WeightDtype::F32));
        for tp in [1, 2] {
            let q8_at_load = run(&s, decode, tp, WeightFormat::All(WeightDtype::Q8_0));
            for (ty, dir) in &files {
                let g = Checkpoint::open(dir.path()).unwrap();
                let got = run(&g, decode, tp, WeightFormat::AsStored);
                let (name, bounds) = match *ty {
                    F16 => ("F16 GGUF (auto: bf16)", BOUNDS_F16[decode as usize]),
                    Q8_0 => ("Q8_0 GGUF (auto: Q8_0)", BOUNDS_Q8_0[decode as usize]),
                    _ => ("Q4_0 GGUF (auto: int8 rows)", BOUNDS_Q4_0[decode as usize]),
                };
                compare(&got, &want, cfg.vocab_size)
                    .check(&format!("{name} {path} tp {tp}"), &bounds);
                if *ty == Q8_0 {
                    // The same blocks through the same kernels: the same logits.
                    assert_eq!(
                        got, q8_at_load,
                        "{path} tp {tp}: q8_0 at load vs the Q8_0 file"
                    );
                }
            }
        }
    }
}

// [prefill, decode] bounds on the logits against the f32 safetensors model, as
// fractions of its logit range (9.24 here), about 3× what this model measures at
// TP 1 and 2 over 300 positions (the top-1 bound allows about 3× the measured
// disagreement; TP 1 and 2 measure the same to the digits shown).
//
// F16 file, served as bf16: the bf16 rounding (2⁻⁹ relative) dominates the file's f16
// rounding (2⁻¹¹); measured max 2.4e-3, mean 4.1e-4, top-1 0.983 in both paths (the
// bf16 GEMV takes f32 activations).
const BOUNDS_F16: [Bounds; 2] = [
    Bounds {
        rel_max: 8e-3,
        rel_mean: 1.2e-3,
        min_top1: 0.95,
    },
    Bounds {
        rel_max: 8e-3,
        rel_mean: 1.2e-3,
        min_top1: 0.95,
    },
];
// Q8_0 file, served as its blocks: ≤ max|block|/254 per weight (plus 2⁻¹¹ relative
// for the f16 scale); measured prefill max 6.1e-3, mean 8.9e-4, top-1 0.973; decode
// adds the activation's int8 rounding per block: max 9.2e-3, mean 1.4e-3, top-1 0.960.
const BOUNDS_Q8_0: [Bounds; 2] = [
    Bounds {
        rel_max: 1.8e-2,
        rel_mean: 2.7e-3,
        min_top1: 0.90,
    },
    Bounds {
        rel_max: 2.8e-2,
        rel_mean: 4.3e-3,
        min_top1: 0.88,
    },
];
// Q4_0 file, requantized to int8 rows: the file's 4-bit step (max|block|/8, so ≤ 1/16
// of the block's max per weight) is ~16× Q8_0's, and the int8 requantization
// (amax/254 per row) adds little; measured max 9.2e-2, mean 1.5e-2 (15× Q8_0's), top-1
// only 0.73 (random weights have no margin between their top logits). Lossy, as the
// load log says.
const BOUNDS_Q4_0: [Bounds; 2] = [
    Bounds {
        rel_max: 0.28,
        rel_mean: 4.6e-2,
        min_top1: 0.5,
    },
    Bounds {
        rel_max: 0.28,
        rel_mean: 4.6e-2,
        min_top1: 0.5,
    },
];
