//! Writing a figure set for one image: PNG (rasterised at a chosen width), SVG, CSV and JSON,
//! each written atomically, with file names that record the image, model, router, k and
//! capacity factor.

use crate::model::PrefixTokens;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::DynamicImage;
use serde_json::json;

use super::data::{CSV_HEADER, routing_json, tokens_csv};
use super::palette::Palette;
use super::raster::svg_to_png;
use super::svg::{FigureInput, Panel, routing_figure};
use super::token_view::ImageRouting;
use crate::routing::{CapacitySpec, RouterConfig, RouterFamily};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Png,
    Svg,
    Csv,
    Json,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "png" => Ok(Format::Png),
            "svg" => Ok(Format::Svg),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format `{other}` (png, svg, csv, json)")),
        }
    }
}

/// One panel of a figure: a routing of the image, its MoE block and a title.
pub struct FigurePanel {
    pub title: String,
    pub block: usize,
    pub routing: ImageRouting,
}

/// Everything a figure set is made of.
pub struct FigureSet<'a> {
    pub title: String,
    pub image_name: &'a str,
    pub image: &'a DynamicImage,
    pub grid: [usize; 2],
    pub prefix: PrefixTokens,
    pub palette: Palette,
    pub opacity: f32,
    pub panels: &'a [FigurePanel],
    /// Top classes `(name, probability)` of the model's prediction, for the JSON.
    pub prediction: Vec<(String, f32)>,
    /// A feature model's mean patch cosine against all experts (the dense model), for the JSON.
    pub fidelity: Option<f64>,
}

/// `{image}__{model}__{router}_k{k}_cf{cf}` (characters outside `[A-Za-z0-9._-]` become `_`).
pub fn default_stem(image: &str, model: &str, router: &RouterConfig) -> String {
    let stem = |s: &str| {
        Path::new(s)
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.to_string())
    };
    let cap = match (router.kind.family(), router.capacity) {
        (RouterFamily::Soft, _) => "slots".to_string(),
        (_, CapacitySpec::Factor(f)) => format!("cf{}", crate::format::number(f)),
        (_, CapacitySpec::Slots(c)) => format!("c{c}"),
    };
    let raw = format!(
        "{}__{}__{}_k{}_{cap}",
        stem(image),
        stem(model),
        router.kind.cli_name(),
        router.experts_per_token()
    );
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl FigureSet<'_> {
    /// The SVG document.
    pub fn svg(&self) -> String {
        // Small images are embedded as they are (drawn pixelated); photos at most 384 px.
        let shown = if self.image.width().max(self.image.height()) > 384 {
            self.image
                .resize(384, 384, image::imageops::FilterType::Triangle)
        } else {
            self.image.clone()
        };
        let mut png = Vec::new();
        let embedded = shown
            .to_rgba8()
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .is_ok();
        let input = FigureInput {
            title: self.title.clone(),
            image_png: embedded.then_some(png.as_slice()),
            image_aspect: self.image.width() as f32 / self.image.height().max(1) as f32,
            grid: self.grid,
            prefix: self.prefix,
            palette: self.palette,
            opacity: self.opacity,
        };
        let panels: Vec<Panel<'_>> = self
            .panels
            .iter()
            .map(|p| Panel {
                title: p.title.clone(),
                routing: &p.routing,
            })
            .collect();
        routing_figure(&input, &panels)
    }

    pub fn csv(&self) -> String {
        let mut s = format!("{CSV_HEADER}\n");
        for p in self.panels {
            s.push_str(&tokens_csv(
                self.image_name,
                p.block,
                &p.routing,
                self.grid,
                self.prefix,
                false,
            ));
        }
        s
    }

    pub fn json(&self) -> String {
        let v = json!({
            "title": self.title,
            "image": self.image_name,
            "prediction": self.prediction.iter().map(|(c, p)| json!({"class": c, "probability": p})).collect::<Vec<_>>(),
            "fidelity_mean_patch_cosine": self.fidelity,
            "panels": self.panels.iter().map(|p| {
                let mut v = routing_json(self.image_name, p.block, &p.routing, self.grid, self.prefix);
                v["title"] = json!(p.title);
                v
            }).collect::<Vec<_>>(),
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// The bytes of `format` (`png_width` for PNG).
    pub fn render(&self, format: Format, png_width: u32) -> Result<Vec<u8>, String> {
        Ok(match format {
            Format::Svg => self.svg().into_bytes(),
            Format::Png => svg_to_png(&self.svg(), png_width).map_err(|e| e.to_string())?,
            Format::Csv => self.csv().into_bytes(),
            Format::Json => self.json().into_bytes(),
        })
    }

    /// Writes every format to `dir/stem.ext` atomically; returns the paths.
    pub fn write(
        &self,
        dir: &Path,
        stem: &str,
        formats: &[Format],
        png_width: u32,
    ) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::new();
        for &f in formats {
            let path = dir.join(format!("{stem}.{}", f.extension()));
            let bytes = self.render(f, png_width)?;
            crate::tensor_io::write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
            out.push(path);
        }
        Ok(out)
    }
}
