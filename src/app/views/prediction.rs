//! The model's top-5 classes with probability bars.

/// Draws the top-5 of `probs` with `name` for class labels.
pub fn prediction(ui: &mut egui::Ui, probs: &[f32], name: impl Fn(usize) -> String) {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    egui::Grid::new("top5").num_columns(3).show(ui, |ui| {
        for &c in order.iter().take(5) {
            ui.label(name(c));
            let (rect, _) = ui.allocate_exact_size(egui::vec2(90.0, 12.0), egui::Sense::hover());
            let p = ui.painter_at(rect);
            p.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            let mut bar = rect;
            bar.set_width(rect.width() * probs[c].clamp(0.0, 1.0));
            p.rect_filled(bar, 2.0, egui::Color32::from_rgb(90, 140, 210));
            ui.label(format!("{:5.1}%", 100.0 * probs[c]));
            ui.end_row();
        }
    });
}
