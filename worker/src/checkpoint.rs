//! Checkpoints on disk in either layout: tensor naming, the RoPE row permutation,
//! and sliced, memory-mapped access for one tensor-parallel rank.
//!
//! Internal convention: RoPE rotates `(x[i], x[i + d/2])` (rotate-half). Hugging Face
//! checkpoints already store `wq`/`wk` rows in that order; Mistral checkpoints rotate
//! interleaved pairs `(x[2i], x[2i+1])`, so their `wq`/`wk` rows are permuted within
//! each head at load time ([`interleaved_to_half`]) and back when written
//! ([`half_to_interleaved`]).
//!
//! GGUF files ([`crate::gguf`]) store `wq`/`wk` rows in interleaved-pair order too
//! (llama.cpp's converter permutes HF rows back), so they get the same permutation;
//! their other tensors need none. Their quantized types decode to f32 here, except
//! that a Q8_0 tensor asked for as [`WeightDtype::Q8_0`] keeps its stored blocks
//! bit for bit ([`Checkpoint::load_rows_as`]).
//!
//! Under `--dtype auto` each tensor is kept as the checkpoint stores it where the CPU
//! has that format ([`Checkpoint::native_dtype`]): safetensors bf16 → bf16, f32 and
//! f16 → f32; GGUF F32 → f32, F16/BF16 → bf16, Q8_0 → Q8_0 (as stored), and Q4_0/Q4_K
//! → int8 rows (dequantized, then requantized per row: lossy on top of the file's
//! own 4-bit rounding).
//!
//! Invariant: a rank reads only its own slices (whole heads / rows / columns), so no
//! process ever materialises the full 44.5 GB model.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use kernels::quant::{QMatrix, WeightDtype, Q8_0_BLOCK};

use crate::config::{CheckpointFormat, ModelConfig};
use crate::gguf::{GgmlType, GgufFile};
use crate::safetensors_io::{MappedFile, StoredDtype, StoredTensor};
use crate::WorkerError;

/// One parameter tensor of the model, named independently of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    Embed,
    Wq(usize),
    Wk(usize),
    Wv(usize),
    Wo(usize),
    W1(usize),
    W2(usize),
    W3(usize),
    AttnNorm(usize),
    FfnNorm(usize),
    Norm,
    Output,
}

impl Param {
    /// The parameters of layer `l`, in checkpoint order.
    pub fn of_layer(l: usize) -> [Param; 9] {
        [
            Param::AttnNorm(l),
            Param::Wq(l),
            Param::Wk(l),
            Param::Wv(l),
            Param::Wo(l),
            Param::FfnNorm(l),
            Param::W1(l),
            Param::W2(l),
            Param::W3(l),
        ]
    }

    /// Every parameter in checkpoint order.
    pub fn all(cfg: &ModelConfig) -> Vec<Param> {
        let mut v = vec![Param::Embed];
        for l in 0..cfg.n_layers {
            v.extend(Param::of_layer(l));
        }
        v.extend([Param::Norm, Param::Output]);
        v
    }

    /// The tensor's name in the given layout.
    pub fn name(self, format: CheckpointFormat) -> String {
        use CheckpointFormat::*;
        match (self, format) {
            (Param::Embed, Mistral) => "tok_embeddings.weight".into(),
            (Param::Embed, Hf) => "model.embed_tokens.weight".into(),
            (Param::Norm, Mistral) => "norm.weight".into(),
            (Param::Norm, Hf) => "model.norm.weight".into(),
            (Param::Output, Mistral) => "output.weight".into(),
            (Param::Output, Hf) => "lm_head.weight".into(),
            (Param::Wq(l), Mistral) => format!("layers.{l}.attention.wq.weight"),
            (Param::Wk(l), Mistral) => format!("layers.{l}.attention.wk.weight"),
            (Param::Wv(l), Mistral) => format!("layers.{l}.attention.wv.weight"),
            (Param::Wo(l), Mistral) => format!("layers.{l}.attention.wo.weight"),
            (Param::W1(l), Mistral) => format!("layers.{l}.feed_forward.w1.weight"),
            (Param::W2(l), Mistral) => format!("layers.{l}.feed_forward.w2.weight"),
            (Param::W3(l), Mistral) => format!("layers.{l}.feed_forward.w3.weight"),
            (Param::AttnNorm(l), Mistral) => format!("layers.{l}.attention_norm.weight"),
            (Param::FfnNorm(l), Mistral) => format!("layers.{l}.ffn_norm.weight"),
            (Param::Wq(l), Hf) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            (Param::Wk(l), Hf) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            (Param::Wv(l), Hf) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            (Param::Wo(l), Hf) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            (Param::W1(l), Hf) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            (Param::W2(l), Hf) => format!("model.layers.{l}.mlp.down_proj.weight"),
            (Param::W3(l), Hf) => format!("model.layers.{l}.mlp.up_proj.weight"),
            (Param::AttnNorm(l), Hf) => format!("model.layers.{l}.input_layernorm.weight"),
            (Param::FfnNorm(l), Hf) => format!("model.layers.{l}.post_attention_layernorm.weight"),
        }
    }

