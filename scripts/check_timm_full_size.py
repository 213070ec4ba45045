"""Full-size check of `routerscope import` on timm and Hugging Face ViTs: each architecture is
created by timm (or transformers, `hf-…`) with random weights (no hub download), saved as its
state dict with the config.json timm's `save_for_hf` writes (or with `save_pretrained`), imported by the routerscope command line, and run by both on the same
random image; prints the largest difference of the final features and of the class
probabilities.

    python scripts/check_timm_full_size.py ROUTERSCOPE_BINARY [ARCH ...]
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
         "vit_small_patch14_dinov2", "hf-vit-base", "hf-dinov2-small"]


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
            (check_hf if arch.startswith("hf-") else check)(binary, arch, Path(t))


if __name__ == "__main__":
    main()
