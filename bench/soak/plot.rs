//! RSS over time as a hand-written SVG: one panel per allocator on the same axes, one polyline
//! per service, the phases marked. (A few polylines need no plotting crate.)

use std::fmt::Write;

use imagemesh_tests::SERVICES;

use crate::Run;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 280.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 40.0;
const COLOURS: [&str; 5] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

pub fn svg(runs: &[Run]) -> String {
    let max_t = runs
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.t))
        .fold(1.0, f64::max);
    let max_mb = runs
        .iter()
        .flat_map(|r| {
            r.samples
                .iter()
                .map(|s| s.footprint.rss_bytes as f64 / 1048576.0)
        })
        .fold(10.0, f64::max);
    // A round top for the axis.
    let step = [10.0, 25.0, 50.0, 100.0, 200.0, 250.0, 500.0]
        .into_iter()
        .find(|s| max_mb / s <= 6.0)
        .unwrap_or(1000.0);
    let top_mb = (max_mb / step).ceil() * step;
    let height = TOP + runs.len() as f64 * (PANEL + BOTTOM + TOP);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, name) in SERVICES.iter().enumerate() {
        let x = LEFT + i as f64 * 120.0;
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="16" x2="{}" y2="16" stroke="{}" stroke-width="3"/><text x="{}" y="20">{name}</text>"#,
            x + 20.0,
            COLOURS[i],
            x + 25.0
        );
    }
    let plot_w = WIDTH - LEFT - RIGHT;
    for (p, run) in runs.iter().enumerate() {
        let y0 = TOP + p as f64 * (PANEL + BOTTOM + TOP) + TOP;
        let x = |t: f64| LEFT + t / max_t * plot_w;
        let y = |mb: f64| y0 + PANEL - mb / top_mb * PANEL;
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">RSS (MiB) with {}</text>"#,
            y0 - 8.0,
            run.allocator
        );
        let mut mb = 0.0;
        while mb <= top_mb {
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{mb}</text>"##,
                y(mb),
                WIDTH - RIGHT,
                LEFT - 6.0,
                y(mb) + 4.0
            );
            mb += step;
        }
        for (t, what) in &run.marks {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#888" stroke-dasharray="4 3"/><text x="{3:.1}" y="{4}" fill="#555" font-size="10">{what}</text>"##,
                x(*t),
                y0,
                y0 + PANEL,
                x(*t) + 3.0,
                y0 + 10.0
            );
        }
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">seconds since start (max {max_t:.0})</text>"##,
            WIDTH - RIGHT,
            y0 + PANEL + 20.0
        );
        for (service, colour) in COLOURS.iter().enumerate() {
            let points: Vec<String> = run
                .samples
                .iter()
                .filter(|s| s.service == service)
                .map(|s| {
                    format!(
                        "{:.1},{:.1}",
                        x(s.t),
                        y(s.footprint.rss_bytes as f64 / 1048576.0)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