    /// The tensor's shape (`[out, in]` for projections).
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        match self {
            Param::Embed | Param::Output => vec![cfg.vocab_size, cfg.dim],
            Param::Wq(_) => vec![cfg.q_dim(), cfg.dim],
            Param::Wk(_) | Param::Wv(_) => vec![cfg.kv_dim(), cfg.dim],
            Param::Wo(_) => vec![cfg.dim, cfg.q_dim()],
            Param::W1(_) | Param::W3(_) => vec![cfg.hidden_dim, cfg.dim],
            Param::W2(_) => vec![cfg.dim, cfg.hidden_dim],
            Param::AttnNorm(_) | Param::FfnNorm(_) | Param::Norm => vec![cfg.dim],
        }
    }

    /// The GGUF (`llama` architecture) name of this parameter.
    pub fn gguf_name(self) -> String {
        match self {
            Param::Embed => "token_embd.weight".into(),
            Param::Norm => "output_norm.weight".into(),
            Param::Output => "output.weight".into(),
            Param::Wq(l) => format!("blk.{l}.attn_q.weight"),
            Param::Wk(l) => format!("blk.{l}.attn_k.weight"),
            Param::Wv(l) => format!("blk.{l}.attn_v.weight"),
            Param::Wo(l) => format!("blk.{l}.attn_output.weight"),
            Param::W1(l) => format!("blk.{l}.ffn_gate.weight"),
            Param::W2(l) => format!("blk.{l}.ffn_down.weight"),
            Param::W3(l) => format!("blk.{l}.ffn_up.weight"),
            Param::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Param::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
        }
    }

    /// Whether RoPE is applied to this projection's output (its rows depend on the convention).
    pub fn is_rotary(self) -> bool {
        matches!(self, Param::Wq(_) | Param::Wk(_))
    }
}

/// Reorders the rows of whole heads from interleaved-pair order to rotate-half order:
/// rotate-half row `j·d/2 + i` is interleaved row `2i + j`.
pub fn interleaved_to_half<T: Copy + Default>(w: &[T], head_dim: usize, row_len: usize) -> Vec<T> {
    permute_head_rows(w, head_dim, row_len, |r| {
        2 * (r % (head_dim / 2)) + r / (head_dim / 2)
    })
}

/// The inverse of [`interleaved_to_half`].
pub fn half_to_interleaved<T: Copy + Default>(w: &[T], head_dim: usize, row_len: usize) -> Vec<T> {
    permute_head_rows(w, head_dim, row_len, |r| (r % 2) * (head_dim / 2) + r / 2)
}

/// `out` row `r` of each head = `w` row `src(r)` of the same head.
fn permute_head_rows<T: Copy + Default>(
    w: &[T],
    head_dim: usize,
    row_len: usize,
    src: impl Fn(usize) -> usize,
) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    for (oh, wh) in out
        .chunks_exact_mut(head_dim * row_len)
        .zip(w.chunks_exact(head_dim * row_len))
    {
        for r in 0..head_dim {
            let s = src(r);
            oh[r * row_len..(r + 1) * row_len].copy_from_slice(&wh[s * row_len..(s + 1) * row_len]);
        }
    }
    out
}

/// How an opened checkpoint is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Safetensors files in the Mistral or Hugging Face layout.
    Safetensors(CheckpointFormat),
    /// One GGUF file (`llama` architecture tensor names and metadata).
    Gguf,
}

