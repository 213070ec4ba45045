"""Reference outputs for `routerscope import` from the source frameworks themselves.

For each family, a tiny-width variant (same code paths as the full-size models) with seeded random
weights (no hub download) is built with timm (saved as its state dict in safetensors with the
`config.json` timm's `save_for_hf` writes) or with Hugging Face transformers (`save_pretrained`),
or written as a big_vision / original-ViT `.npz` and read back by timm's own loader, and run on
a fixed input; the input pixels, the final
features and the logits go to `reference.safetensors` beside it. Committed under
`tests/fixtures/import/`, so CI needs no Python to check the importers against them.

    pip install timm transformers safetensors
    python scripts/make_import_references.py tests/fixtures/import
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch
from timm.models.vision_transformer import VisionTransformer

FAMILIES = {
    # name: (constructor kwargs, architecture name for config.json, mean, std); a
    # `resize` entry also runs the model at that size (timm's `set_input_size`, bicubic).
    "timm-vit": (
        dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
             num_classes=5),
        "vit_tiny_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
    ),
    "timm-deit": (
        dict(img_size=24, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=3.0,
             num_classes=4, qkv_bias=False),
        "deit_small_patch16_224", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    ),
    "timm-dinov2": (
        dict(img_size=28, patch_size=14, embed_dim=24, depth=3, num_heads=4, mlp_ratio=4.0,
             num_classes=0, init_values=0.5),
        "vit_small_patch14_dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    ),
    "timm-deit-distilled": (
        dict(img_size=24, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
             num_classes=4, distilled=True, resize=40),
        "deit_small_distilled_patch16_224", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    ),
    "timm-dinov2-reg": (
        dict(img_size=28, patch_size=14, embed_dim=24, depth=2, num_heads=4, mlp_ratio=4.0,
             num_classes=0, init_values=0.5, reg_tokens=4, no_embed_class=True),
        "vit_small_patch14_reg4_dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    ),
    "timm-vit-avg": (
        dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
             num_classes=3, reg_tokens=2, global_pool="avg", fc_norm=True),
        "vit_small_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
    ),
    "timm-vit-nocls": (
        dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
             num_classes=3, class_token=False, global_pool="avg", fc_norm=False, resize=48),
        "vit_small_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
    ),
}

MODEL_ARGS = ("num_heads", "img_size", "no_embed_class", "global_pool", "reg_tokens",
              "class_token")


def hugging_face(out: Path) -> None:
    """Hugging Face transformers: ViTForImageClassification (LayerNorm eps 1e-12) and Dinov2Model
    (LayerScale), tiny widths, random weights, saved with `save_pretrained` and a
    preprocessor_config.json."""
    import transformers
    from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, Dinov2Config,
                              Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                              ViTConfig, ViTForImageClassification)

    cases = {
        "hf-vit": (ViTForImageClassification, ViTConfig(
            image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=3, intermediate_size=40, num_labels=3,
            id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2}),
            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "hf-dinov2": (Dinov2Model, Dinov2Config(
            image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=4, mlp_ratio=3, layerscale_value=0.5),
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "hf-dinov2-reg": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
            image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=4, mlp_ratio=3, layerscale_value=0.5, num_register_tokens=3),
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "hf-deit": (DeiTForImageClassificationWithTeacher, DeiTConfig(
            image_size=24, patch_size=4, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=40, num_labels=4),
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    }
    for i, (name, (cls, config, mean, std)) in enumerate(cases.items()):
        torch.manual_seed(200 + i)
        model = cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        d = out / name
        model.save_pretrained(str(d), safe_serialization=True)
        (d / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": list(mean), "image_std": list(std), "do_resize": False}, indent=2) + "\n")
        def run(size: int, seed: int, tag: str = "") -> dict:
            pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
            x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
            x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            with torch.no_grad():
                if name == "hf-vit":
                    o = model(pixel_values=x, output_hidden_states=True)
                    features = model.vit.layernorm(o.hidden_states[-1])[0]
                    ref = {"features": features.numpy(), "logits": o.logits[0].numpy()}
                elif name == "hf-deit":
                    o = model(pixel_values=x)
                    features = model.deit(pixel_values=x).last_hidden_state[0]
                    ref = {"features": features.numpy(), "logits": o.logits[0].numpy()}
                else:
                    ref = {"features": model(pixel_values=x).last_hidden_state[0].numpy()}
            ref = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ref.items()}
            ref["pixels"] = pixels
            return {f"{tag}{k}": v for k, v in ref.items()}

        ref = run(config.image_size, 20 + i)
        if name == "hf-dinov2-reg":  # its embeddings always interpolate the position table
            ref.update(run(2 * config.image_size, 40 + i, "resized_"))
        save_file(ref, str(d / "reference.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {d}")


def big_vision(out: Path) -> None:
    """Dense Flax ViTs as `.npz`: the original ViT / vmoe naming (`Transformer/encoderblock_N/`
    with `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`, a CLS token) and
    big_vision's (`params/`, one scanned `encoderblock` with a leading depth axis,
    `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, no CLS, mean pooling), with
    random weights, read into timm by its own `_load_weights` (Flax's GELU is the tanh
    approximation) and run there."""
    import functools
    from timm.models.vision_transformer import _load_weights

    rng = np.random.default_rng(500)
    cases = {
        "bv-vit": dict(scan=False, cls=True, classes=4, d=24, heads=3, mlp=40, depth=2, p=8,
                       size=32),
        "bv-big-vision-gap": dict(scan=True, cls=False, classes=3, d=24, heads=2, mlp=32,
                                  depth=2, p=4, size=24),
    }
    for i, (name, c) in enumerate(cases.items()):
        d, h, m, L, p = c["d"], c["heads"], c["mlp"], c["depth"], c["p"]
        grid = c["size"] // p
        r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
        root = "params/" if c["scan"] else ""
        w = {f"{root}embedding/kernel": r(p, p, 3, d), f"{root}embedding/bias": r(d),
             f"{root}Transformer/encoder_norm/scale": r(d),
             f"{root}Transformer/encoder_norm/bias": r(d),
             f"{root}head/kernel": r(d, c["classes"]), f"{root}head/bias": r(c["classes"])}
        if c["cls"]:
            w["cls"] = r(1, 1, d)
            w["Transformer/posembed_input/pos_embedding"] = r(1, 1 + grid * grid, d)
        else:
            w[f"{root}pos_embedding"] = r(1, grid * grid, d)
        mha, ln2, mlp = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
                         if c["scan"] else
                         ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
        parts = {"LayerNorm_0/scale": (d,), "LayerNorm_0/bias": (d,),
                 f"{ln2}/scale": (d,), f"{ln2}/bias": (d,),
                 f"{mlp}/Dense_0/kernel": (d, m), f"{mlp}/Dense_0/bias": (m,),
                 f"{mlp}/Dense_1/kernel": (m, d), f"{mlp}/Dense_1/bias": (d,),
                 f"{mha}/out/kernel": (h, d // h, d), f"{mha}/out/bias": (d,)}
        for q in ("query", "key", "value"):
            parts[f"{mha}/{q}/kernel"] = (d, h, d // h)
            parts[f"{mha}/{q}/bias"] = (h, d // h)
        for k, shape in parts.items():
            if c["scan"]:
                w[f"{root}Transformer/encoderblock/{k}"] = r(L, *shape)
            else:
                for b in range(L):
                    w[f"Transformer/encoderblock_{b}/{k}"] = r(*shape)
        dd = out / name
        dd.mkdir(parents=True, exist_ok=True)
        np.savez(dd / "model.npz", **w)
        model = VisionTransformer(
            img_size=c["size"], patch_size=p, embed_dim=d, depth=L, num_heads=h,
            mlp_ratio=m / d, num_classes=c["classes"], class_token=c["cls"],
            global_pool="token" if c["cls"] else "avg", fc_norm=False,
            act_layer=functools.partial(torch.nn.GELU, approximate="tanh")).eval()
        _load_weights(model, str(dd / "model.npz"))
        pixels = np.random.default_rng(70 + i).integers(0, 256, (c["size"], c["size"], 3),
                                                       dtype=np.uint8)
        x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
        x = (x - 0.5) / 0.5  # Flax ViTs take [-1, 1]
        with torch.no_grad():
            f = model.forward_features(x)
            logits = model.forward_head(f)
        save_file({"pixels": pixels, "features": f[0].numpy().astype(np.float32),
                   "logits": logits[0].numpy().astype(np.float32)},
                  str(dd / "reference.safetensors"),
                  metadata={"timm": timm.__version__, "torch": torch.__version__})
        print(f"{name}: {len(w)} arrays -> {dd}")


def main(out: Path) -> None:
    from timm.models.deit import VisionTransformerDistilled

    for i, (name, (kwargs, arch, mean, std)) in enumerate(FAMILIES.items()):
        torch.manual_seed(100 + i)
        kwargs = dict(kwargs)
        resize = kwargs.pop("resize", None)
        distilled = kwargs.pop("distilled", False)
        model = (VisionTransformerDistilled if distilled else VisionTransformer)(**kwargs).eval()
        with torch.no_grad():
            for p in model.parameters():  # every weight random and O(1), not timm's init
                p.copy_(torch.randn_like(p) * 0.3)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        save_torch({k: v.contiguous() for k, v in model.state_dict().items()},
                   str(d / "model.safetensors"))
        config = {
            "architecture": arch,
            "num_classes": kwargs["num_classes"],
            "num_features": kwargs["embed_dim"],
            "model_args": {k: v for k, v in kwargs.items() if k in MODEL_ARGS},
            "pretrained_cfg": {"mean": list(mean), "std": list(std),
                               "input_size": [3, kwargs["img_size"], kwargs["img_size"]]},
        }
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        def run(size: int, seed: int, tag: str = "") -> dict:
            pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
            x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
            x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            with torch.no_grad():
                features = model.forward_features(x)
                logits = model.forward_head(features)[0]
            ref = {"pixels": pixels, "features": features[0].numpy().astype(np.float32)}
            if kwargs["num_classes"]:
                ref["logits"] = logits.numpy().astype(np.float32)
            return {f"{tag}{k}": v for k, v in ref.items()}

        ref = run(kwargs["img_size"], 7 + i)
        if resize:  # timm resamples the position table (bicubic) for the new size
            model.set_input_size(img_size=resize)
            ref.update(run(resize, 30 + i, "resized_"))
        save_file(ref, str(d / "reference.safetensors"),
                  metadata={"timm": timm.__version__, "torch": torch.__version__})
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {d}")
    hugging_face(out)
    big_vision(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/import"))
