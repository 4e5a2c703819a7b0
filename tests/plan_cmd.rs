//! `stral plan` as a user runs it (the real binary, a small plan of the tiny model so
//! it stays short): with no SLO and no workload flags it says which defaults it used
//! and where their numbers come from; `--plot` writes a real PNG (or SVG) by the file
//! name, and refuses any other extension with a clear error.

use std::path::PathBuf;
use std::process::Command;

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stral"))
        .arg("plan")
        .args([
            "--model",
            "tiny",
            "--developers",
            "40",
            "--tp",
            "1",
            "--grid-points",
            "4",
            "--sim-seconds",
            "4",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn plan_without_an_slo_uses_200_ms_and_names_every_default_and_writes_a_png() {
    let dir = out_dir("plan_defaults");
    let png = dir.join("plan.png");
    let (ok, stdout, stderr) = plan(&["--plot", png.to_str().unwrap()]);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("SLO (p95): TTFT 200 ms"), "{stdout}");
    assert!(
        stdout.contains("note: no SLO given: using p95 TTFT 200 ms"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: --active-fraction 0.1: an assumption of this planner"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: --requests-per-active-minute 6: an assumption of this planner"),
        "{stdout}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    // IHDR: width and height, big-endian, right after the chunk header.
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!((dim(16), dim(20)), (1200, 900));
    assert!(bytes.len() > 5_000, "a nearly empty PNG");
}

#[test]
fn given_flags_are_not_noted_and_the_plot_format_follows_the_extension() {
    let dir = out_dir("plan_flags");
    let svg = dir.join("plan.svg");
    let (ok, stdout, stderr) = plan(&[
        "--slo-ttft-p95-ms",
        "300",
        "--active-fraction",
        "0.2",
        "--requests-per-active-minute",
        "4",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("SLO (p95): TTFT 300 ms"), "{stdout}");
    assert!(!stdout.contains("note:"), "{stdout}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.trim_end().ends_with("</svg>"));

    let (ok, _, stderr) = plan(&["--plot", dir.join("plan.txt").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("must end in .png or .svg"), "{stderr}");
}
