//! The gallery of loaded images at the bottom; a click shows that image.

use crate::app::RouterscopeApp;

impl RouterscopeApp {
    pub(in crate::app) fn gallery(&mut self, ui: &mut egui::Ui) {
        let mut clicked = None;
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, img) in self.images.iter().enumerate() {
                    let selected = i == self.settings.current_image;
                    let resp = ui
                        .add(
                            egui::Image::new((img.thumbnail.id(), egui::vec2(48.0, 48.0)))
                                .sense(egui::Sense::click())
                                .bg_fill(if selected {
                                    ui.visuals().selection.bg_fill
                                } else {
                                    egui::Color32::TRANSPARENT
                                }),
                        )
                        .on_hover_text(img.path.display().to_string());
                    if selected {
                        ui.painter().rect_stroke(
                            resp.rect.expand(2.0),
                            2.0,
                            egui::Stroke::new(2.0, ui.visuals().selection.stroke.color),
                            egui::StrokeKind::Outside,
                        );
                    }
                    if resp.clicked() {
                        clicked = Some(i);
                    }
                }
            });
        });
        if let Some(i) = clicked {
            self.show_image(i);
        }
    }
}
