"""``routerscope.analyze``: the dataset routing analysis with a progress bar."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Union

from . import _native

PathLike = Union[str, "os.PathLike[str]"]


def _progress_bar(enabled: Optional[bool]) -> Any:
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=None, unit="img", desc="routerscope analyze")


def analyze(
    model: Union["_native.Model", PathLike],
    data: Optional[PathLike] = None,
    out: Optional[PathLike] = None,
    compare: Union[Sequence[str], str] = (),
    *,
    router: Optional[str] = None,
    k: Optional[int] = None,
    capacity_factor: Optional[float] = None,
    group_images: Optional[int] = None,
    split: str = "test",
    limit: Optional[int] = None,
    atlas_size: int = 16,
    atlas_per_image: int = 2,
    png_width: int = 1200,
    progress: Optional[bool] = None,
) -> Dict[str, Any]:
    """Route a whole dataset and return its routing statistics, as ``routerscope analyze``.

    ``model`` is a :class:`Model`, a checkpoint path / built-in model name, or a routing trace
    (``docs/trace-format.md``; then there is no ``data``: the trace's own images are analysed
    under the logged routing, and ``router``/``k``/``capacity_factor``/``compare`` re-route the
    logged logits). ``data`` is a
    folder of images searched recursively whose first subfolder names the class (torchvision's
    ImageFolder convention; images directly in it are ``(unlabelled)``), a Fashion-MNIST IDX
    directory (``split`` picks ``test`` or ``train``), or ``"fashion-mnist"`` (the test set:
    the Debian package's where installed, else the built-in 1,000-image slice). Images are
    streamed in batches, so memory does not grow with the dataset.

    ``router``, ``k``, ``capacity_factor`` and ``group_images`` are a what-if on the model's own
    routing; ``compare`` adds routers (taking the main router's k and capacity factor). ``limit``
    analyses the first N images; ``atlas_size`` patches are kept per expert, at most
    ``atlas_per_image`` of one image (0: no cap); a tile whose patch matches a kept one within a
    small tolerance (its own pixels, not the context around it) is skipped and listed per expert
    under ``skipped``.

    Returns the dict ``analysis.json`` holds (per router in ``runs`` and per MoE layer: tokens
    per class and expert, drops by class and position, load percentiles, experts per token,
    router entropy, Soft MoE slot maps, the atlas). With ``out``, that folder also receives
    ``analysis.json``, the CSV tables and every figure (SVG and PNG ``png_width`` pixels wide),
    each written atomically.

    A progress bar is shown when tqdm is installed (``progress=False`` turns it off). Ctrl-C
    stops after the current batch: the files in ``out`` then cover the images done (marked
    ``"partial": true``) and ``KeyboardInterrupt`` is raised.
    """
    bar = _progress_bar(progress)

    def report(done: int, total: int) -> None:
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    try:
        return _native._analyze(
            model,
            None if data is None else os.fspath(data),
            out=None if out is None else os.fspath(out),
            compare=compare,
            router=router,
            k=k,
            capacity_factor=capacity_factor,
            group_images=group_images,
            split=split,
            limit=limit,
            atlas_size=atlas_size,
            atlas_per_image=atlas_per_image,
            png_width=png_width,
            progress=report,
        )
    finally:
        if bar is not None:
            bar.close()
