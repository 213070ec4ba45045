//! Dataset-level figures of an [`Analysis`], as SVG (PNG through [`super::raster`]): the
//! class × expert heatmap, per-expert position maps, drop rates by class and by position, load
//! box plots, the expert atlas contact sheet and the router summary table. With several routers
//! each figure puts one panel per router side by side.

use std::fmt::Write as _;
use std::io::Cursor;

use super::palette::{DROPPED, Palette, sequential};
use super::svg::{base64, esc, hex};
use crate::analysis::{Analysis, LayerAnalysis, RouterRun};

pub(super) const PAD: f32 = 16.0;
const FONT: &str = r#"font-family="Ubuntu, Helvetica, Arial, sans-serif""#;

/// Starts the document, widened to fit the title.
pub(super) fn open(s: &mut String, w: f32, h: f32, title: &str) {
    let w = w.max(PAD * 2.0 + title.chars().count() as f32 * 7.6).ceil();
    let h = h.ceil();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{w}" height="{h}" viewBox="0 0 {w} {h}" {FONT}>"#
    );
    let _ = writeln!(s, "<title>{}</title>", esc(title));
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{PAD}" y="{}" font-size="14" fill="#111111">{}</text>"##,
        PAD + 12.0,
        esc(title)
    );
}

pub(super) fn text(s: &mut String, x: f32, y: f32, size: f32, anchor: &str, t: &str) {
    let _ = writeln!(
        s,
        r##"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" fill="#111111">{}</text>"##,
        esc(t)
    );
}

/// The layer `l` of every run.
fn layers(a: &Analysis, l: usize) -> Vec<(&RouterRun, &LayerAnalysis)> {
    a.runs
        .iter()
        .filter_map(|r| r.layers.get(l).map(|la| (r, la)))
        .collect()
}

/// The dataset as a title names it: the folder's (or file's) own name, not its full path (the
/// JSON keeps the path).
pub fn data_name(a: &Analysis) -> String {
    let p = std::path::Path::new(&a.data);
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| a.data.clone())
}

fn title(a: &Analysis, what: &str, block: usize) -> String {
    format!(
        "{} · {what} · MoE block {block} · {} images of {}{}",
        a.model,
        a.images,
        data_name(a),
        if a.partial { " (partial)" } else { "" }
    )
}

