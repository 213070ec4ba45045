//! The router comparison: the shown image under every router side by side.

use crate::app::views::patch_grid::{GridStyle, patch_grid};
use crate::app::{RouterscopeApp, ViewImage};
use crate::figures::ImageRouting;
use crate::model::PrefixTokens;

impl RouterscopeApp {
    /// The shown image under every router, MoE layer `layer`.
    pub(in crate::app) fn comparison_view(
        &self,
        ui: &mut egui::Ui,
        img: &ViewImage,
        prefix: PrefixTokens,
        style: &GridStyle,
        layer: usize,
    ) {
        let Some((image, entries)) = self
            .comparison
            .as_ref()
            .filter(|(i, _)| *i == self.settings.current_image)
        else {
            ui.label("Comparing routers…");
            return;
        };
        debug_assert_eq!(*image, self.settings.current_image);
        ui.label(format!(
            "Router comparison, MoE layer {} (each panel routed alone):",
            layer + 1
        ));
        let cols = ((ui.available_width() / 210.0).floor() as usize).max(1);
        egui::Grid::new("comparison")
            .num_columns(cols)
            .show(ui, |ui| {
                for (n, (router, res)) in entries.iter().enumerate() {
                    ui.vertical(|ui| {
                        ui.set_width(200.0);
                        ui.strong(router.kind.display_name());
                        match res {
                            Ok((cfg, out)) => match out.records.get(layer) {
                                Some(rec) => {
                                    let r = ImageRouting::new(&rec.groups[0], 0, cfg.seq_len());
                                    patch_grid(
                                        ui,
                                        &img.texture,
                                        &r,
                                        cfg.grid(),
                                        prefix,
                                        style,
                                        190.0,
                                    );
                                    ui.label(format!(
                                        "dropped {} of {}",
                                        r.dropped_count(),
                                        r.tokens.len()
                                    ));
                                }
                                None => {
                                    ui.label("no such MoE layer");
                                }
                            },
                            Err(e) => {
                                ui.colored_label(
                                    egui::Color32::from_rgb(240, 160, 60),
                                    format!("unavailable: {e}"),
                                );
                            }
                        }
                    });
                    if n % cols == cols - 1 {
                        ui.end_row();
                    }
                }
            });
        ui.separator();
    }
}
