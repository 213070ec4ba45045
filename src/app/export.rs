//! Exporting the current view: the owned figure job, and the save dialog that writes it off the
//! UI thread.

use crate::model::PrefixTokens;
use std::path::Path;
use std::sync::Arc;

use image::DynamicImage;

use crate::app::settings::LayerView;
use crate::app::{DialogResult, RouterscopeApp};
use crate::figures::export::{FigurePanel, FigureSet, Format, default_stem};
use crate::figures::{ImageRouting, Palette};

/// What an export needs, owned so the save dialog and rendering run off the UI thread.
pub struct ExportJob {
    pub title: String,
    pub image_name: String,
    pub image: Arc<DynamicImage>,
    pub grid: [usize; 2],
    pub prefix: PrefixTokens,
    pub palette: Palette,
    pub opacity: f32,
    pub panels: Vec<FigurePanel>,
    pub prediction: Vec<(String, f32)>,
    /// A feature model's fidelity (mean patch cosine against all experts).
    pub fidelity: Option<f64>,
    pub stem: String,
}

impl ExportJob {
    /// Renders `format` and writes it atomically to `path`.
    pub fn write(&self, path: &Path, format: Format, png_width: u32) -> Result<(), String> {
        let set = FigureSet {
            title: self.title.clone(),
            image_name: &self.image_name,
            image: &self.image,
            grid: self.grid,
            prefix: self.prefix,
            palette: self.palette,
            opacity: self.opacity,
            panels: &self.panels,
            prediction: self.prediction.clone(),
            fidelity: self.fidelity,
        };
        let bytes = set.render(format, png_width)?;
        crate::tensor_io::write_atomic(path, &bytes).map_err(|e| e.to_string())
    }
}

impl RouterscopeApp {
    /// The figure of what is shown now: the shown image in the selected MoE layer(s).
    pub fn export_job(&self) -> Option<ExportJob> {
        let model = self.model.as_ref()?;
        let cfg = &model.config;
        let moe = cfg.moe.as_ref()?;
        let img = self.images.get(self.settings.current_image)?;
        let layers: Vec<usize> = match self.settings.layer {
            LayerView::One(i) => vec![i.min(moe.layers.len().saturating_sub(1))],
            LayerView::All => (0..moe.layers.len()).collect(),
        };
        let compared = self
            .comparison
            .as_ref()
            .filter(|(i, _)| self.settings.compare && *i == self.settings.current_image);
        let panels: Vec<FigurePanel> = match compared {
            Some((_, entries)) => entries
                .iter()
                .filter_map(|(router, res)| {
                    let (c, out) = res.as_ref().ok()?;
                    let rec = out.records.get(layers[0])?;
                    Some(FigurePanel {
                        title: format!("{} · block {}", router.kind.display_name(), rec.block),
                        block: rec.block,
                        routing: ImageRouting::new(&rec.groups[0], 0, c.seq_len()),
                    })
                })
                .collect(),
            None => layers
                .iter()
                .filter_map(|&l| {
                    self.image_routing(l).map(|routing| FigurePanel {
                        title: format!("block {}", moe.layers[l]),
                        block: moe.layers[l],
                        routing,
                    })
                })
                .collect(),
        };
        if panels.is_empty() {
            return None;
        }
        let router = self
            .result
            .as_ref()
            .and_then(|r| r.output.options.routers.first().cloned())
            .unwrap_or_else(|| self.settings.router_config());
        let model_name = model.path.display().to_string();
        let mut prediction: Vec<(String, f32)> = self
            .prediction()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .map(|(c, &v)| (cfg.class_name(c), v))
                    .collect()
            })
            .unwrap_or_default();
        prediction.sort_by(|a, b| b.1.total_cmp(&a.1));
        prediction.truncate(5);
        let model_stem = model
            .path
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let fidelity = self.fidelity().filter(|_| compared.is_none());
        Some(ExportJob {
            title: format!(
                "{} · {} · {}{}",
                img.name,
                model_stem,
                router.kind.display_name(),
                fidelity.map_or(String::new(), |f| format!(
                    " · fidelity {f:.3} (mean patch cosine vs all experts)"
                ))
            ),
            image_name: img.name.clone(),
            image: img.image.clone(),
            grid: cfg.grid(),
            prefix: cfg.prefix(),
            palette: self.settings.palette,
            opacity: self.settings.opacity,
            panels,
            prediction,
            fidelity,
            stem: default_stem(&img.name, &model_name, &router),
        })
    }

    pub(super) fn export(&mut self, ctx: &egui::Context, format: Format) {
        let Some(job) = self.export_job() else {
            self.errors
                .push("nothing to export yet: open an image and a model".into());
            return;
        };
        let tx = self.dialogs.0.clone();
        let ctx = ctx.clone();
        let width = self.export_width;
        std::thread::spawn(move || {
            let ext = format.extension();
            let dialog = rfd::AsyncFileDialog::new()
                .set_file_name(format!("{}.{ext}", job.stem))
                .add_filter(ext, &[ext]);
            if let Some(file) = pollster::block_on(dialog.save_file()) {
                let path = file.path().to_path_buf();
                let result = job.write(&path, format, width).map(|()| path);
                let _ = tx.send(DialogResult::Exported(result));
                ctx.request_repaint();
            }
        });
    }
}
