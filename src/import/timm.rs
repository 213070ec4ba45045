//! timm ViT state dicts in safetensors (`VisionTransformer` and DeiT's
//! `VisionTransformerDistilled`: ViT, DeiT with its distillation token, DINOv2 with or without
//! registers, mean pooling with `fc_norm`) as routerscope checkpoints. PyTorch's `Linear` weights are
//! `[out, in]` and become Flax kernels `[in, out]`; the fused `qkv` splits into query, key and
//! value; a model built with `qkv_bias=False` gets zero biases (the same function). What the
//! weights do not say (heads, input normalisation) comes from the `config.json` timm's
//! `save_for_hf` writes beside them, else from the options.

use std::path::Path;

use serde_json::Value;

use super::resample::Resample;
use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, PrefixTokens,
    block_prefix, check_tensors,
};
use crate::tensor_io::F32Tensor;

/// timm's options: heads (else `config.json`'s `model_args.num_heads`, else its architecture),
/// mean and std (else `config.json`'s `pretrained_cfg`, else ImageNet's).
pub type TimmOptions = super::WeightsOptions;

/// ImageNet's mean and std, timm's `IMAGENET_DEFAULT_MEAN` / `_STD`.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Heads of timm's named ViT sizes (`vit_small_…`, `deit_base_…`, `…_dinov2`).
fn heads_of_architecture(arch: &str) -> Option<usize> {
    let size = arch
        .split('_')
        .find(|p| ["tiny", "small", "base", "large", "huge", "giant"].contains(p))?;
    Some(match size {
        "tiny" => 3,
        "small" => 6,
        "base" => 12,
        "large" | "huge" => 16,
        _ => 24,
    })
}

pub(super) fn err(path: &Path, m: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{}: {m}", path.display()))
}

/// Whether `file`'s tensor names are a timm ViT's.
pub fn is_timm_state_dict(names: &[String]) -> bool {
    names.iter().any(|n| n == "patch_embed.proj.weight")
        && names.iter().any(|n| n.starts_with("blocks."))
}

