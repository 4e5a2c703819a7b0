//! GGUF v2/v3 checkpoints (llama.cpp's container): a bounds-checked parser of the
//! header, metadata key/values and tensor infos over a memory-mapped file, the
//! `llama`-architecture tensor names, model facts from metadata, and decoders from
//! the stored types (F32, F16, BF16, Q8_0, Q4_0, Q4_K) to f32.
//!
//! Layout facts: a GGUF tensor's `dims[0]` is its fastest-varying axis, so a
//! `[out, in]` projection is stored with dims `[in, out]`; quantized rows are whole
//! blocks along `dims[0]`. llama.cpp's `convert_hf_to_gguf.py` permutes HF `q`/`k`
//! rows back to interleaved-pair RoPE order, so GGUF rotary rows are in the same
//! order as a Mistral checkpoint's (the caller converts them to rotate-half).
//! Q4_0 and Q4_K are lossy and are dequantized at load; Q8_0 is lossy too (an f16
//! scale per 32 int8 values) but exact with respect to what the file stores, and its
//! blocks can also be read as stored ([`GgufFile::q8_0_rows`], [`GgufFile::q8_0_cols`])
//! for the CPU's Q8_0 GEMV.
//!
//! Invariants: every count, length, dimension and offset read from the file is
//! checked against the file's size before anything is allocated or indexed, so a
//! malformed file gives one `WorkerError::Checkpoint` line and never a panic or an
//! allocation larger than the file. A rank decodes only the rows/columns it asks
//! for (a column range of a block-quantized tensor must lie on block boundaries).
//!
//! Cost: O(header bytes) at open; O(requested elements) per slice.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::config::ModelConfig;
use crate::WorkerError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a GGML tensor may have.
const MAX_DIMS: u32 = 4;

/// A tensor's stored element type (the subset stral decodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    /// Blocks of 32: an f16 scale and 32 int8 values.
    Q8_0,
    /// Blocks of 32: an f16 scale and 32 4-bit values offset by 8.
    Q4_0,
    /// Super-blocks of 256: f16 scale and min, 12 bytes of 6-bit sub-scales/mins, 128 bytes of nibbles.
    Q4K,
}

impl GgmlType {
    /// The type for a GGML type id, or `None` for types stral does not decode.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4K => (256, 144),
        }
    }

    /// Decodes whole blocks in `bytes` (a multiple of the block size) into `out`.
    fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        let (_, bs) = self.block();
        let h = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        match self {
            Self::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Self::F16 => out.extend(bytes.chunks_exact(2).map(|b| h(b, 0))),
            Self::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Self::Q8_0 => {
                for b in bytes.chunks_exact(bs) {
                    let d = h(b, 0);
                    out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
                }
            }
            Self::Q4_0 => {
                for b in bytes.chunks_exact(bs) {
                    let d = h(b, 0);
                    let qs = &b[2..18];
                    out.extend(qs.iter().map(|&q| d * (f32::from(q & 0xF) - 8.0)));
                    out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
                }
            }
            Self::Q4K => {
                for b in bytes.chunks_exact(bs) {
                    let (d, dmin) = (h(b, 0), h(b, 2));
                    let scales = &b[4..16];
                    let qs = &b[16..144];
                    for (j, q) in qs.chunks_exact(32).enumerate() {
                        let (sc1, m1) = q4k_scale_min(2 * j, scales);
                        let (sc2, m2) = q4k_scale_min(2 * j + 1, scales);
                        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
                        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
                        out.extend(q.iter().map(|&v| d1 * f32::from(v & 0xF) - m1));
                        out.extend(q.iter().map(|&v| d2 * f32::from(v >> 4) - m2));
                    }
                }
            }
        }
    }
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and min of Q4_K sub-block `j`.
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A metadata value (arrays keep only what stral reads: their length and, for
/// integer arrays, nothing else).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// An array: its element type id and length (elements are skipped, not stored).
    Array {
        elem_type: u32,
        len: u64,
    },
}

