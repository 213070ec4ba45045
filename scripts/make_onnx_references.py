"""ONNX reference graphs for `routerscope import --format onnx`, exported by PyTorch itself.

Tiny-width timm and Hugging Face ViTs (the same code paths as the full-size models) with seeded
random weights (every parameter drawn, so no two initializers are equal and none is shared) are
exported with `torch.onnx.export`, the legacy TorchScript exporter and the dynamo one, at several
opsets, so that the importer meets each way a ViT reaches ONNX: fused and separate QKV, Gemm and
MatMul+Add, GELU as one op and as Erf or Tanh arithmetic, LayerNormalization and its
decomposition, weights inside the file and in an external `.onnx.data` file. Beside each
`model.onnx` goes `reference.safetensors`: the input pixels, PyTorch's final features (the
last-norm tokens; the raw tokens under `fc_norm`) and its logits; the script also checks that
onnxruntime gives PyTorch's output for each graph. Two graphs the importer must refuse with a
clear error are written too: a ViT with a ReLU MLP and a small residual CNN.

    pip install torch timm transformers onnx onnxscript onnxruntime safetensors
    python scripts/make_onnx_references.py tests/fixtures/import
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import timm
import torch
from safetensors.numpy import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def timm_cases():
    """name: (model, image size, normalisation, exporter, opset, external data)."""
    yield "onnx-timm-vit-legacy", VisionTransformer(
        img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
        num_classes=5), 32, HALF, "legacy", 17, False
    yield "onnx-timm-deit-dynamo", VisionTransformerDistilled(
        img_size=24, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
        num_classes=4, qkv_bias=False,
        act_layer=functools.partial(torch.nn.GELU, approximate="tanh")), 24, IMAGENET, \
        "dynamo", 18, True
    yield "onnx-timm-dinov2-reg-dynamo", VisionTransformer(
        img_size=28, patch_size=14, embed_dim=24, depth=2, num_heads=4, mlp_ratio=4.0,
        num_classes=0, init_values=0.5, reg_tokens=4, no_embed_class=True), 28, IMAGENET, \
        "dynamo", 20, False
    yield "onnx-timm-vit-avg-legacy", VisionTransformer(
        img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0,
        num_classes=3, reg_tokens=2, global_pool="avg", fc_norm=True), 32, HALF, "legacy", 17, \
        False


class Logits(torch.nn.Module):
    """A transformers model as users export it: pixels in, logits (or features) out."""

    def __init__(self, model, key):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return getattr(self.model(pixel_values=x), self.key)


def export(model, x, path: Path, exporter: str, opset: int, external: bool) -> None:
    if exporter == "legacy":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["pixels"], do_constant_folding=True)
    else:
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                    external_data=external)
        program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path))


def write(out: Path, name: str, model, forward, size: int, norm, exporter, opset, external,
          seed: int, meta: dict) -> None:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mean, std = norm
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        features, logits = forward(x)
        out_ref = model(x)
    export(model, x, d / "model.onnx", exporter, opset, external)
    got = onnxruntime.InferenceSession(str(d / "model.onnx")).run(None, {
        onnxruntime.InferenceSession(str(d / "model.onnx")).get_inputs()[0].name: x.numpy()})[0]
    err = float(np.abs(got - out_ref.numpy()).max())
    assert err < 1e-4, f"{name}: onnxruntime differs from PyTorch by {err}"
    ref = {"pixels": pixels, "features": np.ascontiguousarray(features, dtype=np.float32)}
    if logits is not None:
        ref["logits"] = np.ascontiguousarray(logits, dtype=np.float32)
    save_file(ref, str(d / "reference.safetensors"), metadata={
        **meta, "torch": torch.__version__, "onnx": onnx.__version__,
        "exporter": f"{exporter} opset {opset}", "onnxruntime_max_diff": f"{err:.2e}"})
    ops = sorted({n.op_type for n in onnx.load(str(d / "model.onnx")).graph.node})
    print(f"{name}: {exporter} opset {opset}, ops {ops}")


def main(out: Path) -> None:
    import transformers
    from transformers import (Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification)

    for i, (name, model, size, norm, exporter, opset, external) in enumerate(timm_cases()):
        model = randomise(model, 300 + i)

        def forward(x, model=model):
            f = model.forward_features(x)
            h = model.forward_head(f)
            return f[0].numpy(), (h[0].numpy() if model.num_classes else None)

        write(out, name, model, forward, size, norm, exporter, opset, external, 50 + i,
              {"timm": timm.__version__})

    hf = {
        "onnx-hf-vit-legacy14": (ViTForImageClassification(ViTConfig(
            image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=3, intermediate_size=40, num_labels=3)), "logits", 32, HALF,
            "legacy", 14),
        "onnx-hf-dinov2-legacy": (Dinov2Model(Dinov2Config(
            image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2,
            num_attention_heads=4, mlp_ratio=3, layerscale_value=0.5)), "last_hidden_state", 28,
            IMAGENET, "legacy", 17),
    }
    for i, (name, (inner, key, size, norm, exporter, opset)) in enumerate(hf.items()):
        inner = randomise(inner, 400 + i)
        model = Logits(inner, key).eval()

        def forward(x, inner=inner, key=key):
            if key == "logits":
                o = inner(pixel_values=x, output_hidden_states=True)
                f = inner.vit.layernorm(o.hidden_states[-1])
                return f[0].numpy(), o.logits[0].numpy()
            return inner(pixel_values=x).last_hidden_state[0].numpy(), None

        write(out, name, model, forward, size, norm, exporter, opset, False, 60 + i,
              {"transformers": transformers.__version__})

    # Graphs to refuse: a ViT whose MLP is ReLU, and a residual CNN (no tokens, no attention).
    relu = randomise(VisionTransformer(img_size=16, patch_size=8, embed_dim=12, depth=1,
                                       num_heads=2, num_classes=2, act_layer=torch.nn.ReLU), 7)
    d = out / "onnx-bad-relu"
    d.mkdir(parents=True, exist_ok=True)
    export(relu, torch.zeros(1, 3, 16, 16), d / "model.onnx", "legacy", 17, False)

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(x + self.b(torch.relu(self.bn(self.a(x)))))
            return self.fc(x.mean((2, 3)))

    d = out / "onnx-bad-resnet"
    d.mkdir(parents=True, exist_ok=True)
    export(randomise(Residual(), 8), torch.zeros(1, 3, 16, 16), d / "model.onnx", "legacy", 17,
           False)
    print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/import"))