/// Reads the timm state dict at `path` (and the `config.json` beside it, when present).
pub fn import_timm(
    path: &Path,
    opts: &TimmOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let file = super::WeightsFile::open(path)?;
    let names = file.names()?;
    if !is_timm_state_dict(&names) {
        return Err(err(
            path,
            "not a timm ViT state dict (no `patch_embed.proj.weight` and `blocks.*`)",
        ));
    }
    if let Some(name) = names.iter().find(|n| n.ends_with("attn.q_norm.weight")) {
        return Err(err(
            path,
            format!("`{name}`: QK normalisation is not supported by this importer yet"),
        ));
    }
    let config = read_json_beside(path, "config.json")?;
    let arg = |k: &str| config.as_ref()?.pointer(&format!("/model_args/{k}"));
    let get = |n: &str| file.float(n, "a float tensor");
    let proj = get("patch_embed.proj.weight")?;
    let [d, c, ph, pw] = proj.shape[..] else {
        return Err(err(
            path,
            format!(
                "`patch_embed.proj.weight` has shape {:?}, expected [d, c, ph, pw]",
                proj.shape
            ),
        ));
    };
    let token = |n: &str, count: Option<usize>| -> Result<Option<F32Tensor>, ModelError> {
        if !names.iter().any(|x| x == n) {
            return Ok(None);
        }
        let t = get(n)?;
        let k = t.data.len() / d.max(1);
        if t.shape != [1, k, d] || k == 0 || count.is_some_and(|c| c != k) {
            return Err(err(
                path,
                format!(
                    "`{n}` has shape {:?}, expected [1, {}, {d}] (the patch projection's width)",
                    t.shape,
                    count.map_or("k".into(), |c| c.to_string())
                ),
            ));
        }
        Ok(Some(t))
    };
    let cls = token("cls_token", Some(1))?;
    let dist = token("dist_token", Some(1))?;
    let registers = token("reg_token", None)?;
    if dist.is_some() && cls.is_none() {
        return Err(err(path, "`dist_token` without a `cls_token`"));
    }
    let prefix = PrefixTokens {
        cls: cls.is_some(),
        distillation: dist.is_some(),
        registers: registers.as_ref().map_or(0, |r| r.shape[1]),
    };
    // timm adds positions to every prefix token, or to none (`no_embed_class`).
    let covered: &[usize] = match arg("no_embed_class").and_then(Value::as_bool) {
        Some(true) => &[0],
        Some(false) => &[prefix.count()],
        None => &[prefix.count(), 0],
    };
    let (pos_rows, side) =
        super::position_rows(&get("pos_embed")?, d, prefix, covered, "pos_embed")
            .map_err(|m| err(path, m))?;
    let fc_norm = names.iter().any(|n| n == "fc_norm.weight");
    let pool = match opts.pool {
        Some(p) => p,
        None => match arg("global_pool").and_then(Value::as_str) {
            Some("token") => Classifier::Token,
            Some("avg") => Classifier::Gap,
            Some(other) => {
                return Err(err(
                    path,
                    format!(
                        "config.json's global_pool `{other}`: only token and avg are supported"
                    ),
                ));
            }
            None if fc_norm || cls.is_none() => Classifier::Gap,
            None => Classifier::Token,
        },
    };
    if pool == Classifier::Token && cls.is_none() {
        return Err(err(path, "token pooling without a `cls_token`"));
    }
    let blocks = (0..)
        .take_while(|i| {
            names
                .iter()
                .any(|n| n == &format!("blocks.{i}.norm1.weight"))
        })
        .count();
    let extra = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .find(|&i| i >= blocks);
    if let Some(i) = extra {
        return Err(err(
            path,
            format!(
                "block {i} has weights but block {blocks} has no `norm1.weight`: a block is missing"
            ),
        ));
    }
    let heads = opts
        .heads
        .or_else(|| {
            config
                .as_ref()?
                .pointer("/model_args/num_heads")?
                .as_u64()
                .map(|h| h as usize)
        })
        .or_else(|| heads_of_architecture(config.as_ref()?.get("architecture")?.as_str()?))
        .ok_or_else(|| {
            err(
                path,
                "the number of attention heads is not in the weights and no config.json names \
                 it: give --heads",
            )
        })?;
    if heads == 0 || d % heads != 0 {
        return Err(err(
            path,
            format!("{heads} heads do not divide the width {d}"),
        ));
    }
    let hd = d / heads;

    let mut w = ModelWeights::new();
    let mut put = |n: String, shape: Vec<usize>, data: Vec<f32>| {
        w.insert(n, F32Tensor { shape, data });
    };
    put(
        "embedding/kernel".into(),
        vec![ph, pw, c, d],
        patch_kernel(&proj.data, [d, c, ph, pw]),
    );
    put(
        "embedding/bias".into(),
        vec![d],
        get("patch_embed.proj.bias")?.data,
    );
    let np = prefix.count();
    for (name, t) in [("cls", cls), ("dist", dist), ("registers", registers)] {
        if let Some(t) = t {
            put(name.into(), t.shape, t.data);
        }
    }
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, np + side * side, d],
        pos_rows,
    );
    let vector = |n: &str| -> Result<Vec<f32>, ModelError> {
        let t = get(n)?;
        if t.data.len() != d {
            return Err(err(
                path,
                format!("`{n}` has shape {:?}, expected [{d}]", t.shape),
            ));
        }
        Ok(t.data)
    };
    let layer_scale = names.iter().any(|n| n == "blocks.0.ls1.gamma");
    let mut mlp_dim = 0;
    for i in 0..blocks {
        let src = |s: &str| format!("blocks.{i}.{s}");
        let dst = block_prefix(i);
        put(
            format!("{dst}/LayerNorm_0/scale"),
            vec![d],
            vector(&src("norm1.weight"))?,
        );
        put(
            format!("{dst}/LayerNorm_0/bias"),
            vec![d],
            vector(&src("norm1.bias"))?,
        );
        put(
            format!("{dst}/LayerNorm_1/scale"),
            vec![d],
            vector(&src("norm2.weight"))?,
        );
        put(
            format!("{dst}/LayerNorm_1/bias"),
            vec![d],
            vector(&src("norm2.bias"))?,
        );
        if layer_scale {
            put(
                format!("{dst}/LayerScale_0/scale"),
                vec![d],
                vector(&src("ls1.gamma"))?,
            );
            put(
                format!("{dst}/LayerScale_1/scale"),
                vec![d],
                vector(&src("ls2.gamma"))?,
            );
        }
        let qkv = get(&src("attn.qkv.weight"))?;
        if qkv.shape != [3 * d, d] {
            return Err(err(
                path,
                format!(
                    "`{}` has shape {:?}, expected [{}, {d}]",
                    src("attn.qkv.weight"),
                    qkv.shape,
                    3 * d
                ),
            ));
        }
        let qkv_bias = if names.contains(&src("attn.qkv.bias")) {
            let b = get(&src("attn.qkv.bias"))?;
            if b.data.len() != 3 * d {
                return Err(err(
                    path,
                    format!("`{}` has shape {:?}", src("attn.qkv.bias"), b.shape),
                ));
            }
            b.data
        } else {
            vec![0.0; 3 * d]
        };
        for (p, part) in ["query", "key", "value"].into_iter().enumerate() {
            // Rows p·d..(p+1)·d of the fused [3d, d] weight, transposed to [d, heads, hd].
            let mut k = vec![0.0f32; d * d];
            for o in 0..d {
                for inp in 0..d {
                    k[inp * d + o] = qkv.data[(p * d + o) * d + inp];
                }
            }
            put(
                format!("{dst}/SelfAttention/{part}/kernel"),
                vec![d, heads, hd],
                k,
            );
            put(
                format!("{dst}/SelfAttention/{part}/bias"),
                vec![heads, hd],
                qkv_bias[p * d..(p + 1) * d].to_vec(),
            );
        }
        let out = linear(
            &get(&src("attn.proj.weight"))?,
            d,
            d,
            &src("attn.proj.weight"),
            path,
        )?;
        put(
            format!("{dst}/SelfAttention/out/kernel"),
            vec![heads, hd, d],
            out,
        );
        put(
            format!("{dst}/SelfAttention/out/bias"),
            vec![d],
            vector(&src("attn.proj.bias"))?,
        );
        let fc1 = get(&src("mlp.fc1.weight"))?;
        let m = fc1.shape.first().copied().unwrap_or(0);
        if m == 0 || (mlp_dim != 0 && m != mlp_dim) {
            return Err(err(
                path,
                format!("`{}` has shape {:?}", src("mlp.fc1.weight"), fc1.shape),
            ));
        }
        mlp_dim = m;
        put(
            format!("{dst}/Mlp/Dense_0/kernel"),
            vec![d, m],
            linear(&fc1, d, m, &src("mlp.fc1.weight"), path)?,
        );
        let b1 = get(&src("mlp.fc1.bias"))?;
        if b1.data.len() != m {
            return Err(err(
                path,
                format!("`{}` has shape {:?}", src("mlp.fc1.bias"), b1.shape),
            ));
        }
        put(format!("{dst}/Mlp/Dense_0/bias"), vec![m], b1.data);
        let fc2 = get(&src("mlp.fc2.weight"))?;
        put(
            format!("{dst}/Mlp/Dense_1/kernel"),
            vec![m, d],
            linear(&fc2, m, d, &src("mlp.fc2.weight"), path)?,
        );
        put(
            format!("{dst}/Mlp/Dense_1/bias"),
            vec![d],
            vector(&src("mlp.fc2.bias"))?,
        );
    }
    // With `fc_norm` timm's token norm is the identity and the LayerNorm acts after pooling.
    let norm = match fc_norm {
        true => "fc_norm",
        false => "norm",
    };
    if fc_norm && names.iter().any(|n| n == "norm.weight") {
        return Err(err(
            path,
            "both `norm.weight` and `fc_norm.weight`: timm uses one or the other",
        ));
    }
    put(
        "Encoder/encoder_norm/scale".into(),
        vec![d],
        vector(&format!("{norm}.weight"))?,
    );
    put(
        "Encoder/encoder_norm/bias".into(),
        vec![d],
        vector(&format!("{norm}.bias"))?,
    );
    let mut classes = 0;
    let heads_present = ["head", "head_dist"]
        .into_iter()
        .filter(|h| names.iter().any(|n| n == &format!("{h}.weight")));
    for h in heads_present {
        let head = get(&format!("{h}.weight"))?;
        let k = head.shape.first().copied().unwrap_or(0);
        if classes != 0 && k != classes {
            return Err(err(
                path,
                format!("`{h}.weight` has {k} classes, `head.weight` {classes}"),
            ));
        }
        classes = k;
        put(
            format!("{h}/kernel"),
            vec![d, k],
            linear(&head, d, k, &format!("{h}.weight"), path)?,
        );
        let b = get(&format!("{h}.bias"))?;
        if b.data.len() != k {
            return Err(err(
                path,
                format!("`{h}.bias` has shape {:?}, expected [{k}]", b.shape),
            ));
        }
        put(format!("{h}/bias"), vec![k], b.data);
    }
    if prefix.distillation && classes > 0 && !names.iter().any(|n| n == "head_dist.weight") {
        return Err(err(
            path,
            "a distillation token and `head.weight` but no `head_dist.weight`",
        ));
    }
    let cfg = ModelConfig {
        name: opts.name.clone(),
        image_size: [side * ph, side * pw],
        channels: c,
        patch_size: [ph, pw],
        hidden_size: d,
        num_layers: blocks,
        num_heads: heads,
        mlp_dim,
        classifier: pool,
        representation_size: None,
        num_classes: classes,
        class_names: super::unnamed_classes(classes),
        normalization: Normalization {
            mean: super::stat_or(
                &opts.mean,
                config.as_ref(),
                "/pretrained_cfg/mean",
                IMAGENET_MEAN,
            ),
            std: super::stat_or(
                &opts.std,
                config.as_ref(),
                "/pretrained_cfg/std",
                IMAGENET_STD,
            ),
        },
        gelu: opts.gelu.unwrap_or(Gelu::Erf),
        layer_scale,
        cls_token: (prefix.cls != (pool == Classifier::Token)).then_some(prefix.cls),
        distillation_token: prefix.distillation,
        register_tokens: prefix.registers,
        fc_norm,
        layer_norm_eps: opts.eps.unwrap_or(crate::model::DEFAULT_LAYER_NORM_EPS),
        moe: None,
    };
    cfg.validate()?;
    let mut cfg = cfg;
    let mut weights = check_tensors(&cfg, w, &path.display().to_string())?;
    if let Some(size) = opts.image_size {
        // timm's `resample_abs_pos_embed`: bicubic with antialias (its default).
        super::resize_input(&mut cfg, &mut weights, size, Resample::BicubicAntialias)
            .map_err(|e| err(path, e))?;
    }
    Ok((cfg, weights))
}