/// A safetensors checkpoint's layout compares equal to its `CheckpointFormat`.
impl PartialEq<CheckpointFormat> for Layout {
    fn eq(&self, other: &CheckpointFormat) -> bool {
        *self == Layout::Safetensors(*other)
    }
}

enum Storage {
    Safetensors {
        files: Vec<MappedFile>,
        /// Tensor name → index into `files`.
        index: HashMap<String, usize>,
    },
    Gguf(GgufFile),
}

/// An opened checkpoint: its config, layout and memory-mapped files.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub format: Layout,
    storage: Storage,
}

impl Checkpoint {
    /// Opens a checkpoint: a safetensors directory in either layout, a `.gguf` file,
    /// or a directory holding exactly one `.gguf` file (and no config); parses headers only.
    pub fn open(dir: &Path) -> Result<Self, WorkerError> {
        if let Some(file) = Self::gguf_file(dir)? {
            let g = GgufFile::open(&file)?;
            return Ok(Self {
                dir: file,
                config: g.model_config()?,
                format: Layout::Gguf,
                storage: Storage::Gguf(g),
            });
        }
        let (config, format) = ModelConfig::from_dir(dir)?;
        let paths = match format {
            CheckpointFormat::Mistral => Self::mistral_files(dir)?,
            CheckpointFormat::Hf => Self::hf_files(dir)?,
        };
        let files = paths
            .iter()
            .map(|p| MappedFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.insert(name, i);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            format: Layout::Safetensors(format),
            storage: Storage::Safetensors { files, index },
        })
    }

    /// The GGUF file `path` names: itself if it is a `.gguf` file, or the one `.gguf`
    /// in a directory without `params.json`/`config.json`.
    fn gguf_file(path: &Path) -> Result<Option<PathBuf>, WorkerError> {
        let is_gguf = |p: &Path| p.extension().is_some_and(|e| e == "gguf");
        if path.is_file() {
            return Ok(is_gguf(path).then(|| path.to_path_buf()));
        }
        if !path.is_dir()
            || path.join("params.json").is_file()
            || path.join("config.json").is_file()
        {
            return Ok(None);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| WorkerError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_gguf(p))
            .collect();
        found.sort();
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            n => Err(WorkerError::Checkpoint(format!(
                "{} holds {n} .gguf files; pass --model the one to serve",
                path.display()
            ))),
        }
    }

    fn mistral_files(dir: &Path) -> Result<Vec<PathBuf>, WorkerError> {
        let single = dir.join("consolidated.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| WorkerError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("consolidated") && n.ends_with(".safetensors")
            })
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(WorkerError::Checkpoint(format!(
                "{}: params.json found but no consolidated.safetensors",
                dir.display()
            )));
        }
        Ok(found)
    }

    fn hf_files(dir: &Path) -> Result<Vec<PathBuf>, WorkerError> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| WorkerError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| WorkerError::Checkpoint(format!("{}: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    WorkerError::Checkpoint(format!("{}: missing 'weight_map'", index.display()))
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        Err(WorkerError::Checkpoint(format!(
            "{}: config.json found but neither model.safetensors.index.json nor model.safetensors",
            dir.display()
        )))
    }

    /// The stored safetensors tensor for `p`, checked against the shape the config
    /// implies (a GGUF checkpoint has no such view: use [`Self::load_rows`]).
    pub fn tensor(&self, p: Param) -> Result<StoredTensor<'_>, WorkerError> {
        let (Layout::Safetensors(format), Storage::Safetensors { files, index }) =
            (self.format, &self.storage)
        else {
            return Err(WorkerError::Checkpoint(format!(
                "{}: a GGUF checkpoint has no safetensors view of {}",
                self.dir.display(),
                p.gguf_name()
            )));
        };
        let name = p.name(format);
        let expected = p.shape(&self.config);
        let missing = || {
            WorkerError::Checkpoint(format!(
                "missing tensor {name} (expected shape {expected:?}) in {}",
                self.dir.display()
            ))
        };
        let file = index.get(&name).ok_or_else(missing)?;
        let t = files[*file].get(&name)?.ok_or_else(missing)?;
        if t.shape != expected.as_slice() {
            return Err(WorkerError::Checkpoint(format!(
                "tensor {name} has shape {:?}, expected {expected:?}",
                t.shape
            )));
        }
        Ok(t)
    }

    /// Rows `rows` of `p` as f32, in the internal (rotate-half) convention. For
    /// rotary projections the range must cover whole heads.
    pub fn load_rows(&self, p: Param, rows: Range<usize>) -> Result<Vec<f32>, WorkerError> {
        let w = match &self.storage {
            Storage::Gguf(g) => {
                let name = p.gguf_name();
                let t = g.get(&name, &p.shape(&self.config))?;
                g.rows(&name, t, rows)?
            }
            Storage::Safetensors { .. } => self.tensor(p)?.rows(rows),
        };
        Ok(self.to_internal(p, w, self.config.dim))
    }

    /// Columns `cols` of `p` as a `[rows, cols.len()]` f32 matrix, rows in the
    /// internal convention.
    pub fn load_cols(&self, p: Param, cols: Range<usize>) -> Result<Vec<f32>, WorkerError> {
        let row_len = cols.len();
        let w = match &self.storage {
            Storage::Gguf(g) => {
                let name = p.gguf_name();
                let t = g.get(&name, &p.shape(&self.config))?;
                g.cols(&name, t, cols)?
            }
            Storage::Safetensors { .. } => self.tensor(p)?.cols(cols),
        };
        Ok(self.to_internal(p, w, row_len))
    }

    /// The format `--dtype auto` keeps `p` in: the stored one where the CPU has it
    /// (see the module doc).
    pub fn native_dtype(&self, p: Param) -> Result<WeightDtype, WorkerError> {
        Ok(match &self.storage {
            Storage::Gguf(g) => {
                let name = p.gguf_name();
                match g.get(&name, &p.shape(&self.config))?.ty {
                    GgmlType::F32 => WeightDtype::F32,
                    GgmlType::F16 | GgmlType::Bf16 => WeightDtype::Bf16,
                    GgmlType::Q8_0 => WeightDtype::Q8_0,
                    GgmlType::Q4_0 | GgmlType::Q4K => WeightDtype::Int8,
                }
            }
            Storage::Safetensors { .. } => match self.tensor(p)?.dtype {
                StoredDtype::Bf16 => WeightDtype::Bf16,
                StoredDtype::F32 | StoredDtype::F16 => WeightDtype::F32,
            },
        })
    }

    /// The parameters stored in a 4-bit GGUF type (Q4_0, Q4_K), which `--dtype auto`
    /// requantizes to int8 rows at load.
    pub fn four_bit_params(&self) -> Vec<Param> {
        let Storage::Gguf(g) = &self.storage else {
            return Vec::new();
        };
        Param::all(&self.config)
            .into_iter()
            .filter(|p| {
                g.tensor_info(&p.gguf_name())
                    .is_some_and(|t| matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q4K))
            })
            .collect()
    }

    /// Rows `rows` of matrix `p` stored as `dtype`, in the internal convention. A GGUF
    /// Q8_0 tensor asked for as Q8_0 keeps the file's blocks bit for bit; everything
    /// else is read as f32 ([`Self::load_rows`]) and converted.
    pub fn load_rows_as(
        &self,
        p: Param,
        rows: Range<usize>,
        dtype: WeightDtype,
    ) -> Result<QMatrix, WorkerError> {
        let &[_, cols] = &p.shape(&self.config)[..] else {
            return Err(WorkerError::Checkpoint(format!(
                "{p:?} is not a matrix; it has no stored format to choose"
            )));
        };
        if let Some(g) = self.stored_q8_0(p, dtype)? {
            let name = p.gguf_name();
            let t = g.get(&name, &p.shape(&self.config))?;
            let (q, d) = g.q8_0_rows(&name, t, rows)?;
            return self.q8_0_matrix(p, q, d, cols);
        }
        self.convert(p, self.load_rows(p, rows)?, cols, dtype)
    }

    /// Columns `cols` of matrix `p` stored as `dtype`, as in [`Self::load_rows_as`].
    pub fn load_cols_as(
        &self,
        p: Param,
        cols: Range<usize>,
        dtype: WeightDtype,
    ) -> Result<QMatrix, WorkerError> {
        let row_len = cols.len();
        if let Some(g) = self.stored_q8_0(p, dtype)? {
            let name = p.gguf_name();
            let t = g.get(&name, &p.shape(&self.config))?;
            let (q, d) = g.q8_0_cols(&name, t, cols)?;
            return self.q8_0_matrix(p, q, d, row_len);
        }
        self.convert(p, self.load_cols(p, cols)?, row_len, dtype)
    }

    /// The GGUF file when `p` is stored there as Q8_0 and wanted as Q8_0.
    fn stored_q8_0(&self, p: Param, dtype: WeightDtype) -> Result<Option<&GgufFile>, WorkerError> {
        match &self.storage {
            Storage::Gguf(g) if dtype == WeightDtype::Q8_0 => {
                let t = g.get(&p.gguf_name(), &p.shape(&self.config))?;
                Ok((t.ty == GgmlType::Q8_0).then_some(g))
            }
            _ => Ok(None),
        }
    }

    /// Stored Q8_0 rows of `p` (each `row_len` values) in the internal convention.
    fn q8_0_matrix(
        &self,
        p: Param,
        q: Vec<i8>,
        d: Vec<u16>,
        row_len: usize,
    ) -> Result<QMatrix, WorkerError> {
        let (q, d) = if p.is_rotary() {
            let hd = self.config.head_dim;
            (
                interleaved_to_half(&q, hd, row_len),
                interleaved_to_half(&d, hd, row_len / Q8_0_BLOCK),
            )
        } else {
            (q, d)
        };
        QMatrix::q8_0_from_blocks(row_len, q, d).map_err(|e| {
            WorkerError::Checkpoint(format!("{}: {}: {e}", self.dir.display(), p.gguf_name()))
        })
    }

    /// f32 rows of `p` (each `row_len` long) stored as `dtype`.
    fn convert(
        &self,
        p: Param,
        w: Vec<f32>,
        row_len: usize,
        dtype: WeightDtype,
    ) -> Result<QMatrix, WorkerError> {
        if dtype == WeightDtype::Q8_0 && !row_len.is_multiple_of(Q8_0_BLOCK) {
            return Err(WorkerError::Config(format!(
                "Q8_0 weights need rows of whole {Q8_0_BLOCK}-blocks, but this rank's {p:?} rows are {row_len} long"
            )));
        }
        Ok(QMatrix::from_f32(w, row_len, dtype))
    }

    /// Whole-head rows of `p` (each `row_len` long) reordered to rotate-half where
    /// this layout stores rotary rows interleaved (Mistral and GGUF).
    fn to_internal(&self, p: Param, w: Vec<f32>, row_len: usize) -> Vec<f32> {
        let interleaved = matches!(
            self.format,
            Layout::Gguf | Layout::Safetensors(CheckpointFormat::Mistral)
        );
        if p.is_rotary() && interleaved {
            interleaved_to_half(&w, self.config.head_dim, row_len)
        } else {
            w
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutations_are_inverse_and_match_the_hf_formula() {
        let (heads, d, row) = (2, 8, 3);
        let w: Vec<f32> = (0..heads * d * row).map(|i| i as f32).collect();
        let half = interleaved_to_half(&w, d, row);
        assert_eq!(half_to_interleaved(&half, d, row), w);
        // HF: w.view(h, d/2, 2, in).transpose(1, 2).reshape(h*d, in): row (h, j, i) ← (h, i, j).
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let hf_row = h * d + j * d / 2 + i;
                    let mi_row = h * d + 2 * i + j;
                    assert_eq!(
                        half[hf_row * row..(hf_row + 1) * row],
                        w[mi_row * row..(mi_row + 1) * row]
                    );
                }
            }
        }
    }

    #[test]
    fn names_differ_per_layout_and_are_unique() {
        let cfg = ModelConfig::tiny();
        for f in [CheckpointFormat::Mistral, CheckpointFormat::Hf] {
            let mut names: Vec<String> = Param::all(&cfg).iter().map(|p| p.name(f)).collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n);
        }
        assert_eq!(
            Param::W1(3).name(CheckpointFormat::Hf),
            "model.layers.3.mlp.gate_proj.weight"
        );
    }
}
