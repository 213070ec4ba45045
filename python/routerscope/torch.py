"""PyTorch helpers: record a router's logits into a :class:`routerscope.Trace` or a
:class:`routerscope.Run` with a forward hook.

Put the hook on the module that *returns* the router logits (a gate ``nn.Linear``, a router
module): each call logs its output for the next images of the trace, in the order they were added
(as many as the logits have tokens for: a batch, or one image when the model routes image by
image), in routing groups of ``group_images``. A hook that never fires records
nothing, which is easy to miss (a fused gate, the wrong submodule): :meth:`RouterRecorder.close`
and the trace's ``close()`` raise then.

On a :class:`routerscope.Run` every call adds the batch's routing to the run's current step
(logits ``[images, tokens, experts]`` in routing groups of ``group_images`` images, or
``[tokens, experts]`` as one group); inside ``with run.snapshot(step):`` it records the probe
images' per-token routing instead.

::

    with rs.Trace("run.rstrace.safetensors", experts=8) as trace:
        rec = rs.torch.record_router(model.blocks[7].mlp.router, trace, block=7,
                                     router="softmax-tc", k=2, capacity_factor=1.25)
        for images in batches:
            for img in images:
                trace.image(img, grid=(14, 14), cls_token=True)
            model(preprocess(images))
        rec.close()
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from ._run import Run
from ._trace import Trace

__all__ = ["RouterRecorder", "record_router"]


def _logits_of(output: Any) -> Any:
    """The logits tensor in a module's output: the tensor, the first tensor of a tuple or list,
    or ``logits`` / ``router_logits`` of a dict."""
    if hasattr(output, "detach") and hasattr(output, "shape"):
        return output
    if isinstance(output, dict):
        for key in ("router_logits", "logits"):
            if key in output:
                return output[key]
    if isinstance(output, (tuple, list)):
        for item in output:
            if hasattr(item, "detach") and hasattr(item, "shape"):
                return item
    return None


class RouterRecorder:
    """A forward hook logging a router module's logits into a trace (see
    :func:`record_router`)."""

    def __init__(
        self,
        module: Any,
        trace: Union[Trace, Run],
        block: int,
        *,
        group_images: int = 1,
        router: Optional[str] = None,
        k: Optional[int] = None,
        capacity_factor: Optional[float] = None,
    ) -> None:
        if group_images < 1:
            raise ValueError(f"group_images must be at least 1, got {group_images}")
        self.module = module
        self.trace = trace
        self.block = int(block)
        self.group_images = int(group_images)
        self.router = router
        self.k = k
        self.capacity_factor = capacity_factor
        self.calls = 0
        # The next image to log: calls log the trace's images in order, whether one call carries
        # a whole batch or the model calls its router once per image or group.
        self._next = 0
        self._handle = module.register_forward_hook(self._hook)
        trace._recorders.append(self)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        logits = _logits_of(output)
        if logits is None:
            raise TypeError(
                f"record_router (block {self.block}): {type(module).__name__} returned "
                f"{type(output).__name__}, not a logits tensor (or a tuple/dict holding one)"
            )
        arr = logits.detach().float().cpu().numpy()
        if isinstance(self.trace, Run):
            self.trace.log_layer(self.block, logits=arr, router=self.router, k=self.k,
                                 capacity_factor=self.capacity_factor,
                                 group_images=self.group_images)
            self.calls += 1
            return
        s = self.trace.tokens_per_image
        if s is None:
            raise RuntimeError(
                f"record_router (block {self.block}): add the batch's images with "
                "trace.image(...) before the forward pass"
            )
        e = self.trace.experts
        if arr.ndim == 3:
            arr = arr.reshape(-1, arr.shape[-1])
        if arr.ndim != 2 or arr.shape[1] != e or arr.shape[0] % s:
            raise ValueError(
                f"record_router (block {self.block}): logits of shape {tuple(logits.shape)} are "
                f"not [images x {s} tokens, {e} experts]"
            )
        images = arr.shape[0] // s
        first = self._next
        if first + images > self.trace.num_images:
            raise RuntimeError(
                f"record_router (block {self.block}): the logits hold {images} images' tokens, "
                f"images {first}..{first + images - 1}, but only {self.trace.num_images} images "
                "were added to the trace (add each batch's images with trace.image(...) before "
                "the forward pass)"
            )
        if images % self.group_images:
            raise ValueError(
                f"record_router (block {self.block}): {images} images do not split into groups "
                f"of {self.group_images}"
            )
        self._next += images
        for g in range(0, images, self.group_images):
            rows = slice(g * s, (g + self.group_images) * s)
            self.trace.log_layer(
                self.block,
                group=range(first + g, first + g + self.group_images),
                logits=np.ascontiguousarray(arr[rows]),
                router=self.router,
                k=self.k,
                capacity_factor=self.capacity_factor,
            )
        self.calls += 1

    def problem(self) -> Optional[str]:
        """Why this recorder recorded nothing, or ``None``."""
        if self.calls:
            return None
        return (
            f"record_router on {type(self.module).__name__} (block {self.block}) saw no call: the "
            "forward pass never ran that module (a fused gate, or another submodule returns the "
            "logits), so nothing was recorded"
        )

    def close(self) -> None:
        """Remove the hook; raises ``RuntimeError`` when it never fired."""
        self._handle.remove()
        if self in self.trace._recorders:
            self.trace._recorders.remove(self)
        problem = self.problem()
        if problem:
            raise RuntimeError(problem)

    def __enter__(self) -> "RouterRecorder":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:
            self._handle.remove()


def record_router(
    module: Any,
    trace: Union[Trace, Run],
    *,
    block: int,
    group_images: int = 1,
    router: Optional[str] = None,
    k: Optional[int] = None,
    capacity_factor: Optional[float] = None,
) -> RouterRecorder:
    """Log the logits ``module`` returns into ``trace`` as MoE block ``block``, on every forward
    call, for the trace's next images (in the order they were added), in routing groups of ``group_images`` images.
    ``trace`` may be a :class:`routerscope.Run`: each call then adds its routing to the run's
    current step (or, inside ``run.snapshot(...)``, to the probe images' snapshot).
    ``router``, ``k`` and ``capacity_factor`` describe the model's router (routerscope routes the
    logits with them). Returns the :class:`RouterRecorder`; its ``close()`` (or the trace's)
    raises if the hook never fired."""
    return RouterRecorder(
        module,
        trace,
        block,
        group_images=group_images,
        router=router,
        k=k,
        capacity_factor=capacity_factor,
    )
