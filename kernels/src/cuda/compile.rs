//! Run-time compilation of `kernels/cuda/*.cu` with NVRTC, and its on-disk cache.
//!
//! Owns: the embedded sources (one NVRTC program: `common.cuh` followed by every
//! `.cu` file, with `#line` markers so diagnostics name the right file), the kernel
//! table ([`Kernel`]), NVRTC options, and the cubin cache.
//!
//! Invariants: every [`Kernel`] names an `extern "C"` entry point of the program;
//! a cached cubin is keyed by a hash of the source, the options, the NVRTC version and
//! the architecture, so any change recompiles. Only NVRTC is needed here, never the
//! CUDA driver: CI compiles for sm_80 and sm_90 on machines without a GPU.
//!
//! Costs: a compile takes seconds (once per source change and architecture); a
//! cache hit is one file read.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::KernelError;

/// The sources, in program order (`common.cuh` first: every file uses it).
pub const SOURCES: [(&str, &str); 9] = [
    ("common.cuh", include_str!("../../cuda/common.cuh")),
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("rope.cu", include_str!("../../cuda/rope.cu")),
    ("kv_cache.cu", include_str!("../../cuda/kv_cache.cu")),
    ("rope_cache.cu", include_str!("../../cuda/rope_cache.cu")),
    ("activation.cu", include_str!("../../cuda/activation.cu")),
    ("embedding.cu", include_str!("../../cuda/embedding.cu")),
    ("sampling.cu", include_str!("../../cuda/sampling.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
];

/// Every kernel entry point of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RmsNorm,
    FusedAddRmsNorm,
    Rope,
    ReshapeAndCache,
    RopeQkvCache,
    SwiGlu,
    Embedding,
    ArgmaxRows,
    ArgmaxPairs,
    TopKRows,
    AttentionD128W1,
    AttentionD128W4,
    AttentionD128W8,
    AttentionD64W1,
    AttentionD64W4,
    AttentionD64W8,
    AttentionMerge,
}

impl Kernel {
    pub const ALL: [Kernel; 17] = [
        Kernel::RmsNorm,
        Kernel::FusedAddRmsNorm,
        Kernel::Rope,
        Kernel::ReshapeAndCache,
        Kernel::RopeQkvCache,
        Kernel::SwiGlu,
        Kernel::Embedding,
        Kernel::ArgmaxRows,
        Kernel::ArgmaxPairs,
        Kernel::TopKRows,
        Kernel::AttentionD128W1,
        Kernel::AttentionD128W4,
        Kernel::AttentionD128W8,
        Kernel::AttentionD64W1,
        Kernel::AttentionD64W4,
        Kernel::AttentionD64W8,
        Kernel::AttentionMerge,
    ];

    /// The `extern "C"` symbol.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::RmsNorm => "rms_norm_bf16",
            Kernel::FusedAddRmsNorm => "fused_add_rms_norm_bf16",
            Kernel::Rope => "rope_bf16",
            Kernel::ReshapeAndCache => "reshape_and_cache_bf16",
            Kernel::RopeQkvCache => "rope_qkv_cache_bf16",
            Kernel::SwiGlu => "swiglu_bf16",
            Kernel::Embedding => "embedding_bf16",
            Kernel::ArgmaxRows => "argmax_rows_f32",
            Kernel::ArgmaxPairs => "argmax_pairs_f32",
            Kernel::TopKRows => "top_k_rows_f32",
            Kernel::AttentionD128W1 => "paged_attention_d128_w1",
            Kernel::AttentionD128W4 => "paged_attention_d128_w4",
            Kernel::AttentionD128W8 => "paged_attention_d128_w8",
            Kernel::AttentionD64W1 => "paged_attention_d64_w1",
            Kernel::AttentionD64W4 => "paged_attention_d64_w4",
            Kernel::AttentionD64W8 => "paged_attention_d64_w8",
            Kernel::AttentionMerge => "attn_merge_bf16",
        }
    }

    /// Index into [`Kernel::ALL`] (and into the loaded function table).
    pub fn index(self) -> usize {
        Kernel::ALL
            .iter()
            .position(|&k| k == self)
            .expect("every kernel is in ALL")
    }
}

/// A compiled program for one architecture.
#[derive(Clone, Debug)]
pub struct CompiledKernels {
    /// Compute capability as `major * 10 + minor` (80, 86, 90, ...).
    pub arch: u32,
    /// The cubin (device machine code) for `sm_{arch}`.
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings and the ptxas resource report (registers, spills).
    pub log: String,
}

impl CompiledKernels {
    /// Log lines that are warnings (the CI test fails on any).
    pub fn warnings(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("warning"))
            .collect()
    }

    /// Log lines of the ptxas report that show register spills or local-memory stack.
    pub fn spills(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| {
                let spill = |what: &str| {
                    l.split(',')
                        .any(|f| f.contains(what) && f.trim().split(' ').next() != Some("0"))
                };
                spill("bytes spill stores") || spill("bytes spill loads")
            })
            .collect()
    }
}

