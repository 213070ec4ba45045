"""``routerscope.route`` against the spec's worked examples and, bit for bit, against
``routerscope route`` on the same inputs (golden cases and random ones), and torch / jax inputs
against numpy ones."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pytest

import routerscope as rs
from conftest import cli_route, golden, require

SPARSE = ["softmax-tc", "sinkhorn-tc", "softmax-ec", "sinkhorn-ec", "sparse-ec", "sparse-tc"]
TC = {"softmax-tc", "sinkhorn-tc", "sparse-tc"}
SOLVER = {"sinkhorn-tc", "sinkhorn-ec", "sparse-ec", "sparse-tc"}


def flags(options: Dict[str, Any]) -> List[str]:
    """The command-line flags of route() keywords."""
    out: List[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def assert_same_as_cli(r: rs.Routing, cli: Dict[str, Any], group: Optional[int] = None) -> None:
    pick = (lambda a: a) if group is None else (lambda a: a[group])
    meta = cli["__metadata__"]
    assert np.array_equal(pick(r.dispatch), cli["dispatch"])
    assert np.array_equal(pick(r.combine), cli["combine"])
    assert pick(r.dispatch).dtype == np.float32
    if "scores" in cli:
        assert np.array_equal(pick(r.scores), cli["scores"])
    assert r.capacity == int(meta["capacity"])
    assert r.k == int(meta["k"])
    assert int(pick(r.dropped).sum()) == int(meta["dropped_tokens"])
    assert r.actual_capacity_factor == float(meta["actual_capacity_factor"])
    if "solver_iterations" in meta:
        its = r.solver_iterations if group is None else r.solver_iterations[group]
        assert its == int(meta["solver_iterations"])


GOLDEN = golden()
LOGITS = np.array(GOLDEN["logits"], dtype=np.float32)


@pytest.mark.parametrize("case", GOLDEN["sparse_cases"], ids=lambda c: c["name"])
def test_golden_cases_match_the_spec_and_the_cli(case: dict, tmp) -> None:
    opts = dict(case["options"], capacity_multiple_of=1)
    r = rs.route(LOGITS, case["router"], **opts)
    assert r.capacity == case["capacity"]
    if "choices" in case:
        want_e = [[c[0] for c in t] for t in case["choices"]]
        want_s = [[-1 if c[1] is None else c[1] for c in t] for t in case["choices"]]
        assert r.expert_index.tolist() == want_e
        assert r.slot.tolist() == want_s
        # Gates are the softmax probabilities of the chosen experts, never renormalised.
        soft = np.array(GOLDEN["softmax"])
        np.testing.assert_allclose(
            r.gates, np.take_along_axis(soft, r.expert_index, axis=1), atol=1e-5
        )
    if "expert_slots" in case:
        d = r.dispatch  # [tokens, experts, capacity]
        slots = [[int(np.argmax(d[:, j, s])) for s in range(r.capacity)] for j in range(4)]
        assert slots == case["expert_slots"]
        assert r.expert_index is None and r.gates is None
    if "top_experts" in case:
        assert r.expert_index[:, 0].tolist() == case["top_experts"]
    if "dropped" in case:
        assert np.flatnonzero(r.dropped).tolist() == case["dropped"]
    if "tokens_per_expert" in case:
        assert r.tokens_per_expert.tolist() == case["tokens_per_expert"]
        assert r.requests_per_expert.tolist() == case["requests_per_expert"]
        assert r.actual_capacity_factor == case["actual_capacity_factor"]
    if "solver_iterations" in case:
        assert r.solver_iterations == case["solver_iterations"]
    assert_same_as_cli(r, cli_route(tmp, case["router"], {"logits": LOGITS}, flags(opts)))


def soft_inputs() -> Dict[str, np.ndarray]:
    s = GOLDEN["soft_moe"]
    return {
        "x": np.array(s["x"], dtype=np.float32),
        "mu": np.array(s["mu"], dtype=np.float32),
        "scale": np.array(s["scale"], dtype=np.float32),
    }


def test_golden_soft_moe_matches_the_spec_and_the_cli(tmp) -> None:
    s = GOLDEN["soft_moe"]
    t = soft_inputs()
    r = rs.route(None, "soft", x=t["x"], mu=t["mu"], scale=1.0)
    np.testing.assert_allclose(r.dispatch, np.array(s["dispatch"]), atol=s["tolerance"])
    np.testing.assert_allclose(r.combine, np.array(s["combine"]), atol=s["tolerance"])
    assert r.capacity == 1 and not r.dropped.any()
    assert r.scores is None and r.soft_logits.shape == (4, 2, 1)
    assert_same_as_cli(r, cli_route(tmp, "soft", t, []))


def random_case(rng: np.random.Generator) -> Dict[str, Any]:
    router = SPARSE[rng.integers(len(SPARSE))]
    n, e = int(rng.integers(1, 40)), int(rng.integers(1, 9))
    logits = rng.standard_normal((n, e)).astype(np.float32) * float(rng.choice([0.1, 1, 5]))
    if rng.random() < 0.3:
        logits = np.round(logits, 0)  # ties
    opts: Dict[str, Any] = {
        "capacity_factor": float(rng.choice([0.5, 1.0, 1.25, 2.0, 3.7])),
        "capacity_multiple_of": [None, 0, 1, 4][rng.integers(4)],
        "capacity_rounding": ["ceil", "round"][rng.integers(2)],
    }
    if router in TC:
        opts["k"] = int(rng.integers(1, e + 1))
        opts["batch_priority"] = bool(rng.random() < 0.5)
    if router in SOLVER:
        opts["iterations"] = [None, 5, 30][rng.integers(3)]
    groups = [None, 2, 3][rng.integers(3)]
    if groups:
        logits = rng.standard_normal((groups, n, e)).astype(np.float32)
    return {"router": router, "logits": logits, "options": opts}


@pytest.mark.parametrize("seed", range(100))
def test_random_logits_route_exactly_as_the_cli(seed: int, tmp) -> None:
    case = random_case(np.random.default_rng(seed))
    logits, router, opts = case["logits"], case["router"], case["options"]
    cli_flags = flags(opts)
    try:
        r = rs.route(logits, router, **opts)
    except ValueError as err:
        # Then the command line refuses the same group (an impossible capacity, say).
        group = logits if logits.ndim == 2 else logits[0]
        with pytest.raises(AssertionError):
            cli_route(tmp, router, {"logits": group}, cli_flags)
        assert str(err)
        return
    if logits.ndim == 2:
        assert_same_as_cli(r, cli_route(tmp, router, {"logits": logits}, cli_flags))
    else:
        assert r.dispatch.shape[0] == logits.shape[0]
        for g in range(logits.shape[0]):
            assert_same_as_cli(r, cli_route(tmp, router, {"logits": logits[g]}, cli_flags), g)


@pytest.mark.parametrize("seed", range(8))
def test_random_soft_moe_routes_exactly_as_the_cli(seed: int, tmp) -> None:
    rng = np.random.default_rng(100 + seed)
    n, d, e, p = (int(v) for v in rng.integers(1, 12, size=4))
    x = rng.standard_normal((n, d)).astype(np.float32)
    mu = rng.standard_normal((d, e, p)).astype(np.float32)
    scale = np.float32(rng.uniform(0.1, 10))
    r = rs.route(None, "soft", x=x, mu=mu, scale=scale)
    assert_same_as_cli(r, cli_route(tmp, "soft", {"x": x, "mu": mu, "scale": np.array(scale)}, []))
    batched = rs.route(None, "soft", x=np.stack([x, x[::-1].copy()]), mu=mu, scale=scale)
    assert np.array_equal(batched.combine[0], r.combine)


def test_training_mode_routes_as_the_cli_with_the_same_seed(tmp) -> None:
    logits = np.random.default_rng(7).standard_normal((50, 8)).astype(np.float32)
    r = rs.route(logits, "softmax-tc", k=2, train_seed=3)
    assert_same_as_cli(r, cli_route(tmp, "softmax-tc", {"logits": logits}, ["--k", "2", "--train-seed", "3"]))
    # Training mode adds the load loss; deterministic routing computes only importance.
    assert set(r.aux_losses) == {"importance", "load", "total"}
    plain = rs.route(logits, "softmax-tc", k=2)
    assert set(plain.aux_losses) == {"importance", "total"}
    assert plain.aux_losses["total"] == pytest.approx(plain.aux_losses["importance"])
    again = rs.route(logits, "softmax-tc", k=2, train_seed=3)
    assert np.array_equal(again.combine, r.combine)


def test_groups_route_independently_with_per_group_results() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 20, 4)).astype(np.float32)
    r = rs.route(logits, "softmax-ec", capacity_factor=1.5)
    assert r.num_groups == 3 and r.dispatch.shape == (3, 20, 4, r.capacity)
    assert r.dropped.shape == (3, 20) and r.tokens_per_expert.shape == (3, 4)
    for g in range(3):
        one = rs.route(logits[g], "softmax-ec", capacity_factor=1.5)
        assert np.array_equal(one.dispatch, r.dispatch[g])
        assert np.array_equal(one.tokens_per_expert, r.tokens_per_expert[g])
    tc = rs.route(logits, "softmax-tc", k=2)
    assert tc.aux_losses["importance"].shape == (3,)
    assert tc.expert_index.shape == (3, 20, 2)


def test_results_are_consistent_views_of_one_routing() -> None:
    logits = np.random.default_rng(2).standard_normal((196, 32)).astype(np.float32)
    r = rs.route(logits, "softmax-tc", k=2, capacity_factor=1.0)
    d, c = r.dispatch, r.combine
    assert d.shape == (196, 32, r.capacity)
    assert np.array_equal(d.sum(axis=(0, 2)).astype(np.int64), r.tokens_per_expert)
    assert np.array_equal(d.sum(axis=(1, 2)) == 0, r.dropped)
    kept = r.slot >= 0
    assert np.array_equal(kept.sum(axis=1), r.experts_per_token)
    assert (r.requests_per_expert >= r.tokens_per_expert).all()
    rows, ranks = np.nonzero(kept)
    experts, slots = r.expert_index[rows, ranks], r.slot[rows, ranks]
    assert np.array_equal(c[rows, experts, slots], r.gates[rows, ranks])
    assert d is r.dispatch  # cached
    with pytest.raises(ValueError):
        d[0, 0, 0] = 5.0  # read-only


def test_torch_tensors_route_as_numpy() -> None:
    torch = require("torch")
    logits = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    want = rs.route(logits.numpy(), "sinkhorn-tc", k=2)
    for t in (logits, logits.clone().requires_grad_(True), logits.transpose(1, 2).contiguous().transpose(1, 2)):
        got = rs.route(t, "sinkhorn-tc", k=2)
        assert np.array_equal(got.combine, want.combine)
    # bfloat16 / float16 are widened exactly.
    half = logits.to(torch.bfloat16)
    assert np.array_equal(
        rs.route(half, "softmax-ec").dispatch,
        rs.route(half.float().numpy(), "softmax-ec").dispatch,
    )
    x, mu = torch.randn(10, 6), torch.randn(6, 3, 2)
    a = rs.route(None, "soft", x=x, mu=mu, scale=torch.tensor(2.0))
    b = rs.route(None, "soft", x=x.numpy(), mu=mu.numpy(), scale=2.0)
    assert np.array_equal(a.combine, b.combine)


def test_jax_arrays_route_as_numpy() -> None:
    jnp = require("jax.numpy")
    logits = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)
    want = rs.route(logits, "sparse-ec")
    got = rs.route(jnp.asarray(logits), "sparse-ec")
    assert np.array_equal(got.combine, want.combine)
    bf = jnp.asarray(logits).astype(jnp.bfloat16)
    assert np.array_equal(
        rs.route(bf, "softmax-tc").combine,
        rs.route(np.asarray(bf.astype(jnp.float32)), "softmax-tc").combine,
    )


def test_non_contiguous_and_list_inputs_route_as_contiguous_ones() -> None:
    logits = np.random.default_rng(4).standard_normal((8, 30)).astype(np.float32)
    want = rs.route(np.ascontiguousarray(logits.T), "softmax-tc")
    assert np.array_equal(rs.route(logits.T, "softmax-tc").combine, want.combine)
    lst = GOLDEN["logits"]
    assert np.array_equal(rs.route(lst, "softmax-ec").dispatch, rs.route(LOGITS, "softmax-ec").dispatch)
