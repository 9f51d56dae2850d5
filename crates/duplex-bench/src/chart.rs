//! The benchmark chart: one SVG with a panel per figure, drawn by hand (no plotting crate).

use std::fmt::Write as _;

use crate::results::*;
use crate::runner::{Cell, Placement, Target};

const COLORS: [(&str, &str); 4] = [
    ("direct", "#9e9e9e"),
    ("duplex", "#1f77b4"),
    ("nginx", "#2ca02c"),
    ("haproxy", "#ff7f0e"),
];

fn color(t: Target) -> &'static str {
    COLORS
        .iter()
        .find(|c| c.0 == t.name())
        .map_or("#000", |c| c.1)
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Panels of the chart: one figure each, both placements, every target.
const PANELS: &[(&str, &str, &str, &str)] = &[
    (
        "latency",
        "p50_us",
        "64 B ping-pong p50 (µs, lower is better)",
        "µs",
    ),
    (
        "throughput-64",
        "msgs_per_s",
        "64 B messages/s, 100×8 (higher is better)",
        "",
    ),
    (
        "throughput-16k",
        "msgs_per_s",
        "16 KiB messages/s, 100×8 (higher is better)",
        "",
    ),
    (
        "hold",
        "rss_per_tunnel_b",
        "RSS per idle tunnel (lower is better)",
        "B",
    ),
    (
        "handshakes",
        "per_s",
        "WebSocket handshakes/s (higher is better)",
        "",
    ),
    (
        "http",
        "req_per_s",
        "HTTP keep-alive requests/s (higher is better)",
        "",
    ),
];

/// The chart: a grid of bar panels, drawn from the medians.
pub fn chart_svg(
    cells: &[Cell],
    targets: &[Target],
    placements: &[Placement],
    title: &str,
) -> String {
    let (pw, ph) = (430.0, 250.0);
    let cols = 2;
    let rows = PANELS.len().div_ceil(cols);
    let (top, left) = (70.0, 10.0);
    let width = left * 2.0 + pw * cols as f64;
    let height = top + ph * rows as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    // Legend.
    let mut x = width / 2.0 - 45.0 * targets.len() as f64;
    for &t in targets {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="38" width="12" height="12" fill="{}"/><text x="{}" y="49">{t}</text>"#,
            color(t),
            x + 16.0
        );
        x += 90.0;
    }
    for (i, &(sc, key, ptitle, unit)) in PANELS.iter().enumerate() {
        let ox = left + pw * (i % cols) as f64;
        let oy = top + ph * (i / cols) as f64;
        let _ = writeln!(
            s,
            r##"<g transform="translate({ox},{oy})"><rect x="4" y="0" width="{}" height="{}" fill="none" stroke="#ddd"/>"##,
            pw - 8.0,
            ph - 10.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" font-weight="bold" text-anchor="middle">{}</text>"#,
            pw / 2.0,
            esc(ptitle)
        );
        let vals: Vec<Vec<Option<f64>>> = placements
            .iter()
            .map(|&p| targets.iter().map(|&t| med(cells, p, t, sc, key)).collect())
            .collect();
        let max = vals
            .iter()
            .flatten()
            .flatten()
            .fold(0.0f64, |a, &b| a.max(b));
        let (base_y, plot_h) = (ph - 40.0, ph - 90.0);
        let group_w = (pw - 40.0) / placements.len().max(1) as f64;
        let bar_w = (group_w - 30.0) / targets.len().max(1) as f64;
        let _ = writeln!(
            s,
            "<line x1=\"20\" y1=\"{base_y}\" x2=\"{}\" y2=\"{base_y}\" stroke=\"#333\"/>",
            pw - 20.0
        );
        for (gi, &p) in placements.iter().enumerate() {
            let gx = 20.0 + group_w * gi as f64 + 15.0;
            for (ti, &t) in targets.iter().enumerate() {
                let bx = gx + bar_w * ti as f64;
                let cx = bx + bar_w / 2.0;
                match vals[gi][ti] {
                    Some(v) if max > 0.0 => {
                        let h = (v / max * plot_h).max(1.0);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{t} {}: {}</title></rect>"#,
                            bx + 2.0,
                            base_y - h,
                            bar_w - 4.0,
                            color(t),
                            p.name(),
                            fmt_value(v, unit)
                        );
                        let _ = writeln!(
                            s,
                            r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                            base_y - h - 4.0,
                            esc(&short(v, unit))
                        );
                    }
                    _ => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#999">n/a</text>"##,
                            base_y - 4.0
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + bar_w * targets.len() as f64 / 2.0,
                base_y + 18.0,
                p.short()
            );
        }
        s.push_str("</g>\n");
    }
    s.push_str("</svg>\n");
    s
}
