"""Routing traces (``docs/trace-format.md``): written with ``routerscope.Trace`` or by hand, read
by ``routerscope analyze/export --trace`` and ``routerscope.analyze``.

The round trips compare a trace of a built-in model's own routing (recorded from
``Model.predict``) with the model itself; the what-ifs compare re-routed logged logits with
``routerscope.route``; the bad traces check that each defect is one error naming the tensor.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from safetensors.numpy import save_file

import routerscope as rs

from conftest import REPO, require, run_cli

SLICE = REPO / "assets" / "datasets" / "fashion-mnist-slice"
N = 12  # images per round trip


def fashion_slice(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images (uint8 [n, 28, 28]) and labels of the built-in slice."""
    with gzip.open(SLICE / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    count, rows, cols = struct.unpack(">III", raw[4:16])
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)[:n]
    with gzip.open(SLICE / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return images.copy(), labels.astype(np.int64)


def trace_of_prediction(
    model: "rs.Model",
    images: Sequence[np.ndarray],
    path: Path,
    *,
    labels: Optional[Sequence[int]] = None,
    names: Optional[Sequence[str]] = None,
    log: Sequence[str] = ("picks",),
    group_images: int = 1,
    inputs: Optional[Sequence[Any]] = None,
) -> "rs.Prediction":
    """Writes a trace of ``model``'s own routing of ``images``; ``log`` picks the pieces:
    ``picks`` (Token Choice expert_index/gates/slot), ``dense`` (dispatch/combine), ``soft``
    (Soft MoE weights), ``logits``. ``inputs`` (file paths) go to the model instead of the
    pixels when given."""
    cfg = model.config
    pred = model.predict(list(inputs or images), group_images=group_images)
    grid = (cfg["image_size"][0] // cfg["patch_size"][0], cfg["image_size"][1] // cfg["patch_size"][1])
    cls = cfg["classifier"] == "token"
    with rs.Trace(
        path,
        experts=cfg["moe"]["num_experts"],
        model_name=cfg["name"],
        classes=cfg["class_names"],
    ) as trace:
        for i, px in enumerate(images):
            trace.image(
                px,
                grid=grid,
                cls_token=cls,
                label=None if labels is None else int(labels[i]),
                name=None if names is None else names[i],
            )
        for layer in pred.layers:
            router = layer.router
            for g in range(len(images) // group_images):
                rows = slice(g * group_images, (g + 1) * group_images)
                pieces: Dict[str, Any] = {}
                if "picks" in log:
                    pieces.update(
                        expert_index=layer.expert_index[rows],
                        gates=layer.gates[rows],
                        slot=layer.slot[rows],
                    )
                if "dense" in log:
                    pieces.update(dispatch=layer.dispatch[rows], combine=layer.combine[rows])
                if "soft" in log:
                    pieces.update(
                        soft_dispatch=layer.dispatch[rows], soft_combine=layer.combine[rows]
                    )
                if "logits" in log:
                    pieces.update(logits=layer.router_logits[rows])
                trace.log_layer(
                    layer.block,
                    group=range(g * group_images, (g + 1) * group_images),
                    router=router,
                    k=cfg["moe"]["router"]["k"] if router.endswith("-tc") else None,
                    capacity=layer.capacity,
                    **pieces,
                )
    return pred


def expert_totals(layer: Dict[str, Any]) -> np.ndarray:
    """Tokens each expert processed, over the analysis of one layer."""
    return np.array(layer["tokens_per_class_expert"]).sum(0)


def same_runs(a: Dict[str, Any], b: Dict[str, Any], probabilities: bool = True) -> None:
    """The trace's analysis ``a`` and the model's ``b`` agree on every count (their settings may
    differ in form: a trace knows the capacity it logged, a model the factor it derives it
    from). Without ``probabilities`` (a trace of picks or dense weights alone) the trace's
    router entropy is unknown (``None``)."""
    assert len(a["runs"]) == len(b["runs"])
    for ra, rb in zip(a["runs"], b["runs"]):
        for key in ("router", "k", "group_images"):
            assert ra["settings"][key] == rb["settings"][key], key
        la, lb = without_names(ra["layers"]), without_names(rb["layers"])
        if not probabilities:
            for x, y in zip(la, lb):
                assert x["router_entropy"] is None and y["router_entropy"] is not None
                x["router_entropy"] = y["router_entropy"]
        assert la == lb


def without_names(value: Any) -> Any:
    """The analysis with image and model names removed (a trace names its images itself)."""
    if isinstance(value, dict):
        return {
            k: without_names(v)
            for k, v in value.items()
            if k
            not in (
                "name",
                "like_name",
                "image",
                "model",
                "data",
                "source",
                "elapsed_s",
                "images_per_s",
            )
        }
    if isinstance(value, list):
        return [without_names(v) for v in value]
    return value


MODELS = {
    "token-choice": ("fashion-mnist-softmax-tc", ("picks", "logits")),
    "token-choice-picks": ("fashion-mnist-softmax-tc", ("picks",)),
    "token-choice-dense": ("fashion-mnist-sinkhorn-tc", ("dense",)),
    "expert-choice": ("fashion-mnist-softmax-ec", ("dense",)),
    "sparse-expert-choice": ("fashion-mnist-sparse-ec", ("dense", "logits")),
    "soft-moe": ("fashion-mnist-soft", ("soft",)),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_a_trace_of_a_models_routing_analyses_as_the_model_does(tmp: Path, case: str) -> None:
    name, log = MODELS[case]
    model = rs.load(name)
    images, labels = fashion_slice(N)
    path = tmp / "run.rstrace.safetensors"
    trace_of_prediction(model, images, path, labels=labels, log=log)

    of_model = rs.analyze(model, SLICE, tmp / "model", limit=N, progress=False)
    of_trace = rs.analyze(path, out=tmp / "trace", progress=False)
    assert of_trace["images"] == N
    probabilities = "logits" in log or "soft" in log
    same_runs(of_trace, of_model, probabilities)
    # The command line reads the same trace to the same counts.
    run_cli(["analyze", "--trace", str(path), "--out", str(tmp / "cli")])
    cli = json.loads((tmp / "cli" / "analysis.json").read_text())
    same_runs(cli, of_model, probabilities)


def csv_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "image"} for row in csv.DictReader(f)]


EXPORTS = {
    "token-choice": ("fashion-mnist-softmax-tc", ("picks", "logits")),
    "expert-choice": ("fashion-mnist-sinkhorn-ec", ("dense", "logits")),
    "soft-moe": ("fashion-mnist-soft", ("soft",)),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_a_trace_exports_the_figures_data_of_the_model(tmp: Path, case: str) -> None:
    name, log = EXPORTS[case]
    model = rs.load(name)
    files = sorted(p for p in rs.sample_images() if p.name.startswith("fmnist-"))[:3]
    pixels = [rs.read_image(p) for p in files]
    path = tmp / "t.rstrace.safetensors"
    trace_of_prediction(model, pixels, path, names=[p.name for p in files], log=log, inputs=files)

    model_path = rs.builtin_models()[name]
    run_cli(["export", "--model", str(model_path), *map(str, files), "--out", str(tmp / "m"),
             "--format", "csv,json"])
    run_cli(["export", "--trace", str(path), "--out", str(tmp / "t"), "--format", "csv,json"])
    m_csv = sorted((tmp / "m").glob("*.csv"))
    t_csv = sorted((tmp / "t").glob("*.csv"))
    assert len(m_csv) == len(t_csv) == len(files)
    for a, b in zip(m_csv, t_csv):
        assert csv_rows(a) == csv_rows(b), (a.name, b.name)
    for a, b in zip(sorted((tmp / "m").glob("*.json")), sorted((tmp / "t").glob("*.json"))):
        if a.name == "summary.json":
            continue
        pa = json.loads(a.read_text())["panels"]
        pb = json.loads(b.read_text())["panels"]
        assert without_names(pa) == without_names(pb)


ROUTERS = [
    ("softmax-tc", []),
    ("softmax-tc", ["--k", "2", "--capacity-factor", "0.5"]),
    ("sinkhorn-tc", []),
    ("softmax-ec", []),
    ("sinkhorn-ec", ["--capacity-factor", "2"]),
    ("sparse-ec", []),
]


def logits_only_trace(path: Path, logits: np.ndarray, grid: Tuple[int, int], cls: bool) -> None:
    """A hand-made trace of images [G, tokens] of noise with only router logits [G, tokens, E]."""
    g, n, e = logits.shape
    rng = np.random.default_rng(1)
    with rs.Trace(path, experts=e, model_name="logits-only") as trace:
        for i in range(g):
            trace.image(rng.integers(0, 256, (grid[0] * 4, grid[1] * 4, 3), dtype=np.uint8),
                        grid=grid, cls_token=cls)
            trace.log_layer(7, group=i, logits=logits[i])


def token_routes(export_dir: Path, layer: int = 0) -> List[List[Dict[str, Any]]]:
    """Per image (in order), per token: the choices of the exported JSON's panel of MoE layer
    ``layer``."""
    out = []
    for f in sorted(export_dir.glob("*.json")):
        if f.name == "summary.json":
            continue
        panels = json.loads(f.read_text())["panels"]
        out.append(panels[layer]["tokens"])
    return out


@pytest.mark.parametrize("router,flags", ROUTERS, ids=[" ".join([r, *f]) for r, f in ROUTERS])
def test_a_what_if_on_logged_logits_is_route_on_those_logits(
    tmp: Path, router: str, flags: List[str]
) -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((3, 17, 4)) * 2).astype(np.float32)
    path = tmp / "l.rstrace.safetensors"
    logits_only_trace(path, logits, (4, 4), True)
    run_cli(["export", "--trace", str(path), "--router", router, *flags, "--out", str(tmp / "x"),
             "--format", "json"])
    per_image = token_routes(tmp / "x")
    assert len(per_image) == 3
    kw: Dict[str, Any] = {}
    for a, b in zip(flags[::2], flags[1::2]):
        kw[a[2:].replace("-", "_")] = float(b) if "." in b or a == "--capacity-factor" else int(b)
    want = rs.route(logits, router, **kw)
    for gi, tokens in enumerate(per_image):
        assert len(tokens) == 17
        for t, tok in enumerate(tokens):
            d = want.dispatch[gi, t]  # [E, C]
            c = want.combine[gi, t]
            # Token Choice lists dropped choices too (slot null); dispatch holds the kept ones.
            got = {
                (ch["expert"], ch["slot"]): ch["gate"]
                for ch in tok["choices"]
                if ch["slot"] is not None
            }
            expect = {(int(e), int(s)): float(c[e, s]) for e, s in zip(*np.nonzero(d))}
            assert got.keys() == expect.keys(), (gi, t)
            for key in got:
                assert got[key] == pytest.approx(expect[key], abs=1e-6)
            assert tok["dropped"] == bool(want.dropped[gi, t])


def test_compare_re_routes_every_router_on_the_logged_logits(tmp: Path) -> None:
    logits = np.random.default_rng(3).standard_normal((4, 17, 4)).astype(np.float32)
    path = tmp / "l.rstrace.safetensors"
    logits_only_trace(path, logits, (4, 4), True)
    routers = "softmax-tc,sinkhorn-tc,softmax-ec,sinkhorn-ec,sparse-ec"
    report = rs.analyze(path, compare=routers.split(","), progress=False)
    runs = {r["settings"]["router"]: r for r in report["runs"]}
    assert set(runs) == set(routers.split(","))
    for name, run in runs.items():
        want = rs.route(logits, name)
        (layer,) = run["layers"]
        got = expert_totals(layer)
        assert (got == want.tokens_per_expert.sum(0)).all(), name


# -- partial traces -----------------------------------------------------------------------


def partial_trace(path: Path, piece: str) -> None:
    model = rs.load("fashion-mnist-softmax-tc")
    images, labels = fashion_slice(4)
    trace_of_prediction(model, images, path, labels=labels, log=(piece,))


@pytest.mark.parametrize("piece", ["picks", "dense", "logits"])
def test_a_trace_with_one_piece_opens_and_says_what_it_lacks(tmp: Path, piece: str) -> None:
    path = tmp / f"{piece}.rstrace.safetensors"
    partial_trace(path, piece)
    out = run_cli(["export", "--trace", str(path), "--out", str(tmp / "x"), "--format", "json,csv"])
    assert "exported 4 images" in out.stdout
    tokens = token_routes(tmp / "x")
    assert len(tokens) == 4 and all(len(t) == 50 for t in tokens)
    what_if = run_cli(["export", "--trace", str(path), "--router", "softmax-ec", "--out",
                       str(tmp / "y")], check=False)
    if piece == "logits":
        assert what_if.returncode == 0, what_if.stderr
    else:
        assert what_if.returncode != 0
        assert "logits" in what_if.stderr and "what-if" in what_if.stderr, what_if.stderr


# -- bad traces ---------------------------------------------------------------------------


def hand_trace(path: Path, **change: Any) -> None:
    """A valid hand-written two-image trace, with ``change`` applied to its tensors / metadata."""
    tokens, e = 17, 4
    rng = np.random.default_rng(0)
    tensors: Dict[str, np.ndarray] = {}
    groups = []
    for i in range(2):
        tensors[f"images/{i}"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        logits = rng.standard_normal((tokens, e)).astype(np.float32)
        top = logits.argmax(1)
        tensors[f"layers/0/groups/{i}/logits"] = logits
        tensors[f"layers/0/groups/{i}/expert_index"] = top[:, None].astype(np.int32)
        tensors[f"layers/0/groups/{i}/gates"] = np.full((tokens, 1), 0.5, np.float32)
        groups.append({"members": [[i, 0, tokens]]})
    meta: Dict[str, Any] = {
        "format": "routerscope-trace",
        "version": 1,
        "num_experts": e,
        "images": [{"grid": [4, 4], "cls_token": True} for _ in range(2)],
        "layers": [{"block": 0, "router": {"kind": "softmax-tc", "k": 1}, "groups": groups}],
    }
    for key, value in change.items():
        if key == "meta":
            value(meta)
        elif value is None:
            del tensors[key.replace("__", "/")]
        else:
            tensors[key.replace("__", "/")] = value
    save_file(tensors, str(path), metadata={"routerscope.trace": json.dumps(meta)})


BAD = {
    "logits of the wrong shape": (
        {"layers__0__groups__1__logits": np.zeros((17, 3), np.float32)},
        "layers/0/groups/1/logits",
    ),
    "token count against the grid": (
        {"meta": lambda m: m["images"][0].update(grid=[5, 4])},
        "image 0",
    ),
    "expert index beyond the experts": (
        {"layers__0__groups__0__expert_index": np.full((17, 1), 4, np.int32)},
        "layers/0/groups/0/expert_index",
    ),
    "a NaN gate": (
        {"layers__0__groups__1__gates": np.full((17, 1), np.nan, np.float32)},
        "layers/0/groups/1/gates",
    ),
    "a NaN logit": (
        {"layers__0__groups__0__logits": np.full((17, 4), np.nan, np.float32)},
        "layers/0/groups/0/logits",
    ),
    "an unknown version": ({"meta": lambda m: m.update(version=2)}, "version 2"),
    "an image of the wrong dtype": (
        {"images__1": np.zeros((16, 16, 3), np.float32)},
        "images/1",
    ),
    "a group naming a missing image": (
        {"meta": lambda m: m["layers"][0]["groups"][1].update(members=[[5, 0, 17]])},
        "image 5",
    ),
    # Numbers from the description bounded before they size or index anything.
    "a later image's label outside the classes": (
        {"meta": lambda m: (m.update(classes=["a", "b"]), m["images"][0].update(label=0),
                            m["images"][1].update(label=5))},
        "image 1 has label 5 but `classes` names 2 classes",
    ),
    "a label of 10^9 without classes": (
        {"meta": lambda m: m["images"][1].update(label=10**9)},
        "image 1 has label 1000000000",
    ),
    "a logged capacity of 2^62": (
        {"meta": lambda m: m["layers"][0]["router"].update(capacity=2**62)},
        "`capacity` is 4611686018427387904",
    ),
    "a logged slot of 2^40": (
        {"layers__0__groups__0__slot": np.array([[2**40]] + [[i] for i in range(16)], np.int64),
         "meta": lambda m: m["layers"][0].update(router={"kind": "softmax-tc"})},
        "layers/0/groups/0/slot",
    ),
    "a patch size of 0": ({"meta": lambda m: m.update(patch_size=[0, 4])}, "`patch_size` [0, 4]"),
    "a grid whose product overflows": (
        {"meta": lambda m: [im.update(grid=[2**32, 2**32]) for im in m["images"]]},
        "patch grid of 4294967296x4294967296",
    ),
    "an image beyond the image limits": (
        {"images__0": np.zeros((16385, 1, 3), np.uint8)},
        "at most 16384 pixels a side",
    ),
    "a negative num_experts": (
        {"meta": lambda m: m.update(num_experts=-4)},
        "`num_experts`: invalid value: integer `-4`",
    ),
    "gates without expert_index": (
        {"layers__0__groups__1__expert_index": None},
        "`layers/0/groups/1/gates` without `expert_index`",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_trace_is_one_error_naming_the_tensor(tmp: Path, case: str) -> None:
    change, names = BAD[case]
    path = tmp / "bad.rstrace.safetensors"
    hand_trace(path, **change)
    proc = run_cli(["analyze", "--trace", str(path), "--out", str(tmp / "x")], check=False)
    assert proc.returncode != 0
    assert names in proc.stderr, proc.stderr
    assert str(path) in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr
    assert not (tmp / "x").exists(), "a failed run leaves no output folder"
    with pytest.raises(ValueError, match=re.escape(names)) as info:
        rs.analyze(path, out=tmp / "y", progress=False)
    assert str(path) in str(info.value)
    assert not (tmp / "y").exists()
    # The same message as the command line's.
    assert str(info.value) in proc.stderr, (str(info.value), proc.stderr)


def test_no_call_hangs_on_a_fifo_or_takes_a_folder(tmp: Path) -> None:
    """A FIFO (whose open would wait for a writer forever) or a folder given as a trace, a
    model or a dataset is one OSError naming it, at once."""
    fifo = tmp / "pipe.rstrace.safetensors"
    os.mkfifo(fifo)
    folder = tmp / "folder.rstrace.safetensors"
    folder.mkdir()
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("a call blocked on a FIFO"))
    signal.alarm(20)
    try:
        for call in (lambda: rs.analyze(fifo, progress=False), lambda: rs.load(fifo)):
            with pytest.raises(OSError, match=r"pipe\.rstrace\.safetensors.*a FIFO"):
                call()
        with pytest.raises(OSError, match="folder.rstrace.safetensors"):
            rs.analyze(folder, progress=False)
        idx = tmp / "idx"
        idx.mkdir()
        os.mkfifo(idx / "t10k-images-idx3-ubyte")
        os.mkfifo(idx / "t10k-labels-idx1-ubyte")
        with pytest.raises((OSError, ValueError), match="a FIFO"):
            rs.analyze("fashion-mnist-softmax-tc", idx, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_the_hand_written_trace_is_valid(tmp: Path) -> None:
    path = tmp / "ok.rstrace.safetensors"
    hand_trace(path)
    assert rs.analyze(path, progress=False)["images"] == 2


def test_a_truncated_trace_is_an_error_naming_the_file(tmp: Path) -> None:
    path = tmp / "t.rstrace.safetensors"
    partial_trace(path, "picks")
    data = path.read_bytes()
    for cut in (len(data) - 100, 40, 5):
        path.write_bytes(data[:cut])
        proc = run_cli(["analyze", "--trace", str(path), "--out", str(tmp / "x")], check=False)
        assert proc.returncode != 0 and str(path) in proc.stderr, proc.stderr
        assert "panicked" not in proc.stderr
        with pytest.raises(ValueError):
            rs.analyze(path, progress=False)


def test_a_safetensors_file_that_is_not_a_trace_says_so(tmp: Path) -> None:
    path = tmp / "plain.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(path))
    proc = run_cli(["analyze", "--trace", str(path), "--out", str(tmp / "x")], check=False)
    assert proc.returncode != 0 and "routerscope.trace" in proc.stderr, proc.stderr


# -- the writer ---------------------------------------------------------------------------


def test_the_writer_rejects_what_the_reader_would(tmp: Path) -> None:
    with rs.Trace(tmp / "w.rstrace.safetensors", experts=4) as t:
        t.image(np.zeros((16, 16, 3), np.uint8), grid=(4, 4), cls_token=True)
        with pytest.raises(ValueError, match="17 tokens"):
            t.log_layer(0, group=0, logits=np.zeros((16, 4), np.float32))
        with pytest.raises(ValueError, match="experts are 0..3"):
            t.log_layer(0, group=0, expert_index=np.full((17, 1), 4), gates=np.ones((17, 1)))
        with pytest.raises(ValueError, match="non-finite"):
            t.log_layer(0, group=0, expert_index=np.zeros((17, 1), int),
                        gates=np.full((17, 1), np.nan))
        with pytest.raises(ValueError, match="only 1 images"):
            t.log_layer(0, group=1, logits=np.zeros((17, 4), np.float32))
        with pytest.raises(ValueError, match="one patch grid"):
            t.image(np.zeros((16, 16, 3), np.uint8), grid=(4, 4), cls_token=False)
        t.log_layer(0, group=0, logits=np.zeros((17, 4), np.float32))
        with pytest.raises(ValueError, match="already logged"):
            t.log_layer(0, group=0, logits=np.zeros((17, 4), np.float32))
    assert (tmp / "w.rstrace.safetensors").exists()


def test_a_failed_trace_leaves_no_file(tmp: Path) -> None:
    path = tmp / "f.rstrace.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with rs.Trace(path, experts=2) as t:
            t.image(np.zeros((8, 8, 3), np.uint8), grid=(2, 2))
            t.log_layer(0, group=0, logits=np.zeros((4, 2), np.float32))
            raise RuntimeError("boom")
    assert list(tmp.iterdir()) == []
    with pytest.raises(ValueError, match="no MoE layer"):
        with rs.Trace(path, experts=2) as t:
            t.image(np.zeros((8, 8, 3), np.uint8), grid=(2, 2))
    assert list(tmp.iterdir()) == []


def test_torch_and_jax_arrays_are_accepted(tmp: Path) -> None:
    torch = require("torch")
    jnp = require("jax.numpy")
    logits = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    path = tmp / "fw.rstrace.safetensors"
    with rs.Trace(path, experts=3) as t:
        t.image(torch.zeros((8, 8, 3), dtype=torch.uint8), grid=(2, 2))
        t.image(jnp.zeros((8, 8, 3), dtype=jnp.uint8), grid=(2, 2))
        t.log_layer(0, group=0, logits=torch.from_numpy(logits[0]))
        t.log_layer(0, group=1, logits=jnp.asarray(logits[1]))
    report = rs.analyze(path, progress=False)
    (layer,) = report["runs"][0]["layers"]
    want = rs.route(logits, "softmax-tc").tokens_per_expert.sum(0)
    assert (expert_totals(layer) == want).all()


# -- torch recorder and examples ----------------------------------------------------------


def test_record_router_on_a_module_that_never_runs_raises(tmp: Path) -> None:
    torch = require("torch")
    import routerscope.torch as rst

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(8, 4)
            self.unused = torch.nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return self.gate(x)

    net = Net()
    path = tmp / "r.rstrace.safetensors"
    with pytest.raises(RuntimeError, match="saw no call"):
        with rs.Trace(path, experts=4) as trace:
            trace.image(np.zeros((8, 8, 3), np.uint8), grid=(2, 2))
            rst.record_router(net.unused, trace, block=0)
            net(torch.zeros((4, 8)))
    assert not path.exists()

    with rs.Trace(path, experts=4) as trace:
        trace.image(np.zeros((8, 8, 3), np.uint8), grid=(2, 2))
        rec = rst.record_router(net.gate, trace, block=0)
        with torch.no_grad():
            out = net(torch.randn((4, 8)))
    assert rec.calls == 1
    report = rs.analyze(path, progress=False)
    want = rs.route(out.numpy(), "softmax-tc").tokens_per_expert
    assert (expert_totals(report["runs"][0]["layers"][0]) == want).all()


def run_example(script: str, out: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "python" / "examples" / script), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


@pytest.mark.parametrize(
    "script,module",
    [("trace_torch_vit_moe.py", "torch"), ("trace_flax_moe.py", "flax"), ("trace_numpy.py", None)],
)
def test_the_examples_write_traces_routerscope_exports(
    tmp: Path, script: str, module: Optional[str]
) -> None:
    if module:
        require(module)
    path = tmp / "ex.rstrace.safetensors"
    run_example(script, path)
    proc = run_cli(["export", "--trace", str(path), "--out", str(tmp / "fig")])
    assert "exported" in proc.stdout
    assert list((tmp / "fig").glob("*.png")) and list((tmp / "fig").glob("*.svg"))
    # Every example logs logits, so every router is a what-if.
    run_cli(["analyze", "--trace", str(path), "--compare", "softmax-ec,sinkhorn-tc",
             "--out", str(tmp / "an")])
    runs = json.loads((tmp / "an" / "analysis.json").read_text())["runs"]
    assert [r["settings"]["router"] for r in runs][1:] == ["softmax-ec", "sinkhorn-tc"]


# -- streaming ----------------------------------------------------------------------------


def test_a_20000_image_trace_streams_in_bounded_memory(tmp: Path) -> None:
    """Writing and analysing a 20,000-image trace (generated logits, two MoE layers): neither
    side holds the tensors, and ``analyze --trace`` peaks under 200 MB resident."""
    import resource

    n, e = 20_000, 8
    path = tmp / "big.rstrace.safetensors"
    rng = np.random.default_rng(0)
    with rs.Trace(path, experts=e, classes=[f"c{i}" for i in range(10)]) as trace:
        for start in range(0, n, 1000):
            pixels = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
            for i in range(1000):
                trace.image(pixels[i], grid=(8, 8), label=(start + i) % 10)
            for block in (3, 5):
                logits = (rng.standard_normal((1000, 64, e)) * 2).astype(np.float32)
                for i in range(1000):
                    trace.log_layer(block, group=start + i, logits=logits[i],
                                    router="softmax-tc", k=1, capacity_factor=1.0)
    assert path.stat().st_size > 140e6
    script = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    from conftest import cli_binary

    # A fresh interpreter, so that the peak is the command's alone.
    proc = subprocess.run(
        [sys.executable, "-c", script, str(cli_binary()), "analyze", "--trace", str(path),
         "--out", str(tmp / "an")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.strip()) / 1024
    print(f"analyze --trace of {n} images: peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 200, peak_mb
    report = json.loads((tmp / "an" / "analysis.json").read_text())
    assert report["images"] == n
