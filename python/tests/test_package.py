"""The package as users meet it: docstrings in ``help()``, stubs that match the runtime
(mypy's stubtest) and type-check user code, no GUI in the extension module."""

from __future__ import annotations

import inspect
import pydoc
import subprocess
import sys
from pathlib import Path

import routerscope as rs
from conftest import require

PUBLIC = [rs.route, rs.load, rs.analyze, rs.builtin_models, rs.sample_images]
CLASSES = [rs.Routing, rs.Model, rs.Prediction, rs.LayerRouting]


def test_every_public_name_has_a_docstring_shown_by_help() -> None:
    for f in PUBLIC:
        assert f.__doc__ and len(f.__doc__) > 40, f
    for cls in CLASSES:
        assert cls.__doc__, cls
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") or name in ("num_experts",):
                continue
            assert getattr(member, "__doc__", None), f"{cls.__name__}.{name}"
    text = pydoc.render_doc(rs.Routing, renderer=pydoc.plaintext)
    assert "Dispatch tensor" in text and "expert_index" in text
    assert "capacity_rounding='ceil'" in pydoc.render_doc(rs.route, renderer=pydoc.plaintext)


def test_stubs_match_the_runtime_and_type_check_user_code(tmp_path: Path) -> None:
    require("mypy")
    stubtest = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "routerscope"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert stubtest.returncode == 0, stubtest.stdout + stubtest.stderr
    user = tmp_path / "user.py"
    user.write_text(
        "import numpy as np\nimport routerscope as rs\n"
        "r: rs.Routing = rs.route(np.zeros((4, 2), np.float32), 'softmax-tc', k=1)\n"
        "c: int = r.capacity\n"
        "m = rs.load('photo')\n"
        "p = m.predict(['a.png'], 'softmax-ec', capacity_factor=2.0)\n"
        "layer: rs.LayerRouting = p.layers[0]\n"
        "d: dict[str, object] = rs.analyze(m, 'data/', compare=['sinkhorn-tc'])\n"
        "bad: str = r.capacity\n"
    )
    check = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    # The one deliberate mistake, and nothing else.
    assert check.stdout.count("error:") == 1, check.stdout
    assert "user.py:9" in check.stdout and "incompatible types" in check.stdout.lower()


def test_the_extension_module_has_no_gui() -> None:
    native = Path(rs._native.__file__)
    strings = native.read_bytes()
    for gui in (b"egui_plot", b"eframe", b"winit"):
        assert gui not in strings, gui