/// The whole program: `common.cuh` and every `.cu`, each after a `#line` marker.
pub fn program_source() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// Whether `libnvrtc` can be loaded (by name, through the dynamic loader's search path).
pub fn nvrtc_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names and
    // drops what it opened; it has no preconditions.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// The directory holding `cuda_bf16.h`: `$STRAL_CUDA_INCLUDE_DIR`, else
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Result<PathBuf, KernelError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("STRAL_CUDA_INCLUDE_DIR") {
        candidates.push(dir.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(Path::new(&root).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| KernelError::NoCudaHeaders {
            searched: candidates.iter().map(|d| d.display().to_string()).collect(),
        })
}

/// NVRTC options for `sm_{arch}`; producing a cubin (not PTX) means the driver never
/// JIT-compiles, so a newer NVRTC than the driver is fine.
fn options(arch: u32, include_dir: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".into(),
        "--generate-line-info".into(),
        "--ptxas-options=--verbose".into(),
        format!("--include-path={}", include_dir.display()),
    ]
}

/// Compiles the program for `sm_{arch}`. Needs libnvrtc (see [`nvrtc_available`]).
pub fn compile(arch: u32, include_dir: &Path) -> Result<CompiledKernels, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NoNvrtc);
    }
    let source = CString::new(program_source()).expect("sources contain no NUL byte");
    let name = CString::new("stral_kernels.cu").expect("no NUL");
    let opts = options(arch, include_dir);
    let fail = |e: nvrtc::NvrtcError| KernelError::Compile {
        arch,
        log: format!("{e:?}"),
    };
    let prog = nvrtc::create_program(&source, Some(&name)).map_err(fail)?;
    // SAFETY: `prog` was just created from `source` and `name`, which outlive it, and
    // is destroyed exactly once below, after its last use.
    let result = unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let log = nvrtc::get_program_log(prog).map(|raw| c_chars_to_string(&raw));
        let cubin = compiled.and_then(|()| get_cubin(prog));
        let destroyed = nvrtc::destroy_program(prog);
        (cubin, log, destroyed)
    };
    let log = result.1.map_err(fail)?;
    let cubin = result.0.map_err(|e| KernelError::Compile {
        arch,
        log: format!("{e:?}\n{log}"),
    })?;
    result.2.map_err(fail)?;
    Ok(CompiledKernels { arch, cubin, log })
}

/// # Safety
/// `prog` must be a live program that compiled successfully.
unsafe fn get_cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, nvrtc::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per this function's contract; `size` is a valid out-pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result()? };
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC just reported.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast::<c_char>()).result()? };
    Ok(cubin)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    // SAFETY: reinterpreting c_char (i8 or u8) as u8 of the same length.
    let bytes = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len()) };
    CStr::from_bytes_until_nul(bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; NVRTC is loaded (callers check availability).
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Compile {
            arch: 0,
            log: format!("nvrtcVersion: {e:?}"),
        })?;
    Ok((major, minor))
}

/// Where compiled kernels are cached: `$STRAL_CACHE_DIR/kernels`, else
/// `$XDG_CACHE_HOME/stral/kernels`, else `~/.cache/stral/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    env("STRAL_CACHE_DIR")
        .map(|d| d.join("kernels"))
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("stral").join("kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("stral").join("kernels")))
}

/// FNV-1a, 64 bit: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cubin for `sm_{arch}`, from the disk cache when present, else compiled and
/// cached. Cache failures (read-only home, full disk) only cost a recompile.
pub fn cached_cubin(arch: u32, include_dir: &Path) -> Result<Vec<u8>, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NoNvrtc);
    }
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        program_source().as_bytes(),
        options(arch, include_dir).join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{key:016x}-sm_{arch}.cubin")));
    if let Some(cubin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(cubin);
    }
    let compiled = compile(arch, include_dir)?;
    if let Some(path) = path {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &compiled.cubin))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(compiled.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_indices_round_trip() {
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn cache_key_changes_with_every_part() {
        let a = fnv1a(&[b"src", b"opts"]);
        assert_ne!(a, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(a, fnv1a(&[b"sr", b"copts"]));
        assert_eq!(a, fnv1a(&[b"src", b"opts"]));
    }

    #[test]
    fn spill_lines_are_found_and_zero_spills_ignored() {
        let c = CompiledKernels {
            arch: 90,
            cubin: vec![],
            log: "ptxas info    : Used 90 registers\n\
                  ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                  ptxas info    : 8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
                .into(),
        };
        assert_eq!(c.spills().len(), 1);
        assert!(c.warnings().is_empty());
    }
}
