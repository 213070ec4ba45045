"""Array inputs from numpy, PyTorch, JAX and anything with ``__array__`` or ``__dlpack__``.

The native module takes C-contiguous numpy arrays of one exact dtype; these helpers turn what a
user holds into that, without importing torch or jax (a tensor's own methods are used), and say
clearly what is wrong otherwise. Narrowing conversions are refused: routing decisions hinge on
ties and exact sums, so a float64 array is not silently rounded to float32.
"""

from __future__ import annotations

import os
from typing import Any, List, Union

import numpy as np

_EXACT_WIDENING = ("float16", "bfloat16")


def _describe(obj: Any) -> str:
    shape = getattr(obj, "shape", None)
    dtype = getattr(obj, "dtype", None)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if shape is not None and dtype is not None:
        return f"{kind} of dtype {dtype} and shape {tuple(shape)}"
    return kind


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def _from_torch(t: Any, widen: bool) -> np.ndarray:
    # A tensor that requires grad, lives on a GPU or holds bfloat16 (which numpy lacks) cannot
    # become a numpy array as it is: detach, copy to the host, widen exactly.
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if widen and str(t.dtype) in ("torch.float16", "torch.bfloat16"):
        t = t.float()
    arr: np.ndarray = t.numpy()
    return arr


def to_numpy(obj: Any, name: str, widen: bool = True) -> np.ndarray:
    """``obj`` as a numpy array without changing its values (no copy where none is needed)."""
    if isinstance(obj, np.ndarray):
        return obj
    if _is_torch_tensor(obj):
        return _from_torch(obj, widen)
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    if hasattr(obj, "__dlpack__"):
        return np.from_dlpack(obj)
    if isinstance(obj, (list, tuple, float, int)):
        return np.asarray(obj, dtype=np.float32)
    raise TypeError(
        f"{name} must be an array (numpy, torch, jax, or anything with __array__ or "
        f"__dlpack__), got {_describe(obj)}"
    )


def as_float32(obj: Any, name: str) -> np.ndarray:
    """``obj`` as a C-contiguous float32 numpy array; float16 and bfloat16 are widened (exact)."""
    arr = to_numpy(obj, name)
    if arr.dtype != np.float32:
        if arr.dtype.name in _EXACT_WIDENING:
            arr = arr.astype(np.float32)
        else:
            raise ValueError(
                f"{name} must hold float32 values (float16 and bfloat16 are widened exactly), "
                f"got dtype {arr.dtype} with shape {tuple(arr.shape)}; routing depends on exact "
                f"ties and sums, so other dtypes are not converted silently: cast it yourself "
                f"(numpy: .astype(np.float32), torch: .float(), jax: .astype(jnp.float32))"
            )
    return np.ascontiguousarray(arr)


ImageItem = Union[str, np.ndarray]


def _one_image(obj: Any, index: int) -> ImageItem:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, bytes):
        return os.fsdecode(obj)
    arr = to_numpy(obj, f"images[{index}]", widen=False)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"images[{index}]: an image array must hold uint8 pixels (0-255), channels last "
            f"([H, W], [H, W, 1], [H, W, 3] or [H, W, 4]), got dtype {arr.dtype} with shape "
            f"{tuple(arr.shape)}"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"images[{index}]: an image array is [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
            f"(channels last), got shape {tuple(arr.shape)}; a batch of images is a list or "
            f"a [B, H, W, C] array (grey: [B, H, W, 1])"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"images[{index}]: the image has no pixels (shape {tuple(arr.shape)})")
    return np.ascontiguousarray(arr)


def as_images(images: Any) -> List[ImageItem]:
    """One image (a path or an array) or many (a list, or a uint8 [B, H, W, C] batch) as a list
    of paths and C-contiguous uint8 [H, W, C] arrays."""
    if isinstance(images, (str, bytes, os.PathLike)):
        return [_one_image(images, 0)]
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        arr = to_numpy(images, "images", widen=False)
        if arr.ndim == 4:
            items = list(arr)
        else:
            items = [arr]
    if not items:
        raise ValueError("no images given")
    return [_one_image(item, i) for i, item in enumerate(items)]