/// One tensor's info from the header.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub ty: GgmlType,
    /// Shape in row-major order (`[out, in]` for projections), i.e. GGUF dims reversed.
    pub shape: Vec<usize>,
    /// Byte range within the file.
    bytes: Range<usize>,
}

/// An opened, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    tensors: HashMap<String, GgufTensor>,
    mmap: Mmap,
}

/// A bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, file has {left} left",
                self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    /// A count of items each at least `min_item` bytes, checked against what is left.
    fn count(&mut self, min_item: u64, what: &str) -> Result<u64, String> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item) > left {
            return Err(format!(
                "{what} {n} is impossible: {left} bytes remain in the file"
            ));
        }
        Ok(n)
    }
    fn value(&mut self, ty: u32, key: &str) -> Result<MetaValue, String> {
        let size = |t: u32| match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        Ok(match ty {
            0 => MetaValue::Uint(u64::from(self.take(1, key)?[0])),
            1 => MetaValue::Int(i64::from(self.take(1, key)?[0] as i8)),
            2 => {
                let b = self.take(2, key)?;
                MetaValue::Uint(u64::from(u16::from_le_bytes([b[0], b[1]])))
            }
            3 => {
                let b = self.take(2, key)?;
                MetaValue::Int(i64::from(i16::from_le_bytes([b[0], b[1]])))
            }
            4 => MetaValue::Uint(u64::from(self.u32(key)?)),
            5 => MetaValue::Int(i64::from(self.u32(key)? as i32)),
            6 => MetaValue::Float(f64::from(f32::from_bits(self.u32(key)?))),
            7 => MetaValue::Bool(self.take(1, key)?[0] != 0),
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                let elem_type = self.u32(key)?;
                let min = match elem_type {
                    8 => 8,
                    9 => return Err(format!("{key}: nested arrays are not supported")),
                    t => size(t).ok_or_else(|| format!("{key}: unknown array type {t}"))?,
                };
                let len = self.count(min, &format!("{key}: array length"))?;
                if elem_type == 8 {
                    for _ in 0..len {
                        let n = self.u64(key)?;
                        self.take(n, key)?;
                    }
                } else {
                    self.take(len * min, key)?;
                }
                MetaValue::Array { elem_type, len }
            }
            10 => MetaValue::Uint(self.u64(key)?),
            11 => MetaValue::Int(self.u64(key)? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64(key)?)),
            t => return Err(format!("{key}: unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file's header; tensor data stays mapped, unread.
    pub fn open(path: &Path) -> Result<Self, WorkerError> {
        let file = File::open(path).map_err(|e| WorkerError::io(path, e))?;
        // SAFETY: the checkpoint is treated as read-only for the life of the process;
        // like every mmap-based loader we rely on nobody truncating it while we serve.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WorkerError::io(path, e))?;
        let err = |m: String| WorkerError::Checkpoint(format!("{}: {m}", path.display()));
        let (version, metadata, tensors) = parse(&mmap).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    /// The tensor infos, by GGUF name.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    /// The names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    fn meta_uint(&self, key: &str) -> Result<Option<u64>, WorkerError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Uint(v)) => Ok(Some(*v)),
            Some(MetaValue::Int(v)) if *v >= 0 => Ok(Some(*v as u64)),
            Some(v) => Err(self.err(format!(
                "metadata {key} is {v:?}, expected an unsigned integer"
            ))),
        }
    }

    fn meta_float(&self, key: &str) -> Result<Option<f64>, WorkerError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Float(v)) => Ok(Some(*v)),
            Some(v) => Err(self.err(format!("metadata {key} is {v:?}, expected a float"))),
        }
    }

    fn err(&self, m: String) -> WorkerError {
        WorkerError::Checkpoint(format!("{}: {m}", self.path.display()))
    }

    /// Model facts from `llama.*` metadata; the vocabulary size comes from the token
    /// list, else from `token_embd`'s shape.
    pub fn model_config(&self) -> Result<ModelConfig, WorkerError> {
        match self.metadata.get("general.architecture") {
            Some(MetaValue::Str(a)) if a == "llama" => {}
            other => {
                return Err(self.err(format!(
                    "general.architecture is {other:?}; only \"llama\" (Mistral) is supported"
                )))
            }
        }
        let need = |k: &str| -> Result<usize, WorkerError> {
            let v = self
                .meta_uint(k)?
                .ok_or_else(|| self.err(format!("missing metadata {k}")))?;
            usize::try_from(v).map_err(|_| self.err(format!("metadata {k} = {v} is too large")))
        };
        let dim = need("llama.embedding_length")?;
        let n_heads = need("llama.attention.head_count")?;
        let n_kv_heads = match self.meta_uint("llama.attention.head_count_kv")? {
            Some(v) => {
                usize::try_from(v).map_err(|_| self.err("head_count_kv too large".into()))?
            }
            None => n_heads,
        };
        let head_dim = match self.meta_uint("llama.attention.key_length")? {
            Some(v) => usize::try_from(v).map_err(|_| self.err("key_length too large".into()))?,
            None if n_heads > 0 => dim / n_heads,
            None => 0,
        };
        let vocab_size =
            match self.metadata.get("tokenizer.ggml.tokens") {
                Some(MetaValue::Array { len, .. }) => *len as usize,
                _ => match self.tensors.get("token_embd.weight") {
                    Some(t) => t.shape[0],
                    None => return Err(self.err(
                        "no tokenizer.ggml.tokens and no token_embd.weight to size the vocabulary"
                            .into(),
                    )),
                },
            };
        let sliding_window = match self.meta_uint("llama.attention.sliding_window")? {
            Some(0) | None => None,
            Some(v) => {
                Some(u32::try_from(v).map_err(|_| self.err("sliding_window too large".into()))?)
            }
        };
        let cfg = ModelConfig {
            n_layers: need("llama.block_count")?,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden_dim: need("llama.feed_forward_length")?,
            vocab_size,
            norm_eps: self
                .meta_float("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5) as f32,
            rope_theta: self.meta_float("llama.rope.freq_base")?.unwrap_or(10_000.0) as f32,
            sliding_window,
            max_position_embeddings: need("llama.context_length")?,
        };
        cfg.validate()?;
        self.check_tokenizer(&cfg)?;
        Ok(cfg)
    }

    /// stral keeps its own Codestral v3 tokenizer: refuse a file whose special tokens
    /// disagree with it.
    fn check_tokenizer(&self, cfg: &ModelConfig) -> Result<(), WorkerError> {
        for (key, want) in [
            ("tokenizer.ggml.bos_token_id", CODESTRAL_BOS),
            ("tokenizer.ggml.eos_token_id", CODESTRAL_EOS),
        ] {
            if let Some(got) = self.meta_uint(key)? {
                if got != want {
                    return Err(self.err(format!(
                        "{key} is {got}, but stral's Codestral v3 tokenizer uses {want}"
                    )));
                }
            }
        }
        if let Some(t) = self.tensors.get("token_embd.weight") {
            if t.shape.first() != Some(&cfg.vocab_size) {
                return Err(self.err(format!(
                    "the token list has {} entries but token_embd.weight has shape {:?}",
                    cfg.vocab_size, t.shape
                )));
            }
        }
        Ok(())
    }

    /// The info of `name`, checked against `expected` shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<&GgufTensor, WorkerError> {
        let t = self.tensors.get(name).ok_or_else(|| {
            self.err(format!(
                "missing tensor {name} (expected shape {expected:?})"
            ))
        })?;
        if t.shape != expected {
            return Err(self.err(format!(
                "tensor {name} has shape {:?}, expected {expected:?}",
                t.shape
            )));
        }
        Ok(t)
    }

    /// Rows `rows` of tensor `t` (1-D tensors are one row per element) as f32.
    pub fn rows(
        &self,
        name: &str,
        t: &GgufTensor,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, WorkerError> {
        let row_len: usize = if t.shape.len() == 1 {
            1
        } else {
            t.shape[1..].iter().product()
        };
        let n_rows = t.shape[0];
        if rows.start > rows.end || rows.end > n_rows {
            return Err(self.err(format!("tensor {name}: rows {rows:?} out of 0..{n_rows}")));
        }
        let (be, bs) = t.ty.block();
        if t.shape.len() == 1
            && be > 1
            && (rows.start % be != 0 || (rows.end % be != 0 && rows.end != n_rows))
        {
            return Err(self.err(format!(
                "tensor {name}: rows {rows:?} cut a {be}-element {:?} block",
                t.ty
            )));
        }
        let row_bytes = row_len / be * bs;
        let (a, b) = if t.shape.len() == 1 {
            (rows.start / be * bs, rows.end.div_ceil(be) * bs)
        } else {
            (rows.start * row_bytes, rows.end * row_bytes)
        };
        let mut out = Vec::with_capacity(rows.len() * row_len);
        t.ty.decode(&self.mmap[t.bytes.start + a..t.bytes.start + b], &mut out);
        out.truncate(rows.len() * row_len);
        Ok(out)
    }

    /// Columns `cols` of every row of 2-D tensor `t` as a `[rows, cols.len()]` matrix;
    /// for block types the range must lie on block boundaries.
    pub fn cols(
        &self,
        name: &str,
        t: &GgufTensor,
        cols: Range<usize>,
    ) -> Result<Vec<f32>, WorkerError> {
        let mut out = Vec::with_capacity(t.shape[0] * cols.len());
        self.col_bytes(name, t, cols, |b| t.ty.decode(b, &mut out))?;
        Ok(out)
    }

    /// Rows `rows` of a 2-D Q8_0 tensor as stored: its int8 values (`[rows, row_len]`)
    /// and the f16 bits of each 32-block's scale, in the same order.
    pub fn q8_0_rows(
        &self,
        name: &str,
        t: &GgufTensor,
        rows: Range<usize>,
    ) -> Result<(Vec<i8>, Vec<u16>), WorkerError> {
        let [n_rows, row_len] = self.q8_0_matrix(name, t)?;
        if rows.start > rows.end || rows.end > n_rows {
            return Err(self.err(format!("tensor {name}: rows {rows:?} out of 0..{n_rows}")));
        }
        let (be, bs) = t.ty.block();
        let row_bytes = row_len / be * bs;
        let mut out = (Vec::new(), Vec::new());
        split_q8_0(
            &self.mmap
                [t.bytes.start + rows.start * row_bytes..t.bytes.start + rows.end * row_bytes],
            &mut out,
        );
        Ok(out)
    }

    /// Columns `cols` (on block boundaries) of every row of a 2-D Q8_0 tensor as
    /// stored, as in [`GgufFile::q8_0_rows`].
    pub fn q8_0_cols(
        &self,
        name: &str,
        t: &GgufTensor,
        cols: Range<usize>,
    ) -> Result<(Vec<i8>, Vec<u16>), WorkerError> {
        self.q8_0_matrix(name, t)?;
        let mut out = (Vec::new(), Vec::new());
        self.col_bytes(name, t, cols, |b| split_q8_0(b, &mut out))?;
        Ok(out)
    }

    /// `t`'s `[rows, row_len]` when it is a 2-D Q8_0 tensor.
    fn q8_0_matrix(&self, name: &str, t: &GgufTensor) -> Result<[usize; 2], WorkerError> {
        match t.shape[..] {
            [r, c] if t.ty == GgmlType::Q8_0 => Ok([r, c]),
            _ => Err(self.err(format!(
                "tensor {name} is a {:?} tensor of shape {:?}, not a Q8_0 matrix",
                t.ty, t.shape
            ))),
        }
    }

    /// Calls `visit` with the stored bytes of columns `cols` of each row of 2-D `t`, in
    /// row order (the range checked, and on block boundaries for block types).
    fn col_bytes(
        &self,
        name: &str,
        t: &GgufTensor,
        cols: Range<usize>,
        mut visit: impl FnMut(&[u8]),
    ) -> Result<(), WorkerError> {
        let [n_rows, row_len] = t.shape[..] else {
            return Err(self.err(format!(
                "tensor {name}: column slice of a {}-D tensor",
                t.shape.len()
            )));
        };
        if cols.start > cols.end || cols.end > row_len {
            return Err(self.err(format!(
                "tensor {name}: columns {cols:?} out of 0..{row_len}"
            )));
        }
        let (be, bs) = t.ty.block();
        if cols.start % be != 0 || cols.end % be != 0 {
            return Err(self.err(format!(
                "tensor {name}: columns {cols:?} cut a {be}-element {:?} block; choose a tensor-parallel degree that splits on block boundaries",
                t.ty
            )));
        }
        let row_bytes = row_len / be * bs;
        for r in 0..n_rows {
            let base = t.bytes.start + r * row_bytes;
            visit(&self.mmap[base + cols.start / be * bs..base + cols.end / be * bs]);
        }
        Ok(())
    }
}

