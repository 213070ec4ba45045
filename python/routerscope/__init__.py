"""routerscope: look inside vision Mixture-of-Experts models.

The routers of *Routers in Vision Mixture of Experts: An Empirical Study* (Liu, Blondel, Riquelme,
Puigcerver, 2024), exactly as google-research/vmoe implements them, ViT-MoE models (the built-in
Fashion-MNIST and DINOv2 photo models, routerscope and vmoe checkpoints) and the dataset routing
analysis, from numpy, PyTorch and JAX arrays.

- :func:`route`: one router over logits ``[tokens, experts]`` (or ``[groups, tokens, experts]``)
  gives a :class:`Routing`: dispatch and combine tensors, picks, gates, drops, loads, losses.
- :func:`load`: a checkpoint or built-in model as a :class:`Model`; :meth:`Model.predict` gives a
  :class:`Prediction` with probabilities, features and a :class:`LayerRouting` per MoE layer;
  :meth:`Prediction.what_if` re-routes the same images under another router.
- :func:`analyze`: routing statistics and the expert atlas over a whole dataset.

Nothing is downloaded: the models and sample images ship with routerscope.
"""

from __future__ import annotations

import os as _os


def _available_cpus() -> int:
    try:
        return len(_os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return _os.cpu_count() or 1


# candle reads its thread count from this variable before every matrix product and otherwise
# works it out from the system each time, which costs more than a small model's matmuls.
_os.environ.setdefault("RAYON_NUM_THREADS", str(_available_cpus()))
# candle's element-wise worker pool spins this many times after each op before sleeping.
_os.environ.setdefault("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200")

from ._native import (  # noqa: E402
    ROUTERS,
    LayerRouting,
    Model,
    Prediction,
    Routing,
    __version__,
    builtin_models,
    load,
    read_image,
    route,
    sample_images,
)
from ._analysis import analyze  # noqa: E402
from ._run import Run  # noqa: E402
from ._trace import Trace  # noqa: E402

__all__ = [
    "ROUTERS",
    "LayerRouting",
    "Model",
    "Prediction",
    "Routing",
    "Run",
    "Trace",
    "__version__",
    "analyze",
    "builtin_models",
    "load",
    "read_image",
    "route",
    "sample_images",
]


def __getattr__(name: str) -> object:
    # `routerscope.torch` (the PyTorch helpers) loads on first use, so importing routerscope
    # never imports torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'routerscope' has no attribute {name!r}")
