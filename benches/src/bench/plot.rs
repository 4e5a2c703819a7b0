//! Plots of a `stral bench` report (plotters): `latency_cdf.{svg,png}` — the CDF of
//! TTFT, TPOT, ITL and E2E, one line per run — and, for a concurrency sweep,
//! `sweep.{svg,png}` — output token throughput and latency percentiles against
//! concurrency.
//!
//! Fonts: the SVG backend writes `<text>` elements and needs no font file; the PNG
//! backend rasterises text with `ab_glyph` from DejaVu Sans Mono, embedded in the binary
//! (`benches/assets/`, Bitstream Vera licence), so PNGs come out the same on a bare
//! machine with no system fonts. Cost: O(samples) per plot; each CDF line is thinned to
//! at most [`MAX_CDF_POINTS`] points.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::metrics::{Outcome, RequestRecord};
use super::report::BenchReport;
use super::{BenchError, Load, PlotFormats};

/// Points per CDF line (evenly spaced in rank).
pub const MAX_CDF_POINTS: usize = 400;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
const SIZE: (u32, u32) = (1200, 900);

/// Writes the plots for `report` into `dir` (created); returns the files written.
pub fn write_plots(
    report: &BenchReport,
    dir: &Path,
    formats: PlotFormats,
) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    register_font();
    let mut written = Vec::new();
    let sweep: Vec<(f64, &super::report::RunReport)> = report
        .runs
        .iter()
        .filter_map(|r| match r.load {
            Load::Closed { concurrency } => Some((concurrency as f64, r)),
            Load::Open { .. } => None,
        })
        .collect();
    if formats.svg {
        let path = dir.join("latency_cdf.svg");
        svg(&path, |a| draw_cdfs(a, report))?;
        written.push(path);
        if sweep.len() > 1 {
            let path = dir.join("sweep.svg");
            svg(&path, |a| draw_sweep(a, &sweep))?;
            written.push(path);
        }
    }
    if formats.png {
        let path = dir.join("latency_cdf.png");
        png_file(&path, |a| draw_cdfs(a, report))?;
        written.push(path);
        if sweep.len() > 1 {
            let path = dir.join("sweep.png");
            png_file(&path, |a| draw_sweep(a, &sweep))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Registers the embedded font as plotters' "sans-serif" (idempotent). Call before
/// drawing text on a bitmap backend; other plots of this crate may use it too.
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; a failure here is a broken build, caught by the tests.
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("embedded DejaVuSansMono.ttf does not parse"));
    });
}

/// Draws into an SVG file at `path` (also used by the planner's plot).
pub(crate) fn svg(
    path: &Path,
    draw: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
) -> Result<(), BenchError> {
    let fail = |reason: String| BenchError::Plot {
        path: path.to_path_buf(),
        reason,
    };
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    draw(root.clone()).map_err(fail)?;
    root.present().map_err(|e| fail(e.to_string()))
}

/// Draws into a PNG file at `path` (also used by the planner's plot); call
/// [`register_font`] first.
pub(crate) fn png_file(
    path: &Path,
    draw: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<(), BenchError> {
    let fail = |reason: String| BenchError::Plot {
        path: path.to_path_buf(),
        reason,
    };
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(root.clone()).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let file = std::fs::File::create(path).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&rgb))
        .map_err(|e| fail(e.to_string()))
}

/// Which metric a CDF panel shows, from the raw records, in milliseconds.
fn samples_ms(records: &[RequestRecord], metric: &str) -> Vec<f64> {
    let done = records.iter().filter(|r| r.outcome == Outcome::Completed);
    let mut v: Vec<f64> = match metric {
        "TTFT" => done.filter_map(|r| r.ttft).collect(),
        "TPOT" => done.filter_map(|r| r.tpot()).collect(),
        "ITL" => done.flat_map(|r| r.itl.iter().copied()).collect(),
        _ => done.map(|r| r.e2e).collect(),
    };
    v.iter_mut().for_each(|x| *x *= 1e3);
    v.sort_by(f64::total_cmp);
    v
}

