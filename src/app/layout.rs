//! Where the panels go in the window (`panels/`), once per frame, after the worker's replies
//! and the user's input have been taken in.

use std::time::{Duration, Instant};

use crate::app::RouterscopeApp;

impl RouterscopeApp {
    /// Draws the whole viewer into `ui` (the eframe entry and the UI tests call this).
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let start = Instant::now();
        let ctx = ui.ctx().clone();
        self.poll_worker(&ctx);
        self.handle_input(&ctx);
        self.maintain_dataset();
        self.poll_timeline();

        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::bottom("gallery").show(ui, |ui| self.gallery(ui));
        egui::Panel::left("controls")
            .default_size(290.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.controls_panel(ui));
            });
        egui::Panel::right("details")
            .default_size(330.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.details(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::both().show(ui, |ui| self.central(ui));
        });
        self.frame_ms = start.elapsed().as_secs_f32() * 1e3;
        if self.run_started.is_some() || self.in_flight > 0 || self.dataset.running.is_some() {
            // Keep the spinner turning while the worker computes.
            ctx.request_repaint_after(Duration::from_millis(50));
        }
        if self.timeline.shown && self.timeline.playing.is_some() {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
    }
}
