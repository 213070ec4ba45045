//! The top bar: open and export buttons, the model and mode, timings and the compute device.

use std::time::Duration;

use crate::app::RouterscopeApp;
use crate::app::settings::ModelMode;
use crate::figures::export::Format;

impl RouterscopeApp {
    pub(in crate::app) fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if ui.button("Open images…").on_hover_text("or drop image files on the window").clicked() {
                self.pick_images(ui.ctx());
            }
            if ui
                .button("Open checkpoint…")
                .on_hover_text(".safetensors (routerscope) or a vmoe checkpoint's .index file; or drop it on the window")
                .clicked()
            {
                self.pick_model(ui.ctx());
            }
            ui.menu_button("Export…", |ui| {
                ui.add(egui::Slider::new(&mut self.export_width, 400..=6000).text("PNG width (px)"));
                for (format, label) in [
                    (Format::Png, "figure as PNG…"),
                    (Format::Svg, "figure as SVG (vector)…"),
                    (Format::Csv, "data as CSV (one row per token)…"),
                    (Format::Json, "data as JSON (tokens, experts, Soft MoE matrices)…"),
                ] {
                    if ui.button(label).clicked() {
                        self.export(ui.ctx(), format);
                        ui.close();
                    }
                }
            });
            ui.separator();
            match &self.model {
                Some(m) => {
                    let name = m.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    ui.label(format!("model: {name}"));
                    if !m.trained {
                        ui.colored_label(egui::Color32::from_rgb(230, 160, 60), "(untrained random weights)");
                    }
                    let mode = match self.settings.mode {
                        _ if m.trace.is_some() => "routing trace",
                        ModelMode::Trained if m.config.is_feature_model() => {
                            "photo model (for photos)"
                        }
                        ModelMode::Trained => "trained for this router",
                        ModelMode::WhatIf => "what-if: routing swapped on these weights",
                    };
                    ui.label(format!("· {mode}"));
                }
                None => {
                    ui.label("no model loaded");
                }
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let ms = |v: f64| if self.hide_timings { "—".to_string() } else { format!("{v:.1}") };
                ui.label(format!("frame {} ms", ms(self.frame_ms as f64)));
                ui.separator();
                ui.label(format!("device: {}", self.device_label));
                if let Some(n) = &self.device_notice {
                    ui.colored_label(egui::Color32::from_rgb(230, 160, 60), "GPU not used").on_hover_text(n);
                }
                ui.separator();
                if let Some(r) = &self.result {
                    // Kept short: the bar's left half must still fit on a narrow window.
                    if r.what_if && self.trace_summary().is_none() {
                        ui.label(format!("last update {} ms (what-if)", ms(r.millis)))
                            .on_hover_text("re-run from the first MoE layer whose routing changed");
                    } else {
                        ui.label(format!("last update {} ms", ms(r.millis)));
                    }
                }
                if self.run_started.is_some_and(|t| t.elapsed() > Duration::from_millis(100)) || self.in_flight > 0 {
                    ui.add(egui::Spinner::new());
                    if let (Some((done, total)), Some(_)) = (self.run_progress, self.run_started) {
                        ui.label(format!("block {done}/{total}"));
                    }
                }
            });
        });
    }
}
