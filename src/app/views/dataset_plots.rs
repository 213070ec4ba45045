//! Widgets of the Dataset view: the class × expert heatmap (hover a cell for its counts, click
//! to pick the expert), an expert's position map, the per-expert load box plots and drop bars.

use crate::analysis::stats::LayerStats;
use crate::app::views::color;
use crate::figures::{DROPPED, Palette, sequential};

/// The heatmap of `class_expert_usage`; returns the clicked expert.
pub fn class_expert_heatmap(
    ui: &mut egui::Ui,
    st: &LayerStats,
    classes: &[String],
    selected: Option<usize>,
    width: f32,
) -> Option<usize> {
    let e = st.num_experts;
    let label_w = 96.0;
    let cell = ((width - label_w) / e.max(1) as f32).clamp(6.0, 34.0);
    let row_h = cell.clamp(14.0, 22.0);
    let size = egui::vec2(
        label_w + cell * e as f32,
        16.0 + row_h * classes.len() as f32,
    );
    let (rect, response) = ui.allocate_exact_size(size, egui::Sense::click());
    let painter = ui.painter_at(rect);
    let vmax = st
        .class_expert_usage
        .iter()
        .flatten()
        .copied()
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let text = ui.visuals().text_color();
    let origin = rect.min + egui::vec2(label_w, 16.0);
    for j in 0..e {
        if e <= 16 || j % 4 == 0 {
            painter.text(
                origin + egui::vec2((j as f32 + 0.5) * cell, -3.0),
                egui::Align2::CENTER_BOTTOM,
                j.to_string(),
                egui::FontId::proportional(10.0),
                text,
            );
        }
    }
    let cell_at = |pos: egui::Pos2| {
        let d = pos - origin;
        let (j, c) = ((d.x / cell).floor(), (d.y / row_h).floor());
        (d.x >= 0.0 && d.y >= 0.0 && (j as usize) < e && (c as usize) < classes.len())
            .then_some((c as usize, j as usize))
    };
    for (c, name) in classes.iter().enumerate() {
        let y = origin.y + c as f32 * row_h;
        painter.text(
            egui::pos2(origin.x - 4.0, y + row_h / 2.0),
            egui::Align2::RIGHT_CENTER,
            name,
            egui::FontId::proportional(11.0),
            text,
        );
        for j in 0..e {
            let r = egui::Rect::from_min_size(
                egui::pos2(origin.x + j as f32 * cell, y),
                egui::vec2(cell, row_h),
            );
            let v = (st.class_expert_usage[c][j] / vmax) as f32;
            painter.rect_filled(r.shrink(0.5), 0.0, color(sequential(v), 1.0));
        }
    }
    if let Some(j) = selected.filter(|&j| j < e) {
        let r = egui::Rect::from_min_size(
            egui::pos2(origin.x + j as f32 * cell, origin.y),
            egui::vec2(cell, row_h * classes.len() as f32),
        );
        painter.rect_stroke(
            r,
            0.0,
            egui::Stroke::new(2.0, egui::Color32::from_rgb(255, 204, 0)),
            egui::StrokeKind::Outside,
        );
    }
    let hovered = response.hover_pos().and_then(cell_at);
    let clicked = response
        .clicked()
        .then(|| response.interact_pointer_pos().and_then(cell_at))
        .flatten()
        .map(|(_, j)| j);
    if let Some((c, j)) = hovered {
        response.on_hover_ui_at_pointer(|ui| {
            ui.label(format!(
                "{} · expert {j}\n{:.0} tokens ({:.1}% of the class's assignments)\n{} tokens of the class, {} dropped\nclick: show expert {j}'s atlas",
                classes[c],
                st.tokens_per_class_expert[c][j],
                100.0 * st.class_expert_usage[c][j],
                st.tokens_per_class[c],
                st.dropped_per_class[c]
            ));
        });
    }
    clicked
}

