"""``Model.predict`` / ``Model.features`` against ``routerscope predict --json`` and
``routerscope features`` on the sample images, for a Fashion-MNIST model and the photo model,
under the trained router and what-ifs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from safetensors.numpy import load_file

import routerscope as rs
from conftest import REPO, require, run_cli

SAMPLES = [Path(p) for p in rs.sample_images()]
FASHION = [p for p in SAMPLES if p.name.startswith("fmnist-")]
PHOTOS = [p for p in SAMPLES if p.name.startswith("photo-")]

# (CLI flags, predict keywords): the trained router and two what-ifs.
FASHION_RUNS = [
    ([], {}),
    (["--router", "softmax-ec"], {"router": "softmax-ec"}),
    (
        ["--router", "sinkhorn-tc", "--k", "2", "--capacity-factor", "1.5"],
        {"router": "sinkhorn-tc", "k": 2, "capacity_factor": 1.5},
    ),
]
PHOTO_RUNS = [
    ([], {}),
    (["--router", "sinkhorn-tc"], {"router": "sinkhorn-tc"}),
    (["--router", "softmax-ec", "--capacity-factor", "2.5"], {"router": "softmax-ec", "capacity_factor": 2.5}),
]


@pytest.fixture(scope="module")
def fashion() -> rs.Model:
    return rs.load("fashion-mnist-softmax-tc", device="cpu")


@pytest.fixture(scope="module")
def photo() -> rs.Model:
    return rs.load("photo", device="cpu")


def cli_predict(model: rs.Model, flags: List[str], images: List[Path]) -> Dict[str, Any]:
    proc = run_cli(
        ["predict", "--model", str(model.path), "--device", "cpu", "--json", *flags, *map(str, images)]
    )
    return json.loads(proc.stdout)


def assert_predict_matches(pred: rs.Prediction, cli: Dict[str, Any]) -> None:
    tops = pred.top(5)
    for i, img in enumerate(cli["images"]):
        assert tops[i] == img["top5"]
        for layer, want in zip(pred.layers, img["layers"]):
            g = i // layer.group_images
            assert layer.block == want["block"] and layer.router == want["router"]
            assert layer.capacity == want["capacity"]
            assert layer.tokens_per_expert[g].tolist() == want["tokens_per_expert"]
            assert np.flatnonzero(layer.routing.dropped[g]).tolist() == want["dropped_tokens"]
            assert layer.routing.actual_capacity_factor == want["actual_capacity_factor"]


@pytest.mark.parametrize("flags,kwargs", FASHION_RUNS)
def test_fashion_predict_matches_the_cli(fashion: rs.Model, flags, kwargs) -> None:
    pred = fashion.predict(FASHION, **kwargs)
    assert pred.probabilities.shape == (len(FASHION), 10)
    assert_predict_matches(pred, cli_predict(fashion, flags, FASHION))
    # The what-if from the trained run equals the full run under that routing.
    what_if = fashion.predict(FASHION).what_if(**kwargs)
    assert np.array_equal(what_if.probabilities, pred.probabilities)
    assert np.array_equal(what_if.features, pred.features)
    for a, b in zip(what_if.layers, pred.layers):
        assert np.array_equal(a.combine, b.combine)


def test_fashion_groups_match_the_cli(fashion: rs.Model) -> None:
    images = FASHION[:4]
    pred = fashion.predict(images, "softmax-ec", group_images=2)
    assert pred.layers[0].group_images == 2
    assert pred.layers[0].tokens_per_expert.shape == (2, 8)
    assert_predict_matches(pred, cli_predict(fashion, ["--router", "softmax-ec", "--group-images", "2"], images))


def test_fashion_features_match_the_cli(fashion: rs.Model, tmp) -> None:
    out = tmp / "f.safetensors"
    run_cli(["features", "--model", str(fashion.path), "--device", "cpu", "--router", "sparse-ec", "--out", str(out), *map(str, FASHION)])
    want = load_file(str(out))["features"]
    got = fashion.features(FASHION, "sparse-ec").features
    assert got.shape == (len(FASHION), 50, 64) and np.array_equal(got, want)


@pytest.mark.parametrize("flags,kwargs", PHOTO_RUNS)
def test_photo_features_and_routing_match_the_cli(photo: rs.Model, flags, kwargs, tmp) -> None:
    images = PHOTOS[:3]
    pred = photo.features(images, **kwargs)
    out = tmp / "f.safetensors"
    run_cli(["features", "--model", str(photo.path), "--device", "cpu", "--out", str(out), *flags, *map(str, images)])
    assert np.array_equal(pred.features, load_file(str(out))["features"])
    assert pred.probabilities.shape == (3, 0) and photo.is_feature_model
    assert_predict_matches(pred, cli_predict(photo, flags, images))


def idx_images(n: int) -> np.ndarray:
    raw = gzip.open(REPO / "assets/datasets/fashion-mnist-slice/t10k-images-idx3-ubyte.gz").read()
    return np.frombuffer(raw, dtype=np.uint8, offset=16)[: n * 784].reshape(n, 28, 28)


def test_pixel_arrays_run_as_their_files(fashion: rs.Model) -> None:
    pixels = idx_images(2)
    files = [p for p in FASHION if p.name.endswith(("-test0.png", "-test1.png"))]
    from_files = fashion.predict(sorted(files, key=lambda p: p.name))
    for images in (pixels[..., None], list(pixels), [pixels[0][:, :, None], pixels[1]]):
        pred = fashion.predict(images)
        assert pred.images == ["array[0]", "array[1]"]
        assert np.array_equal(pred.probabilities, from_files.probabilities)
    torch = require("torch")
    pred = fashion.predict(torch.from_numpy(pixels[..., None].copy()))
    assert np.array_equal(pred.probabilities, from_files.probabilities)
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        fashion.predict(pixels)
    assert np.array_equal(pred.probabilities, from_files.probabilities)


def test_layer_records_are_per_image(fashion: rs.Model) -> None:
    pred = fashion.predict(FASHION[:3])
    layer = pred.layers[0]
    assert layer.expert_index.shape == (3, 50, 1) and layer.gates.shape == (3, 50, 1)
    assert layer.dropped.shape == (3, 50)
    assert layer.router_probabilities.shape == (3, 50, 8)
    np.testing.assert_allclose(layer.router_probabilities.sum(-1), 1.0, atol=1e-5)
    assert layer.router_logits.shape == (3, 50, 8)
    assert layer.dispatch.shape == (3, 50, 8, layer.capacity)
    top = layer.router_probabilities.argmax(-1)
    assert np.array_equal(top, layer.expert_index[..., 0])  # Softmax TC picks the top expert
    assert pred.routers[0]["router"] == "softmax-tc"
    soft = rs.load("fashion-mnist-soft", device="cpu").predict(FASHION[:2])
    sl = soft.layers[0]
    assert sl.expert_index is None and sl.dispatch.shape[:2] == (2, 50)
    np.testing.assert_allclose(sl.combine.sum(axis=(2, 3)), 1.0, atol=1e-5)
    assert sl.router_logits.ndim == 4


def test_model_metadata(fashion: rs.Model, photo: rs.Model) -> None:
    assert fashion.config["moe"]["num_experts"] == 8
    assert fashion.moe_blocks == [3, 5] and fashion.router == "softmax-tc"
    assert fashion.class_names[9] == "Ankle boot"
    assert fashion.tokens_per_image == 50 and fashion.has_cls_token and fashion.grid == (7, 7)
    assert photo.grid == (16, 16) and photo.is_feature_model
    assert set(rs.builtin_models()) >= {"photo", "fashion-mnist-softmax-tc", "fashion-mnist-dense"}
    assert "CPU" in fashion.device and "fashion-mnist-softmax-tc" in repr(fashion)


def test_distilled_photo_models_load_by_name() -> None:
    for router in ["softmax-tc", "sinkhorn-tc", "softmax-ec", "sinkhorn-ec", "sparse-ec"]:
        assert f"photo-{router}" in rs.builtin_models()
    m = rs.load("photo-sinkhorn-ec", device="cpu")
    assert m.router == "sinkhorn-ec" and m.is_feature_model and m.moe_blocks == [9, 11]
