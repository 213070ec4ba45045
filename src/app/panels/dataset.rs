//! The Dataset view: pick a dataset (built-in Fashion-MNIST, a folder by dialog or drop), watch
//! the analysis progress (cancel), then the class × expert heatmap, drops, loads, and for the
//! picked expert its position map and atlas, whose patches open their image in the image view.

use crate::app::RouterscopeApp;
use crate::app::views::{dataset_plots, dataset_routers};
use crate::catalog;

impl RouterscopeApp {
    /// Which model the shown analysis ran under, and why that one.
    fn dataset_model_line(&self, model: &std::path::Path) -> String {
        let file = model.file_name().map_or_else(
            || model.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        let why = match (self.settings.mode, self.dataset.kind) {
            (crate::app::settings::ModelMode::Trained, Some(kind))
                if self.model.as_ref().is_none_or(|m| m.trace.is_none()) =>
            {
                let ran = self.settings.family.for_dataset(kind);
                let data = match kind {
                    catalog::ImageKind::FashionMnist => "Fashion-MNIST data",
                    catalog::ImageKind::Photo => "a dataset of photos",
                };
                if ran == kind {
                    format!(
                        " · the built-in rule: {data} runs under the {}",
                        ran.label()
                    )
                } else {
                    format!(
                        " · {data}, run under the {} as the model family asks",
                        ran.label()
                    )
                }
            }
            _ => String::new(),
        };
        format!("model: {file}{why}")
    }

    pub(in crate::app) fn dataset_panel(&mut self, ui: &mut egui::Ui) {
        let trace = self.model.as_ref().and_then(|m| m.trace.clone());
        if let Some(t) = &trace {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!(
                    "Dataset: the trace's own {} images, under {}",
                    t.images,
                    if self.routed_as_logged(self.settings.router_config()) == t.own {
                        "its logged routing".to_string()
                    } else {
                        "a what-if on its logged logits".to_string()
                    }
                ));
                if self.dataset.result.is_some()
                    && ui
                        .button("Export…")
                        .on_hover_text("analysis.json, the CSV tables and every figure (PNG and SVG) into a folder")
                        .clicked()
                {
                    self.pick_dataset_export(ui.ctx());
                }
            });
            if self.dataset.result.is_none() && self.dataset.running.is_none() {
                self.maintain_dataset();
            }
        }
        ui.horizontal_wrapped(|ui| {
            if trace.is_some() {
                return;
            }
            ui.label("Dataset:");
            if ui
                .button("Fashion-MNIST test slice (1,000)")
                .on_hover_text("the first 1,000 Fashion-MNIST test images, built in")
                .clicked()
            {
                self.open_dataset(catalog::fashion_mnist_slice());
            }
            if ui
                .button("Photos (built-in)")
                .on_hover_text(
                    "19 public-domain, CC0 and CC-BY photos in eight subject folders (the gallery \
                     photos among them; licences in assets/datasets/photos/README.md), run under \
                     the photo model",
                )
                .clicked()
            {
                self.open_dataset(catalog::photo_dataset());
            }
            let full = catalog::fashion_mnist_test_set();
            let installed = full != catalog::fashion_mnist_slice();
            if ui
                .add_enabled(installed, egui::Button::new("Fashion-MNIST test set (10,000)"))
                .on_hover_text(full.display().to_string())
                .on_disabled_hover_text("install the Debian package dataset-fashion-mnist")
                .clicked()
            {
                self.open_dataset(full);
            }
            if ui
                .button("Open folder…")
                .on_hover_text("a folder of images (the first subfolder names the class) or Fashion-MNIST IDX files; or drop a folder on the window")
                .clicked()
            {
                self.pick_dataset_folder(ui.ctx());
            }
            if self.dataset.result.is_some()
                && ui
                    .button("Export…")
                    .on_hover_text("analysis.json, the CSV tables and every figure (PNG and SVG) into a folder")
                    .clicked()
            {
                self.pick_dataset_export(ui.ctx());
            }
        });
        if let Some(d) = self.dataset.data.as_ref().filter(|_| trace.is_none()) {
            let shown = match d.strip_prefix(catalog::assets_dir()) {
                Ok(rel) => format!("built in: {}", rel.display()),
                Err(_) => d.display().to_string(),
            };
            ui.label(egui::RichText::new(shown).small());
        }
        if let Some(r) = &self.dataset.running {
            let frac = if r.total > 0 {
                r.done as f32 / r.total as f32
            } else {
                0.0
            };
            let secs = r.started.elapsed().as_secs_f64();
            let rate = r.done as f64 / secs.max(1e-3);
            let eta = if rate > 0.0 {
                (r.total - r.done) as f64 / rate
            } else {
                0.0
            };
            let text = if self.hide_timings {
                format!("{} / {} images", r.done, r.total)
            } else {
                format!(
                    "{} / {} images · {rate:.0} images/s · ETA {eta:.0} s",
                    r.done, r.total
                )
            };
            let mut cancel = false;
            ui.horizontal(|ui| {
                ui.add(egui::ProgressBar::new(frac).text(text).desired_width(360.0));
                cancel = ui.button("Cancel").clicked();
            });
            if cancel {
                self.cancel_dataset();
            }
        }
        if let Some(e) = &self.dataset.error {
            ui.colored_label(egui::Color32::from_rgb(240, 90, 80), format!("Error: {e}"));
        }
        if self.dataset.paused_key.is_some()
            && self.dataset.running.is_none()
            && ui.button("Run again").clicked()
        {
            self.dataset.paused_key = None;
            self.dataset.result_key = None;
        }
        let Some(result) = &self.dataset.result else {
            if self.dataset.data.is_none() && trace.is_none() {
                ui.label("Pick a dataset: its routing is computed over every image, with the model and router chosen on the left.");
            }
            return;
        };
        let a = &result.analysis;
        let ri = self.dataset.run.min(a.runs.len().saturating_sub(1));
        let Some(run) = a.runs.get(ri) else {
            return;
        };
        let line = ui.label(format!(
            "{} · {} · {} images{}{} · {} classes{}",
            a.model,
            match a.runs.len() {
                1 => run.settings.label(),
                n => format!("{n} routers side by side"),
            },
            a.images,
            match (a.unreadable_count, a.passed_over_count) {
                (0, 0) => String::new(),
                (u, 0) => format!(" ({u} unreadable, skipped)"),
                (0, p) => format!(" ({p} folder entries passed over)"),
                (u, p) => format!(" ({u} unreadable, skipped; {p} folder entries passed over)"),
            },
            if self.hide_timings {
                String::new()
            } else {
                format!(" in {:.1} s", a.seconds)
            },
            a.classes.len(),
            if a.partial {
                " · partial (stopped early)"
            } else {
                ""
            }
        ));
        line.on_hover_text(format!("computed on {}", result.device));
        ui.label(self.dataset_model_line(&result.model));
        for k in &a.skipped {
            ui.weak(format!(
                "{} left out of the comparison: {}",
                k.settings.label(),
                k.reason
            ));
        }
        if a.runs.len() == 1 && !self.settings.compare {
            ui.weak(
                "tick \"compare routers side by side\" on the left to run every router over this dataset",
            );
        }
        ui.horizontal(|ui| {
            ui.label("MoE block:");
            for (l, la) in run.layers.iter().enumerate() {
                if ui
                    .selectable_label(self.dataset.layer == l, la.stats.block.to_string())
                    .clicked()
                {
                    self.dataset.layer = l;
                }
            }
        });
        let l = self.dataset.layer.min(run.layers.len().saturating_sub(1));
        let Some(la) = run.layers.get(l) else {
            return;
        };
        let st = &la.stats;
        let mut picked = None;
        let width = ui.available_width();
        if a.runs.len() > 1 {
            ui.strong(format!(
                "routers side by side on block {} (each re-routes this checkpoint at the first \
                 router's k and capacity factor; click one for its details below)",
                st.block
            ));
            if let Some(i) = dataset_routers::summary_table(ui, &a.runs, l, ri) {
                self.dataset.run = i;
            }
            ui.add_space(4.0);
            if let Some((i, j)) = dataset_routers::heatmaps(
                ui,
                &a.runs,
                l,
                &a.classes,
                (ri, self.dataset.expert),
                width,
            ) {
                self.dataset.run = i;
                picked = Some(j);
            }
            ui.separator();
            ui.strong(format!("details: {}", run.settings.label()));
        }
        ui.label(format!(
            "dropped {:.2}% of tokens · load std {:.2} tokens/image · usage entropy {:.3} · {}",
            100.0 * st.dropped_token_rate,
            st.load_std,
            st.usage_entropy,
            st.router_entropy.as_ref().map_or_else(
                || "router entropy: unknown (the trace logged no router logits or probabilities)"
                    .to_string(),
                |h| format!("mean router entropy {:.2}", h.mean)
            )
        ));
        ui.horizontal_top(|ui| {
            ui.vertical(|ui| {
                ui.strong(
                    "class × expert usage (rows normalised; hover for counts, click an expert)",
                );
                picked = dataset_plots::class_expert_heatmap(
                    ui,
                    st,
                    &a.classes,
                    self.dataset.expert,
                    (width * 0.55).min(560.0),
                );
            });
            ui.vertical(|ui| {
                ui.strong("dropped tokens by class");
                dataset_plots::drop_bars(ui, st, &a.classes);
            });
        });
        ui.strong(
            "tokens per image per expert (box 25–75%, whiskers 5–95%, line median, dashed capacity)",
        );
        // Capacity is per routing group; the boxes count tokens per image.
        let capacity = (st.router != "soft")
            .then(|| st.capacity as f64 / run.settings.group_images.max(1) as f64);
        if let Some(j) = dataset_plots::load_boxes(
            ui,
            st,
            capacity,
            self.settings.palette,
            self.dataset.expert,
            width.min(640.0),
        ) {
            picked = Some(j);
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("experts:");
            for j in 0..st.num_experts {
                crate::app::views::swatch(ui, self.settings.palette.expert(j));
                if ui
                    .selectable_label(self.dataset.expert == Some(j), format!("show expert {j}"))
                    .clicked()
                {
                    picked = Some(j);
                }
            }
        });
        if let Some(j) = picked {
            self.dataset.expert = Some(j);
        }
        let Some(j) = self.dataset.expert else {
            ui.label("Click an expert (heatmap column or box) to see where its tokens are and its atlas.");
            return;
        };
        ui.separator();
        ui.strong(format!("expert {j}"));
        let (grid, prefix) = (a.grid, a.prefix_tokens);
        let mut open = None;
        ui.horizontal_top(|ui| {
            ui.vertical(|ui| {
                ui.label("where its tokens are");
                dataset_plots::position_map(ui, st, j, grid, prefix, 140.0);
            });
            ui.vertical(|ui| {
                ui.label("atlas: its most strongly routed patches (click to open the image)");
                let Some(ex) = la.atlas.get(j) else {
                    return;
                };
                ui.weak(format!(
                    "at most {} per image{}",
                    a.atlas_per_image,
                    match ex.skipped.len() {
                        0 => String::new(),
                        1 => " · 1 near-duplicate tile skipped".to_string(),
                        n => format!(" · {n} near-duplicate tiles skipped"),
                    }
                ));
                let ctx = ui.ctx().clone();
                let textures = self.dataset.textures.entry((ri, l, j)).or_insert_with(|| {
                    ex.patches
                        .iter()
                        .enumerate()
                        .map(|(k, t)| {
                            t.thumbnail.as_ref().map(|img| {
                                ctx.load_texture(
                                    format!("atlas-{ri}-{l}-{j}-{k}"),
                                    egui::ColorImage::from_rgba_unmultiplied(
                                        [img.width() as usize, img.height() as usize],
                                        img.as_raw(),
                                    ),
                                    egui::TextureOptions::NEAREST,
                                )
                            })
                        })
                        .collect()
                });
                ui.horizontal_wrapped(|ui| {
                    for (t, tex) in ex.patches.iter().zip(textures.iter()) {
                        let Some(tex) = tex else {
                            ui.label("(unreadable)");
                            continue;
                        };
                        let resp = ui
                            .add(
                                egui::Image::new((tex.id(), egui::vec2(56.0, 56.0)))
                                    .sense(egui::Sense::click())
                                    .alt_text(format!("atlas patch of {}", t.name)),
                            )
                            .on_hover_text(format!(
                                "{} · patch ({}, {}) · score {:.4}",
                                t.name, t.row, t.col, t.score
                            ));
                        let [x0, y0, x1, y1] = t.patch_box;
                        let r = resp.rect;
                        ui.painter().rect_stroke(
                            egui::Rect::from_min_max(
                                r.min + egui::vec2(x0 * r.width(), y0 * r.height()),
                                r.min + egui::vec2(x1 * r.width(), y1 * r.height()),
                            ),
                            0.0,
                            egui::Stroke::new(1.5, egui::Color32::from_rgb(255, 204, 0)),
                            egui::StrokeKind::Middle,
                        );
                        if resp.clicked() {
                            open = Some((t.image, t.token));
                        }
                    }
                });
            });
        });
        if let Some((image, token)) = open {
            self.open_dataset_image(image, token);
        }
    }
}
