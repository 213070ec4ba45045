"""Train a small PyTorch ViT-MoE on the Fashion-MNIST slice and log its routing into a run.

Two Mixture-of-Experts layers (blocks 1 and 3, 4 experts, Softmax Token Choice top-1 with vmoe's
capacity rule, one routing group per image) on 28x28 images in 7x7 patches.
``routerscope.torch.record_router`` hooks each router: every training forward pass adds its
routing to the current step, and every ``--snapshot-every`` steps the eight probe images' routing
goes to a snapshot. Healthy training uses vmoe's auxiliary losses (importance + load);
``--collapse`` drops them and gives block 3's router a learning rate 300 times larger, and its
router collapses onto one expert, which ``routerscope analyze --run`` flags.

    python python/examples/run_torch_train.py OUT.rsrun [--steps 300] [--collapse]
    routerscope analyze --run OUT.rsrun --out report/
    routerscope app OUT.rsrun
"""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import routerscope as rs
import routerscope.torch as rst

PATCH, DIM, EXPERTS, K, CF, BATCH = 7, 32, 4, 1, 1.25, 32
GRID = 28 // PATCH
TOKENS = GRID * GRID + 1
SLICE = Path(__file__).resolve().parents[2] / "assets" / "datasets" / "fashion-mnist-slice"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = int.from_bytes(data[3:4], "big")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class MoeMlp(nn.Module):
    """Softmax Token Choice, vectorised: each token's top-k experts, slots taken rank by rank in
    token order until an expert's ceil(k·n·CF/e) slots (padded to a multiple of 4) are full; the
    output is the kept choices' gated expert outputs. Returns the auxiliary losses too."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, EXPERTS, bias=False)
        self.w1 = nn.Parameter(torch.randn(EXPERTS, DIM, 2 * DIM) * DIM ** -0.5)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, 2 * DIM, DIM) * (2 * DIM) ** -0.5)
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        logits = self.router(x)
        probs = logits.softmax(-1)
        gates, experts = probs.topk(K, dim=-1)  # [b, s, k]
        capacity = math.ceil(K * s * CF / EXPERTS)
        capacity = -(-capacity // 4) * 4
        onehot = nn.functional.one_hot(experts, EXPERTS).float()  # [b, s, k, e]
        # Position of each choice in its expert's buffer: rank-major, then token order.
        order = onehot.permute(0, 2, 1, 3).reshape(b, K * s, EXPERTS)
        position = (order.cumsum(1) - 1).reshape(b, K, s, EXPERTS).permute(0, 2, 1, 3)
        kept = (onehot * (position < capacity).float()).sum(-1)  # [b, s, k]
        hidden = torch.einsum("bsd,edh->bseh", x, self.w1)
        out_all = torch.einsum("bseh,ehd->bsed", nn.functional.gelu(hidden), self.w2)
        weight = (onehot * (gates * kept)[..., None]).sum(2)  # [b, s, e]
        # vmoe's importance loss (cv² of the summed probabilities) and a load loss (cv² of the
        # share of first choices), per image.
        importance = probs.sum(1)
        load = onehot[:, :, 0].sum(1)
        cv2 = lambda v: v.var(-1, unbiased=False) / (v.mean(-1) ** 2 + 1e-9)
        self.aux = cv2(importance).mean() + cv2(load).mean()
        return (out_all * weight[..., None]).sum(2)


class Block(nn.Module):
    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.mlp = MoeMlp() if moe else nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                                     nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class VitMoe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block(moe=i in (1, 3)) for i in range(4))
        self.head = nn.Linear(DIM, 10)

    def moe(self, i: int) -> MoeMlp:
        return self.blocks[i].mlp  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--snapshot-every", type=int, default=50)
    ap.add_argument("--collapse", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    images = idx(SLICE / "train-images-idx3-ubyte.gz")
    labels = idx(SLICE / "train-labels-idx1-ubyte.gz").astype(np.int64)
    probe_ids = [int(np.flatnonzero(labels == c)[0]) for c in range(8)]
    model = VitMoe()
    router_params = [model.moe(3).router.weight] if args.collapse else []
    rest = [p for p in model.parameters() if all(p is not q for q in router_params)]
    groups = [{"params": rest, "lr": 3e-3}]
    if router_params:
        groups.append({"params": router_params, "lr": 1.0})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(args.seed)
    to_x = lambda ids: torch.from_numpy(images[ids]).float()[:, None] / 255.0
    with rs.Run(args.out, experts=EXPERTS, model_name="torch-vit-moe" + ("-collapse" if args.collapse else ""),
                classes=CLASSES) as run:
        run.probe([np.repeat(images[i][..., None], 3, -1) for i in probe_ids], grid=(GRID, GRID),
                  cls_token=True, labels=[int(labels[i]) for i in probe_ids])
        for b in (1, 3):
            rst.record_router(model.moe(b).router, run, block=b, router="softmax-tc", k=K,
                              capacity_factor=CF)
        for step in range(args.steps):
            run.step(step)
            ids = rng.choice(len(images), BATCH, replace=False)
            logits = model(to_x(ids))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels[ids]))
            if not args.collapse:
                loss = loss + 0.01 * (model.moe(1).aux + model.moe(3).aux)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.snapshot_every == 0 or step == args.steps - 1:
                with run.snapshot(step), torch.no_grad():
                    model(to_x(probe_ids))
    print(f"wrote {args.out}: {args.steps} steps, MoE blocks 1 and 3, last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
