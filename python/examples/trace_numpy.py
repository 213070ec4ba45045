"""Write a routerscope trace by hand with numpy and the `safetensors` package alone (no
routerscope needed): what any language with a safetensors writer can do.

Two 4x4-patch images with a CLS token, one MoE layer of 4 experts; per image, the router logits
and the Token Choice picks it made (top-1, capacity 4 slots per expert, vmoe's slot order).

    python python/examples/trace_numpy.py OUT.rstrace.safetensors
"""

from __future__ import annotations

import json
import sys

import numpy as np
from safetensors.numpy import save_file

GRID, EXPERTS, CAPACITY = (4, 4), 4, 4
TOKENS = GRID[0] * GRID[1] + 1


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {}
    images, groups = [], []
    for i in range(2):
        tensors[f"images/{i}"] = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        images.append({"grid": list(GRID), "cls_token": True, "name": f"noise-{i}", "label": i})
        logits = rng.standard_normal((TOKENS, EXPERTS)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        top = probs.argmax(1)
        kept = np.zeros(TOKENS, dtype=bool)
        fill = np.zeros(EXPERTS, dtype=int)
        for t in range(TOKENS):  # tokens in order take their expert's next free slot
            if fill[top[t]] < CAPACITY:
                kept[t] = True
                fill[top[t]] += 1
        prefix = f"layers/0/groups/{i}/"
        tensors[prefix + "logits"] = logits
        tensors[prefix + "expert_index"] = top[:, None].astype(np.int32)
        tensors[prefix + "gates"] = probs[np.arange(TOKENS), top][:, None].astype(np.float32)
        tensors[prefix + "kept"] = kept[:, None]
        groups.append({"members": [[i, 0, TOKENS]]})
    meta = {
        "format": "routerscope-trace",
        "version": 1,
        "model_name": "hand-written",
        "num_experts": EXPERTS,
        "classes": ["first", "second"],
        "images": images,
        "layers": [{"block": 0, "router": {"kind": "softmax-tc", "k": 1, "capacity": CAPACITY},
                    "groups": groups}],
    }
    save_file(tensors, out, metadata={"routerscope.trace": json.dumps(meta)})
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.rstrace.safetensors")
    main(sys.argv[1])
