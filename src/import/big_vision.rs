//! Dense Flax ViTs saved as `.npz` (a zip of `.npy` arrays, stored or deflated): the original
//! ViT / vmoe naming (`Transformer/encoderblock_N/` with `MultiHeadDotProductAttention_1`,
//! `LayerNorm_2`, `MlpBlock_3`; an `opt/target/` prefix is allowed) and big_vision's (`params/` or
//! `params/img/`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, blocks either
//! numbered or one scanned `encoderblock` with a leading depth axis), the names timm's
//! `_load_weights` reads. Flax already stores kernels `[in, out]` and attention as
//! `[d, heads, head_dim]`, routerscope's own layout, so the heads come from the weights. What
//! they do not say: Flax's `nn.gelu` is the tanh approximation and its LayerNorm eps 1e-6; the
//! input is `[-1, 1]` (mean and std 0.5), unless the options say otherwise.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::model::{
    Classifier, Gelu, ModelConfig, ModelError, ModelWeights, Normalization, block_prefix,
    check_tensors,
};
use crate::tensor_io::F32Tensor;

/// big_vision's options: the GELU, eps, mean and std where Flax's defaults are not the model's.
pub type BigVisionOptions = super::WeightsOptions;

/// The most bytes one array may hold (2^33: 2G floats) and an archive may declare in all.
const MAX_ARRAY_BYTES: u64 = 8 << 30;
const MAX_ARRAYS: usize = 100_000;

fn err(path: &Path, m: impl std::fmt::Display) -> ModelError {
    ModelError::Config(format!("{}: {m}", path.display()))
}

