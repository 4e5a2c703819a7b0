//! The planner's curves as a standalone SVG: p95 TTFT vs requests/s per replica, one
//! line per TP, the SLO as a dashed line, the recommended TP's capacity marked.
//!
//! Written by hand (a few dozen elements): no font files are read, so it works on a
//! bare machine; text is left to the viewer's default sans-serif font. Costs: O(points).

use std::fmt::Write;

use super::PlanReport;

const W: f64 = 760.0;
const H: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders `report` as SVG text.
pub fn render_svg(report: &PlanReport) -> String {
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
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - (y.min(y_max) / y_max) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(&format!(
            "{} on {}: p95 TTFT vs load per replica — MODELLED, not measured",
            report.model, report.gpu
        ))
    );
    // Axes, ticks and grid.
    let _ = writeln!(
        s,
        r#"<path d="M{LEFT},{TOP} V{} H{}" stroke="black" fill="none"/>"#,
        TOP + ph,
        LEFT + pw
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (x, y) = (LEFT + f * pw, TOP + ph - f * ph);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            f * y_max
        );
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{:.2}</text>"#,
            TOP + ph + 18.0,
            f * x_max
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">requests/s per replica</text>"#,
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">p95 TTFT (ms)</text>"#,
        TOP + ph / 2.0
    );
    if let Some(v) = slo {
        let y = sy(v);
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="black" stroke-dasharray="6,4"/><text x="{}" y="{}">SLO {v} ms</text>"#,
            LEFT + pw,
            LEFT + pw + 6.0,
            y + 4.0
        );
    }
    for (i, c) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = c
            .curve
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.rate_per_s), sy(p.ttft_p95_ms)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 20.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">TP {}{}</text>"#,
            LEFT + pw + 10.0,
            LEFT + pw + 30.0,
            LEFT + pw + 36.0,
            ly + 4.0,
            c.tp,
            if report.recommendation().is_some_and(|r| r.tp == c.tp) {
                " (chosen)"
            } else {
                ""
            }
        );
    }
    if let Some(c) = report.recommendation() {
        let x = sx(c.capacity_per_replica_rps);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#888" stroke-dasharray="2,3"/><text x="{}" y="{}" fill="#555">capacity {:.2}/s</text>"##,
            TOP + ph,
            x + 4.0,
            TOP + 12.0,
            c.capacity_per_replica_rps
        );
    }
    s.push_str("</svg>\n");
    s
}
