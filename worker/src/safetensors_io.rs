//! Safetensors files: a streaming writer (tensors are produced one at a time, so a
//! 44.5 GB synthetic checkpoint never sits in memory) and a memory-mapped reader
//! that converts any slice of rows or columns of a bf16/f16/f32 tensor to f32.
//!
//! Invariant: the reader never copies more than the requested slice; it parses each
//! file's header once (O(tensors) at open) and then only touches mapped pages of the
//! slices asked for.

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::WorkerError;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
}

impl StoredDtype {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::Bf16 => "BF16",
            Self::F16 => "F16",
        }
    }

    /// Appends `values` encoded in this dtype (little-endian) to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes little-endian elements of this dtype into `out` (appending).
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Self::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Self::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Self::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
    }
}

/// Header entry of a tensor to be written.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Writes one safetensors file whose tensor list is known up front; data is then
/// streamed tensor by tensor in the same order.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    dtype: StoredDtype,
    remaining: std::vec::IntoIter<TensorSpec>,
    buf: Vec<u8>,
}

impl SafetensorsWriter {
    pub fn create(
        path: &Path,
        tensors: Vec<TensorSpec>,
        dtype: StoredDtype,
    ) -> Result<Self, WorkerError> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for t in &tensors {
            let bytes = t.numel() * dtype.size();
            header.insert(
                t.name.clone(),
                json!({"dtype": dtype.tag(), "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut text = Value::Object(header).to_string().into_bytes();
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let file = File::create(path).map_err(|e| WorkerError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&text))
            .map_err(|e| WorkerError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            dtype,
            remaining: tensors.into_iter(),
            buf: Vec::new(),
        })
    }

    /// Writes the next tensor's values; they must match the next spec's element count.
    pub fn write_next(&mut self, values: &[f32]) -> Result<(), WorkerError> {
        let spec = self.remaining.next().ok_or_else(|| {
            WorkerError::Checkpoint(format!(
                "{}: more tensors written than declared",
                self.path.display()
            ))
        })?;
        if spec.numel() != values.len() {
            return Err(WorkerError::Checkpoint(format!(
                "{}: tensor {} expects {} values, got {}",
                self.path.display(),
                spec.name,
                spec.numel(),
                values.len()
            )));
        }
        self.buf.clear();
        self.dtype.encode(values, &mut self.buf);
        self.out
            .write_all(&self.buf)
            .map_err(|e| WorkerError::io(&self.path, e))
    }

    pub fn finish(mut self) -> Result<(), WorkerError> {
        if let Some(t) = self.remaining.next() {
            return Err(WorkerError::Checkpoint(format!(
                "{}: tensor {} declared but never written",
                self.path.display(),
                t.name
            )));
        }
        self.out.flush().map_err(|e| WorkerError::io(&self.path, e))
    }
}

/// One memory-mapped safetensors file with its parsed header.
pub struct MappedFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// Where a tensor lives and what it is.
#[derive(Clone, Debug)]
pub struct StoredTensor<'a> {
    pub dtype: StoredDtype,
    pub shape: &'a [usize],
    bytes: &'a [u8],
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self, WorkerError> {
        let file = File::open(path).map_err(|e| WorkerError::io(path, e))?;
        // SAFETY: the checkpoint is treated as read-only for the life of the process;
        // like every mmap-based loader we rely on nobody truncating it while we serve.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WorkerError::io(path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                WorkerError::Checkpoint(format!(
                    "{}: not a valid safetensors file: {e:?}",
                    path.display()
                ))
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            data_start: 8 + header_len,
            mmap,
            metadata,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    pub fn get(&self, name: &str) -> Result<Option<StoredTensor<'_>>, WorkerError> {
        let Some(info) = self.metadata.info(name) else {
            return Ok(None);
        };
        let dtype = match info.dtype {
            Dtype::F32 => StoredDtype::F32,
            Dtype::BF16 => StoredDtype::Bf16,
            Dtype::F16 => StoredDtype::F16,
            other => {
                return Err(WorkerError::Checkpoint(format!(
                    "{}: tensor {name} has dtype {other:?}; supported are BF16, F16 and F32",
                    self.path.display()
                )))
            }
        };
        let (a, b) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + a..self.data_start + b];
        Ok(Some(StoredTensor {
            dtype,
            shape: &info.shape,
            bytes,
        }))
    }
}

impl StoredTensor<'_> {
    /// Rows `rows` of a 2-D (or 1-D, as one row per element) tensor as f32.
    pub fn rows(&self, rows: Range<usize>) -> Vec<f32> {
        let row_len: usize = self.shape[1..].iter().product();
        let es = self.dtype.size();
        let mut out = Vec::with_capacity(rows.len() * row_len);
        self.dtype.decode(
            &self.bytes[rows.start * row_len * es..rows.end * row_len * es],
            &mut out,
        );
        out
    }

    /// Columns `cols` of every row of a 2-D tensor, as a `[rows, cols.len()]` f32 matrix.
    pub fn cols(&self, cols: Range<usize>) -> Vec<f32> {
        let (n_rows, row_len) = (self.shape[0], self.shape[1]);
        let es = self.dtype.size();
        let mut out = Vec::with_capacity(n_rows * cols.len());
        for r in 0..n_rows {
            let base = r * row_len;
            self.dtype.decode(
                &self.bytes[(base + cols.start) * es..(base + cols.end) * es],
                &mut out,
            );
        }
        out
    }
}
