//! Figures of a run, per MoE block: its metrics over steps (one small chart per metric, a band
//! from each step bin's minimum to its maximum, the alerts' steps shaded) and an expert × step
//! heatmap of the experts' shares of the kept tokens (each bin's mean), from the decimated
//! [`BlockSeries`] the run's analysis streams into.

use std::fmt::Write as _;

use super::dataset::{PAD, open, text};
use super::palette::sequential;
use super::svg::{esc, hex};
use crate::run::alerts::{Alert, AlertKind};
use crate::run::series::{BlockSeries, METRICS};

fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The metrics of one block over steps: one chart per metric, a band from each bin's minimum
/// to its maximum, the alerts' step ranges shaded.
pub fn metrics_figure(model: &str, series: &BlockSeries, alerts: &[Alert]) -> String {
    let (w, chart_h) = (760.0f32, 90.0f32);
    let left = 110.0;
    let plot_w = w - left - PAD;
    let h = PAD + 30.0 + METRICS.len() as f32 * (chart_h + 26.0) + 30.0;
    let mut s = String::new();
    let (first, last) = series.step_range();
    open(
        &mut s,
        w,
        h,
        &format!(
            "{model} · routing over training · MoE block {} · steps {first}–{last}",
            series.block
        ),
    );
    let span = (last - first).max(1) as f32;
    let x_of = |step: i64| left + plot_w * (step - first) as f32 / span;
    for (k, name) in METRICS.iter().enumerate() {
        let y0 = PAD + 40.0 + k as f32 * (chart_h + 26.0);
        let known: Vec<(f64, f64)> = series
            .bins()
            .iter()
            .map(|b| b.metrics[k])
            .filter(|m| m.0.is_finite())
            .collect();
        let lo = known
            .iter()
            .map(|m| m.0)
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        let hi = known.iter().map(|m| m.1).fold(f64::NEG_INFINITY, f64::max);
        let hi = if hi.is_finite() && hi > lo {
            hi
        } else {
            lo + 1.0
        };
        let y_of = |v: f64| y0 + chart_h - chart_h * ((v - lo) / (hi - lo)) as f32;
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{chart_h}" fill="#f7f7f7" stroke="#cccccc"/>"##
        );
        // Alerts as bands in three rows along the chart's top: collapse, dead experts, drops.
        for a in alerts {
            let (x1, x2) = (
                x_of(a.first_step),
                x_of(a.last_step).max(x_of(a.first_step) + 1.0),
            );
            let (row, colour) = match a.kind {
                AlertKind::Collapse => (0.0, "#d62728"),
                AlertKind::DeadExperts => (1.0, "#9467bd"),
                AlertKind::Drops => (2.0, "#ff7f0e"),
            };
            let _ = writeln!(
                s,
                r##"<rect class="alert" data-kind="{}" x="{x1:.1}" y="{:.1}" width="{:.1}" height="4" fill="{colour}"><title>{}</title></rect>"##,
                a.kind.name(),
                y0 + 1.0 + row * 5.0,
                x2 - x1,
                esc(&a.detail)
            );
        }
        text(&mut s, left - 8.0, y0 + 14.0, 12.0, "end", name);
        text(&mut s, left - 8.0, y0 + chart_h, 10.0, "end", &short(lo));
        text(&mut s, left - 8.0, y0 + 28.0, 10.0, "end", &short(hi));
        if known.is_empty() {
            text(
                &mut s,
                left + plot_w / 2.0,
                y0 + chart_h / 2.0,
                11.0,
                "middle",
                "not logged",
            );
            continue;
        }
        // The band (min to max per bin) and the line through the maxima.
        let mut top = String::new();
        let mut bottom = Vec::new();
        for b in series.bins().iter().filter(|b| b.metrics[k].0.is_finite()) {
            let x = (x_of(b.first) + x_of(b.last)) / 2.0;
            let _ = write!(top, "{x:.1},{:.1} ", y_of(b.metrics[k].1));
            bottom.push(format!("{x:.1},{:.1}", y_of(b.metrics[k].0)));
        }
        bottom.reverse();
        let _ = writeln!(
            s,
            r##"<polygon class="band" points="{top}{}" fill="#1f77b4" fill-opacity="0.25" stroke="#1f77b4" stroke-width="1"/>"##,
            bottom.join(" ")
        );
    }
    let y = h - 14.0;
    let _ = writeln!(
        s,
        r##"<text x="{PAD}" y="{:.1}" font-size="10" fill="#555555">alerts along each chart's top: <tspan fill="#d62728">collapse</tspan> · <tspan fill="#9467bd">dead experts</tspan> · <tspan fill="#ff7f0e">drops</tspan>; each band spans a step bin's minimum to maximum</text>"##,
        h - 30.0
    );
    text(&mut s, left, y, 11.0, "start", &first.to_string());
    text(&mut s, left + plot_w, y, 11.0, "end", &last.to_string());
    text(
        &mut s,
        left + plot_w / 2.0,
        y,
        11.0,
        "middle",
        "training step",
    );
    s.push_str("</svg>\n");
    s
}

/// Heatmaps with more cells than this are embedded as an image rather than drawn cell by cell.
const MAX_VECTOR_CELLS: usize = 20_000;

