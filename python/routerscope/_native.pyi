"""Type stubs of ``routerscope._native``, the Rust extension module (re-exported by
``routerscope``). The docstrings are the runtime ones, shown by ``help()``."""

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from typing import final

__all__ = [
    "LayerRouting",
    "Model",
    "Prediction",
    "ROUTERS",
    "Routing",
    "RunWriter",
    "__version__",
    "_analyze",
    "builtin_models",
    "load",
    "read_image",
    "route",
    "sample_images",
]

__version__: str
ROUTERS: Tuple[str, ...]

_RouterName = Literal[
    "softmax-tc", "sinkhorn-tc", "softmax-ec", "sinkhorn-ec", "sparse-ec", "sparse-tc", "soft"
]
_PathLike = Union[str, "os.PathLike[str]"]
#: Anything with ``__array__`` or ``__dlpack__`` (numpy, torch, jax), or nested lists.
_ArrayLike = Any
#: A file path, or uint8 pixels ``[H, W]`` / ``[H, W, C]``; or a list of them; or ``[B, H, W, C]``.
_Images = Any
_F32 = npt.NDArray[np.float32]
_I32 = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]
_Bool = npt.NDArray[np.bool_]

@final
class Routing:
    """The routing of one or more groups by one router: who went to which expert slot, with
    which weight, what was dropped, and the load of every expert.

    Arrays have a leading groups axis when the input had one (``[groups, tokens, ...]``), else
    not. Dense tensors are built on first access and cached (read-only)."""

    @property
    def router(self) -> str:
        """The router's command-line name (``"softmax-tc"``, ...)."""
    @property
    def name(self) -> str:
        """The router's name in the routers paper (``"Softmax Token Choice"``, ...)."""
    @property
    def num_groups(self) -> int:
        """Number of groups routed (1 without a groups axis)."""
    @property
    def num_tokens(self) -> int:
        """Tokens per group."""
    @property
    def num_experts(self) -> int: ...
    @property
    def capacity(self) -> int:
        """Slots per expert per group ``c`` (Soft MoE: slots per expert ``p``)."""
    @property
    def k(self) -> int:
        """Experts per token (Token Choice ``k``; 1 for the other routers)."""
    @property
    def actual_capacity_factor(self) -> float:
        """``e·c / N``: the capacity factor after rounding and padding."""
    @property
    def dispatch(self) -> _F32:
        """Dispatch tensor ``D``, float32 ``[.., tokens, experts, capacity]``."""
    @property
    def combine(self) -> _F32:
        """Combine tensor ``Γ``, float32 ``[.., tokens, experts, capacity]``."""
    @property
    def expert_index(self) -> Optional[_I32]:
        """Token Choice: int32 ``[.., tokens, k]``, the experts chosen, before capacity."""
    @property
    def gates(self) -> Optional[_F32]:
        """Token Choice: float32 ``[.., tokens, k]``, the combine gate of each choice."""
    @property
    def slot(self) -> Optional[_I32]:
        """Token Choice: int32 ``[.., tokens, k]``, each choice's slot, -1 where dropped."""
    @property
    def dropped(self) -> _Bool:
        """bool ``[.., tokens]``: tokens that reach no expert."""
    @property
    def tokens_per_expert(self) -> _I64:
        """int64 ``[.., experts]``: filled slots per expert."""
    @property
    def requests_per_expert(self) -> _I64:
        """int64 ``[.., experts]``: requests per expert, those beyond capacity included."""
    @property
    def experts_per_token(self) -> _I64:
        """int64 ``[.., tokens]``: how many experts process each token."""
    @property
    def scores(self) -> Optional[_F32]:
        """float32 ``[.., tokens, experts]``: the matrix the router ranked (sparse routers)."""
    @property
    def probabilities(self) -> _F32:
        """float32 ``[.., tokens, experts]``: each token's probability per expert."""
    @property
    def soft_logits(self) -> Optional[_F32]:
        """Soft MoE: float32 ``[.., tokens, experts, slots]`` logits."""
    @property
    def aux_losses(self) -> Dict[str, Union[float, npt.NDArray[np.float64]]]:
        """The router's auxiliary losses per group (``total`` and each computed term)."""
    @property
    def solver_iterations(self) -> Union[int, _I64, None]:
        """Iterations the solver ran; ``None`` for routers without a solver."""

