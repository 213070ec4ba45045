//! Hugging Face transformers ViTs in safetensors (`ViTModel`, `ViTForImageClassification`,
//! `Dinov2Model`, `Dinov2WithRegistersModel`, `DeiTModel`,
//! `DeiTForImageClassificationWithTeacher`) as routerscope checkpoints. The `config.json` beside the weights gives the heads,
//! the LayerNorm epsilon (1e-12 for ViT), the activation and the class names; the
//! `preprocessor_config.json` gives the input mean and std. PyTorch `Linear` weights `[out, in]`
//! become kernels; missing QKV biases (`qkv_bias: false`) become zeros.

use std::path::Path;

use serde_json::Value;

use super::resample::Resample;
use super::timm::{err, linear, patch_kernel, read_json_beside};
use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, PrefixTokens,
    block_prefix, check_tensors,
};
use crate::tensor_io::F32Tensor;

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
    let file = super::WeightsFile::open(path)?;
    let names = file.names()?;
    let root = hf_root(&names).ok_or_else(|| {
        err(
            path,
            "not a Hugging Face ViT / DINOv2 checkpoint (no `embeddings.cls_token` with \
             `encoder.layer.*`)",
        )
    })?;
    let n = |s: &str| format!("{root}{s}");
    let swiglu = n("encoder.layer.0.mlp.weights_in.weight");
    if names.contains(&swiglu) {
        return Err(err(
            path,
            format!("`{swiglu}`: a SwiGLU MLP (DINOv2-g) is not supported by this importer yet"),
        ));
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
    let token = |s: &str| -> Result<Option<F32Tensor>, ModelError> {
        if !names.contains(&n(s)) {
            return Ok(None);
        }
        let t = get(&n(s))?;
        let k = t.data.len() / d;
        if t.shape != [1, k, d] || k == 0 {
            return Err(err(
                path,
                format!("`{}` has shape {:?}, expected [1, k, {d}]", n(s), t.shape),
            ));
        }
        Ok(Some(t))
    };
    let dist = token("embeddings.distillation_token")?;
    let registers = token("embeddings.register_tokens")?;
    if dist.as_ref().is_some_and(|t| t.shape[1] != 1) {
        return Err(err(path, "the distillation token is not [1, 1, d]"));
    }
    // transformers has registers only in Dinov2WithRegisters and a distillation token only in
    // DeiT: anything else is a checkpoint no transformers class loads.
    match family {
        Family::Vit if registers.is_some() => {
            return Err(err(
                path,
                format!(
                    "`{}`: register tokens on a ViT/DeiT checkpoint (only Dinov2WithRegisters \
                     has them)",
                    n("embeddings.register_tokens")
                ),
            ));
        }
        Family::Dinov2 if dist.is_some() => {
            return Err(err(
                path,
                format!(
                    "`{}`: a distillation token on a DINOv2 checkpoint (only DeiT has one)",
                    n("embeddings.distillation_token")
                ),
            ));
        }
        _ => {}
    }
    let prefix = PrefixTokens {
        cls: true,
        distillation: dist.is_some(),
        registers: registers.as_ref().map_or(0, |r| r.shape[1]),
    };
    // Hugging Face adds positions to the class tokens, then inserts the registers.
    let covered = 1 + usize::from(prefix.distillation);
    let pos_name = n("embeddings.position_embeddings");
    let (pos_rows, side) = super::position_rows(&get(&pos_name)?, d, prefix, &[covered], &pos_name)
        .map_err(|m| err(path, m))?;
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
    let gelu = match (opts.gelu, field("hidden_act").and_then(Value::as_str)) {
        (Some(g), _) => g,
        (None, None | Some("gelu")) => Gelu::Erf,
        (None, Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast")) => Gelu::Tanh,
        (None, Some(other)) => {
            return Err(err(
                path,
                format!("hidden_act `{other}`: routerscope's MLPs use GELU"),
            ));
        }
    };
    let eps = opts
        .eps
        .or_else(|| field("layer_norm_eps")?.as_f64().map(|e| e as f32))
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
    for (name, t) in [("dist", dist), ("registers", registers)] {
        if let Some(t) = t {
            put(name.into(), t.shape, t.data);
        }
    }
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, prefix.count() + side * side, d],
        pos_rows,
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
    // `classifier` (on the CLS token), or DeiT's `cls_classifier` + `distillation_classifier`.
    let mut classes = 0;
    for (src_name, dst_name) in [
        ("classifier", "head"),
        ("cls_classifier", "head"),
        ("distillation_classifier", "head_dist"),
    ] {
        let wname = format!("{src_name}.weight");
        if !names.contains(&wname) {
            continue;
        }
        let head = get(&wname)?;
        if head.shape.get(1) == Some(&(2 * d)) {
            return Err(err(
                path,
                format!(
                    "`{wname}` reads the CLS token and the mean patch token together \
                     (Dinov2ForImageClassification): not supported yet"
                ),
            ));
        }
        let k = head.shape.first().copied().unwrap_or(0);
        if classes != 0 && k != classes {
            return Err(err(
                path,
                format!("`{wname}` has {k} classes, the other head {classes}"),
            ));
        }
        classes = k;
        put(
            format!("{dst_name}/kernel"),
            vec![d, k],
            linear(&head, d, k, &wname, path)?,
        );
        put(
            format!("{dst_name}/bias"),
            vec![k],
            bias_or_zero(&format!("{src_name}.bias"), k)?,
        );
    }
    let two_heads = names.iter().any(|x| x == "distillation_classifier.weight");
    if classes > 0 && prefix.distillation && !two_heads {
        return Err(err(
            path,
            "DeiTForImageClassification reads only the CLS token of a distilled DeiT: not \
             supported (DeiTForImageClassificationWithTeacher and DeiTModel are)",
        ));
    }
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
    // Hugging Face's ViT processor defaults to 0.5; DINOv2's and DeiT's to ImageNet's.
    let imagenet = family == Family::Dinov2 || root.starts_with("deit") || prefix.distillation;
    let (default, default_std) = match imagenet {
        false => ([0.5f32; 3], [0.5f32; 3]),
        true => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
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
        cls_token: None,
        distillation_token: prefix.distillation,
        register_tokens: prefix.registers,
        fc_norm: false,
        layer_norm_eps: eps,
        moe: None,
    };
    cfg.validate()?;
    let mut cfg = cfg;
    let mut weights = check_tensors(&cfg, w, &path.display().to_string())?;
    if let Some(size) = opts.image_size {
        // `interpolate_pos_encoding`: plain bicubic, antialiased for DINOv2 with registers.
        let kind = match prefix.registers {
            0 => Resample::Bicubic,
            _ => Resample::BicubicAntialias,
        };
        super::resize_input(&mut cfg, &mut weights, size, kind).map_err(|e| err(path, e))?;
    }
    Ok((cfg, weights))
}
