"""Full-size check of `routerscope import` on timm, Hugging Face, ONNX and Flax `.npz` ViTs: each
architecture is created by timm (or transformers, `hf-…`) with random weights (no hub download)
and saved as a user would hold it: its state dict with the config.json timm's `save_for_hf`
writes, `save_pretrained`, `torch.onnx.export` (`onnx-legacy:ARCH`, `onnx-dynamo:ARCH`), or a
Flax `.npz` in the original ViT naming read into timm by its own `_load_weights` (`bv-vit-b16`).
The routerscope command line imports it, both run the same random image, and the largest
difference of the final features and of the class probabilities is printed.

    python scripts/check_timm_full_size.py ROUTERSCOPE_BINARY [ARCH ...]

The `routerscope` Python package must be importable (`pip install ./python`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

import routerscope as rs

ARCHS = ["vit_small_patch16_224", "vit_base_patch16_224", "deit_small_patch16_224",
         "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "hf-vit-base",
         "hf-dinov2-small", "onnx-legacy:vit_small_patch16_224",
         "onnx-dynamo:vit_small_patch16_224", "onnx-dynamo:deit_small_patch16_224",
         "bv-vit-b16"]


def random_timm(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # timm's init leaves some tensors constant
    return model


def compare(arch: str, model, x, pixels, out: Path) -> None:
    with torch.no_grad():
        feats = model.forward_features(x)
        probs = torch.softmax(model.forward_head(feats), -1)[0].numpy()
        feats = feats[0].numpy()
    ours = rs.load(out, device="cpu")
    fd = float(np.abs(ours.features([pixels]).features[0] - feats).max())
    pd = float(np.abs(ours.predict([pixels]).probabilities[0] - probs).max())
    print(f"{arch}: {ours.config['num_layers']} blocks, width {ours.config['hidden_size']}, "
          f"{ours.config['num_heads']} heads, {feats.shape[0]} tokens: features max |diff| "
          f"{fd:.2e} (max |feature| {np.abs(feats).max():.2f}), probabilities max |diff| {pd:.2e}",
          flush=True)


def image(size, mean, std):
    pixels = np.random.default_rng(1).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return pixels, x


def check_onnx(binary: str, arch: str, tmp: Path) -> None:
    """A timm ViT exported by `torch.onnx.export` (the legacy TorchScript exporter at opset 17,
    or the dynamo exporter at opset 18 with its weights in an external `.onnx.data` file)."""
    exporter, name = arch.split(":", 1)
    model = random_timm(name)
    cfg = model.pretrained_cfg
    pixels, x = image(model.patch_embed.img_size, cfg["mean"], cfg["std"])
    d = tmp / arch.replace(":", "-")
    d.mkdir()
    path = d / "model.onnx"
    if exporter == "onnx-legacy":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=True)
    else:
        torch.onnx.export(model, (x,), dynamo=True, opset_version=18,
                          external_data=True).save(str(path), external_data=True)
    out = d / "imported.safetensors"
    norm = ["--mean", ",".join(map(str, cfg["mean"])), "--std", ",".join(map(str, cfg["std"]))]
    subprocess.run([binary, "import", str(path), "--out", str(out), *norm], check=True)
    compare(arch, model, x, pixels, out)


def check_big_vision(binary: str, arch: str, tmp: Path) -> None:
    """ViT-B/16 with an ImageNet-1k head as a Flax `.npz` in the original ViT naming
    (`Transformer/encoderblock_N/...`), random weights, read into timm by its own
    `_load_weights` (Flax's GELU is the tanh approximation; inputs in [-1, 1])."""
    import functools
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    rng = np.random.default_rng(7)
    d, h, m, L, p, size, classes = 768, 12, 3072, 12, 16, 224, 1000
    r = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
    w = {"embedding/kernel": r(p, p, 3, d), "embedding/bias": r(d), "cls": r(1, 1, d),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + (size // p) ** 2, d),
         "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d),
         "head/kernel": r(d, classes), "head/bias": r(classes)}
    for b in range(L):
        e = f"Transformer/encoderblock_{b}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[e + ln + "/scale"], w[e + ln + "/bias"] = 1 + r(d), r(d)
        a = e + "MultiHeadDotProductAttention_1/"
        for q in ("query", "key", "value"):
            w[a + q + "/kernel"], w[a + q + "/bias"] = r(d, h, d // h), r(h, d // h)
        w[a + "out/kernel"], w[a + "out/bias"] = r(h, d // h, d), r(d)
        w[e + "MlpBlock_3/Dense_0/kernel"], w[e + "MlpBlock_3/Dense_0/bias"] = r(d, m), r(m)
        w[e + "MlpBlock_3/Dense_1/kernel"], w[e + "MlpBlock_3/Dense_1/bias"] = r(m, d), r(d)
    dd = tmp / arch
    dd.mkdir()
    np.savez(dd / "model.npz", **w)
    model = VisionTransformer(img_size=size, patch_size=p, embed_dim=d, depth=L, num_heads=h,
                              mlp_ratio=m / d, num_classes=classes,
                              act_layer=functools.partial(torch.nn.GELU,
                                                          approximate="tanh")).eval()
    _load_weights(model, str(dd / "model.npz"))
    out = dd / "imported.safetensors"
    subprocess.run([binary, "import", str(dd / "model.npz"), "--out", str(out)], check=True)
    pixels, x = image((size, size), [0.5] * 3, [0.5] * 3)
    compare(arch, model, x, pixels, out)


def check(binary: str, arch: str, tmp: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # timm's init leaves some tensors constant
    d = tmp / arch
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = model.pretrained_cfg
    (d / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": model.num_classes,
        "pretrained_cfg": {"mean": list(cfg["mean"]), "std": list(cfg["std"])},
    }))
    out = d / "imported.safetensors"
    subprocess.run([binary, "import", str(d / "model.safetensors"), "--out", str(out)], check=True)
    size = model.patch_embed.img_size
    pixels = np.random.default_rng(1).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    x = (x - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        feats = model.forward_features(x)[0].numpy()
        probs = torch.softmax(model.forward_head(model.forward_features(x)), -1)[0].numpy()
    ours = rs.load(out, device="cpu")
    pred = ours.predict([pixels])
    ours_feats = ours.features([pixels]).features[0]
    fd = float(np.abs(ours_feats - feats).max())
    pd = float(np.abs(pred.probabilities[0] - probs).max()) if model.num_classes else float("nan")
    print(f"{arch}: {ours.config['num_layers']} blocks, width {ours.config['hidden_size']}, "
          f"{ours.config['num_heads']} heads, {feats.shape[0]} tokens: features max |diff| "
          f"{fd:.2e} (max |feature| {np.abs(feats).max():.2f}), probabilities max |diff| {pd:.2e}")


def check_hf(binary: str, arch: str, tmp: Path) -> None:
    """A Hugging Face ViT-B/16 classifier or DINOv2-S/14 from its config (random weights)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if arch == "hf-vit-base":
        model, mean, std = ViTForImageClassification(ViTConfig(num_labels=1000)), [0.5] * 3, [0.5] * 3
    else:
        model = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12,
                                         num_attention_heads=6, image_size=518, patch_size=14))
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp / arch
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    out = d / "imported.safetensors"
    subprocess.run([binary, "import", str(d / "model.safetensors"), "--out", str(out)], check=True)
    size = model.config.image_size
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        if arch == "hf-vit-base":
            o = model(pixel_values=x, output_hidden_states=True)
            feats = model.vit.layernorm(o.hidden_states[-1])[0].numpy()
            probs = torch.softmax(o.logits, -1)[0].numpy()
        else:
            feats, probs = model(pixel_values=x).last_hidden_state[0].numpy(), None
    ours = rs.load(out, device="cpu")
    fd = float(np.abs(ours.features([pixels]).features[0] - feats).max())
    pd = float(np.abs(ours.predict([pixels]).probabilities[0] - probs).max()) if probs is not None else float("nan")
    print(f"{arch}: {ours.config['num_layers']} blocks, width {ours.config['hidden_size']}, "
          f"{feats.shape[0]} tokens: features max |diff| {fd:.2e} (max |feature| "
          f"{np.abs(feats).max():.2f}), probabilities max |diff| {pd:.2e}")


def main() -> None:
    binary, archs = sys.argv[1], sys.argv[2:] or ARCHS
    with tempfile.TemporaryDirectory() as t:
        for arch in archs:
            run = (check_hf if arch.startswith("hf-") else check_onnx if arch.startswith("onnx-")
                   else check_big_vision if arch.startswith("bv-") else check)
            run(binary, arch, Path(t))


if __name__ == "__main__":
    main()