def route(
    logits: Optional[_ArrayLike],
    router: Union[_RouterName, str],
    *,
    k: Optional[int] = None,
    capacity_factor: Optional[float] = None,
    capacity_multiple_of: Optional[int] = None,
    capacity_rounding: Literal["ceil", "round"] = "ceil",
    batch_priority: bool = False,
    iterations: Optional[int] = None,
    adam_lr: Optional[float] = None,
    num_slots: Optional[int] = None,
    x: Optional[_ArrayLike] = None,
    mu: Optional[_ArrayLike] = None,
    scale: Optional[Union[float, _ArrayLike]] = None,
    train_seed: Optional[int] = None,
) -> Routing:
    """Route tokens with one of the routers of "Routers in Vision Mixture of Experts", exactly
    as google-research/vmoe does and as ``routerscope route`` does for each group.

    ``logits``: float32 ``[tokens, experts]`` or ``[groups, tokens, experts]`` (float16 and
    bfloat16 are widened exactly). Soft MoE takes ``x``, ``mu`` and ``scale`` instead. The
    keywords are the command line's flags with vmoe's defaults; one that does not apply to the
    router is an error. ``train_seed`` routes in training mode. Raises ``ValueError`` for bad
    arguments."""

@final
class Model:
    """A ViT-MoE checkpoint, loaded once and run on the CPU (or a GPU)."""

    @property
    def config(self) -> Dict[str, Any]:
        """The architecture and trained routing, as stored in the checkpoint."""
    @property
    def path(self) -> Path:
        """The checkpoint file."""
    @property
    def name(self) -> str:
        """The model's name in its configuration."""
    @property
    def device(self) -> str:
        """Where it runs: ``"CPU (candle, N threads)"`` or ``"GPU: <adapter>, <backend>"``."""
    @property
    def class_names(self) -> List[str]:
        """Class names of the head (empty for a feature model)."""
    @property
    def is_feature_model(self) -> bool:
        """Whether the model has no classifier head."""
    @property
    def moe_blocks(self) -> List[int]:
        """Encoder blocks (0-based) whose MLP is an MoE layer."""
    @property
    def router(self) -> Optional[str]:
        """The router the checkpoint was trained with (``None`` for a dense model)."""
    @property
    def tokens_per_image(self) -> int:
        """Tokens per image (patches, plus the CLS token when the model has one)."""
    @property
    def grid(self) -> Tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
    @property
    def has_cls_token(self) -> bool:
        """Whether token 0 of every image is the CLS token."""
    def predict(
        self,
        images: _Images,
        router: Optional[Union[_RouterName, str]] = None,
        *,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        group_images: Optional[int] = None,
    ) -> "Prediction":
        """Run the model on ``images`` (paths or uint8 pixel arrays): probabilities, features
        and the routing of every MoE layer; ``router``, ``k`` and ``capacity_factor`` are a
        what-if on the same weights, ``group_images`` the routing group size."""
    def features(
        self,
        images: _Images,
        router: Optional[Union[_RouterName, str]] = None,
        *,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        group_images: Optional[int] = None,
    ) -> "Prediction":
        """The same run as :meth:`predict`, for its ``features`` ``[images, tokens, d]``."""

@final
class Prediction:
    """The result of running a model on images: probabilities, features and per MoE layer the
    routing. :meth:`what_if` re-routes the same images from the first MoE layer it changes."""

    @property
    def probabilities(self) -> _F32:
        """float32 ``[images, classes]`` (``[images, 0]`` for a feature model)."""
    @property
    def features(self) -> _F32:
        """float32 ``[images, tokens, d]``: the final LayerNorm output of every token."""
    @property
    def images(self) -> List[str]:
        """The images, as paths or ``array[i]``."""
    @property
    def device(self) -> str:
        """The device the run used."""
    @property
    def layers(self) -> List["LayerRouting"]:
        """One :class:`LayerRouting` per MoE layer, in block order."""
    @property
    def routers(self) -> List[Dict[str, Any]]:
        """The routing of each MoE layer in this run (block, router, k, capacity_factor,
        group_images)."""
    def top(self, k: int = 5) -> List[List[Dict[str, Any]]]:
        """The ``k`` most probable classes of each image as ``{"class", "name",
        "probability"}`` dicts, as ``routerscope predict --json`` lists them."""
    def what_if(
        self,
        router: Optional[Union[_RouterName, str]] = None,
        *,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        group_images: Optional[int] = None,
    ) -> "Prediction":
        """The same images under other routing, re-run from the first MoE layer it changes."""

