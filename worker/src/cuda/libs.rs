//! Probing the CUDA libraries the worker loads at run time, before cudarc touches them.
//!
//! Owns: [`CudaLib`] (the libraries cudarc dlopens by name on first use: cuBLASLt and
//! NCCL; the driver and NVRTC are probed by `kernels`), [`probe`] and the typed
//! [`LibError`] that names the missing file, every name that was tried, and the fix.
//!
//! Why: cudarc (dynamic loading) panics inside its first call when a library is
//! absent (`lt::create_handle()` without libcublasLt), and its candidate names for
//! NCCL (`libnccl.so`, `libnccl.so.13`, `.so.12`, … `.so.1`) never include
//! `libnccl.so.2`, the only name the PyPI wheel `nvidia-nccl-cu13` ships. So every
//! cudarc entry point into these libraries goes through [`probe`] first.
//!
//! The candidate list is cudarc's own ([`cudarc::get_lib_name_candidates`]), so a
//! probe succeeds exactly when cudarc's loader would. A successful probe is cached
//! (the library stays loaded, as cudarc keeps it); a failure is re-probed each call.

use std::sync::OnceLock;

/// A CUDA library the worker loads through cudarc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLib {
    /// cuBLASLt: every GEMM.
    CublasLt,
    /// NCCL: the device collective (TP > 1 on several GPUs, or `--collective nccl`).
    Nccl,
}

impl CudaLib {
    /// The stem cudarc passes to its loader (`libSTEM.so…`).
    pub fn stem(self) -> &'static str {
        match self {
            CudaLib::CublasLt => "cublasLt",
            CudaLib::Nccl => "nccl",
        }
    }

    /// How to make the library loadable, for the error message.
    fn fix(self) -> &'static str {
        match self {
            CudaLib::CublasLt => {
                "PyPI nvidia-cublas ships it in site-packages/nvidia/cublas/lib \
                 (libcublasLt.so.13); put that folder on LD_LIBRARY_PATH \
                 (worker/scripts/device-run.sh does this)"
            }
            CudaLib::Nccl => {
                "PyPI nvidia-nccl-cu13 ships only libnccl.so.2 — make a symlink \
                 libnccl.so -> libnccl.so.2 in a folder first on LD_LIBRARY_PATH \
                 (worker/scripts/device-run.sh does this), or use the host-staged \
                 collective (--collective host)"
            }
        }
    }

    /// cudarc's candidate file names for this library, in its order.
    pub fn candidates(self) -> Vec<String> {
        cudarc::get_lib_name_candidates(self.stem())
    }
}

/// A CUDA library that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{file} not found: cudarc looks for {tried}; {fix} (last loader error: {last})")]
pub struct LibError {
    /// The first (canonical) name, e.g. `libnccl.so`.
    pub file: String,
    /// Every name tried, `a, b, …`.
    pub tried: String,
    /// What to do about it.
    pub fix: String,
    /// The dynamic loader's message for the last candidate.
    pub last: String,
}

impl From<LibError> for crate::WorkerError {
    fn from(e: LibError) -> Self {
        crate::WorkerError::Config(e.to_string())
    }
}

/// Checks that cudarc will find `lib`; the error names the file and the fix.
pub fn probe(lib: CudaLib) -> Result<(), LibError> {
    static OK: [OnceLock<String>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &OK[lib as usize];
    if slot.get().is_some() {
        return Ok(());
    }
    let found = probe_names(&lib.candidates(), lib.fix())?;
    let _ = slot.set(found);
    Ok(())
}

/// The first of `names` the dynamic loader opens (kept loaded, as cudarc keeps its
/// libraries), or the typed error listing them all.
pub fn probe_names(names: &[String], fix: &str) -> Result<String, LibError> {
    let mut last = String::from("no candidate names");
    for name in names {
        // SAFETY: loading a CUDA library runs its initialisers, exactly as cudarc's
        // own loader would on first use; we do it earlier, on the same names.
        match unsafe { libloading::Library::new(name) } {
            Ok(l) => {
                std::mem::forget(l);
                return Ok(name.clone());
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(LibError {
        file: names.first().cloned().unwrap_or_default(),
        tried: names.join(", "),
        fix: fix.to_string(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_typed_error_naming_file_names_and_fix() {
        let names = vec![
            "libstral_no_such_lib.so".to_string(),
            "libstral_no_such_lib.so.2".to_string(),
        ];
        let e = probe_names(&names, "make a symlink").unwrap_err();
        assert_eq!(e.file, "libstral_no_such_lib.so");
        let msg = e.to_string();
        assert!(
            msg.starts_with("libstral_no_such_lib.so not found: cudarc looks for libstral_no_such_lib.so, libstral_no_such_lib.so.2; make a symlink"),
            "{msg}"
        );
    }

    #[test]
    fn a_symlink_with_a_cudarc_name_is_found() {
        // The device run's fix for NCCL: a `libX.so` link to a real `libX.so.N`.
        // libm is on every glibc machine; we load it through such a link.
        let dir = tempfile::tempdir().unwrap();
        let target = [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib64/libm.so.6",
            "/lib64/libm.so.6",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        let Some(target) = target else {
            panic!("no libm.so.6 in the usual places");
        };
        let link = dir.path().join("libstral_probe.so");
        std::os::unix::fs::symlink(target, &link).unwrap();
        let names = vec![
            dir.path()
                .join("libstral_probe.so.13")
                .display()
                .to_string(),
            link.display().to_string(),
        ];
        assert_eq!(probe_names(&names, "").unwrap(), names[1]);
    }

    #[test]
    fn nccl_candidates_are_cudarcs_and_miss_the_wheels_name() {
        // The reason for the symlink: if cudarc ever adds `.so.2`, this test tells us
        // the workaround can go.
        let c = CudaLib::Nccl.candidates();
        assert_eq!(c[0], "libnccl.so");
        assert!(c.iter().any(|n| n == "libnccl.so.12"), "{c:?}");
        assert!(!c.iter().any(|n| n == "libnccl.so.2"), "{c:?}");
    }

    #[test]
    fn probing_the_real_libraries_never_panics() {
        // On a CPU machine they are usually absent: then the error names the fix.
        for lib in [CudaLib::CublasLt, CudaLib::Nccl] {
            if let Err(e) = probe(lib) {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("lib{}.so not found", lib.stem())),
                    "{msg}"
                );
                assert!(msg.contains("LD_LIBRARY_PATH"), "{msg}");
            }
        }
    }
}
