//! The central view: errors and notices, the shown image's patch grid per MoE layer with its
//! expert legend, and for Soft MoE the slot heatmaps and the combine-entropy map.

use crate::app::RouterscopeApp;
use crate::app::settings::LayerView;
use crate::app::views::{
    self,
    patch_grid::{GridStyle, patch_grid},
};
use crate::figures::{ImageRouting, Palette};
use crate::routing::RouterFamily;

impl RouterscopeApp {
    pub(in crate::app) fn central(&mut self, ui: &mut egui::Ui) {
        for e in self.errors.iter().rev().take(3) {
            ui.colored_label(egui::Color32::from_rgb(240, 90, 80), format!("Error: {e}"));
        }
        if !self.errors.is_empty() && ui.small_button("dismiss errors").clicked() {
            self.errors.clear();
        }
        if let Some(n) = &self.notice {
            ui.colored_label(egui::Color32::from_rgb(120, 200, 120), n);
        }
        ui.horizontal(|ui| {
            let timeline = self.timeline.shown;
            if ui
                .selectable_label(!self.dataset.shown && !timeline, "Image")
                .clicked()
            {
                self.timeline.shown = false;
                self.show_dataset_view(false);
            }
            if ui
                .selectable_label(self.dataset.shown && !timeline, "Dataset")
                .on_hover_text("routing statistics and the expert atlas over a whole dataset")
                .clicked()
            {
                self.timeline.shown = false;
                self.show_dataset_view(true);
            }
            if self.timeline.path.is_some()
                && ui
                    .selectable_label(timeline, "Timeline")
                    .on_hover_text("the open run's routing over training")
                    .clicked()
            {
                self.timeline.shown = true;
            }
        });
        if let Some(t) = self.trace_summary() {
            let logged = self.routed_as_logged(self.settings.router_config()) == t.own;
            views::trace_banner::trace_banner(ui, t, logged, self.images.len());
        }
        ui.separator();
        if self.timeline.shown {
            self.timeline_panel(ui);
            return;
        }
        if self.dataset.shown {
            self.dataset_panel(ui);
            return;
        }
        if let Some(e) = &self.run_error {
            ui.colored_label(
                egui::Color32::from_rgb(240, 160, 60),
                format!("unavailable: {e} (showing the previous result)"),
            );
        }
        let Some(model) = &self.model else {
            ui.label("Opening the model…");
            return;
        };
        let Some(img) = self.images.get(self.settings.current_image) else {
            ui.label("Open an image to see its routing.");
            return;
        };
        let cfg = &model.config;
        let Some(moe) = &cfg.moe else {
            ui.label(format!(
                "{}: this model has no MoE layers (the dense baseline); nothing is routed.",
                img.name
            ));
            return;
        };
        let prefix = cfg.prefix();
        let layers: Vec<usize> = match self.settings.layer {
            LayerView::One(i) => vec![i.min(moe.layers.len().saturating_sub(1))],
            LayerView::All => (0..moe.layers.len()).collect(),
        };
        let views: Vec<(usize, ImageRouting)> = layers
            .iter()
            .filter_map(|&l| self.image_routing(l).map(|r| (l, r)))
            .collect();
        ui.horizontal(|ui| {
            ui.heading(&img.name);
            if let Some(v) = views.first() {
                ui.label(format!(
                    "· {} · {} experts · {} tokens per image",
                    v.1.router.display_name(),
                    v.1.num_experts,
                    v.1.tokens.len()
                ));
            }
        });
        if views.is_empty() {
            ui.label("Computing…");
            return;
        }
        let avail = ui.available_width();
        let side = if views.len() == 1 {
            (avail - 10.0).clamp(200.0, 460.0)
        } else {
            ((avail - 20.0) / views.len() as f32 - 10.0).clamp(140.0, 360.0)
        };
        let style = GridStyle {
            opacity: self.settings.opacity,
            palette: self.settings.palette,
            show_second_choices: self.settings.show_second_choices,
            highlight: self.highlight,
            marked: self.marked.filter(|(id, _)| *id == img.id).map(|(_, t)| t),
        };
        if self.settings.compare {
            self.comparison_view(ui, img, prefix, &style, layers[0]);
        }
        ui.horizontal_top(|ui| {
            for (l, v) in &views {
                ui.vertical(|ui| {
                    ui.label(format!("MoE block {}", moe.layers[*l]));
                    patch_grid(ui, &img.texture, v, cfg.grid(), prefix, &style, side);
                });
            }
        });
        if let Some(j) = legend(
            ui,
            moe.num_experts,
            self.settings.palette,
            self.highlight,
            views[0].1.router.family(),
        ) {
            self.highlight = if self.highlight == Some(j) {
                None
            } else {
                Some(j)
            };
        }
        if let Some(soft) = &views[0].1.soft {
            ui.separator();
            views::soft_slots::slot_heatmaps(
                ui,
                soft,
                moe.num_experts,
                cfg.grid(),
                prefix,
                self.settings.palette,
                avail.min(520.0),
            );
            let ent = views::soft_slots::combine_entropy(soft);
            let mean = ent.iter().sum::<f32>() / ent.len().max(1) as f32;
            ui.label(format!(
                "combine weights per patch: normalised entropy over the {} slots (light: reads from few slots, dark: from many; mean {mean:.2})",
                soft.combine.first().map_or(0, |r| r.len())
            ));
            views::soft_slots::entropy_map(ui, &ent, cfg.grid(), prefix, 180.0);
        }
    }
}

/// The expert legend; returns the clicked expert.
fn legend(
    ui: &mut egui::Ui,
    e: usize,
    palette: Palette,
    highlight: Option<usize>,
    family: RouterFamily,
) -> Option<usize> {
    let mut clicked = None;
    ui.horizontal_wrapped(|ui| {
        ui.label("experts:");
        for j in 0..e {
            views::swatch(ui, palette.expert(j));
            let resp = ui
                .selectable_label(highlight == Some(j), format!("{j}"))
                .on_hover_text("click to highlight this expert's tokens");
            if resp.clicked() {
                clicked = Some(j);
            }
        }
        if family != RouterFamily::Soft {
            views::dropped_swatch(ui);
            ui.colored_label(
                views::color(crate::figures::DROPPED, 1.0),
                "dropped / picked by no expert",
            );
        }
        match family {
            RouterFamily::TokenChoice => {
                ui.label("· inner square: 2nd choice");
            }
            RouterFamily::ExpertChoice => {
                ui.label("· stripes ×n: picked by n experts");
            }
            RouterFamily::Soft => {
                ui.label("· colour: expert with the largest combine weight");
            }
        }
    });
    clicked
}