@final
class LayerRouting:
    """The routing of one MoE layer in a :class:`Prediction`, per image."""

    @property
    def block(self) -> int:
        """The encoder block (0-based) of this MoE layer."""
    @property
    def router(self) -> str:
        """The router's command-line name."""
    @property
    def group_images(self) -> int:
        """_Images per routing group."""
    @property
    def capacity(self) -> int:
        """Slots per expert per group."""
    @property
    def routing(self) -> Routing:
        """The layer's :class:`Routing`, with a groups axis."""
    @property
    def expert_index(self) -> Optional[_I32]:
        """Token Choice: int32 ``[images, tokens, k]``."""
    @property
    def gates(self) -> Optional[_F32]:
        """Token Choice: float32 ``[images, tokens, k]``."""
    @property
    def slot(self) -> Optional[_I32]:
        """Token Choice: int32 ``[images, tokens, k]``, -1 where dropped."""
    @property
    def dropped(self) -> _Bool:
        """bool ``[images, tokens]``."""
    @property
    def tokens_per_expert(self) -> _I64:
        """int64 ``[groups, experts]``."""
    @property
    def router_probabilities(self) -> _F32:
        """float32 ``[images, tokens, experts]``."""
    @property
    def router_logits(self) -> _F32:
        """float32 ``[images, tokens, experts]`` (Soft MoE: ``[.., experts, slots]``)."""
    @property
    def dispatch(self) -> _F32:
        """float32 ``[images, tokens, experts, capacity]``."""
    @property
    def combine(self) -> _F32:
        """float32 ``[images, tokens, experts, capacity]``."""

def load(path: _PathLike, *, device: Literal["auto", "gpu", "cpu"] = "auto") -> Model:
    """Load a checkpoint (``.safetensors``, a vmoe ``.index``) or a built-in model by name."""

def builtin_models() -> Dict[str, Path]:
    """The built-in models, ``{name: path}``."""

def sample_images() -> List[Path]:
    """The sample images shipped with routerscope, as paths."""

def read_image(path: _PathLike, *, size: Optional[Tuple[int, int]] = None) -> npt.NDArray[np.uint8]:
    """An image file as uint8 RGB pixels ``[H, W, 3]``, resized to ``size`` ``(H, W)`` when given."""

def _analyze(
    model: Union[Model, _PathLike],
    data: Optional[_PathLike] = None,
    *,
    out: Optional[_PathLike] = None,
    compare: Optional[Union[Sequence[str], str]] = None,
    router: Optional[str] = None,
    k: Optional[int] = None,
    capacity_factor: Optional[float] = None,
    group_images: Optional[int] = None,
    split: str = "test",
    limit: Optional[int] = None,
    atlas_size: int = 16,
    atlas_per_image: int = 2,
    png_width: int = 1200,
    progress: Optional[Callable[[int, int], Any]] = None,
) -> Dict[str, Any]:
    """Native half of :func:`routerscope.analyze` (which adds the progress bar)."""

@final
class RunWriter:
    """One process's writer of a run (``docs/run-format.md``); use :class:`routerscope.Run`."""

    def __new__(
        cls,
        path: _PathLike,
        *,
        experts: int,
        model_name: str = "",
        classes: Optional[Sequence[str]] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> "RunWriter": ...
    def step(self, n: int) -> None:
        """Commit the current step and start step ``n`` (steps increase)."""
    @property
    def current_step(self) -> Optional[int]:
        """The step being logged, or ``None``."""
    @property
    def last_committed(self) -> Optional[int]:
        """The last committed step, or ``None``."""
    def log_layer(
        self,
        block: int,
        *,
        logits: Any = None,
        probs: Any = None,
        expert_index: Optional[npt.NDArray[np.int64]] = None,
        kept: Optional[npt.NDArray[np.bool_]] = None,
        router: Optional[str] = None,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        group_images: int = 1,
    ) -> None:
        """Add one forward call's routing of MoE block ``block`` to the current step."""
    def set_probes(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        *,
        grid: Tuple[int, int],
        cls_token: bool = False,
        labels: Optional[Sequence[Optional[int]]] = None,
    ) -> None:
        """Register the probe images (uint8 ``[H, W, 3]`` arrays), once."""
    def snapshot_path(self, step: int) -> Path:
        """Where the snapshot of ``step`` is written."""
    def record_snapshot(self, step: int) -> None:
        """Record that the snapshot of ``step`` is complete."""
    def commit(self) -> None:
        """Commit the current step."""
    def discard(self) -> None:
        """Forget the current step's sums without committing them (a step cut short)."""
    def close(self) -> None:
        """Commit the current step and close the run (further calls raise)."""
