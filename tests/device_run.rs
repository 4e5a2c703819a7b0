//! The GPU device run's CPU test: `worker/scripts/device-run.sh` (packed as
//! `devcarry/run.sh`) on this machine, from debug binaries (`STRAL_CARRY_BIN`), must
//! check the binaries, set up the libraries as far as the wheels allow, and stop with
//! "no GPU here" and exit status 3 — never a hang, never a claim of results. The
//! PyTorch peer must read the same model shapes the synthetic presets have.
//! (`device-pack.sh` itself builds release binaries: too slow for CI; it is run by
//! hand, see worker/README.md.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use worker::config::ModelConfig;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn has_nvidia_smi() -> bool {
    Command::new("nvidia-smi").arg("-L").output().is_ok()
}

/// A carried-binaries folder made of links: `stral` is the real one, the others
/// only need to exist before the script reaches its GPU check.
fn carry_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in [
        "stral",
        "cuda_step_bench",
        "kernels_cuda_gpu",
        "worker_cuda_gpu",
        "cuda_serve",
    ] {
        std::os::unix::fs::symlink(common::stral(), bin.join(name)).unwrap();
    }
    bin
}

fn device_run(bin: &Path, out: &Path) -> (i32, String) {
    let o = Command::new("bash")
        .arg(root().join("worker/scripts/device-run.sh"))
        .env("STRAL_CARRY_BIN", bin)
        .env("OUT", out)
        .current_dir(out)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn device_run_stops_at_no_gpu_here_on_a_cpu_machine() {
    if has_nvidia_smi() {
        eprintln!("skipped: this machine has nvidia-smi (the device run itself is the test there)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = carry_bin(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (code, stderr) = device_run(&bin, &out);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("no GPU here: nvidia-smi not found"),
        "{stderr}"
    );
    assert!(stderr.contains("binaries: "), "{stderr}");
    assert!(stderr.contains("LD_LIBRARY_PATH="), "{stderr}");
    assert!(
        !stderr.contains(": ok ("),
        "a stage claims to have run: {stderr}"
    );
    let log = std::fs::read_to_string(out.join("run.log")).unwrap();
    assert!(log.contains("no GPU here"), "{log}");
    assert!(
        log.contains("stral "),
        "stral --version missing from run.log: {log}"
    );
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(
        files <= 8,
        "{files} result files (the device tool returns 8)"
    );
}

#[test]
fn device_run_names_a_missing_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bin = carry_bin(dir.path());
    std::fs::remove_file(bin.join("worker_cuda_gpu")).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let (code, stderr) = device_run(&bin, &out);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("worker_cuda_gpu missing"), "{stderr}");
    assert!(stderr.contains("device-pack.sh"), "{stderr}");
}

#[test]
fn the_pytorch_peer_reads_the_synthetic_presets_shapes() {
    let o = Command::new("python3")
        .arg(root().join("benches/peers/torch_mistral.py"))
        .arg("--print-shape")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shapes: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (name, want) in [
        ("codestral-22b", ModelConfig::codestral_22b()),
        ("tiny", ModelConfig::tiny()),
    ] {
        let got: ModelConfig = serde_json::from_value(shapes[name].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}: {}", shapes[name]));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn the_device_scripts_parse() {
    for s in [
        "worker/scripts/device-run.sh",
        "worker/scripts/device-pack.sh",
    ] {
        let o = Command::new("bash")
            .arg("-n")
            .arg(root().join(s))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
