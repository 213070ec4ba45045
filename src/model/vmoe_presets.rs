//! Architectures of the released V-MoE checkpoints (which hold only tensors), matched against a
//! checkpoint's tensor shapes (the reader is `import::vmoe`).
//!
//! All released models are Softmax Token Choice V-MoEs with 8 experts and k = 2, a CLS token and
//! vmoe's `value_range(-1, 1)` input scaling; they were trained with routing groups of 8 images
//! and capacity factor 1.05 (the viewer routes one image per group unless asked otherwise).

use std::collections::BTreeMap;

use super::config::{Classifier, ModelConfig, MoeConfig, Normalization};
use super::weights::expected_tensors;
use crate::routing::{CapacitySpec, RouterConfig, RouterKind};

/// CIFAR-10's class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// ImageNet-1k (ILSVRC-2012) class names in label order (from torchvision, BSD 3-Clause; see
/// `assets/classes/`).
pub fn imagenet1k_classes() -> Vec<String> {
    include_str!("../../assets/classes/imagenet1k.txt")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Images per routing group in the released models' training.
pub const VMOE_TRAINED_GROUP_IMAGES: usize = 8;

#[allow(clippy::too_many_arguments)]
fn vmoe(
    name: &str,
    size: usize,
    patch: usize,
    width: usize,
    depth: usize,
    mlp: usize,
    heads: usize,
    layers: Vec<usize>,
    classes: usize,
) -> ModelConfig {
    let mut router = RouterConfig::new(RouterKind::SoftmaxTokenChoice);
    router.k = 2;
    router.capacity = CapacitySpec::Factor(1.05);
    router.loss_weights.importance = 0.005;
    router.loss_weights.load = 0.005;
    ModelConfig {
        name: name.into(),
        image_size: [size, size],
        channels: 3,
        patch_size: [patch, patch],
        hidden_size: width,
        num_layers: depth,
        num_heads: heads,
        mlp_dim: mlp,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: classes,
        gelu: Default::default(),
        layer_scale: false,
        class_names: match classes {
            10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            1000 => imagenet1k_classes(),
            // ImageNet-21k's names ship in no package: classes show as indices.
            _ => Vec::new(),
        },
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
            layers,
            num_experts: 8,
            router,
            group_images: 1,
            bfloat16_dispatch: false,
            combine: Default::default(),
            expert_mlp_dim: None,
        }),
    }
}

/// The released V-MoE architectures (ImageNet-21k heads show class indices: no package ships
/// their names).
pub fn vmoe_presets() -> Vec<ModelConfig> {
    let odd = |depth: usize| (1..depth).step_by(2).collect::<Vec<_>>();
    vec![
        vmoe(
            "vmoe_s32_last2_ilsvrc2012",
            224,
            32,
            512,
            8,
            2048,
            8,
            vec![5, 7],
            1000,
        ),
        vmoe(
            "vmoe_s32_last2_ilsvrc2012_ft_ilsvrc2012",
            384,
            32,
            512,
            8,
            2048,
            8,
            vec![5, 7],
            1000,
        ),
        vmoe(
            "vmoe_b16_imagenet21k_randaug_strong",
            224,
            16,
            768,
            12,
            3072,
            12,
            odd(12),
            21843,
        ),
        vmoe(
            "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
            384,
            16,
            768,
            12,
            3072,
            12,
            odd(12),
            1000,
        ),
        vmoe(
            "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10",
            128,
            16,
            768,
            12,
            3072,
            12,
            odd(12),
            10,
        ),
    ]
}

/// The benchmark shape of the released V-MoE-B/16 (ImageNet-21k, fine-tuned on ILSVRC2012) at
/// 384 px, named `vmoe-b16-softmax-tc`, routing each image alone (`cargo bench --bench model`,
/// `routerscope gpu-check`).
pub fn vmoe_b16_benchmark() -> ModelConfig {
    let mut cfg = vmoe(
        "vmoe-b16-softmax-tc",
        384,
        16,
        768,
        12,
        3072,
        12,
        (1..12).step_by(2).collect(),
        1000,
    );
    if let Some(m) = &mut cfg.moe {
        m.group_images = 1;
    }
    cfg
}

/// The first preset whose tensors are exactly `shapes` (canonical names, no `params/`).
pub fn match_vmoe_preset(shapes: &BTreeMap<String, Vec<usize>>) -> Option<ModelConfig> {
    vmoe_presets().into_iter().find(|cfg| {
        let specs = expected_tensors(cfg);
        shapes.len()
            == specs
                .iter()
                .filter(|s| s.required || shapes.contains_key(&s.name))
                .count()
            && specs.iter().all(|s| match shapes.get(&s.name) {
                Some(shape) => {
                    s.shape.len() == shape.len()
                        && s.shape
                            .iter()
                            .zip(shape)
                            .all(|(a, b)| a.is_none_or(|a| a == *b))
                }
                None => !s.required,
            })
    })
}
