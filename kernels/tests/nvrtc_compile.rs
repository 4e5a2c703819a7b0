//! Compiles every CUDA kernel with NVRTC for sm_80 (A100) and sm_90 (H100), without a
//! GPU. Fails on compile errors, on compiler warnings, on register spills, and on a
//! kernel of the table missing from the cubin.
//!
//! Needs libnvrtc on the loader path and the CUDA headers: `eval "$(bash
//! scripts/cuda-venv.sh)"` provides both. With `STRAL_REQUIRE_NVRTC=1` (set by
//! scripts/test.sh) a missing NVRTC fails the test instead of skipping it.

use kernels::cuda::compile::{compile, cuda_include_dir, nvrtc_available, Kernel};

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    let required = std::env::var("STRAL_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "STRAL_REQUIRE_NVRTC=1 but libnvrtc.so.13 cannot be loaded; run `eval \"$(bash scripts/cuda-venv.sh)\"`"
    );
    eprintln!(
        "skipping: libnvrtc not found (eval \"$(bash scripts/cuda-venv.sh)\" to run this test)"
    );
    false
}

fn compiles_cleanly_for(arch: u32) {
    if !nvrtc_or_skip() {
        return;
    }
    let include = cuda_include_dir().expect("CUDA headers (set STRAL_CUDA_INCLUDE_DIR)");
    let compiled = compile(arch, &include).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        compiled.warnings().is_empty(),
        "sm_{arch} warnings:\n{}",
        compiled.warnings().join("\n")
    );
    assert!(
        compiled.spills().is_empty(),
        "sm_{arch} register spills:\n{}",
        compiled.log
    );
    for k in Kernel::ALL {
        let name = k.name().as_bytes();
        assert!(
            compiled.cubin.windows(name.len()).any(|w| w == name),
            "sm_{arch}: kernel {} missing from the cubin",
            k.name()
        );
    }
}

#[test]
fn all_kernels_compile_for_sm80_without_warnings_or_spills() {
    compiles_cleanly_for(80);
}

#[test]
fn all_kernels_compile_for_sm90_without_warnings_or_spills() {
    compiles_cleanly_for(90);
}
