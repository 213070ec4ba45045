//! Routers side by side over a dataset: one summary row per router for the shown MoE block
//! (drops, load spread, usage and router entropy) and a class × expert heatmap per router, each
//! a way to pick the router whose details (load boxes, atlas) are shown below.

use crate::analysis::RouterRun;
use crate::app::views::dataset_plots;

/// The summary table for block `l` of every run; returns the run whose row was clicked.
pub fn summary_table(
    ui: &mut egui::Ui,
    runs: &[RouterRun],
    l: usize,
    selected: usize,
) -> Option<usize> {
    let mut picked = None;
    egui::Grid::new("dataset-routers")
        .striped(true)
        .spacing([18.0, 4.0])
        .show(ui, |ui| {
            for h in [
                "router",
                "dropped",
                "load std (tokens/image)",
                "usage entropy",
                "router entropy",
            ] {
                ui.strong(h);
            }
            ui.end_row();
            for (i, run) in runs.iter().enumerate() {
                let Some(st) = run.layers.get(l).map(|la| &la.stats) else {
                    continue;
                };
                if ui
                    .selectable_label(i == selected, run.settings.label())
                    .on_hover_text(format!("show {}'s details below", run.settings.name))
                    .clicked()
                {
                    picked = Some(i);
                }
                ui.label(format!("{:.2}%", 100.0 * st.dropped_token_rate));
                ui.label(format!("{:.2}", st.load_std));
                ui.label(format!("{:.3}", st.usage_entropy));
                ui.label(
                    st.router_entropy
                        .as_ref()
                        .map_or_else(|| "unknown".to_string(), |h| format!("{:.2}", h.mean)),
                );
                ui.end_row();
            }
        });
    picked
}

/// A class × expert heatmap of block `l` per run, in rows that wrap; returns the run whose
/// heatmap was clicked and the expert clicked in it.
pub fn heatmaps(
    ui: &mut egui::Ui,
    runs: &[RouterRun],
    l: usize,
    classes: &[String],
    selected: (usize, Option<usize>),
    width: f32,
) -> Option<(usize, usize)> {
    let mut picked = None;
    // Rows of as many heatmaps as fit at a legible size (egui does not wrap whole groups).
    let (gap, least) = (16.0, 200.0);
    let per_row = (((width + gap) / (least + gap)).floor() as usize).clamp(1, runs.len().max(1));
    let each = ((width - gap * (per_row - 1) as f32) / per_row as f32).min(320.0);
    for (r, row) in runs.chunks(per_row).enumerate() {
        ui.horizontal_top(|ui| {
            ui.spacing_mut().item_spacing.x = gap;
            for (c, run) in row.iter().enumerate() {
                let i = r * per_row + c;
                let Some(st) = run.layers.get(l).map(|la| &la.stats) else {
                    continue;
                };
                ui.allocate_ui(egui::vec2(each, 0.0), |ui| {
                    ui.set_width(each);
                    ui.vertical(|ui| {
                        let title = format!(
                            "{} · dropped {:.1}%",
                            run.settings.label(),
                            100.0 * st.dropped_token_rate
                        );
                        if i == selected.0 {
                            ui.strong(title);
                        } else {
                            ui.label(title);
                        }
                        let expert = selected.1.filter(|_| i == selected.0);
                        if let Some(j) =
                            dataset_plots::class_expert_heatmap(ui, st, classes, expert, each)
                        {
                            picked = Some((i, j));
                        }
                    });
                });
            }
        });
        ui.add_space(6.0);
    }
    picked
}
