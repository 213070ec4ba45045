"""Train a small Flax (JAX) ViT-MoE on the Fashion-MNIST slice and log its routing into a run.

The Flax recipe: JAX has no forward hooks, so the MoE layer ``sow``s what its router did (logits,
the expert each token picked, whether it was kept within capacity) into the ``intermediates``
collection, the jit-compiled train step returns that collection beside the loss, and the loop
hands it to ``run.log_layer`` after each step: the model's own picks count as they are, and the
logits give the router entropy and z-loss. Every ``--snapshot-every`` steps the eight probe
images go through ``model.apply`` inside ``run.snapshot(step)``.

The model: 7x7 patches of 28x28 images, two pre-norm blocks, block 1 a Mixture of Experts
(4 experts, Softmax Token Choice top-1 with vmoe's capacity rule, one routing group per image),
mean pooling, vmoe's auxiliary losses.

    python python/examples/run_flax_train.py OUT.rsrun [--steps 200]
    routerscope analyze --run OUT.rsrun --out report/
"""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import routerscope as rs

PATCH, DIM, EXPERTS, CF, BATCH = 7, 32, 4, 1.25, 32
GRID = 28 // PATCH
TOKENS = GRID * GRID
# vmoe's Token Choice capacity: ceil(k·n·CF / e) slots, here padded to a multiple of 4.
CAPACITY = -(-math.ceil(TOKENS * CF / EXPERTS) // 4) * 4
SLICE = Path(__file__).resolve().parents[2] / "assets" / "datasets" / "fashion-mnist-slice"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = int.from_bytes(data[3:4], "big")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class MoeMlp(nn.Module):
    """Top-1 Softmax Token Choice: each token's best expert, slots taken in token order until the
    expert's CAPACITY is full; dropped tokens pass through the residual only."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        logits = nn.Dense(EXPERTS, use_bias=False, name="router")(x)  # [b, s, e]
        probs = jax.nn.softmax(logits)
        top = jnp.argmax(probs, -1)  # [b, s]
        gate = jnp.max(probs, -1)
        onehot = jax.nn.one_hot(top, EXPERTS)  # [b, s, e]
        kept = ((jnp.cumsum(onehot, axis=1) - 1) * onehot < CAPACITY).all(-1)  # [b, s]
        self.sow("intermediates", "logits", logits)
        self.sow("intermediates", "expert_index", top)
        self.sow("intermediates", "kept", kept)
        w1 = self.param("w1", nn.initializers.lecun_normal(), (EXPERTS, DIM, 2 * DIM))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (EXPERTS, 2 * DIM, DIM))
        hidden = nn.gelu(jnp.einsum("bsd,edh->bseh", x, w1))
        out = jnp.einsum("bseh,ehd->bsed", hidden, w2)
        weight = onehot * (gate * kept)[..., None]
        # vmoe's importance loss (cv² of the summed probabilities) and a load loss (cv² of the
        # share of choices), per image.
        cv2 = lambda v: v.var(-1) / (v.mean(-1) ** 2 + 1e-9)
        self.sow("intermediates", "aux", cv2(probs.sum(1)).mean() + cv2(onehot.sum(1)).mean())
        return (out * weight[..., None]).sum(2)


class Block(nn.Module):
    moe: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
        h = nn.LayerNorm()(x)
        if self.moe:
            return x + MoeMlp(name="moe")(h)
        return x + nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(h)))


class VitMoe(nn.Module):
    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:  # [b, 28, 28] in [0, 1]
        b = images.shape[0]
        patches = images.reshape(b, GRID, PATCH, GRID, PATCH).transpose(0, 1, 3, 2, 4)
        x = nn.Dense(DIM, name="embed")(patches.reshape(b, TOKENS, PATCH * PATCH))
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, TOKENS, DIM))
        for i in range(2):
            x = Block(moe=i == 1, name=f"block{i}")(x)
        return nn.Dense(10, name="head")(nn.LayerNorm()(x).mean(1))


def log_routing(run: rs.Run, moe: Dict[str, Any]) -> None:
    """One forward pass's routing of block 1, as the layer sowed it."""
    logits = np.asarray(moe["logits"][0])  # [images, tokens, experts]
    top = np.asarray(moe["expert_index"][0])[..., None]  # [images, tokens, 1]
    probs = np.asarray(jax.nn.softmax(logits))
    run.log_layer(1, logits=logits, expert_index=top, gates=np.take_along_axis(probs, top, -1),
                  kept=np.asarray(moe["kept"][0])[..., None], router="softmax-tc", k=1,
                  capacity_factor=CF)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--snapshot-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    images = idx(SLICE / "train-images-idx3-ubyte.gz")
    labels = idx(SLICE / "train-labels-idx1-ubyte.gz").astype(np.int32)
    probe_ids = [int(np.flatnonzero(labels == c)[0]) for c in range(8)]
    to_x = lambda ids: jnp.asarray(images[ids], dtype=jnp.float32) / 255.0
    model = VitMoe()
    params = model.init(jax.random.PRNGKey(args.seed), to_x(probe_ids[:1]))["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params: Any, opt_state: Any, x: jnp.ndarray, y: jnp.ndarray) -> Any:
        def loss_fn(p: Any) -> Any:
            out, state = model.apply({"params": p}, x, mutable=["intermediates"])
            moe = state["intermediates"]["block1"]["moe"]
            ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
            return ce + 0.01 * moe["aux"][0], (ce, moe)

        (_, (ce, moe)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, moe

    @jax.jit
    def probe_pass(params: Any, x: jnp.ndarray) -> Any:
        _, state = model.apply({"params": params}, x, mutable=["intermediates"])
        return state["intermediates"]["block1"]["moe"]

    rng = np.random.default_rng(args.seed)
    with rs.Run(args.out, experts=EXPERTS, model_name="flax-vit-moe", classes=CLASSES) as run:
        run.probe([np.repeat(images[i][..., None], 3, -1) for i in probe_ids], grid=(GRID, GRID),
                  cls_token=False, labels=[int(labels[i]) for i in probe_ids])
        for step in range(args.steps):
            run.step(step)
            ids = rng.choice(len(images), BATCH, replace=False)
            params, opt_state, ce, moe = train_step(params, opt_state, to_x(ids),
                                                    jnp.asarray(labels[ids]))
            log_routing(run, moe)
            if step % args.snapshot_every == 0 or step == args.steps - 1:
                with run.snapshot(step):
                    log_routing(run, probe_pass(params, to_x(probe_ids)))
    print(f"wrote {args.out}: {args.steps} steps, MoE block 1, last loss {float(ce):.3f}")


if __name__ == "__main__":
    main()
