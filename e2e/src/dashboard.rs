//! The chart's Grafana dashboard (`charts/mirrorlet/dashboards/mirrorlet.json`) read as
//! panels and queries, its Grafana variables expanded for Prometheus, and a static preview
//! of its panels drawn from query results (an HTML page with SVG charts, laid out on the
//! dashboard's own grid) for the README's picture: Grafana itself is not available here.

use std::fmt::Write as _;

use serde_json::Value;

use crate::prometheus::Series;

/// One panel of the dashboard.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Its title.
    pub title: String,
    /// `row`, `stat` or `timeseries`.
    pub kind: String,
    /// Grafana's unit (`percentunit`, `Bps`, `reqps`, `ops`, `s`, `short`).
    pub unit: String,
    /// Position and size on Grafana's 24-column grid.
    pub grid: (u32, u32, u32, u32),
    /// Its queries, each with its legend format.
    pub targets: Vec<(String, String)>,
}

/// The chart's dashboard, parsed.
pub fn load() -> anyhow::Result<Value> {
    let path = crate::deps::workspace().join("charts/mirrorlet/dashboards/mirrorlet.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The dashboard's panels, in order.
pub fn panels(dashboard: &Value) -> Vec<Panel> {
    let n = |v: &Value| u32::try_from(v.as_u64().unwrap_or(0)).unwrap_or(0);
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| Panel {
            title: p["title"].as_str().unwrap_or_default().to_owned(),
            kind: p["type"].as_str().unwrap_or_default().to_owned(),
            unit: p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or("short")
                .to_owned(),
            grid: (
                n(&p["gridPos"]["x"]),
                n(&p["gridPos"]["y"]),
                n(&p["gridPos"]["w"]),
                n(&p["gridPos"]["h"]),
            ),
            targets: p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["expr"].as_str().unwrap_or_default().to_owned(),
                        t["legendFormat"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// `expr` with Grafana's variables replaced as Grafana would for "all nodes": `$instance`
/// matches every node, `$__rate_interval` is `rate_interval` and `$__range` the whole
/// time range shown, both in seconds.
pub fn expand(expr: &str, rate_interval: u64, range: u64) -> String {
    expr.replace("$__rate_interval", &format!("{rate_interval}s"))
        .replace("$__range", &format!("{range}s"))
        .replace("$instance", ".*")
}

/// A legend format (`{{registry}} {{kind}}`) filled from a series' labels.
pub fn legend(format: &str, series: &Series) -> String {
    let mut out = format.to_owned();
    for (k, v) in &series.labels {
        out = out.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or_default());
    }
    out
}

/// A value in a panel's unit.
pub fn show(unit: &str, v: f64) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    let bytes = |v: f64| {
        let units = ["B", "KiB", "MiB", "GiB"];
        let mut v = v;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < units.len() {
            v /= 1024.0;
            i += 1;
        }
        format!("{v:.1} {}", units[i])
    };
    match unit {
        "percentunit" => format!("{:.0}%", v * 100.0),
        "Bps" => format!("{}/s", bytes(v)),
        "reqps" => format!("{v:.2} req/s"),
        "ops" => format!("{v:.2}/s"),
        "s" if v < 1.0 => format!("{:.1} ms", v * 1000.0),
        "s" => format!("{v:.2} s"),
        _ if v.fract() == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

const COLORS: [&str; 8] = [
    "#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#b877d9", "#f2495c", "#8ab8ff", "#37872d",
];
/// Grafana's grid: 24 columns over the page width, 30 pixels per height unit.
const WIDTH: f64 = 1600.0;
const ROW: f64 = 30.0;

/// The preview page: `results[i][j]` are panel `i`'s target `j`'s series over
/// `start..end` (unix seconds).
pub fn preview(
    title: &str,
    panels: &[Panel],
    results: &[Vec<Vec<Series>>],
    start: f64,
    end: f64,
) -> String {
    let bottom = panels
        .iter()
        .map(|p| p.grid.1 + p.grid.3)
        .max()
        .unwrap_or(0);
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
body{{margin:0;background:#111217;color:#ccccdc;font:13px sans-serif}}\
h1{{font-size:18px;font-weight:500;margin:0;padding:10px 12px}}\
.note{{color:#8e8e9e;font-size:12px;padding:0 12px 8px}}\
.grid{{position:relative;width:{WIDTH}px;height:{h}px}}\
.p{{position:absolute;box-sizing:border-box;background:#181b1f;border:1px solid #2b2e33;border-radius:2px;padding:6px 8px;overflow:hidden}}\
.p h2{{font-size:13px;font-weight:500;margin:0 0 4px}}\
.row{{position:absolute;font-size:15px;font-weight:500;padding:6px 8px}}\
.stat{{font-size:40px;font-weight:500;color:#73bf69;text-align:center;margin-top:30px}}\
.lg{{font-size:11px;white-space:nowrap}} .lg span{{margin-right:10px}}\
.ax{{fill:#8e8e9e;font-size:10px}}</style></head><body><h1>{title}</h1>\
<div class=\"note\">Every node, the last {span:.0} s of a test cluster, queried from Prometheus; \
drawn by the end-to-end suite from the dashboard's own queries and layout.</div>\
<div class=\"grid\">",
        h = f64::from(bottom) * ROW,
        span = end - start,
    );
    for (panel, series) in panels.iter().zip(results) {
        let (x, y, w, h) = panel.grid;
        let (left, top) = (f64::from(x) * WIDTH / 24.0, f64::from(y) * ROW);
        let (pw, ph) = (f64::from(w) * WIDTH / 24.0 - 4.0, f64::from(h) * ROW - 4.0);
        if panel.kind == "row" {
            let _ = write!(
                html,
                "<div class=\"row\" style=\"left:{left}px;top:{top}px\">{}</div>",
                panel.title
            );
            continue;
        }
        let _ = write!(
            html,
            "<div class=\"p\" style=\"left:{left}px;top:{top}px;width:{pw}px;height:{ph}px\"><h2>{}</h2>",
            panel.title
        );
        let flat: Vec<(String, &Series)> = panel
            .targets
            .iter()
            .zip(series)
            .flat_map(|((_, format), list)| list.iter().map(move |s| (legend(format, s), s)))
            .collect();
        if panel.kind == "stat" {
            let last = flat
                .first()
                .and_then(|(_, s)| s.points.iter().rev().find(|p| p.1.is_finite()))
                .map_or(f64::NAN, |p| p.1);
            let _ = write!(
                html,
                "<div class=\"stat\">{}</div>",
                show(&panel.unit, last)
            );
        } else {
            chart(
                &mut html,
                &panel.unit,
                &flat,
                (start, end),
                (pw - 16.0, ph - 58.0),
            );
        }
        html.push_str("</div>");
    }
    html.push_str("</div></body></html>");
    html
}

/// An SVG line chart of `series` (legend, points) in a `size` box, with its legend.
fn chart(
    html: &mut String,
    unit: &str,
    series: &[(String, &Series)],
    (start, end): (f64, f64),
    (w, h): (f64, f64),
) {
    let max = series
        .iter()
        .flat_map(|(_, s)| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let axis = 58.0;
    let plot = w - axis;
    let _ = write!(
        html,
        "<svg width=\"{w}\" height=\"{h}\"><line x1=\"{axis}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#2b2e33\"/>\
<text class=\"ax\" x=\"0\" y=\"10\">{}</text><text class=\"ax\" x=\"0\" y=\"{h}\">0</text>",
        show(unit, top)
    );
    for (i, (_, s)) in series.iter().enumerate() {
        let mut points = String::new();
        for &(t, v) in &s.points {
            if !v.is_finite() {
                continue;
            }
            let px = axis + (t - start) / (end - start).max(1.0) * plot;
            let py = h - v / top * (h - 2.0);
            let _ = write!(points, "{px:.1},{py:.1} ");
        }
        let _ = write!(
            html,
            "<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"{}\" points=\"{points}\"/>",
            COLORS[i % COLORS.len()]
        );
    }
    html.push_str("</svg><div class=\"lg\">");
    for (i, (name, _)) in series.iter().enumerate().take(8) {
        let _ = write!(
            html,
            "<span style=\"color:{}\">&#9644;</span>{name} ",
            COLORS[i % COLORS.len()]
        );
    }
    html.push_str("</div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_expanded_and_legends_filled() {
        assert_eq!(
            expand(
                "sum(rate(x{instance=~\"$instance\"}[$__rate_interval])) + increase(y[$__range])",
                5,
                90
            ),
            "sum(rate(x{instance=~\".*\"}[5s])) + increase(y[90s])"
        );
        let s = Series {
            labels: serde_json::from_str(r#"{"registry":"docker.io","kind":"blob"}"#)
                .expect("labels"),
            points: vec![],
        };
        assert_eq!(legend("{{registry}} {{kind}}", &s), "docker.io blob");
        assert_eq!(show("percentunit", 0.5), "50%");
        assert_eq!(show("Bps", 2048.0), "2.0 KiB/s");
        assert_eq!(show("s", 0.0123), "12.3 ms");
        assert_eq!(show("short", 3.0), "3");
        assert_eq!(show("short", f64::NAN), "-");
    }
}
