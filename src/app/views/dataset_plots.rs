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

/// Per expert: box 25–75th percentile of tokens per image, median line, whiskers 5–95th;
/// returns the clicked expert.
pub fn load_boxes(
    ui: &mut egui::Ui,
    st: &LayerStats,
    palette: Palette,
    selected: Option<usize>,
    width: f32,
) -> Option<usize> {
    let e = st.num_experts;
    let h = 110.0;
    let slot = (width / e.max(1) as f32).clamp(4.0, 30.0);
    let (rect, response) =
        ui.allocate_exact_size(egui::vec2(slot * e as f32, h), egui::Sense::click());
    let painter = ui.painter_at(rect);
    let ymax = st
        .load_per_expert
        .iter()
        .map(|l| l.max)
        .fold(1.0f64, f64::max)
        * 1.05;
    let y = |v: f64| rect.bottom() - (v / ymax) as f32 * h;
    let dark = ui.visuals().text_color();
    for (j, l) in st.load_per_expert.iter().enumerate() {
        let cx = rect.left() + (j as f32 + 0.5) * slot;
        let bw = slot * 0.6;
        painter.line_segment(
            [egui::pos2(cx, y(l.p5)), egui::pos2(cx, y(l.p95))],
            egui::Stroke::new(1.0, dark),
        );
        let b = egui::Rect::from_min_max(
            egui::pos2(cx - bw / 2.0, y(l.p75)),
            egui::pos2(cx + bw / 2.0, y(l.p25).max(y(l.p75) + 1.0)),
        );
        painter.rect_filled(b, 0.0, color(palette.expert(j), 1.0));
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