/// How often each position goes to expert `j` (share of images), as the patch grid.
pub fn position_map(
    ui: &mut egui::Ui,
    st: &LayerStats,
    j: usize,
    grid: [usize; 2],
    prefix: usize,
    side: f32,
) {
    let [gr, gc] = grid;
    let cls = prefix;
    let images = st.images.max(1) as f64;
    let values: Vec<f64> = (0..gr * gc)
        .map(|p| st.tokens_per_position_expert[p + cls][j] / images)
        .collect();
    let vmax = values.iter().copied().fold(0.0f64, f64::max).max(1e-12);
    let h = side * gr as f32 / gc.max(1) as f32;
    let (rect, response) = ui.allocate_exact_size(egui::vec2(side, h), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let (cw, ch) = (side / gc.max(1) as f32, h / gr.max(1) as f32);
    for (p, v) in values.iter().enumerate() {
        let r = egui::Rect::from_min_size(
            rect.min + egui::vec2((p % gc) as f32 * cw, (p / gc) as f32 * ch),
            egui::vec2(cw + 0.5, ch + 0.5),
        );
        painter.rect_filled(r, 0.0, color(sequential((v / vmax) as f32), 1.0));
    }
    if let Some(pos) = response.hover_pos() {
        let d = pos - rect.min;
        let (c, r) = ((d.x / cw) as usize, (d.y / ch) as usize);
        if r < gr && c < gc {
            let v = values[r * gc + c];
            response.on_hover_text(format!(
                "patch ({r}, {c}): expert {j} in {:.1}% of images",
                100.0 * v
            ));
        }
    }
}

/// Where the load axis ends: above every whisker, maximum and the capacity line (when given), with
/// room for a box pinned at the top to stay visible.
pub fn load_axis_top(st: &LayerStats, capacity: Option<f64>) -> f64 {
    let top = (st.load_per_expert.iter())
        .flat_map(|l| [l.max, l.p95, l.p75])
        .chain(capacity)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    top * 1.1
}

/// Per expert: box 25–75th percentile of tokens per image, median line, whiskers 5–95th, the
/// capacity (tokens per image an expert holds) as a dashed line, on a labelled axis that fits
/// them all; returns the clicked expert.
pub fn load_boxes(
    ui: &mut egui::Ui,
    st: &LayerStats,
    capacity: Option<f64>,
    palette: Palette,
    selected: Option<usize>,
    width: f32,
) -> Option<usize> {
    let e = st.num_experts;
    let h = 120.0;
    let axis = 44.0;
    let slot = ((width - axis) / e.max(1) as f32).clamp(4.0, 30.0);
    let (full, response) = ui.allocate_exact_size(
        egui::vec2(axis + slot * e as f32, h + 8.0),
        egui::Sense::click(),
    );
    let rect = egui::Rect::from_min_max(
        egui::pos2(full.left() + axis, full.top() + 4.0),
        egui::pos2(full.right(), full.bottom() - 4.0),
    );
    let painter = ui.painter_at(full);
    let ymax = load_axis_top(st, capacity);
    let y = |v: f64| rect.bottom() - (v.clamp(0.0, ymax) / ymax) as f32 * rect.height();
    let dark = ui.visuals().text_color();
    let weak = ui.visuals().weak_text_color();
    let font = egui::FontId::proportional(10.0);
    // The y axis: 0, the capacity and the top, and what they count.
    painter.line_segment(
        [rect.left_top(), rect.left_bottom()],
        egui::Stroke::new(1.0, weak),
    );
    let mut ticks = vec![0.0, ymax / 1.1];
    ticks.extend(capacity);
    for v in ticks {
        painter.text(
            egui::pos2(rect.left() - 4.0, y(v)),
            egui::Align2::RIGHT_CENTER,
            crate::format::number_with(v, 1),
            font.clone(),
            weak,
        );
    }
    painter.text(
        egui::pos2(full.left(), rect.top()),
        egui::Align2::LEFT_TOP,
        "tokens\n/ image",
        font.clone(),
        weak,
    );
    if let Some(c) = capacity {
        let cy = y(c);
        let mut x = rect.left();
        while x < rect.right() {
            painter.line_segment(
                [
                    egui::pos2(x, cy),
                    egui::pos2((x + 4.0).min(rect.right()), cy),
                ],
                egui::Stroke::new(1.0, egui::Color32::from_rgb(200, 80, 60)),
            );
            x += 7.0;
        }
    }
    for (j, l) in st.load_per_expert.iter().enumerate() {
        let cx = rect.left() + (j as f32 + 0.5) * slot;
        let bw = slot * 0.6;
        painter.line_segment(
            [egui::pos2(cx, y(l.p5)), egui::pos2(cx, y(l.p95))],
            egui::Stroke::new(1.0, dark),
        );
        // At least 4 px tall, so that a box whose quartiles coincide (an expert always full)
        // still shows.
        let (top, bottom) = (y(l.p75), y(l.p25));
        let pad = ((4.0 - (bottom - top)) / 2.0).max(0.0);
        let b = egui::Rect::from_min_max(
            egui::pos2(cx - bw / 2.0, top - pad),
            egui::pos2(cx + bw / 2.0, bottom + pad),
        );
        painter.rect_filled(b, 0.0, color(palette.expert(j), 1.0));
        painter.rect_stroke(
            b,
            0.0,
            egui::Stroke::new(1.0, dark),
            egui::StrokeKind::Inside,
        );
        painter.line_segment(
            [
                egui::pos2(b.left(), y(l.p50)),
                egui::pos2(b.right(), y(l.p50)),
            ],
            egui::Stroke::new(2.0, dark),
        );
        if selected == Some(j) {
            painter.rect_stroke(
                b.expand(2.0),
                0.0,
                egui::Stroke::new(2.0, egui::Color32::from_rgb(255, 204, 0)),
                egui::StrokeKind::Outside,
            );
        }
    }
    let at = |pos: egui::Pos2| {
        let j = ((pos.x - rect.left()) / slot).floor();
        (j >= 0.0 && (j as usize) < e).then_some(j as usize)
    };
    let clicked = response
        .clicked()
        .then(|| response.interact_pointer_pos().and_then(at))
        .flatten();
    if let Some(j) = response.hover_pos().and_then(at) {
        let l = &st.load_per_expert[j];
        response.on_hover_text(format!(
            "expert {j}: tokens per image mean {:.2} (std {:.2}), min {:.0}, 5th {:.1}, median {:.1}, 95th {:.1}, max {:.0}",
            l.mean, l.std, l.min, l.p5, l.p50, l.p95, l.max
        ));
    }
    clicked
}

/// Drop rate of each class as bars.
pub fn drop_bars(ui: &mut egui::Ui, st: &LayerStats, classes: &[String]) {
    let rates: Vec<f64> = (0..classes.len())
        .map(|c| st.dropped_per_class[c] as f64 / st.tokens_per_class[c].max(1) as f64)
        .collect();
    let rmax = rates.iter().copied().fold(0.0f64, f64::max).max(1e-9);
    for (name, r) in classes.iter().zip(&rates) {
        ui.horizontal(|ui| {
            ui.add_sized(
                [90.0, 14.0],
                egui::Label::new(egui::RichText::new(name).small()).truncate(),
            );
            let (rect, _) = ui.allocate_exact_size(egui::vec2(120.0, 10.0), egui::Sense::hover());
            ui.painter().rect_filled(
                egui::Rect::from_min_size(rect.min, egui::vec2(120.0 * (*r / rmax) as f32, 10.0)),
                0.0,
                color(DROPPED, 1.0),
            );
            ui.label(egui::RichText::new(format!("{:.2}%", 100.0 * r)).small());
        });
    }
}
