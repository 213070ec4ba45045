"""Shared helpers: the routerscope command line the package is checked against, and safetensors
files in and out of it.

The CLI binary is ``$ROUTERSCOPE_CLI``, else ``target/{debug,release}/routerscope`` of the
checkout. With ``ROUTERSCOPE_REQUIRE_FRAMEWORKS=1`` (CI) a missing torch or jax fails the tests
that need it instead of skipping them.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "fixtures" / "routing-golden.json"


def cli_binary() -> Path:
    env = os.environ.get("ROUTERSCOPE_CLI")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "routerscope"
        if p.is_file():
            return p
    raise RuntimeError("no routerscope binary: build it (cargo build) or set ROUTERSCOPE_CLI")


def run_cli(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(cli_binary()), *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"routerscope {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def cli_route(
    tmp: Path, router: str, tensors: Dict[str, np.ndarray], flags: List[str]
) -> Dict[str, np.ndarray]:
    """``routerscope route`` on one group; returns its output tensors and metadata."""
    inp, out = tmp / "in.safetensors", tmp / "out.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(inp))
    run_cli(["route", "--router", router, "--input", str(inp), "--output", str(out), *flags])
    result: Dict[str, np.ndarray] = dict(load_file(str(out)))
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as f:
        result["__metadata__"] = f.metadata()  # type: ignore[assignment]
    return result


def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def require(module: str):
    """Imports ``module``, or skips (fails under ROUTERSCOPE_REQUIRE_FRAMEWORKS=1)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("ROUTERSCOPE_REQUIRE_FRAMEWORKS") == "1":
            raise
        pytest.skip(f"{module} is not installed")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
