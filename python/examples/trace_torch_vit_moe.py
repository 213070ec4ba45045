"""Log the routing of your own PyTorch ViT-MoE into a routerscope trace.

A small Vision Transformer with two Mixture-of-Experts layers (Softmax Token Choice, top-2,
capacity factor 1, vmoe's slotting), seeded random weights, run on routerscope's sample images.
``routerscope.torch.record_router`` hooks each layer's router (the ``nn.Linear`` returning the
logits); the trace holds the images and the logits, and routerscope routes those logits with the
same router settings (exactly, see docs/trace-format.md).

    python python/examples/trace_torch_vit_moe.py OUT.rstrace.safetensors
    routerscope export --trace OUT.rstrace.safetensors --out figures/
    routerscope analyze --trace OUT.rstrace.safetensors --compare softmax-ec --out atlas/
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import nn

import routerscope as rs

SIZE, PATCH, DIM, EXPERTS, K, CF = 64, 8, 64, 8, 2, 1.0
GRID = SIZE // PATCH


class MoeMlp(nn.Module):
    """Top-k Softmax Token Choice with vmoe's capacity rule: choices take slots rank by rank,
    tokens in order, until an expert's ceil(k·n·CF/e) slots are full."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
            for _ in range(EXPERTS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        out = torch.zeros_like(x)
        for i in range(b):  # one routing group per image
            probs = self.router(x[i]).softmax(-1)
            gates, experts = probs.topk(K, dim=-1)
            capacity = math.ceil(K * s * CF / EXPERTS)
            capacity = -(-capacity // 4) * 4  # vmoe pads to a multiple of 4
            fill = [0] * EXPERTS
            for rank in range(K):
                for t in range(s):
                    j = int(experts[t, rank])
                    if fill[j] < capacity:
                        fill[j] += 1
                        out[i, t] += gates[t, rank] * self.experts[j](x[i, t])
        return out


class Block(nn.Module):
    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.mlp = MoeMlp() if moe else nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class VitMoe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, GRID * GRID + 1, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block(moe=i in (1, 3)) for i in range(4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return x


def main(out: str) -> None:
    torch.manual_seed(0)
    model = VitMoe().eval()
    paths = rs.sample_images()
    with rs.Trace(out, experts=EXPERTS, model_name="torch-vit-moe", patch_size=(PATCH, PATCH)) as trace:
        recorders = [
            rs.torch.record_router(
                model.blocks[b].mlp.router, trace, block=b, router="softmax-tc", k=K,
                capacity_factor=CF,
            )
            for b in (1, 3)
        ]
        for start in range(0, len(paths), 8):  # batches of 8 images
            batch = [rs.read_image(p, size=(SIZE, SIZE)) for p in paths[start:start + 8]]
            for p, pixels in zip(paths[start:start + 8], batch):
                trace.image(pixels, grid=(GRID, GRID), cls_token=True, name=p.name)
            x = torch.from_numpy(np.stack(batch)).float().permute(0, 3, 1, 2) / 255.0
            with torch.no_grad():
                model(x)
        for r in recorders:
            r.close()
    print(f"wrote {out}: {len(paths)} images, MoE blocks 1 and 3")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.rstrace.safetensors")
    main(sys.argv[1])
