//! The planner's curves as a PNG or SVG through plotters, the library `stral bench`
//! plots with (`bench::plot`, whose embedded font and PNG encoder this reuses): p95
//! TTFT vs requests/s per replica, one line per TP, the TTFT SLO as a black line, the
//! recommended TP's capacity as a grey vertical line. The format follows the file
//! name (`.png` or `.svg`). Costs: O(points).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{PlanError, PlanReport};
use crate::bench::plot::{png_file, register_font, svg};

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Whether `path` names a PNG (`true`) or an SVG (`false`) file; anything else is an
/// input error (checked before planning, so a typo costs no simulation).
pub fn is_png(path: &Path) -> Result<bool, PlanError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(true),
        Some("svg") => Ok(false),
        _ => Err(PlanError::Input(format!(
            "--plot {}: the file name must end in .png or .svg",
            path.display()
        ))),
    }
}

/// Writes the plot of `report` to `path`, PNG or SVG by its extension.
pub fn write_plot(report: &PlanReport, path: &Path) -> Result<(), PlanError> {
    // Both backends lay text out with the embedded font.
    register_font();
    let result = if is_png(path)? {
        png_file(path, |a| draw(a, report))
    } else {
        svg(path, |a| draw(a, report))
    };
    result.map_err(|e| PlanError::Plot(e.to_string()))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    report: &PlanReport,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let curves: Vec<_> = report
        .candidates
        .iter()
        .filter(|c| !c.curve.is_empty())
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|c| c.curve.iter().map(|p| p.rate_per_s))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let slo = report.slo.ttft_p95_ms;
    // Clip the y axis at 4× the SLO (or the largest point): overload explodes.
    let y_data = curves
        .iter()
        .flat_map(|c| c.curve.iter().map(|p| p.ttft_p95_ms))
        .fold(0.0f64, f64::max);
    let y_max = slo
        .map_or(y_data, |s| y_data.min(4.0 * s).max(1.5 * s))
        .max(1e-9);
    let title = format!(
        "{} on {}: p95 TTFT vs load per replica (MODELLED, not measured)",
        report.model, report.gpu
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("requests/s per replica")
        .y_desc("p95 TTFT (ms)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let chosen = report.recommendation().map(|c| c.tp);
    for (i, c) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = c
            .curve
            .iter()
            .map(|p| (p.rate_per_s, p.ttft_p95_ms.min(y_max)))
            .collect();
        let label = format!(
            "TP {}{}",
            c.tp,
            if chosen == Some(c.tp) {
                " (chosen)"
            } else {
                ""
            }
        );
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if let Some(v) = slo {
        chart
            .draw_series(LineSeries::new(
                [(0.0, v), (x_max * 1.05, v)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("SLO {v} ms"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    if let Some(c) = report.recommendation() {
        let x = c.capacity_per_replica_rps;
        chart
            .draw_series(LineSeries::new(
                [(x, 0.0), (x, y_max)],
                RGBColor(0x88, 0x88, 0x88),
            ))
            .map_err(err)?
            .label(format!("capacity {x:.2}/s"))
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(0x88, 0x88, 0x88))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}
