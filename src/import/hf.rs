//! Hugging Face transformers ViTs in safetensors (`ViTModel`, `ViTForImageClassification`,
//! `Dinov2Model`) as routerscope checkpoints. The `config.json` beside the weights gives the heads,
//! the LayerNorm epsilon (1e-12 for ViT), the activation and the class names; the
//! `preprocessor_config.json` gives the input mean and std. PyTorch `Linear` weights `[out, in]`
//! become kernels; missing QKV biases (`qkv_bias: false`) become zeros.

use std::path::Path;

use serde_json::Value;

use super::timm::{err, linear, patch_kernel, read_json_beside};
use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, block_prefix,
    check_tensors,
};
use crate::tensor_io::{F32Tensor, TensorFile};

/// Hugging Face's options: heads (else `config.json`'s `num_attention_heads`), mean and std
/// (else `preprocessor_config.json`'s, else the family's processor defaults).
pub type HfOptions = super::WeightsOptions;

/// The two block layouts: ViT's `layernorm_before`/`intermediate`/`output`, DINOv2's
/// `norm1`/`mlp.fc1`/`mlp.fc2` with LayerScale.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    Vit,
    Dinov2,
}

/// The prefix before `embeddings.cls_token` when `names` are a Hugging Face ViT's.
pub fn hf_root(names: &[String]) -> Option<String> {
    names
        .iter()
        .find_map(|n| n.strip_suffix("embeddings.cls_token"))
        .filter(|root| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("{root}encoder.layer.")))
        })
        .map(str::to_string)
}

