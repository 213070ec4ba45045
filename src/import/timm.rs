//! timm ViT state dicts in safetensors (`VisionTransformer`: ViT, DeiT without the distillation
//! token, DINOv2 without registers) as routerscope checkpoints. PyTorch's `Linear` weights are
//! `[out, in]` and become Flax kernels `[in, out]`; the fused `qkv` splits into query, key and
//! value; a model built with `qkv_bias=False` gets zero biases (the same function). What the
//! weights do not say (heads, input normalisation) comes from the `config.json` timm's
//! `save_for_hf` writes beside them, else from the options.

use std::path::Path;

use serde_json::Value;

use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, block_prefix,
    check_tensors,
};
use crate::tensor_io::{F32Tensor, TensorFile};

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
    let file = TensorFile::open(path)?;
    let names = file.names()?;
    if !is_timm_state_dict(&names) {
        return Err(err(
            path,
            "not a timm ViT state dict (no `patch_embed.proj.weight` and `blocks.*`)",
        ));
    }
    for (name, what) in [
        ("reg_token", "register tokens"),
        ("dist_token", "a distillation token (DeiT distilled)"),
        ("fc_norm.weight", "mean pooling with fc_norm"),
        ("blocks.0.attn.q_norm.weight", "QK normalisation"),
    ] {
        if names.iter().any(|n| n == name) {
            return Err(err(
                path,
                format!("`{name}`: {what} is not supported by this importer yet"),
            ));
        }
    }
    let config = read_config(path)?;
    let get = |n: &str| file.float(n, "a float tensor");
    let cls = get("cls_token")?;
    let d = cls.data.len();
    if cls.shape != [1, 1, d] || d == 0 {
        return Err(err(
            path,
            format!("`cls_token` has shape {:?}, expected [1, 1, d]", cls.shape),
        ));
    }
    let proj = get("patch_embed.proj.weight")?;
    let [od, c, ph, pw] = proj.shape[..] else {
        return Err(err(
            path,
            format!(
                "`patch_embed.proj.weight` has shape {:?}, expected [d, c, ph, pw]",
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
    let pos = get("pos_embed")?;
    let tokens = pos.data.len() / d.max(1);
    if pos.shape != [1, tokens, d] || tokens < 2 {
        return Err(err(
            path,
            format!(
                "`pos_embed` has shape {:?}, expected [1, 1 + patches, {d}]",
                pos.shape
            ),
        ));
    }
    // The grid the position embedding was trained for (square, as timm's ViTs are).
    let side = ((tokens - 1) as f64).sqrt().round() as usize;
    if side * side != tokens - 1 {
        return Err(err(
            path,
            format!(
                "`pos_embed` holds {} patch positions, not a square grid",
                tokens - 1
            ),
        ));
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
    put("cls".into(), vec![1, 1, d], cls.data);
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        vec![1, tokens, d],
        pos.data,
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
    put(
        "Encoder/encoder_norm/scale".into(),
        vec![d],
        vector("norm.weight")?,
    );
    put(
        "Encoder/encoder_norm/bias".into(),
        vec![d],
        vector("norm.bias")?,
    );
    let classes = if names.iter().any(|n| n == "head.weight") {
        let head = get("head.weight")?;
        let k = head.shape.first().copied().unwrap_or(0);
        put(
            "head/kernel".into(),
            vec![d, k],
            linear(&head, d, k, "head.weight", path)?,
        );
        let b = get("head.bias")?;
        if b.data.len() != k {
            return Err(err(
                path,
                format!("`head.bias` has shape {:?}, expected [{k}]", b.shape),
            ));
        }
        put("head/bias".into(), vec![k], b.data);
        k
    } else {
        0
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
        gelu: Gelu::Erf,
        layer_scale,
        layer_norm_eps: crate::model::DEFAULT_LAYER_NORM_EPS,
        moe: None,
    };
    cfg.validate()?;
    let weights = check_tensors(&cfg, w, &path.display().to_string())?;
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
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| err(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(&p, format!("not valid JSON: {e}")))
}

/// The `config.json` beside `path`, when there is one.
fn read_config(path: &Path) -> Result<Option<Value>, ModelError> {
    let p = path.with_file_name("config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| err(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(&p, format!("not valid JSON: {e}")))
}
