"""``routerscope.Trace``: write a routing trace (``docs/trace-format.md``) from any framework.

Pure Python on numpy: every tensor goes to a temporary data file the moment it is logged (a trace
of any number of images never sits in memory), and ``close()`` writes the safetensors header and
moves the finished file into place atomically. Nothing here needs the native module.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import to_numpy

TRACE_METADATA_KEY = "routerscope.trace"
FORMAT_NAME = "routerscope-trace"
VERSION = 1

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

PathLike = Union[str, "os.PathLike[str]"]


def _float32(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x, name)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        at = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} has a non-finite value {arr[tuple(at)]} at {tuple(int(a) for a in at)}")
    return arr


def _int64(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x, name, widen=False)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _bool(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x, name, widen=False)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold booleans, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr.astype(np.bool_))


class Trace:
    """A routing trace being written: images, then per MoE layer and routing group what the
    router did. Use it as a context manager; the file appears (atomically) when it closes.

    ``experts`` is the number of experts of every MoE layer; ``classes`` names the images'
    labels; ``patch_size`` (pixels per patch) places the patch grid over the stored images
    (derived from image size and grid when omitted).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        experts: int,
        model_name: str = "",
        classes: Optional[Sequence[str]] = None,
        patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        if int(experts) < 1:
            raise ValueError(f"experts must be at least 1, got {experts}")
        self.path = Path(os.fspath(path))
        self.experts = int(experts)
        self._meta: Dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": VERSION,
            "model_name": model_name,
            "num_experts": self.experts,
            "classes": list(classes or []),
            "images": [],
            "layers": [],
        }
        if patch_size is not None:
            self._meta["patch_size"] = [int(patch_size[0]), int(patch_size[1])]
        self._layer_of_block: Dict[int, int] = {}
        self._logged: Dict[int, set] = {}
        self._tensors: List[Tuple[str, str, List[int], int, int]] = []
        self._offset = 0
        self._tokens: Optional[int] = None
        self._recorders: List[Any] = []
        self._closed = False
        self._tmp_data = self.path.with_name(f".{self.path.name}.{os.getpid()}.data.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self._tmp_data, "wb")

    # -- images ---------------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        """Images added so far."""
        return len(self._meta["images"])

    @property
    def tokens_per_image(self) -> Optional[int]:
        """Tokens of each image (patches, plus the CLS token), once an image was added."""
        return self._tokens

    def image(
        self,
        pixels: Any = None,
        *,
        grid: Tuple[int, int],
        cls_token: bool = False,
        path: Optional[PathLike] = None,
        name: Optional[str] = None,
        label: Optional[int] = None,
    ) -> int:
        """Add an image the model saw and return its index.

        ``pixels`` is uint8 ``[H, W, 3]`` (or ``[H, W]`` grey) as the model saw it, or ``None``
        with ``path`` naming the file (relative to the trace). ``grid`` is the patch grid
        ``(rows, cols)``; ``cls_token`` says whether a CLS token leads the image's tokens.
        """
        self._check_open()
        rows, cols = int(grid[0]), int(grid[1])
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        tokens = rows * cols + int(bool(cls_token))
        if self._tokens is not None and tokens != self._tokens:
            raise ValueError(
                f"this image has {tokens} tokens ({rows}x{cols} patches, CLS token: {cls_token}), "
                f"the earlier ones {self._tokens}: one trace holds images of one patch grid"
            )
        if pixels is None and path is None:
            raise ValueError("give the image's pixels or its path")
        i = self.num_images
        entry: Dict[str, Any] = {"grid": [rows, cols], "cls_token": bool(cls_token)}
        if name is not None:
            entry["name"] = str(name)
        if path is not None:
            entry["path"] = os.fspath(path)
            entry.setdefault("name", Path(os.fspath(path)).name)
        if label is not None:
            entry["label"] = int(label)
        if pixels is not None:
            arr = to_numpy(pixels, f"image {i}", widen=False)
            if arr.dtype != np.uint8:
                raise ValueError(f"image {i}: pixels must be uint8, got {arr.dtype}")
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[:, :, 0]
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"image {i}: pixels are [H, W, 3] or [H, W], got {arr.shape}")
            self._write(f"images/{i}", np.ascontiguousarray(arr))
        self._meta["images"].append(entry)
        self._tokens = tokens
        return i

    # -- routing --------------------------------------------------------------------------

    def log_layer(
        self,
        block: int,
        *,
        group: Union[int, Sequence[int]],
        logits: Any = None,
        probs: Any = None,
        expert_index: Any = None,
        gates: Any = None,
        kept: Any = None,
        slot: Any = None,
        dispatch: Any = None,
        combine: Any = None,
        soft_dispatch: Any = None,
        soft_combine: Any = None,
        router: Optional[str] = None,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        capacity: Optional[int] = None,
    ) -> None:
        """Log one routing group of MoE block ``block``.

        ``group`` is the image (an index) or the consecutive images the group holds; arrays have
        the group's tokens first (``[tokens, ...]``, or ``[images, tokens per image, ...]``):
        router ``logits`` or ``probs`` ``[tokens, experts]``; Token Choice picks ``expert_index``
        and ``gates`` ``[tokens, k]`` with ``kept`` (bool) or ``slot`` (-1: dropped); dense
        ``dispatch`` and ``combine`` ``[tokens, experts, capacity]``; Soft MoE ``soft_dispatch``
        and ``soft_combine`` ``[tokens, experts, slots]``. Any subset that says how the group was
        routed will do. ``router`` (``"softmax-tc"``, ...), ``k``, ``capacity_factor`` and
        ``capacity`` describe the layer's router where known.
        """
        self._check_open()
        images = [int(group)] if isinstance(group, (int, np.integer)) else [int(g) for g in group]
        if not images:
            raise ValueError("group holds no images")
        if images != list(range(images[0], images[0] + len(images))):
            raise ValueError(f"group {images}: a group holds consecutive images")
        if images[-1] >= self.num_images or images[0] < 0:
            raise ValueError(
                f"group {images}: only {self.num_images} images were added (trace.image(...))"
            )
        assert self._tokens is not None
        n = len(images) * self._tokens
        e = self.experts
        l = self._layer_of_block.get(int(block))
        settings = {
            key: value
            for key, value in (
                ("kind", router),
                ("k", k),
                ("capacity_factor", capacity_factor),
                ("capacity", capacity),
            )
            if value is not None
        }
        if l is None:
            l = len(self._meta["layers"])
            self._layer_of_block[int(block)] = l
            self._meta["layers"].append({"block": int(block), "router": settings, "groups": []})
        elif settings:
            known = self._meta["layers"][l]["router"]
            for key, value in settings.items():
                if known.setdefault(key, value) != value:
                    raise ValueError(
                        f"block {block}: {key}={value!r}, but an earlier group logged {known[key]!r}"
                    )
        layer = self._meta["layers"][l]
        g = len(layer["groups"])
        seen = self._logged.setdefault(l, set())
        again = [i for i in images if i in seen]
        if again:
            raise ValueError(
                f"block {block}: image {again[0]} was already logged in an earlier group (a "
                "forward pass ran twice on the same images?)"
            )

        def tokens_first(arr: np.ndarray, name: str, inner: int) -> np.ndarray:
            if arr.ndim == inner + 1 and arr.shape[0] == len(images) and arr.shape[1] == self._tokens:
                arr = arr.reshape((n,) + arr.shape[2:])
            if arr.ndim != inner or arr.shape[0] != n:
                raise ValueError(
                    f"block {block} group {g}: {name} has shape {tuple(arr.shape)}; its first axis "
                    f"must be the group's {n} tokens ({len(images)} images x {self._tokens})"
                )
            return arr

        pieces: List[Tuple[str, np.ndarray]] = []
        for name, value in (("logits", logits), ("probs", probs)):
            if value is not None:
                arr = tokens_first(_float32(value, name), name, 2)
                if arr.shape[1] != e:
                    raise ValueError(f"{name} has {arr.shape[1]} experts, the trace {e}")
                pieces.append((name, arr))
        if (expert_index is None) != (gates is None):
            raise ValueError("expert_index and gates go together")
        if expert_index is not None:
            idx = tokens_first(_int64(expert_index, "expert_index"), "expert_index", 2)
            if idx.min() < 0 or idx.max() >= e:
                raise ValueError(f"expert_index holds {int(idx.min())}..{int(idx.max())}; experts are 0..{e - 1}")
            gts = tokens_first(_float32(gates, "gates"), "gates", 2)
            if gts.shape != idx.shape:
                raise ValueError(f"gates {gts.shape} and expert_index {idx.shape} differ")
            pieces += [("expert_index", idx), ("gates", gts)]
            if kept is not None:
                kp = tokens_first(_bool(kept, "kept"), "kept", 2)
                pieces.append(("kept", kp))
            if slot is not None:
                pieces.append(("slot", tokens_first(_int64(slot, "slot"), "slot", 2)))
        dense = {
            "dispatch": dispatch,
            "combine": combine,
            "soft_dispatch": soft_dispatch,
            "soft_combine": soft_combine,
        }
        for a, b in (("dispatch", "combine"), ("soft_dispatch", "soft_combine")):
            va, vb = dense[a], dense[b]
            if (va is None) != (vb is None):
                raise ValueError(f"{a} and {b} go together")
            if va is not None:
                xa = tokens_first(_float32(va, a), a, 3)
                xb = tokens_first(_float32(vb, b), b, 3)
                if xa.shape != xb.shape or xa.shape[1] != e:
                    raise ValueError(f"{a} {xa.shape} and {b} {xb.shape} must be [{n}, {e}, slots]")
                pieces += [(a, xa), (b, xb)]
        if not pieces:
            raise ValueError(
                f"block {block} group {g}: nothing logged (give logits, probs, expert_index + "
                "gates, dispatch + combine or soft_dispatch + soft_combine)"
            )
        for name, arr in pieces:
            self._write(f"layers/{l}/groups/{g}/{name}", arr)
        s = self._tokens
        layer["groups"].append({"members": [[i, 0, s] for i in images]})
        seen.update(images)

    # -- file -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the trace is closed")

    def _write(self, name: str, arr: np.ndarray) -> None:
        dtype = _DTYPES[arr.dtype]
        data = arr.tobytes()
        self._data.write(data)
        start = self._offset
        self._offset += len(data)
        self._tensors.append((name, dtype, list(arr.shape), start, self._offset))

    def _recorder_errors(self) -> List[str]:
        return [r.problem() for r in self._recorders if r.problem()]

    def close(self) -> None:
        """Write the header and move the finished trace into place (atomically). Raises when
        nothing was logged or a recorder (``routerscope.torch.record_router``) saw no call."""
        if self._closed:
            return
        self._data.close()
        try:
            problems = self._recorder_errors()
            if problems:
                raise RuntimeError("; ".join(problems))
            if not self._meta["layers"]:
                raise ValueError(f"{self.path}: no MoE layer was logged, the trace would be empty")
            header: Dict[str, Any] = {
                name: {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}
                for name, dtype, shape, a, b in self._tensors
            }
            header["__metadata__"] = {TRACE_METADATA_KEY: json.dumps(self._meta)}
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as out, open(self._tmp_data, "rb") as data:
                out.write(struct.pack("<Q", len(text)))
                out.write(text)
                while True:
                    chunk = data.read(1 << 22)
                    if not chunk:
                        break
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            self._closed = True
            for leftover in (self._tmp_data, self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")):
                try:
                    os.remove(leftover)
                except FileNotFoundError:
                    pass

    def abort(self) -> None:
        """Drop the trace: nothing is written, the temporary data is removed."""
        if not self._closed:
            self._data.close()
            self._closed = True
            try:
                os.remove(self._tmp_data)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"Trace('{self.path}', {self.num_images} images, {len(self._meta['layers'])} layers"
            f"{', closed' if self._closed else ''})"
        )
