//! One file per panel of the viewer. Every view is a function of the data it shows; the app
//! passes in what it needs and reads back the user's interactions.

pub mod controls;
pub mod dataset_plots;
pub mod dataset_routers;
pub mod load_plot;
pub mod patch_grid;
pub mod prediction;
pub mod soft_slots;
pub mod token_details;
pub mod trace_banner;

use crate::figures::Rgb;

/// An RGB triple as an egui colour with alpha `a` in `[0, 1]`.
pub fn color(c: Rgb, a: f32) -> egui::Color32 {
    egui::Color32::from_rgba_unmultiplied(c[0], c[1], c[2], (a.clamp(0.0, 1.0) * 255.0) as u8)
}

/// A small square in colour `c` (egui's built-in font has no "■").
pub fn swatch(ui: &mut egui::Ui, c: Rgb) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    ui.painter().rect_filled(rect, 2.0, color(c, 1.0));
}

/// The legend mark of a dropped token: a red X in a red square.
pub fn dropped_swatch(ui: &mut egui::Ui) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
    let red = egui::Stroke::new(2.0, color(crate::figures::DROPPED, 1.0));
    let p = ui.painter();
    p.rect_stroke(rect, 0.0, red, egui::StrokeKind::Inside);
    p.line_segment([rect.left_top(), rect.right_bottom()], red);
    p.line_segment([rect.right_top(), rect.left_bottom()], red);
}