fn draw_cdfs<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    report: &BenchReport,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "stral bench: {} workload, {} — latency CDFs (completed requests)",
        report.workload.name(),
        report.endpoint.path()
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
    let panels = root.split_evenly((2, 2));
    for (panel, metric) in panels.iter().zip(["TTFT", "TPOT", "ITL", "E2E"]) {
        let lines: Vec<(String, Vec<f64>)> = report
            .runs
            .iter()
            .zip(&report.samples)
            .map(|(run, recs)| (run.label(), samples_ms(recs, metric)))
            .collect();
        // Cut the x axis at twice the largest p99 so one outlier does not flatten the rest.
        let x_max = lines
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| {
                let p99 = super::metrics::percentile_sorted(v, 99.0);
                v[v.len() - 1].min(2.0 * p99)
            })
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{metric} (ms)"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..x_max, 0f64..1.0f64)
            .map_err(err)?;
        let decimals = if x_max >= 20.0 { 0 } else { 2 };
        let fmt_x = move |v: &f64| format!("{v:.decimals$}");
        chart
            .configure_mesh()
            .x_label_formatter(&fmt_x)
            .light_line_style(WHITE)
            .x_desc("milliseconds")
            .y_desc(if metric == "ITL" {
                "fraction of chunk gaps"
            } else {
                "fraction of requests"
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, (label, v)) in lines.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            let n = v.len();
            let step = n.div_ceil(MAX_CDF_POINTS).max(1);
            let pts = (0..n)
                .step_by(step)
                .chain(std::iter::once(n - 1))
                .map(|k| (v[k].min(x_max), (k + 1) as f64 / n as f64));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(format!("{label} (n={n})"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn draw_sweep<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    sweep: &[(f64, &super::report::RunReport)],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled("stral bench: concurrency sweep", ("sans-serif", 22))
        .map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let c_min = sweep.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let c_max = sweep.iter().map(|s| s.0).fold(0.0, f64::max);
    let x_range = (c_min / 1.3)..(c_max * 1.3);

    let tput_max = sweep
        .iter()
        .map(|(_, r)| r.output_token_throughput)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("output throughput", ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.clone().log_scale(), 0f64..tput_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_labels(6)
        .light_line_style(WHITE)
        .x_desc("concurrency")
        .y_desc("output tokens / s")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let pts: Vec<(f64, f64)> = sweep
        .iter()
        .map(|(c, r)| (*c, r.output_token_throughput))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2)))
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
        .map_err(err)?;

    type Pick = fn(&super::report::RunReport) -> f64;
    let series: [(&str, Pick); 4] = [
        ("TTFT p50", |r| r.ttft_ms.p50),
        ("TTFT p99", |r| r.ttft_ms.p99),
        ("TPOT p50", |r| r.tpot_ms.p50),
        ("E2E p50", |r| r.e2e_ms.p50),
    ];
    let lat_max = sweep
        .iter()
        .flat_map(|(_, r)| series.iter().map(move |(_, f)| f(r)))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.15;
    let mut chart = ChartBuilder::on(&right)
        .caption("latency", ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.log_scale(), 0f64..lat_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_labels(6)
        .light_line_style(WHITE)
        .x_desc("concurrency")
        .y_desc("milliseconds")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, pick)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = sweep.iter().map(|(c, r)| (*c, pick(r))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::{Slo, TokenCountSource};
    use crate::bench::report::RunReport;
    use crate::bench::BenchConfig;

    fn records(scale: f64) -> Vec<RequestRecord> {
        (1..=50)
            .map(|i| RequestRecord {
                outcome: Outcome::Completed,
                sent_at: 0.0,
                ttft: Some(0.01 * scale * i as f64),
                e2e: 0.05 * scale * i as f64,
                itl: vec![0.002 * scale; 4],
                output_tokens: 5,
                prompt_tokens: None,
                cached_tokens: None,
                predicted: None,
                token_source: TokenCountSource::Chunks,
            })
            .collect()
    }

    #[test]
    fn writes_valid_svg_and_png_files_for_a_sweep() {
        let runs = [1usize, 4, 16]
            .iter()
            .map(|&c| {
                let recs = records(c as f64);
                let run =
                    RunReport::new(Load::Closed { concurrency: c }, &recs, 3.0, &Slo::default());
                (run, recs)
            })
            .collect();
        let report = BenchReport::new(&BenchConfig::default(), "m", runs);
        let dir = std::env::temp_dir().join(format!("stral-bench-plot-{}", std::process::id()));
        let files = write_plots(
            &report,
            &dir,
            PlotFormats {
                svg: true,
                png: true,
            },
        )
        .unwrap();
        assert_eq!(files.len(), 4);
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            if f.extension().unwrap() == "png" {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
                // Text was rasterised: the image is not just white, black and the lines.
                assert!(
                    bytes.len() > 10_000,
                    "{} is {} bytes",
                    f.display(),
                    bytes.len()
                );
            } else {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.contains("<svg") && text.trim_end().ends_with("</svg>"));
                let label = if f.ends_with("sweep.svg") {
                    "TTFT p99"
                } else {
                    "concurrency 4"
                };
                assert!(text.contains(label), "{} lacks {label:?}", f.display());
            }
        }
        if std::env::var_os("STRAL_KEEP_PLOTS").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
