//! The details panel on the right: the prediction (for a feature model, how far the routing
//! moves its representation from the dense model) and the expert load plot.

use crate::app::RouterscopeApp;
use crate::app::settings::LayerView;
use crate::app::views;
use crate::routing::RouterFamily;

impl RouterscopeApp {
    pub(in crate::app) fn details(&mut self, ui: &mut egui::Ui) {
        let cfg = self.model.as_ref().map(|m| m.config.clone());
        if self.trace_summary().is_some() {
            ui.heading("Prediction");
            ui.label("— (a routing trace holds the routing, not the model's outputs)");
        } else if cfg.as_ref().is_some_and(|c| c.is_feature_model()) {
            ui.heading("Fidelity to the dense model");
            match self.fidelity() {
                Some(f) => {
                    ui.label(
                        egui::RichText::new(format!("mean patch cosine {f:.3}"))
                            .size(18.0)
                            .strong(),
                    );
                    ui.label(
                        "Cosine similarity of the final features of every patch under this \
                         routing against the same image with every expert chosen (which is the \
                         dense model), averaged over the patches. 1 = unchanged.",
                    );
                }
                None => {
                    ui.label("—");
                }
            }
        } else {
            ui.heading("Prediction");
        }
        match (self.prediction().filter(|p| !p.is_empty()), &cfg) {
            (Some(p), Some(cfg)) => views::prediction::prediction(ui, p, |c| cfg.class_name(c)),
            (None, Some(c)) if c.is_feature_model() || self.trace_summary().is_some() => {}
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
