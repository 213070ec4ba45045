"""``routerscope.Run``: log a vision MoE's routing while it trains (``docs/run-format.md``).

Per training step and MoE block, the routing of every forward call is summed in Rust (the
library's one definition of a run's numbers, the GIL released) and committed to the run's SQLite
database when the next step starts; at chosen steps, ``with run.snapshot(step):`` records the
probe images' full per-token routing as a routing trace beside it. Each process of a distributed
job writes its own database (no collective calls); ``routerscope analyze --run`` adds them up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import to_numpy
from ._trace import Trace, _bool, _int64

PathLike = Union[str, "os.PathLike[str]"]


def _rank_and_world() -> Tuple[int, int]:
    """This process's rank and the world size: ``torch.distributed`` when it is initialised,
    else the ``RANK`` / ``WORLD_SIZE`` variables a launcher sets, else a single process."""
    try:
        import torch.distributed as dist  # type: ignore

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Run:
    """A run being written: ``step(n)`` starts training step ``n`` (committing the previous
    one), ``log_layer`` adds one forward call's routing of a training batch to it, ``probe``
    registers the probe images once and ``snapshot(step)`` records their per-token routing.
    Use it as a context manager.

    ``experts`` is the number of experts of every MoE block; ``classes`` names the probe
    labels. ``rank`` and ``world_size`` default to ``torch.distributed``'s (or the ``RANK`` and
    ``WORLD_SIZE`` variables): each rank writes its own part of the run, and snapshots come
    from rank 0. Opening a run this rank wrote before resumes it after its last committed step.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        experts: int,
        model_name: Optional[str] = None,
        classes: Optional[Sequence[str]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        from . import _native

        auto_rank, auto_world = _rank_and_world()
        self.path = Path(os.fspath(path))
        self.experts = int(experts)
        self.rank = auto_rank if rank is None else int(rank)
        self.world_size = auto_world if world_size is None else int(world_size)
        self.model_name = model_name or ""
        self.classes = list(classes or [])
        self._w = _native.RunWriter(
            self.path,
            experts=self.experts,
            model_name=self.model_name,
            classes=self.classes,
            rank=self.rank,
            world_size=self.world_size,
        )
        self._probes: List[np.ndarray] = []
        self._probe_labels: List[Optional[int]] = []
        self._grid: Optional[Tuple[int, int]] = None
        self._cls_token = False
        self._snapshot: Optional[Trace] = None
        self._snapshot_step: Optional[int] = None
        self._snapshot_calls: dict = {}
        self._recorders: List[Any] = []

    # -- steps ------------------------------------------------------------------------------

    @property
    def current_step(self) -> Optional[int]:
        """The step being logged, or ``None``."""
        return self._w.current_step

    @property
    def last_committed(self) -> Optional[int]:
        """The last committed step, or ``None``."""
        return self._w.last_committed

    def step(self, n: int) -> None:
        """Start training step ``n``, committing the previous one (steps increase)."""
        self._w.step(int(n))

    def log_layer(
        self,
        block: int,
        *,
        logits: Any = None,
        probs: Any = None,
        expert_index: Any = None,
        gates: Any = None,
        kept: Any = None,
        router: Optional[str] = None,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        group_images: int = 1,
    ) -> None:
        """Add one forward call's routing of MoE block ``block`` to the current step (several
        calls add up: micro-batches, gradient accumulation).

        Arrays are ``[tokens, ...]`` (one routing group) or ``[images, tokens, ...]`` (routing
        groups of ``group_images`` images). Where the framework gives its own picks
        (``expert_index`` ``[.., k]`` and ``kept``) they count as they are; where it gives only
        ``logits`` (or ``probs``) they are routed under ``router`` (``"softmax-tc"``, ...) with
        ``k`` and ``capacity_factor``, exactly as :func:`routerscope.route` routes them.
        ``logits`` also give the router z-loss, and ``probs`` or ``logits`` the router entropy.

        Logits routed here run on the run's worker thread: the call returns once the arrays
        are checked and copied, and the routing overlaps the training step that follows;
        ``step``, ``commit`` and ``close`` wait for it, and a failure of it is raised by the next
        call.

        Inside ``with run.snapshot(step):`` the call is the probe images' routing and goes to
        the snapshot, never into the step's training numbers.
        """
        if self._snapshot is not None:
            self._log_snapshot(block, logits=logits, probs=probs, expert_index=expert_index,
                               gates=gates, kept=kept, router=router, k=k,
                               capacity_factor=capacity_factor, group_images=group_images)
            return
        idx = kp = None
        if expert_index is not None:
            idx = _int64(expert_index, "expert_index")
            if idx.ndim == 1:
                idx = idx[:, None]
            idx = np.ascontiguousarray(idx.reshape(-1, idx.shape[-1]))
            if kept is not None:
                kp = np.ascontiguousarray(_bool(kept, "kept").reshape(idx.shape))
        lg = None if logits is None else to_numpy(logits, "logits")
        pr = None if probs is None else to_numpy(probs, "probs")
        if idx is not None:
            lg = None if lg is None else lg.reshape(-1, lg.shape[-1])
            pr = None if pr is None else pr.reshape(-1, pr.shape[-1])
        self._w.log_layer(int(block), logits=lg, probs=pr, expert_index=idx, kept=kp,
                          router=router, k=k, capacity_factor=capacity_factor,
                          group_images=int(group_images))

    # -- probe images and snapshots ---------------------------------------------------------

    def probe(
        self,
        images: Any,
        *,
        grid: Tuple[int, int],
        cls_token: bool = False,
        labels: Optional[Sequence[Optional[int]]] = None,
    ) -> None:
        """Register the probe images once: uint8 ``[H, W, 3]`` each (or one ``[B, H, W, 3]``
        array), as the model saw them; ``grid`` is their patch grid, ``cls_token`` whether a CLS
        token leads each image's tokens, ``labels`` their classes."""
        arr = [np.ascontiguousarray(to_numpy(im, "images", widen=False)) for im in images]
        for i, a in enumerate(arr):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"probe image {i} is {a.dtype} {a.shape}: expected uint8 [H, W, 3]")
        labels = list(labels) if labels is not None else [None] * len(arr)
        if len(labels) != len(arr):
            raise ValueError(f"{len(labels)} labels for {len(arr)} probe images")
        if self.rank == 0:
            self._w.set_probes(arr, grid=(int(grid[0]), int(grid[1])), cls_token=bool(cls_token),
                               labels=[None if l is None else int(l) for l in labels])
        self._probes = arr
        self._probe_labels = labels
        self._grid = (int(grid[0]), int(grid[1]))
        self._cls_token = bool(cls_token)

    @property
    def tokens_per_image(self) -> Optional[int]:
        """Tokens of each probe image (patches, plus the CLS token), once probes are set."""
        if self._grid is None:
            return None
        return self._grid[0] * self._grid[1] + int(self._cls_token)

    @contextlib.contextmanager
    def snapshot(self, step: Optional[int] = None) -> Iterator["Run"]:
        """Record the probe images' per-token routing of the forward pass(es) inside the block
        into the snapshot of ``step`` (default: the current step), a routing trace written
        atomically beside the run. Probe passes never count in the step's training numbers.
        Only rank 0 writes snapshots; on other ranks the block runs and records nothing."""
        if self._grid is None:
            raise ValueError("register the probe images with run.probe(...) before a snapshot")
        if self._snapshot is not None:
            raise ValueError("a snapshot is already being recorded")
        step = self.current_step if step is None else int(step)
        if step is None:
            raise ValueError("snapshot(step): no step was started (run.step(n))")
        path = Path(self._w.snapshot_path(int(step)))
        trace = Trace(path, experts=self.experts, model_name=self.model_name, classes=self.classes)
        for im, label in zip(self._probes, self._probe_labels):
            trace.image(im, grid=self._grid, cls_token=self._cls_token, label=label)
        self._snapshot, self._snapshot_step, self._snapshot_calls = trace, int(step), {}
        try:
            yield self
        except BaseException:
            trace.abort()
            raise
        finally:
            self._snapshot = None
        if self.rank != 0:
            trace.abort()
            return
        trace.close()
        self._w.record_snapshot(int(step))

    def _log_snapshot(
        self,
        block: int,
        *,
        group_images: int,
        router: Optional[str],
        k: Optional[int],
        capacity_factor: Optional[float],
        **pieces: Any,
    ) -> None:
        """A probe pass's routing of ``block`` into the snapshot: the next probe images, in
        routing groups of ``group_images``."""
        trace = self._snapshot
        s = self.tokens_per_image
        assert trace is not None and s is not None
        arrays: Dict[str, np.ndarray] = {}
        for name, value in pieces.items():
            if value is None:
                continue
            arr = to_numpy(value, name, widen=False)
            if arr.ndim == 3 and arr.shape[1] == s:  # [images, tokens, ...]
                arr = arr.reshape(-1, arr.shape[2])
            elif arr.ndim == 1 and name in ("expert_index", "kept", "gates"):
                arr = arr[:, None]
            arrays[name] = arr
        if not arrays:
            raise ValueError("nothing logged for the snapshot (give logits=, probs= or expert_index=)")
        tokens = next(iter(arrays.values())).shape[0]
        if tokens % s:
            raise ValueError(f"snapshot: {tokens} tokens are not whole probe images of {s} tokens")
        images = tokens // s
        if images % group_images:
            raise ValueError(f"snapshot: {images} images do not split into groups of {group_images}")
        first = self._snapshot_calls.get(int(block), 0)
        settings: Dict[str, Any] = {key: v for key, v in (("router", router), ("k", k),
                                                          ("capacity_factor", capacity_factor))
                                    if v is not None}
        for g in range(0, images, group_images):
            rows = slice(g * s, (g + group_images) * s)
            kwargs: Dict[str, Any] = {name: np.ascontiguousarray(v[rows]) for name, v in arrays.items()}
            kwargs.update(settings)
            trace.log_layer(int(block), group=range(first + g, first + g + group_images), **kwargs)
        self._snapshot_calls[int(block)] = first + images

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Commit the current step and close the run. Raises when a
        ``routerscope.torch.record_router`` hook on this run never fired."""
        problems = [r.problem() for r in self._recorders if r.problem()]
        self._w.close()
        if problems:
            raise RuntimeError("; ".join(problems))

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            # A step cut short by an exception is not committed; every earlier step is.
            self._w.discard()
            self._w.close()

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, experts={self.experts}, rank={self.rank}/"
                f"{self.world_size}, last committed step {self.last_committed})")