/// Class × expert usage, each row normalised to the class's assignments; every cell's
/// `<title>` gives its count.
pub fn class_expert_heatmap(a: &Analysis, l: usize) -> String {
    let panels = layers(a, l);
    let e = panels.first().map_or(0, |p| p.1.stats.num_experts);
    let c = a.classes.len();
    let label_w = 16.0
        + 7.0
            * a.classes
                .iter()
                .map(|n| n.chars().count())
                .max()
                .unwrap_or(4) as f32;
    let cell = (480.0 / e.max(1) as f32).clamp(10.0, 36.0);
    let pw = label_w + cell * e as f32 + PAD;
    let ph = 40.0 + cell * c as f32 + 40.0;
    let width = (PAD + panels.len() as f32 * pw).max(560.0);
    let height = PAD + 30.0 + ph + 30.0;
    let mut s = String::new();
    let block = panels.first().map_or(0, |p| p.1.stats.block);
    open(
        &mut s,
        width,
        height,
        &title(a, "class × expert usage", block),
    );
    let mut vmax: f64 = 0.0;
    for (_, la) in &panels {
        for row in &la.stats.class_expert_usage {
            vmax = row.iter().copied().fold(vmax, f64::max);
        }
    }
    for (k, (run, la)) in panels.iter().enumerate() {
        let x0 = PAD + k as f32 * pw;
        let y0 = PAD + 36.0;
        text(&mut s, x0, y0 + 8.0, 12.0, "start", &run.settings.label());
        let gx = x0 + label_w;
        let gy = y0 + 36.0;
        for j in 0..e {
            if e <= 16 || j % 4 == 0 {
                text(
                    &mut s,
                    gx + (j as f32 + 0.5) * cell,
                    gy - 4.0,
                    10.0,
                    "middle",
                    &j.to_string(),
                );
            }
        }
        for (ci, name) in a.classes.iter().enumerate() {
            let y = gy + ci as f32 * cell;
            text(&mut s, gx - 6.0, y + cell * 0.5 + 4.0, 11.0, "end", name);
            for j in 0..e {
                let share = la.stats.class_expert_usage[ci][j];
                let count = la.stats.tokens_per_class_expert[ci][j];
                let col = sequential((share / vmax.max(1e-12)) as f32);
                let _ = writeln!(
                    s,
                    r##"<rect class="cell" data-class="{ci}" data-expert="{j}" x="{:.1}" y="{y:.1}" width="{cell:.1}" height="{cell:.1}" fill="{}" stroke="#ffffff" stroke-width="0.5"><title>{}, expert {j}: {count:.0} tokens ({:.1}% of the class)</title></rect>"##,
                    gx + j as f32 * cell,
                    hex(col),
                    esc(name),
                    100.0 * share
                );
            }
        }
        text(
            &mut s,
            gx,
            gy + c as f32 * cell + 16.0,
            11.0,
            "start",
            &format!("expert (rows sum to 100%; darkest {:.1}%)", 100.0 * vmax),
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Per expert, the patch grid coloured by how often each position goes to it (share of the
/// images; Soft MoE: mean combine mass). One row of maps per router.
pub fn position_maps(a: &Analysis, l: usize) -> String {
    let panels = layers(a, l);
    let e = panels.first().map_or(0, |p| p.1.stats.num_experts);
    let [gr, gc] = a.grid;
    let per_row = e.min(8);
    let side = 72.0;
    let map_h = side * gr as f32 / gc.max(1) as f32;
    let rows = e.div_ceil(per_row.max(1));
    let block_h = 22.0 + rows as f32 * (map_h + 22.0);
    let width = (PAD + per_row as f32 * (side + 10.0) + PAD).max(560.0);
    let height = PAD + 30.0 + panels.len() as f32 * (block_h + 10.0) + 30.0;
    let mut s = String::new();
    let block = panels.first().map_or(0, |p| p.1.stats.block);
    open(
        &mut s,
        width,
        height,
        &title(a, "where each expert's tokens are", block),
    );
    let cls = a.prefix_tokens;
    for (k, (run, la)) in panels.iter().enumerate() {
        let y0 = PAD + 36.0 + k as f32 * (block_h + 10.0);
        text(&mut s, PAD, y0 + 8.0, 12.0, "start", &run.settings.label());
        let images = la.stats.images.max(1) as f64;
        let vmax = la.stats.tokens_per_position_expert[cls..]
            .iter()
            .flatten()
            .fold(0.0f64, |m, &v| m.max(v / images))
            .max(1e-12);
        text(
            &mut s,
            PAD + 260.0,
            y0 + 8.0,
            11.0,
            "start",
            &format!("darkest: {:.1}% of images", 100.0 * vmax),
        );
        for j in 0..e {
            let x = PAD + (j % per_row) as f32 * (side + 10.0);
            let y = y0 + 22.0 + (j / per_row) as f32 * (map_h + 22.0);
            let _ = writeln!(s, r#"<g class="position-map" data-expert="{j}">"#);
            let (cw, ch) = (side / gc.max(1) as f32, map_h / gr.max(1) as f32);
            for p in 0..gr * gc {
                let v = la.stats.tokens_per_position_expert[p + cls][j] / images;
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"/>"##,
                    x + (p % gc) as f32 * cw,
                    y + (p / gc) as f32 * ch,
                    cw + 0.05,
                    ch + 0.05,
                    hex(sequential((v / vmax) as f32))
                );
            }
            let _ = writeln!(
                s,
                r##"<rect x="{x}" y="{y}" width="{side}" height="{map_h}" fill="none" stroke="#888888" stroke-width="0.5"/></g>"##
            );
            text(
                &mut s,
                x,
                y + map_h + 12.0,
                10.0,
                "start",
                &format!("expert {j}"),
            );
        }
    }
    text(
        &mut s,
        PAD,
        height - PAD,
        11.0,
        "start",
        "share of images whose patch there goes to the expert (Soft MoE: mean combine mass); white: never",
    );
    s.push_str("</svg>\n");
    s
}

/// Drop rate by class (bars) and by position (a map), per router.
pub fn drop_rates(a: &Analysis, l: usize) -> String {
    let panels = layers(a, l);
    let c = a.classes.len();
    let [gr, gc] = a.grid;
    let label_w = 16.0
        + 7.0
            * a.classes
                .iter()
                .map(|n| n.chars().count())
                .max()
                .unwrap_or(4) as f32;
    let bar_w = 200.0;
    let map_side = 160.0;
    let map_h = map_side * gr as f32 / gc.max(1) as f32;
    let pw = label_w + bar_w + 70.0 + map_side + PAD * 2.0;
    let ph = 30.0 + (c as f32 * 16.0).max(map_h) + 40.0;
    let width = (PAD + panels.len() as f32 * pw).max(560.0);
    let height = PAD + 36.0 + ph;
    let mut s = String::new();
    let block = panels.first().map_or(0, |p| p.1.stats.block);
    open(&mut s, width, height, &title(a, "dropped tokens", block));
    let cls = a.prefix_tokens;
    for (k, (run, la)) in panels.iter().enumerate() {
        let st = &la.stats;
        let x0 = PAD + k as f32 * pw;
        let y0 = PAD + 36.0;
        text(
            &mut s,
            x0,
            y0 + 8.0,
            12.0,
            "start",
            &format!(
                "{} · {:.2}% dropped",
                run.settings.label(),
                100.0 * st.dropped_token_rate
            ),
        );
        let rates: Vec<f64> = (0..c)
            .map(|ci| st.dropped_per_class[ci] as f64 / st.tokens_per_class[ci].max(1) as f64)
            .collect();
        let rmax = rates.iter().copied().fold(0.0f64, f64::max).max(1e-9);
        for (ci, name) in a.classes.iter().enumerate() {
            let y = y0 + 22.0 + ci as f32 * 16.0;
            text(&mut s, x0 + label_w - 6.0, y + 11.0, 11.0, "end", name);
            let w = bar_w * (rates[ci] / rmax) as f32;
            let _ = writeln!(
                s,
                r##"<rect class="drop-bar" data-class="{ci}" x="{:.1}" y="{y:.1}" width="{w:.1}" height="12" fill="{}"><title>{}: {} of {} tokens dropped</title></rect>"##,
                x0 + label_w,
                hex(DROPPED),
                esc(name),
                st.dropped_per_class[ci],
                st.tokens_per_class[ci]
            );
            text(
                &mut s,
                x0 + label_w + w + 4.0,
                y + 10.5,
                10.0,
                "start",
                &format!("{:.2}%", 100.0 * rates[ci]),
            );
        }
        let mx = x0 + label_w + bar_w + 70.0;
        let my = y0 + 22.0;
        let pos_rate = |p: usize| st.dropped_per_position[p] as f64 / st.images.max(1) as f64;
        let pmax = (0..st.dropped_per_position.len())
            .map(pos_rate)
            .fold(0.0f64, f64::max);
        let (cw, ch) = (map_side / gc.max(1) as f32, map_h / gr.max(1) as f32);
        for p in 0..gr * gc {
            let v = pos_rate(p + cls);
            let _ = writeln!(
                s,
                r##"<rect class="drop-position" x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{}"><title>patch ({}, {}): dropped in {:.1}% of images</title></rect>"##,
                mx + (p % gc) as f32 * cw,
                my + (p / gc) as f32 * ch,
                cw + 0.05,
                ch + 0.05,
                hex(reds((v / pmax.max(1e-9)) as f32)),
                p / gc,
                p % gc,
                100.0 * v
            );
        }
        text(
            &mut s,
            mx,
            my + map_h + 14.0,
            10.0,
            "start",
            &format!("by position (darkest {:.1}% of images)", 100.0 * pmax),
        );
    }
    s.push_str("</svg>\n");
    s
}

/// White to the dropped red.
fn reds(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| (255.0 * (1.0 - v) + DROPPED[i] as f32 * v).round() as u8)
}

/// Tokens per image of every expert as box plots: box 25–75th percentile, line the median,
/// whiskers 5–95th, dots min and max; the dashed line is the capacity per image.
pub fn load_boxplots(a: &Analysis, l: usize, palette: Palette) -> String {
    let panels = layers(a, l);
    let e = panels.first().map_or(0, |p| p.1.stats.num_experts);
    let slot = (520.0 / e.max(1) as f32).clamp(8.0, 40.0);
    let plot_h = 200.0;
    let pw = 50.0 + slot * e as f32 + PAD * 2.0;
    let width = (PAD + panels.len() as f32 * pw).max(560.0);
    let height = PAD + 36.0 + 30.0 + plot_h + 50.0;
    let mut s = String::new();
    let block = panels.first().map_or(0, |p| p.1.stats.block);
    open(
        &mut s,
        width,
        height,
        &title(a, "tokens per image per expert", block),
    );
    let ymax = panels
        .iter()
        .flat_map(|(_, la)| la.stats.load_per_expert.iter().map(|x| x.max))
        .fold(1.0f64, f64::max)
        * 1.05;
    for (k, (run, la)) in panels.iter().enumerate() {
        let x0 = PAD + k as f32 * pw + 50.0;
        let y0 = PAD + 36.0 + 26.0;
        text(
            &mut s,
            x0 - 50.0,
            y0 - 14.0,
            12.0,
            "start",
            &run.settings.label(),
        );
        let y = |v: f64| y0 + plot_h - (v / ymax) as f32 * plot_h;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="#444444"/><line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#444444"/>"##,
            y0 + plot_h,
            y0 + plot_h,
            x0 + slot * e as f32,
            y0 + plot_h
        );
        for t in 0..=4 {
            let v = ymax * t as f64 / 4.0;
            text(
                &mut s,
                x0 - 4.0,
                y(v) + 4.0,
                10.0,
                "end",
                &format!("{v:.0}"),
            );
        }
        for (j, ld) in la.stats.load_per_expert.iter().enumerate() {
            let cx = x0 + (j as f32 + 0.5) * slot;
            let bw = slot * 0.6;
            let col = hex(palette.expert(j));
            let _ = writeln!(
                s,
                r##"<g class="box" data-expert="{j}"><title>expert {j}: mean {:.2}, std {:.2}, min {:.0}, p5 {:.1}, median {:.1}, p95 {:.1}, max {:.0}</title><line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#333333"/><rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{col}" stroke="#333333"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#111111" stroke-width="2"/><circle cx="{cx:.1}" cy="{:.1}" r="1.5" fill="#333333"/><circle cx="{cx:.1}" cy="{:.1}" r="1.5" fill="#333333"/></g>"##,
                ld.mean,
                ld.std,
                ld.min,
                ld.p5,
                ld.p50,
                ld.p95,
                ld.max,
                y(ld.p95),
                y(ld.p5),
                cx - bw / 2.0,
                y(ld.p75),
                (y(ld.p25) - y(ld.p75)).max(0.5),
                cx - bw / 2.0,
                y(ld.p50),
                cx + bw / 2.0,
                y(ld.p50),
                y(ld.min),
                y(ld.max)
            );
            if e <= 16 || j % 4 == 0 {
                text(
                    &mut s,
                    cx,
                    y0 + plot_h + 14.0,
                    10.0,
                    "middle",
                    &j.to_string(),
                );
            }
        }
        let cap = la.stats.capacity as f64 / run.settings.group_images.max(1) as f64;
        if run.settings.router != crate::routing::RouterKind::SoftMoe.cli_name() && cap <= ymax {
            let _ = writeln!(
                s,
                r##"<line class="capacity" x1="{x0}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#cc3311" stroke-dasharray="4 3"/>"##,
                y(cap),
                x0 + slot * e as f32,
                y(cap)
            );
        }
        text(
            &mut s,
            x0,
            y0 + plot_h + 30.0,
            11.0,
            "start",
            "expert (dashed: capacity per image)",
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Contact sheet of the atlas of layer `l` of run `r`: one row per expert, best patch first; each
/// patch's outline marks it inside its context.
pub fn atlas_sheet(a: &Analysis, r: usize, l: usize, palette: Palette) -> String {
    let Some(run) = a.runs.get(r) else {
        return String::new();
    };
    let Some(la) = run.layers.get(l) else {
        return String::new();
    };
    let tile = 64.0;
    let n = la.atlas.iter().map(|x| x.patches.len()).max().unwrap_or(0);
    let label_w = 90.0;
    let width = (PAD + label_w + n as f32 * (tile + 4.0) + PAD).max(560.0);
    let height = PAD + 36.0 + la.atlas.len() as f32 * (tile + 6.0) + PAD;
    let mut s = String::new();
    open(
        &mut s,
        width,
        height,
        &format!(
            "{} · {}",
            title(a, "expert atlas", la.stats.block),
            run.settings.label()
        ),
    );
    for (row, ex) in la.atlas.iter().enumerate() {
        let y = PAD + 36.0 + row as f32 * (tile + 6.0);
        let _ = writeln!(
            s,
            r##"<rect x="{PAD}" y="{:.1}" width="10" height="10" fill="{}"/>"##,
            y + tile / 2.0 - 8.0,
            hex(palette.expert(ex.expert))
        );
        text(
            &mut s,
            PAD + 14.0,
            y + tile / 2.0 + 1.0,
            11.0,
            "start",
            &format!("expert {}", ex.expert),
        );
        for (k, t) in ex.patches.iter().enumerate() {
            let x = PAD + label_w + k as f32 * (tile + 4.0);
            let _ = writeln!(
                s,
                r#"<g class="atlas-patch" data-expert="{}" data-image="{}" data-token="{}"><title>{} · patch ({}, {}) · score {:.4}</title>"#,
                ex.expert,
                t.image,
                t.token,
                esc(&t.name),
                t.row,
                t.col,
                t.score
            );
            match t.thumbnail.as_ref().and_then(png_bytes) {
                Some(png) => {
                    let _ = writeln!(
                        s,
                        r#"<image x="{x:.1}" y="{y:.1}" width="{tile}" height="{tile}" image-rendering="optimizeSpeed" xlink:href="data:image/png;base64,{}"/>"#,
                        base64(&png)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.1}" y="{y:.1}" width="{tile}" height="{tile}" fill="#dddddd"/>"##
                    );
                }
            }
            let [bx0, by0, bx1, by1] = t.patch_box;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#ffcc00" stroke-width="1.5"/></g>"##,
                x + bx0 * tile,
                y + by0 * tile,
                (bx1 - bx0) * tile,
                (by1 - by0) * tile
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn png_bytes(img: &image::RgbaImage) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .ok()?;
    Some(out)
}

/// The routers' summary per MoE layer: drop rate, load std, usage entropy.
pub fn summary_table(a: &Analysis) -> String {
    let rows: Vec<(String, usize, f64, f64, f64)> = a
        .runs
        .iter()
        .flat_map(|r| {
            r.layers.iter().map(move |l| {
                (
                    r.settings.label(),
                    l.stats.block,
                    l.stats.dropped_token_rate,
                    l.stats.load_std,
                    l.stats.usage_entropy,
                )
            })
        })
        .collect();
    let width = 640.0;
    let height = PAD + 36.0 + 22.0 * (rows.len() + 1) as f32 + PAD;
    let mut s = String::new();
    open(
        &mut s,
        width,
        height,
        &format!(
            "{} · routers on {} images of {}",
            a.model,
            a.images,
            data_name(a)
        ),
    );
    let cols = [PAD, 260.0, 340.0, 440.0, 540.0];
    let head = ["router", "block", "dropped", "load std", "usage entropy"];
    let y0 = PAD + 36.0 + 12.0;
    for (x, h) in cols.iter().zip(head) {
        text(&mut s, *x, y0, 12.0, "start", h);
    }
    for (i, (name, block, drop, std, ent)) in rows.iter().enumerate() {
        let y = y0 + 22.0 * (i + 1) as f32;
        let cells = [
            name.clone(),
            block.to_string(),
            format!("{:.2}%", 100.0 * drop),
            format!("{std:.2}"),
            format!("{ent:.3}"),
        ];
        for (x, c) in cols.iter().zip(cells) {
            text(&mut s, *x, y, 12.0, "start", &c);
        }
    }
    s.push_str("</svg>\n");
    s
}

/// File stems and SVG documents of every figure of `a`.
pub fn figures(a: &Analysis, palette: Palette) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let n_layers = a.runs.first().map_or(0, |r| r.layers.len());
    for l in 0..n_layers {
        let b = a.runs[0].layers[l].stats.block;
        out.push((format!("class_expert_block{b}"), class_expert_heatmap(a, l)));
        out.push((format!("positions_block{b}"), position_maps(a, l)));
        out.push((format!("drops_block{b}"), drop_rates(a, l)));
        out.push((format!("load_block{b}"), load_boxplots(a, l, palette)));
        for (r, run) in a.runs.iter().enumerate() {
            let stem = if a.runs.len() == 1 {
                format!("atlas_block{b}")
            } else {
                format!("atlas_block{b}_{}", file_part(&run.settings.label()))
            };
            out.push((stem, atlas_sheet(a, r, l, palette)));
        }
    }
    if a.runs.len() > 1 {
        out.push(("summary".to_string(), summary_table(a)));
    }
    out
}

/// Characters outside `[A-Za-z0-9._-]` become `_`.
fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes every figure as SVG and as PNG `png_width` wide (at least the SVG's own width, so
/// wide comparisons stay legible) into `dir`, atomically; returns the paths.
/// Writes a whole analysis into `dir`: `analysis.json`, the CSV tables and every figure, staged
/// beside it and moved in only when all are written (a failure leaves `dir` as it was, and
/// creates nothing). Returns the final paths.
pub fn write_analysis(
    a: &Analysis,
    dir: &std::path::Path,
    palette: Palette,
    png_width: u32,
) -> Result<Vec<std::path::PathBuf>, String> {
    let staged =
        crate::files::StagedDir::new(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    crate::analysis::report::write_data(a, staged.path()).map_err(|e| e.to_string())?;
    write_figures(a, staged.path(), palette, png_width)?;
    staged
        .commit()
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Writes the figures of `a` into `dir` (each file atomically); returns their paths.
pub fn write_figures(
    a: &Analysis,
    dir: &std::path::Path,
    palette: Palette,
    png_width: u32,
) -> Result<Vec<std::path::PathBuf>, String> {
    let mut out = Vec::new();
    for (stem, svg) in figures(a, palette) {
        let svg_path = dir.join(format!("{stem}.svg"));
        crate::tensor_io::write_atomic(&svg_path, svg.as_bytes()).map_err(|e| e.to_string())?;
        out.push(svg_path);
        let own = svg_width(&svg).unwrap_or(png_width as f32).ceil() as u32;
        let width = png_width.max(own).min(super::raster::MAX_RASTER_SIDE);
        let png = super::raster::svg_to_png(&svg, width).map_err(|e| format!("{stem}.png: {e}"))?;
        let png_path = dir.join(format!("{stem}.png"));
        crate::tensor_io::write_atomic(&png_path, &png).map_err(|e| e.to_string())?;
        out.push(png_path);
    }
    Ok(out)
}

fn svg_width(svg: &str) -> Option<f32> {
    let i = svg.find("width=\"")? + 7;
    svg[i..].split('"').next()?.parse().ok()
}