/// A PyTorch `Linear` weight `[out, in]` as a Flax kernel `[in, out]`, checking its shape.
pub(super) fn linear(
    t: &F32Tensor,
    inp: usize,
    out: usize,
    name: &str,
    path: &Path,
) -> Result<Vec<f32>, ModelError> {
    if t.shape != [out, inp] {
        return Err(err(
            path,
            format!("`{name}` has shape {:?}, expected [{out}, {inp}]", t.shape),
        ));
    }
    let mut k = vec![0.0f32; inp * out];
    for o in 0..out {
        for i in 0..inp {
            k[i * out + o] = t.data[o * inp + i];
        }
    }
    Ok(k)
}

/// A PyTorch patch `Conv2d` weight `[d, c, ph, pw]` as the Flax kernel `[ph, pw, c, d]`.
pub(super) fn patch_kernel(w: &[f32], [d, c, ph, pw]: [usize; 4]) -> Vec<f32> {
    let mut kernel = vec![0.0f32; ph * pw * c * d];
    for o in 0..d {
        for ch in 0..c {
            for i in 0..ph {
                for j in 0..pw {
                    kernel[((i * pw + j) * c + ch) * d + o] = w[((o * c + ch) * ph + i) * pw + j];
                }
            }
        }
    }
    kernel
}

/// The JSON file `name` beside `path`, when there is one.
pub(super) fn read_json_beside(path: &Path, name: &str) -> Result<Option<Value>, ModelError> {
    let p = path.with_file_name(name);
    if !p.exists() {
        return Ok(None);
    }
    // A configuration is a few kilobytes; 16 MB is generous (ImageNet-21k's class names).
    let text = crate::files::read_regular_string(&p, 16 << 20).map_err(|e| err(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(&p, format!("not valid JSON: {e}")))
}