/// The float arrays of an `.npz` file by name (`.npy` dropped); other dtypes are left out.
pub fn read_npz(path: &Path) -> Result<HashMap<String, F32Tensor>, ModelError> {
    let file = crate::files::open_regular(path).map_err(|e| err(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(path, format!("not an .npz (zip) archive: {e}")))?;
    if zip.len() > MAX_ARRAYS {
        return Err(err(
            path,
            format!("{} arrays is beyond the limit of {MAX_ARRAYS}", zip.len()),
        ));
    }
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| err(path, format!("entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| err(path, format!("entry {i}: {e}")))?
            .to_string();
        let Some(key) = name.strip_suffix(".npy") else {
            continue;
        };
        let declared = entry.size();
        if declared > MAX_ARRAY_BYTES {
            return Err(err(
                path,
                format!("`{name}` declares {declared} bytes, beyond the limit"),
            ));
        }
        // Read no more than the entry declares (a deflate stream may claim anything).
        let mut bytes = Vec::with_capacity(declared.min(1 << 24) as usize);
        (&mut entry)
            .take(declared + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| err(path, format!("`{name}`: {e}")))?;
        if bytes.len() as u64 != declared {
            return Err(err(
                path,
                format!(
                    "`{name}` holds {} bytes, its entry declares {declared}",
                    bytes.len()
                ),
            ));
        }
        if let Some(t) = parse_npy(&bytes).map_err(|m| err(path, format!("`{name}`: {m}")))? {
            out.insert(key.to_string(), t);
        }
    }
    Ok(out)
}

/// One `.npy` array as f32 (little-endian f2/f4/f8, C order), `None` for other dtypes.
fn parse_npy(b: &[u8]) -> Result<Option<F32Tensor>, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (no \\x93NUMPY magic)".into());
    }
    let (len, start): (usize, usize) = match b[6] {
        1 => (usize::from(u16::from_le_bytes([b[8], b[9]])), 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!(".npy version {v} is not supported")),
    };
    let header = b
        .get(start..start.saturating_add(len))
        .ok_or("the .npy header runs past the array")?;
    let header = String::from_utf8_lossy(header);
    let field = |k: &str| -> Option<&str> {
        let at = header.find(&format!("'{k}'"))? + k.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("the .npy header has no descr")?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("the .npy header has no shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("shape entry `{s}`")))
        .collect::<Result<_, _>>()?;
    let width = match descr {
        "<f4" => 4,
        "<f2" => 2,
        "<f8" => 8,
        _ => return Ok(None),
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .filter(|&n| n <= 1 << 31)
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let data = &b[start + len..];
    if data.len() != count * width {
        return Err(format!(
            "shape {shape:?} of {descr} needs {} bytes, the array holds {}",
            count * width,
            data.len()
        ));
    }
    let values: Vec<f32> = match width {
        4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        2 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "non-finite value {} at flat index {at}",
            values[at]
        ));
    }
    Ok(Some(F32Tensor {
        shape,
        data: values,
    }))
}

/// The prefix before `embedding/kernel` when `names` are a Flax ViT's.
pub fn flax_root(names: &[&String]) -> Option<String> {
    names
        .iter()
        .find_map(|n| n.strip_suffix("embedding/kernel"))
        .filter(|root| root.is_empty() || root.ends_with('/'))
        .map(str::to_string)
}

/// Reads the dense Flax ViT at `path` (see the module docs).
pub fn import_big_vision(
    path: &Path,
    opts: &BigVisionOptions,
) -> Result<(ModelConfig, ModelWeights), ModelError> {
    let mut arrays = read_npz(path)?;
    let names: Vec<&String> = arrays.keys().collect();
    let root = flax_root(&names).ok_or_else(|| {
        err(
            path,
            "no `embedding/kernel` array: not a Flax ViT checkpoint (big_vision, ViT or vmoe)",
        )
    })?;
    if names.iter().any(|n| n.contains("MAPHead_0/")) {
        return Err(err(
            path,
            "a MAP head (`MAPHead_0`, attention pooling) is not supported; only CLS-token and \
             mean pooling are",
        ));
    }
    if names.iter().any(|n| n.contains("/Moe/")) {
        return Err(err(
            path,
            "MoE layers (`Moe/`): open vmoe's MoE checkpoints with their `.index` file",
        ));
    }
    let n = |s: &str| format!("{root}{s}");
    let take =
        |arrays: &mut HashMap<String, F32Tensor>, s: &str| -> Result<F32Tensor, ModelError> {
            arrays
                .remove(&n(s))
                .ok_or_else(|| err(path, format!("no `{}` array", n(s))))
        };
    let kernel = take(&mut arrays, "embedding/kernel")?;
    let [ph, pw, c, d] = kernel.shape[..] else {
        return Err(err(
            path,
            format!(
                "`{}` has shape {:?}, expected [ph, pw, channels, d]",
                n("embedding/kernel"),
                kernel.shape
            ),
        ));
    };
    let shape_is = |t: &F32Tensor, want: &[usize], what: &str| {
        if t.shape == want {
            Ok(())
        } else {
            Err(err(
                path,
                format!("`{what}` has shape {:?}, expected {want:?}", t.shape),
            ))
        }
    };
    let bias = take(&mut arrays, "embedding/bias")?;
    shape_is(&bias, &[d], &n("embedding/bias"))?;
    let names: Vec<String> = arrays.keys().cloned().collect();
    let has = |s: &str| names.contains(&n(s));
    let cls = if has("cls") {
        Some(take(&mut arrays, "cls")?)
    } else {
        None
    };
    if let Some(t) = &cls {
        shape_is(t, &[1, 1, d], &n("cls"))?;
    }
    let container = if names.iter().any(|x| x.starts_with(&n("Encoder/"))) {
        "Encoder"
    } else {
        "Transformer"
    };
    let pos_name = [
        format!("{container}/posembed_input/pos_embedding"),
        "pos_embedding".to_string(),
    ]
    .into_iter()
    .find(|p| has(p))
    .ok_or_else(|| err(path, format!("no position embedding (`{root}{container}/posembed_input/pos_embedding` or `{root}pos_embedding`)")))?;
    let pos = take(&mut arrays, &pos_name)?;
    let np = usize::from(cls.is_some());
    let rows = pos.data.len() / d.max(1);
    let patches = rows.saturating_sub(np);
    let side = (patches as f64).sqrt().round() as usize;
    if pos.data.len() != rows * d || side == 0 || side * side != patches {
        return Err(err(
            path,
            format!(
                "`{}{pos_name}` has shape {:?}: not {np} class token(s) and a square grid of \
                 patches of width {d}",
                root, pos.shape
            ),
        ));
    }

    // Blocks: numbered, or one scanned array per weight with a leading depth axis.
    let blk = |i: usize| format!("{container}/encoderblock_{i}/");
    let scanned = has(&format!("{container}/encoderblock/LayerNorm_0/scale"));
    let depth = if scanned {
        arrays[&n(&format!("{container}/encoderblock/LayerNorm_0/scale"))]
            .shape
            .first()
            .copied()
            .unwrap_or(0)
    } else {
        (0..)
            .take_while(|&i| has(&format!("{}LayerNorm_0/scale", blk(i))))
            .count()
    };
    if depth == 0 {
        return Err(err(
            path,
            format!("no encoder blocks (`{root}{container}/encoderblock_0/LayerNorm_0/scale`)"),
        ));
    }
    if !scanned {
        let extra = names
            .iter()
            .filter_map(|x| {
                x.strip_prefix(&n(&format!("{container}/encoderblock_")))?
                    .split('/')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .find(|&i| i >= depth);
        if let Some(i) = extra {
            return Err(err(
                path,
                format!(
                    "block {i} has weights but block {depth} has no `LayerNorm_0/scale`: a block is missing"
                ),
            ));
        }
    }
    let first = |cands: &[&str], stem: &str| -> Result<String, ModelError> {
        let base = if scanned {
            format!("{container}/encoderblock/")
        } else {
            blk(0)
        };
        cands
            .iter()
            .find(|c| has(&format!("{base}{c}/{stem}")))
            .map(|c| c.to_string())
            .ok_or_else(|| err(path, format!("block 0 has none of {cands:?} with `{stem}`")))
    };
    let mha = first(
        &[
            "MultiHeadDotProductAttention_1",
            "MultiHeadDotProductAttention_0",
            "SelfAttention",
        ],
        "query/kernel",
    )?;
    let ln2 = first(&["LayerNorm_2", "LayerNorm_1"], "scale")?;
    let mlp = first(&["MlpBlock_3", "MlpBlock_0", "Mlp"], "Dense_0/kernel")?;
    let part = |arrays: &mut HashMap<String, F32Tensor>,
                i: usize,
                s: &str|
     -> Result<F32Tensor, ModelError> {
        if !scanned {
            return take(arrays, &format!("{}{s}", blk(i)));
        }
        let key = n(&format!("{container}/encoderblock/{s}"));
        let t = arrays
            .get(&key)
            .ok_or_else(|| err(path, format!("no `{key}` array")))?;
        if t.shape.first() != Some(&depth) {
            return Err(err(
                path,
                format!(
                    "`{key}` has shape {:?}, expected a leading depth {depth}",
                    t.shape
                ),
            ));
        }
        let each = t.data.len() / depth;
        Ok(F32Tensor {
            shape: t.shape[1..].to_vec(),
            data: t.data[i * each..(i + 1) * each].to_vec(),
        })
    };
    let q_key = match scanned {
        true => n(&format!("{container}/encoderblock/{mha}/query/kernel")),
        false => n(&format!("{}{mha}/query/kernel", blk(0))),
    };
    let q_shape: Vec<usize> = arrays
        .get(&q_key)
        .map(|t| t.shape[usize::from(scanned).min(t.shape.len())..].to_vec())
        .unwrap_or_default();
    let [qd, heads, hd] = q_shape[..] else {
        return Err(err(
            path,
            format!("`{q_key}` has shape {q_shape:?}, expected [d, heads, head_dim]"),
        ));
    };
    if qd != d || heads * hd != d {
        return Err(err(
            path,
            format!("`{q_key}` {q_shape:?} does not split width {d} into heads"),
        ));
    }
    if opts.heads.is_some_and(|h| h != heads) {
        return Err(err(
            path,
            format!(
                "the weights have {heads} heads; --heads {} disagrees",
                opts.heads.unwrap_or(0)
            ),
        ));
    }
    let mut w = ModelWeights::new();
    let mut put = |k: String, t: F32Tensor| {
        w.insert(k, t);
    };
    put("embedding/kernel".into(), kernel);
    put("embedding/bias".into(), bias);
    if let Some(t) = cls {
        put("cls".into(), t);
    }
    put(
        "Encoder/posembed_input/pos_embedding".into(),
        F32Tensor {
            shape: vec![1, rows, d],
            data: pos.data,
        },
    );
    let fc1 = match scanned {
        true => n(&format!("{container}/encoderblock/{mlp}/Dense_0/kernel")),
        false => n(&format!("{}{mlp}/Dense_0/kernel", blk(0))),
    };
    let mlp_dim = arrays
        .get(&fc1)
        .and_then(|t| t.shape.last().copied())
        .unwrap_or(0);
    for i in 0..depth {
        let dst = block_prefix(i);
        let mut copy = |src: String, to: &str, want: Vec<usize>| -> Result<(), ModelError> {
            let t = part(&mut arrays, i, &src)?;
            if t.shape != want {
                return Err(err(
                    path,
                    format!(
                        "block {i}: `{src}` has shape {:?}, expected {want:?}",
                        t.shape
                    ),
                ));
            }
            put(format!("{dst}/{to}"), t);
            Ok(())
        };
        for (s, t) in [
            ("LayerNorm_0", "LayerNorm_0"),
            (ln2.as_str(), "LayerNorm_1"),
        ] {
            copy(format!("{s}/scale"), &format!("{t}/scale"), vec![d])?;
            copy(format!("{s}/bias"), &format!("{t}/bias"), vec![d])?;
        }
        for q in ["query", "key", "value"] {
            copy(
                format!("{mha}/{q}/kernel"),
                &format!("SelfAttention/{q}/kernel"),
                vec![d, heads, hd],
            )?;
            copy(
                format!("{mha}/{q}/bias"),
                &format!("SelfAttention/{q}/bias"),
                vec![heads, hd],
            )?;
        }
        copy(
            format!("{mha}/out/kernel"),
            "SelfAttention/out/kernel",
            vec![heads, hd, d],
        )?;
        copy(format!("{mha}/out/bias"), "SelfAttention/out/bias", vec![d])?;
        copy(
            format!("{mlp}/Dense_0/kernel"),
            "Mlp/Dense_0/kernel",
            vec![d, mlp_dim],
        )?;
        copy(
            format!("{mlp}/Dense_0/bias"),
            "Mlp/Dense_0/bias",
            vec![mlp_dim],
        )?;
        copy(
            format!("{mlp}/Dense_1/kernel"),
            "Mlp/Dense_1/kernel",
            vec![mlp_dim, d],
        )?;
        copy(format!("{mlp}/Dense_1/bias"), "Mlp/Dense_1/bias", vec![d])?;
    }
    for s in ["scale", "bias"] {
        let t = take(&mut arrays, &format!("{container}/encoder_norm/{s}"))?;
        shape_is(&t, &[d], &format!("{container}/encoder_norm/{s}"))?;
        put(format!("Encoder/encoder_norm/{s}"), t);
    }
    let mut representation = None;
    let mut width = d;
    if has("pre_logits/kernel") {
        let k = take(&mut arrays, "pre_logits/kernel")?;
        let r = k.shape.get(1).copied().unwrap_or(0);
        shape_is(&k, &[d, r], &n("pre_logits/kernel"))?;
        let b = take(&mut arrays, "pre_logits/bias")?;
        shape_is(&b, &[r], &n("pre_logits/bias"))?;
        put("pre_logits/kernel".into(), k);
        put("pre_logits/bias".into(), b);
        representation = Some(r);
        width = r;
    }
    let mut classes = 0;
    if has("head/kernel") {
        let k = take(&mut arrays, "head/kernel")?;
        classes = k.shape.get(1).copied().unwrap_or(0);
        shape_is(&k, &[width, classes], &n("head/kernel"))?;
        let b = take(&mut arrays, "head/bias")?;
        shape_is(&b, &[classes], &n("head/bias"))?;
        // A zero-width head is a feature model (big_vision's `num_classes=0`).
        if classes > 0 {
            put("head/kernel".into(), k);
            put("head/bias".into(), b);
        }
    }
    let pool = match (opts.pool, np) {
        (Some(p), _) => p,
        (None, 1) => Classifier::Token,
        (None, _) => Classifier::Gap,
    };
    let stat = |given: &Option<Vec<f32>>| given.clone().unwrap_or_else(|| vec![0.5; c]);
    let cfg = ModelConfig {
        name: opts.name.clone(),
        image_size: [side * ph, side * pw],
        channels: c,
        patch_size: [ph, pw],
        hidden_size: d,
        num_layers: depth,
        num_heads: heads,
        mlp_dim,
        classifier: pool,
        representation_size: representation,
        num_classes: classes,
        class_names: super::unnamed_classes(classes),
        normalization: Normalization {
            mean: stat(&opts.mean),
            std: stat(&opts.std),
        },
        gelu: opts.gelu.unwrap_or(Gelu::Tanh),
        layer_scale: false,
        layer_norm_eps: opts.eps.unwrap_or(crate::model::DEFAULT_LAYER_NORM_EPS),
        cls_token: ((np == 1) != (pool == Classifier::Token)).then_some(np == 1),
        distillation_token: false,
        register_tokens: 0,
        fc_norm: false,
        moe: None,
    };
    cfg.validate()?;
    let mut cfg = cfg;
    let mut weights = check_tensors(&cfg, w, &path.display().to_string())?;
    if let Some(size) = opts.image_size {
        // timm's `_load_weights` resamples Flax position tables bilinearly without antialias;
        // routerscope resizes bicubically, as timm does for its own models.
        super::resize_input(
            &mut cfg,
            &mut weights,
            size,
            super::resample::Resample::Bicubic,
        )
        .map_err(|e| err(path, e))?;
    }
    Ok((cfg, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(data);
        b
    }

    #[test]
    fn npy_arrays_parse_and_lies_are_errors() {
        let v: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let t = parse_npy(&npy("<f4", "(2, 2)", &v)).unwrap().unwrap();
        assert_eq!((t.shape, t.data), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
        let t = parse_npy(&npy("<f4", "(4,)", &v)).unwrap().unwrap();
        assert_eq!(t.shape, [4]);
        assert!(parse_npy(&npy("<i8", "(2,)", &v[..16])).unwrap().is_none());
        let e = parse_npy(&npy("<f4", "(1000000, 1000000)", &v)).unwrap_err();
        assert!(e.contains("too large") || e.contains("needs"), "{e}");
        let e = parse_npy(&npy("<f4", "(3,)", &v)).unwrap_err();
        assert!(e.contains("needs 12 bytes, the array holds 16"), "{e}");
        let e = parse_npy(b"PK\x03\x04 not npy").unwrap_err();
        assert!(e.contains("magic"), "{e}");
        let nan: Vec<u8> = f32::NAN.to_le_bytes().to_vec();
        assert!(
            parse_npy(&npy("<f4", "(1,)", &nan))
                .unwrap_err()
                .contains("non-finite")
        );
    }
}
