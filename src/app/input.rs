//! Keyboard shortcuts, files dropped on the window, and the file dialogs (run off the UI thread,
//! their answers collected here).

use std::path::Path;

use crate::app::settings::ModelMode;
use crate::app::views;
use crate::app::{DialogResult, IMAGE_EXTENSIONS, RouterscopeApp};
use crate::import::is_vmoe_checkpoint;
use crate::routing::RouterKind;

impl RouterscopeApp {
    pub(super) fn handle_input(&mut self, ctx: &egui::Context) {
        let (dropped, keys) = ctx.input(|i| {
            let keys: Vec<egui::Key> = i
                .events
                .iter()
                .filter_map(|e| match e {
                    egui::Event::Key {
                        key,
                        pressed: true,
                        modifiers,
                        ..
                    } if !modifiers.ctrl && !modifiers.command => Some(*key),
                    _ => None,
                })
                .collect();
            (i.raw.dropped_files.clone(), keys)
        });
        if ctx.egui_wants_keyboard_input() {
            // A text field has focus: keys are typing.
        } else {
            for key in keys {
                match key {
                    egui::Key::ArrowRight => self.show_image(self.settings.current_image + 1),
                    egui::Key::ArrowLeft => {
                        self.show_image(self.settings.current_image.saturating_sub(1))
                    }
                    egui::Key::W => {
                        self.settings.mode = match self.settings.mode {
                            ModelMode::Trained => ModelMode::WhatIf,
                            ModelMode::WhatIf => ModelMode::Trained,
                        };
                        self.select_model_for_mode();
                    }
                    k => {
                        if let Some(i) = (0..RouterKind::ALL.len())
                            .find(|&i| views::controls::router_key(i) == k)
                        {
                            self.select_router(RouterKind::ALL[i]);
                        }
                    }
                }
            }
        }
        let mut images = Vec::new();
        for f in dropped {
            let path = f.path().to_path_buf();
            if path.as_os_str().is_empty() {
                continue;
            }
            if crate::run::is_run(&path) {
                // A run's folder (or its run.sqlite) opens the Timeline.
                self.open_run(path, ctx);
            } else if path.is_dir() {
                // A folder is a dataset (class subfolders, or Fashion-MNIST IDX files).
                self.open_dataset(path);
            } else if is_checkpoint(&path) {
                self.open_model(path);
            } else {
                images.push(path);
            }
        }
        if !images.is_empty() {
            self.open_images(images);
        }
        while let Ok(d) = self.dialogs.1.try_recv() {
            match d {
                DialogResult::Images(p) => self.open_images(p),
                DialogResult::Model(p) if crate::run::is_run(&p) => self.open_run(p, ctx),
                DialogResult::Model(p) => self.open_model(p),
                DialogResult::Exported(Ok(p)) => {
                    self.notice = Some(format!("saved {}", p.display()))
                }
                DialogResult::Exported(Err(e)) => self.errors.push(format!("export failed: {e}")),
                DialogResult::Dataset(p) => self.open_dataset(p),
            }
        }
    }

    pub(super) fn pick_images(&self, ctx: &egui::Context) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let dialog = rfd::AsyncFileDialog::new().add_filter("images", &IMAGE_EXTENSIONS);
            if let Some(files) = pollster::block_on(dialog.pick_files()) {
                let _ = tx.send(DialogResult::Images(
                    files.iter().map(|f| f.path().to_path_buf()).collect(),
                ));
                ctx.request_repaint();
            }
        });
    }

    pub(super) fn pick_model(&self, ctx: &egui::Context) {
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let dialog = rfd::AsyncFileDialog::new().add_filter(
                "checkpoints, routing traces and runs (run.sqlite)",
                &["safetensors", "index", "sqlite"],
            );
            if let Some(file) = pollster::block_on(dialog.pick_file()) {
                let _ = tx.send(DialogResult::Model(file.path().to_path_buf()));
                ctx.request_repaint();
            }
        });
    }
}

fn is_checkpoint(path: &Path) -> bool {
    is_vmoe_checkpoint(path) || path.extension().is_some_and(|e| e == "safetensors")
}
