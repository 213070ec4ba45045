"""Log the routing of a Flax (JAX) MoE into a routerscope trace.

The recipe: the router ``sow``s its logits into the ``intermediates`` collection, and
``model.apply(..., mutable=["intermediates"])`` returns them beside the output. (Without a
``sow`` in the model, ``model.apply(..., capture_intermediates=True)`` captures every submodule's
output; the router Dense's ``__call__`` entry is the logits.) The example embeds routerscope's
sample images as 8x8-pixel patches, runs one top-1 Softmax Token Choice MoE layer (no capacity
limit: every token reaches its expert) with seeded random weights, and writes the images, the
logits and the picks the layer made; the logits make every other router a what-if.

    python python/examples/trace_flax_moe.py OUT.rstrace.safetensors
    routerscope export --trace OUT.rstrace.safetensors --out figures/
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import routerscope as rs

SIZE, PATCH, DIM, EXPERTS = 64, 8, 32, 4
GRID = SIZE // PATCH


class MoeLayer(nn.Module):
    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        logits = nn.Dense(EXPERTS, use_bias=False, name="router")(x)
        self.sow("intermediates", "router_logits", logits)
        gate = jax.nn.softmax(logits)
        top = jnp.argmax(gate, axis=-1)
        experts = [nn.Dense(DIM, name=f"expert_{j}") for j in range(EXPERTS)]
        out = jnp.stack([e(x) for e in experts], axis=-2)  # [..., E, D]
        pick = jax.nn.one_hot(top, EXPERTS)[..., None]
        return x + (out * pick).sum(-2) * jnp.max(gate, axis=-1, keepdims=True)


class Model(nn.Module):
    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        b = images.shape[0]
        patches = images.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
        x = nn.Dense(DIM, name="embed")(patches.reshape(b, GRID * GRID, -1))
        return MoeLayer(name="moe")(x)


def main(out: str) -> None:
    paths = rs.sample_images()
    pixels = np.stack([rs.read_image(p, size=(SIZE, SIZE)) for p in paths])
    images = jnp.asarray(pixels, dtype=jnp.float32) / 255.0
    model = Model()
    params = model.init(jax.random.PRNGKey(0), images[:1])
    _, state = model.apply(params, images, mutable=["intermediates"])
    logits = np.asarray(state["intermediates"]["moe"]["router_logits"][0])  # [B, S, E]
    with rs.Trace(out, experts=EXPERTS, model_name="flax-moe", patch_size=(PATCH, PATCH)) as trace:
        for p, px in zip(paths, pixels):
            trace.image(px, grid=(GRID, GRID), name=p.name)
        probs = np.asarray(jax.nn.softmax(logits))
        for i in range(len(paths)):  # one routing group per image
            top = probs[i].argmax(-1)[:, None]
            trace.log_layer(0, group=i, logits=logits[i], expert_index=top,
                            gates=np.take_along_axis(probs[i], top, -1), router="softmax-tc", k=1)
    print(f"wrote {out}: {len(paths)} images, router logits {logits.shape}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.rstrace.safetensors")
    main(sys.argv[1])
