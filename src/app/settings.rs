//! The viewer's settings, persisted between runs (eframe storage), and how they become the
//! model's routing options.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backend::DeviceChoice;
use crate::catalog::ImageKind;

use crate::figures::Palette;
use crate::model::{ModelConfig, RunOptions};
use crate::routing::{CapacityRounding, CapacitySpec, RouterConfig, RouterKind};

/// Which weights run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelMode {
    /// The built-in checkpoint trained with the selected router.
    Trained,
    /// The current checkpoint's weights, routed with the selected rule.
    WhatIf,
}

/// Which built-in models the shown image runs under in trained mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelFamily {
    /// By the image: 28×28 grey images under the Fashion-MNIST models, photos under the photo
    /// model.
    #[default]
    ByImage,
    FashionMnist,
    Photo,
}

impl ModelFamily {
    pub const ALL: [ModelFamily; 3] = [Self::ByImage, Self::FashionMnist, Self::Photo];

    pub fn label(self) -> &'static str {
        match self {
            Self::ByImage => "by image",
            Self::FashionMnist => "Fashion-MNIST",
            Self::Photo => "photo model",
        }
    }

    /// The kind of model a dataset of `kind` (see [`crate::catalog::dataset_kind`]) runs under.
    pub fn for_dataset(self, kind: ImageKind) -> ImageKind {
        match self {
            Self::ByImage => kind,
            Self::FashionMnist => ImageKind::FashionMnist,
            Self::Photo => ImageKind::Photo,
        }
    }

    /// The kind of model `img` runs under.
    pub fn for_image(self, img: &image::DynamicImage) -> ImageKind {
        match self {
            Self::ByImage => ImageKind::of(img),
            Self::FashionMnist => ImageKind::FashionMnist,
            Self::Photo => ImageKind::Photo,
        }
    }
}

/// Which images form a routing group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupMode {
    /// The shown image alone (the viewer's default).
    Single,
    /// Every loaded image in one group (capacity is shared, as in V-MoE training batches).
    AllImages,
    /// Groups of the size the checkpoint was trained with (8 for the released V-MoE models).
    AsTrained,
}

/// Which MoE layer(s) the image view shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerView {
    One(usize),
    All,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub mode: ModelMode,
    pub router: RouterKind,
    pub k: usize,
    pub capacity_factor: f64,
    pub rounding: CapacityRounding,
    pub multiple_of: usize,
    pub batch_priority: bool,
    pub iterations: usize,
    pub group: GroupMode,
    pub layer: LayerView,
    pub opacity: f32,
    pub palette: Palette,
    pub show_second_choices: bool,
    /// Show the image under every router side by side.
    pub compare: bool,
    /// The checkpoint used in what-if mode (`None`: the built-in model of the last router).
    pub model_path: Option<PathBuf>,
    /// Images the user opened (the sample gallery is always there).
    pub image_paths: Vec<PathBuf>,
    pub current_image: usize,
    /// Where the model runs.
    pub device: DeviceChoice,
    /// Which built-in models images open under (trained mode).
    pub family: ModelFamily,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: ModelMode::Trained,
            router: RouterKind::SoftmaxTokenChoice,
            k: 1,
            capacity_factor: 1.0,
            rounding: CapacityRounding::Ceil,
            multiple_of: 4,
            batch_priority: false,
            iterations: 20,
            group: GroupMode::Single,
            layer: LayerView::One(0),
            opacity: 0.55,
            palette: Palette::TolMuted,
            show_second_choices: true,
            compare: false,
            model_path: None,
            image_paths: Vec::new(),
            current_image: 0,
            device: DeviceChoice::Auto,
            family: ModelFamily::ByImage,
        }
    }
}

impl Settings {
    /// The router configuration the controls describe.
    pub fn router_config(&self) -> RouterConfig {
        let mut r = RouterConfig::new(self.router);
        r.k = self.k.max(1);
        r.capacity = match self.router {
            // Soft MoE's slots are the shape of `mu`; the model fills them in.
            RouterKind::SoftMoe => CapacitySpec::Slots(1),
            _ => CapacitySpec::Factor(self.capacity_factor),
        };
        r.rounding = self.rounding;
        r.multiple_of = self.multiple_of;
        r.batch_priority = self.batch_priority;
        r.max_iterations = self.iterations;
        r
    }

    /// Routing options for `cfg` with `images` images loaded and the shown image `current`:
    /// the options and the batch (indices into the loaded images) to run.
    pub fn run_plan(
        &self,
        cfg: &ModelConfig,
        images: usize,
        current: usize,
    ) -> Result<(RunOptions, Vec<usize>), String> {
        let mut opts = RunOptions::from_config(cfg).with_router(self.router_config());
        let batch: Vec<usize> = match self.group {
            GroupMode::Single => vec![current],
            GroupMode::AllImages => (0..images).collect(),
            GroupMode::AsTrained => {
                let g = cfg.moe.as_ref().map_or(1, |m| m.group_images).max(1);
                if images < g {
                    return Err(format!(
                        "this checkpoint was trained with groups of {g} images; load at least {g} \
                         images (or route the image alone)"
                    ));
                }
                // The group of g consecutive images that contains the current one.
                let start = (current / g * g).min(images - g);
                (start..start + g).collect()
            }
        };
        opts.group_images = batch.len();
        Ok((opts, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preset;

    #[test]
    fn settings_round_trip_through_json() {
        let s = Settings {
            router: RouterKind::SinkhornExpertChoice,
            capacity_factor: 1.5,
            group: GroupMode::AllImages,
            layer: LayerView::All,
            ..Settings::default()
        };
        let back: Settings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        // Missing fields (an older settings file) take defaults.
        let old: Settings = serde_json::from_str(r#"{"k": 2}"#).unwrap();
        assert_eq!(old.k, 2);
        assert_eq!(old.router, RouterKind::SoftmaxTokenChoice);
    }

    #[test]
    fn group_modes_choose_the_batch() {
        let mut cfg = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
        let mut s = Settings::default();
        let (o, b) = s.run_plan(&cfg, 5, 3).unwrap();
        assert_eq!((o.group_images, b), (1, vec![3]));
        s.group = GroupMode::AllImages;
        let (o, b) = s.run_plan(&cfg, 5, 3).unwrap();
        assert_eq!((o.group_images, b), (5, vec![0, 1, 2, 3, 4]));
        s.group = GroupMode::AsTrained;
        if let Some(m) = &mut cfg.moe {
            m.group_images = 2;
        }
        let (o, b) = s.run_plan(&cfg, 5, 3).unwrap();
        assert_eq!((o.group_images, b), (2, vec![2, 3]));
        let (_, b) = s.run_plan(&cfg, 5, 4).unwrap();
        assert_eq!(b, vec![3, 4]);
        assert!(s.run_plan(&cfg, 1, 0).unwrap_err().contains("groups of 2"));
    }
}
