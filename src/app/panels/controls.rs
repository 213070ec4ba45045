//! The controls panel on the left: model mode, router and its settings, routing group, view
//! options and the compute device (the widgets are in `views/controls.rs`); a change re-runs
//! what it affects.

use crate::app::RouterscopeApp;
use crate::app::settings::{self, ModelMode};
use crate::app::views;

impl RouterscopeApp {
    pub(in crate::app) fn controls_panel(&mut self, ui: &mut egui::Ui) {
        let group = match self.settings.group {
            settings::GroupMode::Single => 1,
            settings::GroupMode::AllImages => self.images.len(),
            settings::GroupMode::AsTrained => self
                .model
                .as_ref()
                .and_then(|m| m.config.moe.as_ref())
                .map_or(1, |m| m.group_images),
        };
        let mode_before = self.settings.mode;
        let router_before = self.settings.router;
        let family_before = self.settings.family;
        let change = views::controls::controls(
            ui,
            &mut self.settings,
            self.model.as_ref().map(|m| &m.config),
            self.model.as_ref().and_then(|m| m.trace.as_ref()),
            group,
        );
        if change.device {
            self.apply_device();
            self.request_run();
        }
        if self.settings.mode != mode_before
            || self.settings.router != router_before
            || self.settings.family != family_before
        {
            if self.settings.mode == ModelMode::WhatIf && mode_before == ModelMode::Trained {
                self.settings.model_path = self.model.as_ref().map(|m| m.path.clone());
            }
            self.select_model_for_mode();
        } else if change.rerun {
            self.request_run();
        }
    }
}
