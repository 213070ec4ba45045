"""PyTorch checkpoints (`torch.save`'s zip format) for `routerscope import`, made by timm and
Hugging Face transformers themselves from the weights of the safetensors fixtures beside them
(`tests/fixtures/import/`), so each one's reference outputs are that fixture's
`reference.safetensors` (this script checks that the reloaded model reproduces them), plus the
hostile pickles the reader must refuse without running them. Committed, so CI needs no Python.

    pip install torch timm "transformers<5" safetensors   # 5.x writes safetensors only
    python scripts/make_pytorch_references.py tests/fixtures/import

Writes, under `pt/`:
- `timm-vit/pytorch_model.bin` + `config.json`: timm's `save_for_hf(..., safe_serialization=False)`
- `timm-dinov2-reg/vit.pth`: `torch.save(model.state_dict(), "vit.pth")`, no config beside it
- `timm-deit-distilled/checkpoint.pth.tar`: a training checkpoint `{"epoch", "model",
  "optimizer", "version"}` as timm's and most training scripts save one
- `hf-vit/`, `hf-dinov2/`: `save_pretrained(..., safe_serialization=False)` (`pytorch_model.bin`)
- `hostile/`: a custom class, an `os.system` reduce, a ResNet state dict, the pre-1.6 format
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from timm.models._hub import save_for_hf

sys.path.insert(0, str(Path(__file__).parent))
from make_import_references import FAMILIES, MODEL_ARGS  # noqa: E402


class Net:
    """A model class of the user's, pickled by reference as `__main__.Net`."""

    def __init__(self) -> None:
        self.width = 24


class Evil:
    """Unpickling this would run `os.system`: the reader must refuse it unrun."""

    def __reduce__(self):
        return (os.system, ("touch routerscope-pwned",))


def timm_model(src: Path, name: str) -> torch.nn.Module:
    kwargs, _arch, _mean, _std = FAMILIES[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "resize"}
    from timm.models.deit import VisionTransformerDistilled
    cls = VisionTransformerDistilled if kwargs.pop("distilled", False) else \
        timm.models.VisionTransformer
    model = cls(**kwargs).eval()
    model.load_state_dict(load_torch(str(src / name / "model.safetensors")))
    return model


def check_timm(model: torch.nn.Module, src: Path, name: str) -> None:
    ref = load_file(str(src / name / "reference.safetensors"))
    _, _arch, mean, std = FAMILIES[name]
    x = torch.from_numpy(ref["pixels"]).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        f = model.forward_features(x)[0].numpy()
    assert np.abs(f - ref["features"]).max() < 1e-5, name


def main(out: Path) -> None:
    src = out
    pt = out / "pt"
    shutil.rmtree(pt, ignore_errors=True)

    # timm's save_for_hf writes pytorch_model.bin unless asked for safetensors.
    d = pt / "timm-vit"
    d.mkdir(parents=True)
    model = timm_model(src, "timm-vit")
    _, arch, mean, std = FAMILIES["timm-vit"]
    model.pretrained_cfg = {"architecture": arch, "mean": mean, "std": std,
                            "input_size": (3, 32, 32), "num_classes": 5}
    save_for_hf(model, str(d), safe_serialization=False)
    reloaded = timm_model(src, "timm-vit")
    reloaded.load_state_dict(torch.load(d / "pytorch_model.bin", weights_only=True))
    check_timm(reloaded, src, "timm-vit")

    # The way most people keep their weights, with nothing beside them.
    d = pt / "timm-dinov2-reg"
    d.mkdir(parents=True)
    model = timm_model(src, "timm-dinov2-reg")
    torch.save(model.state_dict(), d / "vit.pth")
    check_timm(model, src, "timm-dinov2-reg")

    # A training checkpoint: the state dict under "model", beside an optimizer's state.
    d = pt / "timm-deit-distilled"
    d.mkdir(parents=True)
    model = timm_model(src, "timm-deit-distilled")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randn(2, 3, 24, 24))[0].sum().backward()
    opt.step()
    model.load_state_dict(load_torch(str(src / "timm-deit-distilled" / "model.safetensors")))
    model.eval()
    torch.save({"epoch": 7, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "metric": 0.75}, d / "checkpoint.pth.tar")
    shutil.copy(src / "timm-deit-distilled" / "config.json", d / "config.json")

    # Hugging Face's save_pretrained without safetensors.
    import transformers
    for name, cls in [("hf-vit", transformers.ViTForImageClassification),
                      ("hf-dinov2", transformers.Dinov2Model)]:
        d = pt / name
        m = cls.from_pretrained(str(src / name)).eval()
        m.save_pretrained(str(d), safe_serialization=False)
        shutil.copy(src / name / "preprocessor_config.json", d / "preprocessor_config.json")
        assert (d / "pytorch_model.bin").exists(), sorted(os.listdir(d))

    # Hostile and foreign pickles.
    d = pt / "hostile"
    d.mkdir(parents=True)
    sd = {"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), "blocks.0.norm1.weight": torch.ones(4)}

    torch.save({**sd, "net": Net()}, d / "custom-class.pth")
    torch.save({"state_dict": sd, "hook": Evil()}, d / "os-system.pth")
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    resnet = {"conv1.weight": r(8, 3, 7, 7)}
    for bn in ["bn1", "layer1.0.bn1", "layer1.0.bn2"]:
        resnet.update({f"{bn}.weight": r(8), f"{bn}.bias": r(8), f"{bn}.running_mean": r(8),
                       f"{bn}.running_var": r(8).abs(),
                       f"{bn}.num_batches_tracked": torch.tensor(0)})
    resnet.update({"layer1.0.conv1.weight": r(8, 8, 3, 3), "layer1.0.conv2.weight": r(8, 8, 3, 3),
                   "fc.weight": r(10, 8), "fc.bias": r(10)})
    torch.save(resnet, d / "resnet.pth")
    torch.save(sd, d / "legacy.pth", _use_new_zipfile_serialization=False)
    for p in sorted(pt.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(out)}: {p.stat().st_size} bytes")
    print("torch", torch.__version__, "timm", timm.__version__, "transformers",
          transformers.__version__)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/import"))