/// Reads the Hugging Face checkpoint at `path` with the JSON configs beside it.
pub fn import_hf(path: &Path, opts: &HfOptions) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let file = TensorFile::open(path)?;
    let names = file.names()?;
    let root = hf_root(&names).ok_or_else(|| {
        err(
            path,
            "not a Hugging Face ViT / DINOv2 checkpoint (no `embeddings.cls_token` with \
             `encoder.layer.*`)",
        )
    })?;
    let n = |s: &str| format!("{root}{s}");
    for (name, what) in [
        ("embeddings.register_tokens", "register tokens"),
        (
            "embeddings.distillation_token",
            "a distillation token (DeiT)",
        ),
        (
            "encoder.layer.0.mlp.weights_in.weight",
            "a SwiGLU MLP (DINOv2-g)",
        ),
    ] {
        if names.contains(&n(name)) {
            return Err(err(
                path,
                format!(
                    "`{}`: {what} is not supported by this importer yet",
                    n(name)
                ),
            ));
        }
    }
    let family = if names.contains(&n("encoder.layer.0.norm1.weight")) {
        Family::Dinov2
    } else {
        Family::Vit
    };
    let config = read_json_beside(path, "config.json")?;
    let preprocessor = read_json_beside(path, "preprocessor_config.json")?;
    let field = |k: &str| config.as_ref().and_then(|c| c.get(k));
    let get = |s: &str| file.float(s, "a float tensor");
    let cls = get(&n("embeddings.cls_token"))?;
    let d = cls.data.len();
    if cls.shape != [1, 1, d] || d == 0 {
        return Err(err(
            path,
            format!(
                "`{}` has shape {:?}, expected [1, 1, d]",
                n("embeddings.cls_token"),
                cls.shape
            ),
        ));
    }
    let proj_name = n("embeddings.patch_embeddings.projection.weight");
    let proj = get(&proj_name)?;
    let [od, c, ph, pw] = proj.shape[..] else {
        return Err(err(
            path,
            format!(
                "`{proj_name}` has shape {:?}, expected [d, c, ph, pw]",
                proj.shape
            ),
        ));
    };
    if od != d {
        return Err(err(
            path,
            format!("the patch projection gives width {od}, the CLS token {d}"),
        ));
    }
    let pos = get(&n("embeddings.position_embeddings"))?;
    let tokens = pos.data.len() / d;
    let side = ((tokens.saturating_sub(1)) as f64).sqrt().round() as usize;
    if pos.shape != [1, tokens, d] || side == 0 || side * side + 1 != tokens {
        return Err(err(
            path,
            format!(
                "`{}` has shape {:?}, expected [1, 1 + a square grid, {d}]",
                n("embeddings.position_embeddings"),
                pos.shape
            ),
        ));
    }
    let blocks = (0..)
        .take_while(|i| {
            names
                .iter()
                .any(|x| x.starts_with(&n(&format!("encoder.layer.{i}."))))
        })
        .count();
    if let Some(i) = names
        .iter()
        .filter_map(|x| {
            x.strip_prefix(&n("encoder.layer."))?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .find(|&i| i >= blocks)
    {
        return Err(err(
            path,
            format!("layer {i} has weights but layer {blocks} has none: a layer is missing"),
        ));
    }
    if let Some(want) = field("num_hidden_layers").and_then(Value::as_u64)
        && want as usize != blocks
    {
        return Err(err(
            path,
            format!("config.json says {want} layers, the weights hold {blocks}"),
        ));
    }
    let heads = opts
        .heads
        .or_else(|| field("num_attention_heads")?.as_u64().map(|h| h as usize))
        .ok_or_else(|| {
            err(
                path,
                "no config.json names num_attention_heads: give --heads",
            )
        })?;
    if heads == 0 || d % heads != 0 {
        return Err(err(
            path,
            format!("{heads} heads do not divide the width {d}"),
        ));
    }
    let hd = d / heads;
    let gelu = match field("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu")
    {
        "gelu" => Gelu::Erf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Gelu::Tanh,
        other => {
            return Err(err(
                path,
                format!("hidden_act `{other}`: routerscope's MLPs use GELU"),
            ));
        }
    };
    let eps = field("layer_norm_eps")
        .and_then(Value::as_f64)
        .map(|e| e as f32)
        .unwrap_or(match family {
            Family::Vit => 1e-12,
            Family::Dinov2 => 1e-6,
        });

    let mut w = ModelWeights::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        w.insert(name, F32Tensor { shape, data });
    };
    put(
        "embedding/kernel".into(),
        vec![ph, pw, c, d],
        patch_kernel(&proj.data, [d, c, ph, pw]),
    );
    put(
        "embedding/bias".into(),
        vec![d],
        get(&n("embeddings.patch_embeddings.projection.bias"))?.data,
    );
    put("cls".into(), vec![1, 1, d], cls.data);
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, tokens, d],
        pos.data,
    );
    let vector = |s: &str| -> Result<Vec<f32>, ModelError> {
        let t = get(s)?;
        if t.data.len() != d {
            return Err(err(
                path,
                format!("`{s}` has shape {:?}, expected [{d}]", t.shape),
            ));
        }
        Ok(t.data)
    };
    let bias_or_zero = |s: &str, len: usize| -> Result<Vec<f32>, ModelError> {
        if !names.iter().any(|x| x == s) {
            return Ok(vec![0.0; len]);
        }
        let t = get(s)?;
        if t.data.len() != len {
            return Err(err(
                path,
                format!("`{s}` has shape {:?}, expected [{len}]", t.shape),
            ));
        }
        Ok(t.data)
    };
    let layer_scale = family == Family::Dinov2;
    let mut mlp_dim = 0;
    for i in 0..blocks {
        let src = |s: &str| n(&format!("encoder.layer.{i}.{s}"));
        let dst = block_prefix(i);
        let (ln0, ln1, fc1, fc2) = match family {
            Family::Vit => (
                "layernorm_before",
                "layernorm_after",
                "intermediate.dense",
                "output.dense",
            ),
            Family::Dinov2 => ("norm1", "norm2", "mlp.fc1", "mlp.fc2"),
        };
        put(
            format!("{dst}/LayerNorm_0/scale"),
            vec![d],
            vector(&src(&format!("{ln0}.weight")))?,
        );
        put(
            format!("{dst}/LayerNorm_0/bias"),
            vec![d],
            vector(&src(&format!("{ln0}.bias")))?,
        );
        put(
            format!("{dst}/LayerNorm_1/scale"),
            vec![d],
            vector(&src(&format!("{ln1}.weight")))?,
        );
        put(
            format!("{dst}/LayerNorm_1/bias"),
            vec![d],
            vector(&src(&format!("{ln1}.bias")))?,
        );
        if layer_scale {
            put(
                format!("{dst}/LayerScale_0/scale"),
                vec![d],
                vector(&src("layer_scale1.lambda1"))?,
            );
            put(
                format!("{dst}/LayerScale_1/scale"),
                vec![d],
                vector(&src("layer_scale2.lambda1"))?,
            );
        }
        for part in ["query", "key", "value"] {
            let wname = src(&format!("attention.attention.{part}.weight"));
            put(
                format!("{dst}/SelfAttention/{part}/kernel"),
                vec![d, heads, hd],
                linear(&get(&wname)?, d, d, &wname, path)?,
            );
            put(
                format!("{dst}/SelfAttention/{part}/bias"),
                vec![heads, hd],
                bias_or_zero(&src(&format!("attention.attention.{part}.bias")), d)?,
            );
        }
        let out = src("attention.output.dense.weight");
        put(
            format!("{dst}/SelfAttention/out/kernel"),
            vec![heads, hd, d],
            linear(&get(&out)?, d, d, &out, path)?,
        );
        put(
            format!("{dst}/SelfAttention/out/bias"),
            vec![d],
            vector(&src("attention.output.dense.bias"))?,
        );
        let w1 = get(&src(&format!("{fc1}.weight")))?;
        let m = w1.shape.first().copied().unwrap_or(0);
        if m == 0 || (mlp_dim != 0 && m != mlp_dim) {
            return Err(err(
                path,
                format!(
                    "`{}` has shape {:?}",
                    src(&format!("{fc1}.weight")),
                    w1.shape
                ),
            ));
        }
        mlp_dim = m;
        put(
            format!("{dst}/Mlp/Dense_0/kernel"),
            vec![d, m],
            linear(&w1, d, m, &src(&format!("{fc1}.weight")), path)?,
        );
        put(
            format!("{dst}/Mlp/Dense_0/bias"),
            vec![m],
            bias_or_zero(&src(&format!("{fc1}.bias")), m)?,
        );
        let w2name = src(&format!("{fc2}.weight"));
        put(
            format!("{dst}/Mlp/Dense_1/kernel"),
            vec![m, d],
            linear(&get(&w2name)?, m, d, &w2name, path)?,
        );
        put(
            format!("{dst}/Mlp/Dense_1/bias"),
            vec![d],
            vector(&src(&format!("{fc2}.bias")))?,
        );
    }
    put(
        "Encoder/encoder_norm/scale".into(),
        vec![d],
        vector(&n("layernorm.weight"))?,
    );
    put(
        "Encoder/encoder_norm/bias".into(),
        vec![d],
        vector(&n("layernorm.bias"))?,
    );
    let classes = if names.iter().any(|x| x == "classifier.weight") {
        let head = get("classifier.weight")?;
        if head.shape.get(1) == Some(&(2 * d)) {
            return Err(err(
                path,
                "`classifier.weight` reads the CLS token and the mean patch token together \
                 (Dinov2ForImageClassification): not supported yet",
            ));
        }
        let k = head.shape.first().copied().unwrap_or(0);
        put(
            "head/kernel".into(),
            vec![d, k],
            linear(&head, d, k, "classifier.weight", path)?,
        );
        put(
            "head/bias".into(),
            vec![k],
            bias_or_zero("classifier.bias", k)?,
        );
        k
    } else {
        0
    };
    let labels = field("id2label").and_then(Value::as_object);
    let class_names: Vec<String> = match (classes, labels) {
        (0, _) => Vec::new(),
        (k, Some(map)) if map.len() == k => (0..k)
            .map(|i| {
                map.get(&i.to_string())
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("class {i}"), str::to_string)
            })
            .collect(),
        (k, _) => super::unnamed_classes(k),
    };
    // Hugging Face's ViT processor defaults to 0.5; DINOv2's to ImageNet's statistics.
    let default = match family {
        Family::Vit => [0.5f32; 3],
        Family::Dinov2 => [0.485, 0.456, 0.406],
    };
    let default_std = match family {
        Family::Vit => [0.5f32; 3],
        Family::Dinov2 => [0.229, 0.224, 0.225],
    };
    let cfg = ModelConfig {
        name: opts.name.clone(),
        image_size: [side * ph, side * pw],
        channels: c,
        patch_size: [ph, pw],
        hidden_size: d,
        num_layers: blocks,
        num_heads: heads,
        mlp_dim,
        classifier: Classifier::Token,
        representation_size: None,
        num_classes: classes,
        class_names,
        normalization: Normalization {
            mean: super::stat_or(&opts.mean, preprocessor.as_ref(), "/image_mean", default),
            std: super::stat_or(&opts.std, preprocessor.as_ref(), "/image_std", default_std),
        },
        gelu,
        layer_scale,
        layer_norm_eps: eps,
        moe: None,
    };
    cfg.validate()?;
    let weights = check_tensors(&cfg, w, &path.display().to_string())?;
    Ok((cfg, weights))
}
