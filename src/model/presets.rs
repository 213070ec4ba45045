//! Named architectures: the small Fashion-MNIST ViT-MoE the project trains and ships, and a
//! ViT-S/16-sized V-MoE for benchmarks.

use super::config::{Classifier, ModelConfig, MoeConfig, Normalization};
use crate::routing::{CapacitySpec, RouterConfig, RouterKind};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The preset names accepted by [`preset`].
pub const PRESETS: [&str; 2] = ["fashion-mnist", "vit-s16"];

/// A router configuration for a preset: vmoe's defaults, and for Soft MoE the slot count that
/// gives the same expert compute as the sparse routers (`e·p` slots = `e·c` with k = 1, CF 1).
pub fn preset_router(kind: RouterKind, slots_for_soft: usize) -> RouterConfig {
    let mut r = RouterConfig::new(kind);
    if kind == RouterKind::SoftMoe {
        r.capacity = CapacitySpec::Slots(slots_for_soft);
    }
    r
}

/// The architecture called `name` with router `kind`.
pub fn preset(name: &str, kind: RouterKind) -> Option<ModelConfig> {
    match name {
        // 28×28 grey, patch 4 (49 patches + CLS), width 64, 6 blocks, MoE in blocks 3 and 5
        // (every other block of the second half), 8 experts. Soft MoE gets 8 slots per expert:
        // 50 tokens, k = 1, CF 1 give c = ceil(50/8) = 7, padded to 8.
        "fashion-mnist" => Some(ModelConfig {
            name: format!("fashion-mnist-{}", kind.cli_name()),
            image_size: [28, 28],
            channels: 1,
            patch_size: [4, 4],
            hidden_size: 64,
            num_layers: 6,
            num_heads: 4,
            mlp_dim: 256,
            classifier: Classifier::Token,
            representation_size: None,
            num_classes: 10,
            gelu: Default::default(),
            layer_scale: false,
            class_names: FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            normalization: Normalization {
                mean: vec![0.5],
                std: vec![0.5],
            },
            layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
            cls_token: None,
            distillation_token: false,
            register_tokens: 0,
            fc_norm: false,
            moe: Some(MoeConfig {
                layers: vec![3, 5],
                num_experts: 8,
                router: preset_router(kind, 8),
                group_images: 1,
                bfloat16_dispatch: false,
                combine: Default::default(),
                expert_mlp_dim: None,
            }),
        }),
        // ViT-S/16 at 224 px with MoE in the last 6 blocks and 32 experts (the paper's count).
        "vit-s16" => Some(ModelConfig {
            name: format!("vit-s16-{}", kind.cli_name()),
            image_size: [224, 224],
            channels: 3,
            patch_size: [16, 16],
            hidden_size: 384,
            num_layers: 12,
            num_heads: 6,
            mlp_dim: 1536,
            classifier: Classifier::Token,
            representation_size: None,
            num_classes: 1000,
            gelu: Default::default(),
            layer_scale: false,
            class_names: Vec::new(),
            normalization: Normalization {
                mean: vec![0.5; 3],
                std: vec![0.5; 3],
            },
            layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
            cls_token: None,
            distillation_token: false,
            register_tokens: 0,
            fc_norm: false,
            moe: Some(MoeConfig {
                layers: (6..12).collect(),
                num_experts: 32,
                router: preset_router(kind, 8),
                group_images: 1,
                bfloat16_dispatch: false,
                combine: Default::default(),
                expert_mlp_dim: None,
            }),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_for_every_router() {
        for name in PRESETS {
            for kind in RouterKind::ALL {
                let cfg = preset(name, kind).unwrap();
                cfg.validate().unwrap();
                assert!(
                    cfg.moe
                        .as_ref()
                        .unwrap()
                        .layers
                        .iter()
                        .all(|&l| l < cfg.num_layers)
                );
            }
        }
        assert!(preset("vit-h14", RouterKind::SoftMoe).is_none());
        let f = preset("fashion-mnist", RouterKind::SoftmaxTokenChoice).unwrap();
        assert_eq!(f.seq_len(), 50);
        let (c, _) = f.moe.unwrap().router.capacity_for(50, 8).unwrap();
        assert_eq!(
            c, 8,
            "Soft MoE's 8 slots per expert match the sparse routers' capacity"
        );
    }
}
