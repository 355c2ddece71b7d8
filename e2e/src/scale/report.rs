//! The scale harness's tables (Markdown, for BENCHMARKS.md) and plot (SVG; the bench script
//! renders it to PNG with headless Chromium).

use anyhow::Result;

use super::driver::Row;
use super::{BUDGET_MS, percentile};

/// The three tables' heads.
pub const HEADS: [&str; 3] = [
    "| nodes | found 15 s after every node announced | found 45 s after | every announcement ended after | found then | a new key found by every other node after |\n|---|---|---|---|---|---|",
    "| nodes | start-up / announcing | connections per node during lookups (mean / max) | after every node fetched a blob | at rest (35 s later) | routing-table entries per node | provider records per node | descriptors per node | memory per agent | announcements retried / given up | providers without an address |\n|---|---|---|---|---|---|---|---|---|---|---|",
    "| nodes | upstream GETs when every node asks for a new blob at once | after killing 10%: live holders found | dead holders still offered 10 s / 40 s after | upstream GETs for a new blob after killing 10% |\n|---|---|---|---|---|",
];

/// A lookup cell: found share, share within the budget, latencies.
pub fn ms_cell(found: f64, within: f64, ms: &[f64]) -> String {
    format!(
        "{found:>5.1}% ({within:.1}% in {BUDGET_MS} ms; p50 {:.1}, p99 {:.1}, max {:.1} ms)",
        percentile(ms, 0.5),
        percentile(ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    )
}

/// The three tables for `rows`.
pub fn tables(rows: &[Row]) -> String {
    let tables: Vec<String> = (0..3)
        .map(|t| {
            let body: Vec<&str> = rows.iter().map(|r| r.lines[t].as_str()).collect();
            format!("{}\n{}\n", HEADS[t], body.join("\n"))
        })
        .collect();
    tables.join("\n")
}

/// Found share (left) and p99 lookup latency (right) against node count, at both moments.
pub fn plot(rows: &[Row], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let series = |value: fn(&Row, usize) -> f64| {
        [0, 1, 2].map(|m| {
            rows.iter()
                .filter(|r| value(r, m).is_finite())
                .map(|r| (r.nodes as f64, value(r, m)))
                .collect::<Vec<_>>()
        })
    };
    let max_ms = rows
        .iter()
        .flat_map(|r| r.p99_ms)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    panel(
        &left,
        rows,
        "keys found (every node announcing at once)",
        ("% of lookups finding the holder", 105.0),
        series(|r, m| r.found[m]),
        SeriesLabelPosition::LowerLeft,
    )?;
    panel(
        &right,
        rows,
        "lookup latency to the holder, p99",
        ("ms", max_ms),
        series(|r, m| r.p99_ms[m]),
        SeriesLabelPosition::UpperLeft,
    )?;
    root.present()?;
    Ok(())
}

/// One chart: a line per moment after the announcement, against node count.
fn panel(
    area: &plotters::drawing::DrawingArea<
        plotters::backend::SVGBackend<'_>,
        plotters::coord::Shift,
    >,
    rows: &[Row],
    caption: &str,
    (y_desc, y_max): (&str, f64),
    lines: [Vec<(f64, f64)>; 3],
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<()> {
    use plotters::prelude::*;
    let max_n = rows.iter().map(|r| r.nodes).max().unwrap_or(10) as f64 * 1.05;
    let colors = [
        RGBColor(230, 120, 20),
        RGBColor(30, 110, 200),
        RGBColor(40, 160, 70),
    ];
    let labels = ["15 s after", "45 s after", "once announced"];
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_n, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc(y_desc)
        .draw()?;
    for ((points, color), label) in lines.into_iter().zip(colors).zip(labels) {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