/// The experts' shares of the block's kept tokens over steps (each bin's mean share), one row
/// per expert.
pub fn load_heatmap(model: &str, series: &BlockSeries) -> String {
    let e = series.experts();
    let cols = series.bins().len().max(1);
    let left = 70.0;
    let plot_w = 760.0f32.max(cols as f32 * 0.75).min(1600.0);
    let cell_w = plot_w / cols as f32;
    let cell_h = (360.0 / e.max(1) as f32).clamp(3.0, 24.0);
    let w = left + plot_w + PAD;
    let h = PAD + 40.0 + cell_h * e as f32 + 50.0;
    let (first, last) = series.step_range();
    let mut s = String::new();
    open(
        &mut s,
        w,
        h,
        &format!(
            "{model} · expert share of kept tokens · MoE block {} · steps {first}–{last}",
            series.block
        ),
    );
    let y0 = PAD + 40.0;
    let vmax = series
        .bins()
        .iter()
        .flat_map(|b| b.shares.iter().map(move |v| v / b.rows.max(1) as f64))
        .fold(0.0f64, f64::max)
        .max(1e-12);
    for j in 0..e {
        let y = y0 + j as f32 * cell_h;
        if e <= 16 || j % 4 == 0 {
            text(
                &mut s,
                left - 6.0,
                y + cell_h * 0.5 + 4.0,
                10.0,
                "end",
                &format!("expert {j}"),
            );
        }
    }
    let share = |b: &crate::run::series::Bin, j: usize| b.shares[j] / b.rows.max(1) as f64;
    if cols * e <= MAX_VECTOR_CELLS {
        // One rectangle per cell, each with its numbers on hover.
        for j in 0..e {
            let y = y0 + j as f32 * cell_h;
            for (c, b) in series.bins().iter().enumerate() {
                let v = share(b, j);
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{cell_h:.1}" fill="{}"><title>expert {j}, steps {}–{}: {:.1}% of the kept tokens</title></rect>"##,
                    left + c as f32 * cell_w,
                    cell_w + 0.05,
                    hex(sequential((v / vmax) as f32)),
                    b.first,
                    b.last,
                    100.0 * v
                );
            }
        }
    } else {
        // A long run's heatmap as one embedded image (tens of thousands of rectangles would
        // make the SVG slow to open and to render).
        let img = image::RgbImage::from_fn(cols as u32, e as u32, |c, j| {
            let v = series
                .bins()
                .get(c as usize)
                .map_or(0.0, |b| share(b, j as usize));
            image::Rgb(sequential((v / vmax) as f32))
        });
        let mut png = std::io::Cursor::new(Vec::new());
        if image::DynamicImage::ImageRgb8(img)
            .write_to(&mut png, image::ImageFormat::Png)
            .is_ok()
        {
            let _ = writeln!(
                s,
                r#"<image x="{left}" y="{y0}" width="{plot_w:.1}" height="{:.1}" preserveAspectRatio="none" style="image-rendering:pixelated" href="data:image/png;base64,{}"><title>expert share of the kept tokens, {} step bins x {e} experts</title></image>"#,
                cell_h * e as f32,
                super::svg::base64(&png.into_inner()),
                cols
            );
        }
    }
    let y = y0 + cell_h * e as f32 + 16.0;
    text(&mut s, left, y, 11.0, "start", &first.to_string());
    text(&mut s, left + plot_w, y, 11.0, "end", &last.to_string());
    text(
        &mut s,
        left + plot_w / 2.0,
        y,
        11.0,
        "middle",
        &format!(
            "training step (darkest {:.1}%; an even load is {:.1}%)",
            100.0 * vmax,
            100.0 / e.max(1) as f64
        ),
    );
    s.push_str("</svg>\n");
    s
}

/// Analyses `run` into `dir`: the tables of [`crate::run::report::write_tables`] and, per
/// block, `run_block{B}_metrics` and `run_block{B}_load` as SVG and PNG; staged beside `dir` and
/// moved in only when everything is written. Returns the analysis and the final paths.
pub fn write_run_analysis(
    run: &crate::run::RunFile,
    rules: crate::run::alerts::AlertRules,
    dir: &std::path::Path,
    png_width: u32,
) -> Result<(crate::run::report::RunAnalysis, Vec<std::path::PathBuf>), String> {
    let staged =
        crate::files::StagedDir::new(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let analysis =
        crate::run::report::write_tables(run, rules, staged.path()).map_err(|e| e.to_string())?;
    for s in &analysis.series {
        let alerts: Vec<Alert> = analysis
            .alerts
            .iter()
            .filter(|a| a.block == s.block)
            .cloned()
            .collect();
        for (stem, svg) in [
            (
                format!("run_block{}_metrics", s.block),
                metrics_figure(&analysis.model, s, &alerts),
            ),
            (
                format!("run_block{}_load", s.block),
                load_heatmap(&analysis.model, s),
            ),
        ] {
            let svg_path = staged.path().join(format!("{stem}.svg"));
            crate::tensor_io::write_atomic(&svg_path, svg.as_bytes()).map_err(|e| e.to_string())?;
            let png = super::raster::svg_to_png(&svg, png_width)
                .map_err(|e| format!("{stem}.png: {e}"))?;
            crate::tensor_io::write_atomic(&staged.path().join(format!("{stem}.png")), &png)
                .map_err(|e| e.to_string())?;
        }
    }
    let files = staged
        .commit()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok((analysis, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_valid_svg_and_say_what_was_not_logged() {
        let mut s = BlockSeries::new(3, 2);
        for step in 0..50 {
            s.push(step, [0.1, 0.0, 0.0, f64::NAN, 0.0, 0.0], &[0.5, 0.5]);
        }
        let svg = metrics_figure("m", &s, &[]);
        assert!(svg.contains("not logged"), "router entropy was never known");
        roxmltree::Document::parse(&svg).unwrap();
        roxmltree::Document::parse(&load_heatmap("m", &s)).unwrap();
    }
}
