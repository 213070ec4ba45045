//! The details panel on the right: the prediction and the expert load plot.

use crate::app::RouterscopeApp;
use crate::app::settings::LayerView;
use crate::app::views;
use crate::routing::RouterFamily;

impl RouterscopeApp {
    pub(in crate::app) fn details(&mut self, ui: &mut egui::Ui) {
        ui.heading("Prediction");
        let cfg = self.model.as_ref().map(|m| m.config.clone());
        match (self.prediction(), &cfg) {
            (Some(p), Some(cfg)) => views::prediction::prediction(ui, p, |c| cfg.class_name(c)),
            _ => {
                ui.label("—");
            }
        }
        ui.separator();
        ui.heading("Expert load");
        let layer = match self.settings.layer {
            LayerView::One(i) => i,
            LayerView::All => 0,
        };
        if let Some(r) = self.image_routing(layer) {
            if let Some(j) = views::load_plot::load_plot(ui, &r, self.settings.palette, 170.0) {
                self.highlight = if self.highlight == Some(j) {
                    None
                } else {
                    Some(j)
                };
            }
            if let Some(h) = self.highlight {
                ui.label(format!("highlighting expert {h} (click again to clear)"));
            }
            if r.router.family() == RouterFamily::Soft {
                ui.label(
                    "Soft MoE drops nothing: every token reaches every slot with some weight.",
                );
            }
        }
    }
}
