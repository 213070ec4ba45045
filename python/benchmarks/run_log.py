"""What one ``Run.log_layer`` call of 4,096 tokens x 64 experts costs the training loop.

Each "step" logs one call and then sleeps for ``--step-ms`` (the training step's own work, during
which the worker routes logits-only calls); the call's own time and ``step()``'s wait for the
worker are timed apart. Prints medians and 90th percentiles in microseconds.

    python python/benchmarks/run_log.py [--steps 200] [--step-ms 45]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import routerscope as rs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-ms", type=float, default=45.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4096, 64)).astype(np.float32)
    picks = np.argsort(-logits, axis=1)[:, :2].astype(np.int64)
    cases = {
        "logits (routed under softmax-tc, k=2)": dict(logits=logits, router="softmax-tc", k=2,
                                                     capacity_factor=1.25),
        "picks + logits": dict(expert_index=picks, logits=logits),
        "picks": dict(expert_index=picks),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in cases.items():
            call, wait = [], []
            with rs.Run(Path(tmp) / f"{len(call)}{abs(hash(name))}.rsrun", experts=64) as run:
                for step in range(args.steps):
                    t0 = time.perf_counter()
                    run.step(step)
                    t1 = time.perf_counter()
                    run.log_layer(3, **kwargs)
                    t2 = time.perf_counter()
                    call.append(t2 - t1)
                    wait.append(t1 - t0)
                    time.sleep(args.step_ms / 1000)
            c, w = np.array(call[10:]) * 1e6, np.array(wait[10:]) * 1e6
            print(f"{name}: call median {np.median(c):.0f} us (p90 {np.percentile(c, 90):.0f}); "
                  f"step() median {np.median(w):.0f} us (p90 {np.percentile(w, 90):.0f})")


if __name__ == "__main__":
    main()
