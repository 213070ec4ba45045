"""Bad input from Python: an exception of the expected class whose message names the problem,
never a crash, a panic or a silent result."""

from __future__ import annotations

import numpy as np
import pytest

import routerscope as rs

LOGITS = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: rs.route(LOGITS.astype(np.float64), "softmax-tc"), ValueError, "float32.*float64"),
        (lambda: rs.route(LOGITS.astype(np.int32), "softmax-tc"), ValueError, "float32.*int32"),
        (lambda: rs.route(LOGITS[0], "softmax-tc"), ValueError, r"\[tokens, experts\].*\(4,\)|\[4\]"),
        (lambda: rs.route(LOGITS[None, None], "softmax-tc"), ValueError, "groups, tokens, experts"),
        (lambda: rs.route(np.zeros((0, 3, 4), np.float32), "softmax-tc"), ValueError, "no groups"),
        (lambda: rs.route(np.zeros((0, 4), np.float32), "softmax-tc"), ValueError, "at least one token"),
        (lambda: rs.route(np.where(np.eye(16, 4) > 0, np.nan, LOGITS).astype(np.float32), "softmax-tc"), ValueError, r"non-finite.*NaN at \[0, 0\]"),
        (lambda: rs.route(np.full((16, 4), np.inf, np.float32), "sinkhorn-ec"), ValueError, "non-finite"),
        (lambda: rs.route(LOGITS, "softmax-tc", capacity_factor=-1.0), ValueError, "capacity factor must be a positive"),
        (lambda: rs.route(LOGITS, "softmax-ec", capacity_factor=100.0), ValueError, "exceeds the 16 tokens"),
        (lambda: rs.route(LOGITS, "top-k"), ValueError, "unknown router `top-k`.*softmax-tc"),
        (lambda: rs.route(LOGITS, "softmax-ec", k=2), ValueError, "k= does not apply to softmax-ec"),
        (lambda: rs.route(LOGITS, "softmax-tc", k=0), ValueError, "k = 0 experts per token"),
        (lambda: rs.route(LOGITS, "softmax-tc", k=5), ValueError, "between 1 and the 4 experts"),
        (lambda: rs.route(LOGITS, "softmax-tc", k=-1), ValueError, "k= must be a non-negative integer"),
        (lambda: rs.route(LOGITS, "softmax-tc", iterations=5), ValueError, "iterations= does not apply"),
        (lambda: rs.route(LOGITS, "sinkhorn-tc", iterations=10**6), ValueError, "beyond the limit of 10000"),
        (lambda: rs.route(LOGITS, "sparse-ec", adam_lr=-1.0), ValueError, "Adam learning rate must be positive"),
        (lambda: rs.route(LOGITS, "softmax-tc", capacity_rounding="floor"), ValueError, "unknown capacity rounding"),
        (lambda: rs.route(LOGITS, "softmax-tc", x=LOGITS), ValueError, "x= is for Soft MoE"),
        (lambda: rs.route(None, "softmax-tc"), ValueError, "pass logits"),
        (lambda: rs.route(LOGITS, "soft"), ValueError, "Soft MoE routes token vectors"),
        (lambda: rs.route(None, "soft", x=LOGITS), ValueError, "needs x=.*mu=.*scale="),
        (lambda: rs.route(None, "soft", x=LOGITS, mu=np.ones((5, 2, 1), np.float32), scale=1.0), ValueError, "d = 4"),
        (lambda: rs.route(None, "soft", x=LOGITS, mu=np.ones((4, 2, 1), np.float32), scale=[1.0, 2.0]), ValueError, "scale must be a scalar"),
        (lambda: rs.route(None, "soft", x=LOGITS, mu=np.ones((4, 2, 1), np.float32), scale=1.0, capacity_rounding="round"), ValueError, "capacity_rounding= does not apply to soft"),
        (lambda: rs.route(None, "soft", x=LOGITS, mu=np.ones((4, 2, 1), np.float32), scale=1.0, num_slots=3), ValueError, "mu has 1 slots per expert"),
        (lambda: rs.route({"a": 1}, "softmax-tc"), TypeError, "logits must be an array"),
    ],
)
def test_bad_route_arguments_raise_clear_errors(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_a_bad_group_is_named() -> None:
    logits = np.zeros((3, 16, 4), np.float32)
    logits[2, 5, 1] = np.nan
    with pytest.raises(ValueError, match=r"group 2: .*non-finite.*\[5, 1\]"):
        rs.route(logits, "softmax-ec")


def test_bad_model_files_raise_os_or_value_errors(tmp) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model.safetensors"):
        rs.load(tmp / "no-such-model.safetensors")
    with pytest.raises(FileNotFoundError, match="no built-in model of that name.*photo"):
        rs.load("photoo")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        rs.load(tmp)
    with pytest.raises(OSError) as info:
        rs.load(tmp / "missing.index")
    assert info.value.errno == 2 and info.value.filename
    junk = tmp / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        rs.load(junk)
    with pytest.raises(ValueError, match="unknown device"):
        rs.load("fashion-mnist-softmax-tc", device="tpu")
    with pytest.raises(ValueError, match="must be a str or os.PathLike"):
        rs.load(42)


def test_bad_predict_arguments_raise_clear_errors(tmp) -> None:
    m = rs.load("fashion-mnist-softmax-tc", device="cpu")
    image = rs.sample_images()[0]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        m.predict([image, tmp / "nope.png"])
    with pytest.raises(IsADirectoryError):
        m.predict(tmp)
    broken = tmp / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        m.predict(broken)
    with pytest.raises(ValueError, match="uint8"):
        m.predict(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match="no images"):
        m.predict([])
    with pytest.raises(ValueError, match="unknown router"):
        m.predict(image, "fast")
    with pytest.raises(ValueError, match="k= does not apply to softmax-ec"):
        m.predict(image, "softmax-ec", k=2)
    with pytest.raises(ValueError, match="routing groups of 2"):
        m.predict([image] * 3, group_images=2)
    with pytest.raises(ValueError, match="group_images= must be at least 1"):
        m.predict(image, group_images=0)
    with pytest.raises(ValueError, match="capacity_factor= does not apply to Soft MoE"):
        m.predict(image, "soft", capacity_factor=2.0)
    with pytest.raises(ValueError, match="mu"):
        m.predict(image, "soft")  # a sparse checkpoint has no Soft MoE parameters
    dense = rs.load("fashion-mnist-dense", device="cpu")
    with pytest.raises(ValueError, match="no MoE layers"):
        dense.predict(image, "softmax-ec")
    assert dense.predict(image).layers == []


def test_bad_analyze_arguments_raise_clear_errors(tmp) -> None:
    m = rs.load("fashion-mnist-softmax-tc", device="cpu")
    with pytest.raises(FileNotFoundError, match="no-data"):
        rs.analyze(m, tmp / "no-data")
    afile = tmp / "file.txt"
    afile.write_text("x")
    with pytest.raises(ValueError, match="out=.*not a folder"):
        rs.analyze(m, "fashion-mnist-slice", out=afile)
    with pytest.raises(ValueError, match="no MoE layers"):
        rs.analyze("fashion-mnist-dense", "fashion-mnist-slice")
    with pytest.raises(ValueError, match="atlas_size=1000 is beyond"):
        rs.analyze(m, "fashion-mnist-slice", atlas_size=1000)
    with pytest.raises(ValueError, match="split="):
        rs.analyze(m, "fashion-mnist-slice", split="val")
    with pytest.raises(ValueError, match="unknown router"):
        rs.analyze(m, "fashion-mnist-slice", compare=["softmax-tc", "nope"])
    empty = tmp / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images|no image"):
        rs.analyze(m, empty)