/// Appends whole Q8_0 blocks' values and scale bits to `out`.
fn split_q8_0(bytes: &[u8], out: &mut (Vec<i8>, Vec<u16>)) {
    let (_, bs) = GgmlType::Q8_0.block();
    for b in bytes.chunks_exact(bs) {
        out.1.push(u16::from_le_bytes([b[0], b[1]]));
        out.0.extend(b[2..bs].iter().map(|&q| q as i8));
    }
}

/// Codestral v3's BOS and EOS ids (stral's tokenizer).
pub const CODESTRAL_BOS: u64 = 1;
pub const CODESTRAL_EOS: u64 = 2;

type Parsed = (u32, HashMap<String, MetaValue>, HashMap<String, GgufTensor>);

fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4, "magic")? != MAGIC {
        return Err("bad magic: not a GGUF file".into());
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    // A tensor info is at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes;
    // a key/value at least 8 (key len) + 4 (type) + 1.
    let n_tensors = c.count(24, "tensor count")?;
    let n_kv = c.count(13, "metadata key/value count")?;
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let v = c.value(ty, &key)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::Uint(a)) if *a > 0 && a.is_power_of_two() && *a <= 1 << 20 => *a,
        Some(v) => return Err(format!("general.alignment {v:?} is not a power of two")),
    };
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let type_id = c.u32(&name)?;
        let offset = c.u64(&name)?;
        infos.push((name, dims, type_id, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (buf.len() as u64).saturating_sub(data_start);
    let mut tensors = HashMap::new();
    for (name, dims, type_id, offset) in infos {
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            format!("tensor {name} has GGML type {type_id}; supported are F32, F16, BF16, Q8_0, Q4_0, Q4_K")
        })?;
        if offset % alignment != 0 {
            return Err(format!(
                "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= data_len.saturating_mul(256))
            .ok_or_else(|| {
                format!(
                    "tensor {name}: dims {dims:?} are absurd for a {}-byte file",
                    buf.len()
                )
            })?;
        let (be, bs) = ty.block();
        if dims[0] % be as u64 != 0 {
            return Err(format!(
                "tensor {name}: row length {} is not a multiple of the {ty:?} block ({be})",
                dims[0]
            ));
        }
        let size = (numel / be as u64).saturating_mul(bs as u64);
        let end = offset.checked_add(size).filter(|&e| e <= data_len).ok_or_else(|| {
            format!("tensor {name}: data {offset}+{size} runs past the end of the file ({data_len} data bytes)")
        })?;
        let start = (data_start + offset) as usize;
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        if tensors
            .insert(
                name.clone(),
                GgufTensor {
                    ty,
                    shape,
                    bytes: start..(data_start + end) as usize,
                },
            )
            .is_some()
        {
            return Err(format!("tensor {name} appears twice"));
        }
    }
    Ok((version, metadata, tensors))
}
