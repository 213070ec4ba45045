"""Call overhead of the Python package, to compare with the Rust benchmarks:

- ``route`` on one 196 x 32 float32 group (ViT-B/16 tokens, the paper's 32 experts), against
  ``cargo bench --bench routers -- route/196x32``;
- ``Model.predict`` on one 28 x 28 image with the built-in Fashion-MNIST model, against
  ``cargo bench --bench model -- fashion-mnist-softmax-tc/cpu/forward``.

Run with a release build of the package (``pip install ./python``) and ``RAYON_NUM_THREADS``
set as for the Rust benchmark; prints medians of ``timeit`` repeats in microseconds.
"""

from __future__ import annotations

import gzip
import statistics
import sys
import timeit
from pathlib import Path

import numpy as np

import routerscope as rs


def median_us(stmt, number: int, repeat: int = 15) -> float:
    runs = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    logits = np.random.default_rng(0).standard_normal((196, 32)).astype(np.float32)
    print(f"routerscope {rs.__version__}, Python {sys.version.split()[0]}")
    for router in ("softmax-tc", "softmax-ec", "sinkhorn-tc"):
        us = median_us(lambda: rs.route(logits, router), number=2000)
        print(f"route 196x32 {router:<12} {us:8.2f} us")
    model = rs.load("fashion-mnist-softmax-tc", device="cpu")
    slice_dir = Path(rs.builtin_models()["photo"]).parents[1] / "datasets" / "fashion-mnist-slice"
    raw = gzip.open(slice_dir / "t10k-images-idx3-ubyte.gz").read()
    image = np.frombuffer(raw, dtype=np.uint8, offset=16)[:784].reshape(28, 28).copy()
    model.predict(image)
    us = median_us(lambda: model.predict(image), number=200)
    print(f"Model.predict, one 28x28 array   {us:8.1f} us")
    pred = model.predict(image)
    us = median_us(lambda: pred.what_if("softmax-ec"), number=200)
    print(f"Prediction.what_if(softmax-ec)   {us:8.1f} us")


if __name__ == "__main__":
    main()
