//! The hover card of one token: position, router probabilities per expert as a small bar chart,
//! and its choices with slots and gates.

use crate::figures::{DROPPED, Palette, TokenRouting};
use crate::model::PrefixTokens;
use crate::routing::RouterFamily;

use super::color;

/// Draws the card for `t` (an image of `grid` patches, with a CLS token first when `prefix`).
pub fn token_details(
    ui: &mut egui::Ui,
    t: &TokenRouting,
    family: RouterFamily,
    grid: [usize; 2],
    prefix: PrefixTokens,
    palette: Palette,
) {
    match prefix.patch(t.index) {
        Some(p) => ui.strong(format!(
            "token {} · patch row {}, column {}",
            t.index,
            p / grid[1],
            p % grid[1]
        )),
        None => ui.strong(format!(
            "token {} · {}",
            t.index,
            prefix.name(t.index).unwrap_or_default()
        )),
    };
    let e = t.probs.len();
    if e == 0 {
        ui.weak("router probabilities: not in the trace (it logged no logits or probabilities)");
    } else {
        ui.label(match family {
            RouterFamily::Soft => "combine weight per expert (summed over its slots)",
            _ => "router probability per expert",
        });
        probability_bars(ui, t, e, palette);
    }
    if family == RouterFamily::Soft {
        return;
    }
    choices(ui, t, family, palette);
}

fn probability_bars(ui: &mut egui::Ui, t: &TokenRouting, e: usize, palette: Palette) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(220.0, 64.0), egui::Sense::hover());
    let p = ui.painter_at(rect);
    p.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    let w = rect.width() / e as f32;
    let max = t.probs.iter().cloned().fold(1e-6f32, f32::max).max(0.25);
    for (j, &v) in t.probs.iter().enumerate() {
        let h = (v / max).clamp(0.0, 1.0) * (rect.height() - 12.0);
        let x0 = rect.left() + j as f32 * w;
        let bar = egui::Rect::from_min_max(
            egui::pos2(x0 + 1.0, rect.bottom() - 12.0 - h),
            egui::pos2(x0 + w - 1.0, rect.bottom() - 12.0),
        );
        p.rect_filled(bar, 0.0, color(palette.expert(j), 1.0));
        if e <= 16 {
            p.text(
                egui::pos2(x0 + w / 2.0, rect.bottom() - 6.0),
                egui::Align2::CENTER_CENTER,
                j.to_string(),
                egui::FontId::monospace(9.0),
                ui.visuals().text_color(),
            );
        }
    }
}

fn choices(ui: &mut egui::Ui, t: &TokenRouting, family: RouterFamily, palette: Palette) {
    if t.choices.is_empty() {
        ui.colored_label(color(DROPPED, 1.0), "not picked by any expert (output 0)");
        return;
    }
    egui::Grid::new("choices").striped(true).show(ui, |ui| {
        ui.label(if family == RouterFamily::TokenChoice {
            "rank"
        } else {
            ""
        });
        ui.label("expert");
        ui.label("slot");
        ui.label("gate");
        ui.end_row();
        for (r, c) in t.choices.iter().enumerate() {
            ui.label(if family == RouterFamily::TokenChoice {
                format!("{}", r + 1)
            } else {
                String::new()
            });
            ui.horizontal(|ui| {
                super::swatch(ui, palette.expert(c.expert as usize));
                ui.label(c.expert.to_string());
            });
            match c.slot {
                Some(s) => ui.label(s.to_string()),
                None => ui.colored_label(color(DROPPED, 1.0), "dropped (full)"),
            };
            ui.label(format!("{:.3}", c.gate));
            ui.end_row();
        }
    });
    if t.dropped {
        ui.colored_label(color(DROPPED, 1.0), "dropped: reaches no expert (output 0)");
    }
}
