//! Soft MoE: one small heatmap per slot (rows = experts, columns = slots) showing its dispatch
//! weights over the image's patches, and per token the entropy of its combine weights over slots.

use crate::figures::{Palette, SoftImage, sequential};
use crate::model::PrefixTokens;

use super::color;

/// Draws the slot heatmaps; `grid` is the patch grid, `prefix` whether token 0 is CLS.
pub fn slot_heatmaps(
    ui: &mut egui::Ui,
    soft: &SoftImage,
    num_experts: usize,
    grid: [usize; 2],
    prefix: PrefixTokens,
    palette: Palette,
    width: f32,
) {
    let p = soft.slots_per_expert;
    let [gh, gw] = grid;
    ui.label(format!(
        "dispatch weights of each slot over the patches ({num_experts} experts × {p} slots; each heatmap from its own minimum, white, to its maximum, dark; hover for the mass)"
    ));
    let gap = 3.0;
    let cols = p.max(1);
    let tile = ((width - gap * cols as f32) / cols as f32).clamp(12.0, 64.0);
    let height = num_experts as f32 * (tile + gap);
    let (rect, response) = ui.allocate_exact_size(egui::vec2(width, height), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let mut hovered = None;
    for j in 0..num_experts {
        for s in 0..p {
            let slot = j * p + s;
            let origin = rect.min + egui::vec2(s as f32 * (tile + gap), j as f32 * (tile + gap));
            let tr = egui::Rect::from_min_size(origin, egui::vec2(tile, tile));
            let w = &soft.dispatch[slot];
            let patches = &w[prefix.count()..];
            let max = patches.iter().cloned().fold(f32::MIN, f32::max);
            let min = patches.iter().cloned().fold(f32::MAX, f32::min);
            let span = (max - min).max(1e-12);
            let cw = tile / gw as f32;
            let ch = tile / gh as f32;
            for (q, &v) in patches.iter().enumerate().take(gh * gw) {
                let cr = egui::Rect::from_min_size(
                    origin + egui::vec2((q % gw) as f32 * cw, (q / gw) as f32 * ch),
                    egui::vec2(cw, ch),
                );
                painter.rect_filled(cr, 0.0, color(sequential((v - min) / span), 1.0));
            }
            painter.rect_stroke(
                tr,
                0.0,
                egui::Stroke::new(1.5, color(palette.expert(j), 1.0)),
                egui::StrokeKind::Outside,
            );
            if response.hover_pos().is_some_and(|pos| tr.contains(pos)) {
                hovered = Some((j, s, w.iter().sum::<f32>(), prefix.cls.then(|| w[0])));
            }
        }
    }
    if let Some((j, s, mass, cls)) = hovered {
        response.on_hover_ui_at_pointer(|ui| {
            ui.strong(format!("expert {j}, slot {s}"));
            ui.label(format!("dispatch weight on this image's tokens: {mass:.3}"));
            if let Some(c) = cls {
                ui.label(format!("on the CLS token: {c:.3}"));
            }
        });
    }
}

/// Per-token entropy of the combine weights over all slots, normalised to `[0, 1]` by
/// `ln(e·p)` (0: one slot, 1: uniform over every slot).
pub fn combine_entropy(soft: &SoftImage) -> Vec<f32> {
    soft.combine
        .iter()
        .map(|w| {
            let h: f32 = w.iter().filter(|&&v| v > 0.0).map(|&v| -v * v.ln()).sum();
            h / (w.len().max(2) as f32).ln()
        })
        .collect()
}

/// Per patch, the normalised entropy of its combine weights (`combine_entropy`), as a heatmap
/// `side` points wide: light = the token reads from few slots, dark = from many.
pub fn entropy_map(
    ui: &mut egui::Ui,
    entropy: &[f32],
    grid: [usize; 2],
    prefix: PrefixTokens,
    side: f32,
) {
    let [gh, gw] = grid;
    let (rect, response) = ui.allocate_exact_size(
        egui::vec2(side, side * gh as f32 / gw as f32),
        egui::Sense::hover(),
    );
    let painter = ui.painter_at(rect);
    let cw = rect.width() / gw as f32;
    let ch = rect.height() / gh as f32;
    let patches = &entropy[prefix.count()..];
    for (q, &v) in patches.iter().enumerate().take(gh * gw) {
        let r = egui::Rect::from_min_size(
            rect.min + egui::vec2((q % gw) as f32 * cw, (q / gw) as f32 * ch),
            egui::vec2(cw, ch),
        );
        painter.rect_filled(r, 0.0, color(sequential(v), 1.0));
    }
    if let Some(pos) = response.hover_pos() {
        let q = ((pos.y - rect.top()) / ch) as usize * gw + ((pos.x - rect.left()) / cw) as usize;
        if let Some(v) = patches.get(q) {
            response.on_hover_text_at_pointer(format!("patch {q}: combine entropy {v:.3}"));
        }
    }
}
