//! GGUF checkpoints: the tiny synthetic model written as GGUF (F32, F16, Q8_0, with
//! llama.cpp's q/k row permutation) loads to the same f32 weights as its
//! safetensors twin at TP 1 and 2; metadata gives the model facts; the tokenizer
//! check refuses foreign special tokens; malformed files give one-line errors and
//! random corruption never panics.
//!
//! `fixtures/gguf/types.gguf` (written by `scripts/gguf/make_fixture.py` with gguf-py
//! 0.17.1) holds one tensor per supported type; its JSON twin holds gguf-py's own
//! dequantized values, the independent reference for stral's decoders.
//!
//! The model files are written by a small GGUF v3 writer below, which follows gguf-py's
//! layout (header, key/values, tensor infos, data aligned to 32).

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::checkpoint::{half_to_interleaved, Checkpoint, Param};
use worker::gguf::GgufFile;
use worker::safetensors_io::StoredDtype;
use worker::synth::{param_values, synthesize, SynthOptions};
use worker::{CheckpointFormat, ModelConfig};

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;

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
        let t = if shape.len() == 1 { F32 } else { ty };
        w.tensor(&p.gguf_name(), &shape, t, &v);
    }
    w
}

fn write(dir: &std::path::Path, w: &Writer) -> std::path::PathBuf {
    let path = dir.join("model.gguf");
    std::fs::write(&path, w.bytes()).unwrap();
    path
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
    let dir = tempfile::tempdir().unwrap();
    let st = tempfile::tempdir().unwrap();
    write(dir.path(), &model_writer(&cfg, F32));
    let g = Checkpoint::open(dir.path()).unwrap();
    let s = safetensors_twin(st.path(), &cfg);
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
    let dir = tempfile::tempdir().unwrap();
    let st = tempfile::tempdir().unwrap();
    write(dir.path(), &model_writer(&cfg, F32));
    let g = Checkpoint::open(dir.path()).unwrap();
    let s = safetensors_twin(st.path(), &cfg);
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
