"""``routerscope.analyze`` against ``routerscope analyze``, its files, progress and Ctrl-C; Ctrl-C
during a forward pass."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

import routerscope as rs
from routerscope import _native
from conftest import run_cli

# Timings and where the run came from differ between two runs; everything else must not.
VOLATILE = ("seconds", "images_per_second", "model", "data")


def comparable(a: dict) -> dict:
    return {k: v for k, v in a.items() if k not in VOLATILE}


def test_analyze_returns_what_the_cli_writes(tmp) -> None:
    model = rs.load("fashion-mnist-softmax-tc", device="cpu")
    slice_dir = str(Path(rs.builtin_models()["photo"]).parents[1] / "datasets" / "fashion-mnist-slice")
    cli_out, py_out = tmp / "cli", tmp / "py"
    run_cli([
        "analyze", "--model", str(model.path), "--data", slice_dir, "--limit", "300",
        "--compare", "softmax-ec,sparse-ec", "--k", "2", "--device", "cpu", "--out", str(cli_out),
    ])
    got = rs.analyze(model, "fashion-mnist-slice", out=py_out, compare=["softmax-ec", "sparse-ec"], k=2, limit=300, progress=False)
    want = json.loads((cli_out / "analysis.json").read_text())
    assert comparable(got) == comparable(want)
    assert [r["settings"]["router"] for r in got["runs"]] == ["softmax-tc", "softmax-ec", "sparse-ec"]
    assert got["images"] == 300 and not got["partial"]
    assert sorted(p.name for p in py_out.iterdir()) == sorted(p.name for p in cli_out.iterdir())
    assert comparable(json.loads((py_out / "analysis.json").read_text())) == comparable(want)
    for csv in py_out.glob("*.csv"):
        assert csv.read_text() == (cli_out / csv.name).read_text(), csv.name


def test_analyze_of_a_folder_with_classes(tmp) -> None:
    data = tmp / "data"
    for cls, names in {"boots": ["fmnist-00"], "trousers": ["fmnist-02", "fmnist-10"]}.items():
        (data / cls).mkdir(parents=True)
        for p in rs.sample_images():
            if any(Path(p).name.startswith(n) for n in names):
                shutil.copy(p, data / cls)
    a = rs.analyze("fashion-mnist-sinkhorn-ec", data, progress=False)
    assert a["classes"] == ["boots", "trousers"] and a["labelled"] and a["images"] == 3
    layer = a["runs"][0]["layers"][0]
    assert np.array(layer["tokens_per_class"]).tolist() == [50, 100]


def test_progress_reaches_the_total() -> None:
    seen: List[Tuple[int, int]] = []
    _native._analyze(
        "fashion-mnist-softmax-tc", "fashion-mnist-slice", limit=400,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen and seen[-1] == (400, 400)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # tqdm, when installed, draws the bar; the result is the same.
    pytest.importorskip("tqdm")
    a = rs.analyze("fashion-mnist-softmax-tc", "fashion-mnist-slice", limit=50, progress=True)
    assert a["images"] == 50


def interrupt_after(seconds: float) -> threading.Timer:
    """Sends this process SIGINT (as Ctrl-C does) after ``seconds``."""
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_stops_an_analysis_and_keeps_what_was_done(tmp) -> None:
    out = tmp / "out"
    model = rs.load("fashion-mnist-softmax-tc", device="cpu")
    timer = interrupt_after(0.8)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rs.analyze(
            model, "fashion-mnist-slice", out=out,
            compare=["softmax-ec", "sinkhorn-tc", "sinkhorn-ec", "sparse-ec"], progress=False,
        )
    timer.join()
    assert time.monotonic() - start < 4.0
    partial = json.loads((out / "analysis.json").read_text())
    assert partial["partial"] and 0 < partial["images"] < 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_ctrl_c_stops_a_forward_pass_and_the_model_still_works() -> None:
    photo = rs.load("photo", device="cpu")
    images = [p for p in rs.sample_images() if Path(p).name.startswith("photo-")] * 4
    timer = interrupt_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        photo.predict(images)
    timer.join()
    assert time.monotonic() - start < 0.5 + 3.0
    assert photo.predict(images[:1]).features.shape == (1, 257, 384)
