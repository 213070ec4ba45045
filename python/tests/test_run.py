"""``routerscope.Run``: routing over training logged from Python and read back by the command line.

Counts equal ``routerscope.route`` on the same logits summed over a step's calls; framework picks
count as they are; snapshots equal a trace written by ``Trace`` from the same pass; a writer killed
with SIGKILL leaves every committed step readable; a reader sees a writer's new steps; ranks of a
``torch.distributed`` job add up; the training example's collapse is flagged and its healthy run
is not; the Flax recipe's picks are vmoe's routing of its logits.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

import routerscope as rs

from conftest import REPO, require, run_cli


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def analyze_run(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["analyze", "--run", str(run), "--out", str(out), *extra])


def test_counts_equal_route_on_the_same_logits_summed_over_calls(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    want: Dict[Tuple[int, int], np.ndarray] = {}
    requests: Dict[Tuple[int, int], np.ndarray] = {}
    with rs.Run(tmp / "r.rsrun", experts=8, model_name="toy") as run:
        for step in range(6):
            run.step(step)
            for block in (2, 5):
                kept = np.zeros(8, np.int64)
                req = np.zeros(8, np.int64)
                for _call in range(3):  # micro-batches of 4 images of 17 tokens
                    logits = rng.standard_normal((4, 17, 8)).astype(np.float32)
                    run.log_layer(block, logits=logits, router="softmax-tc", k=2,
                                  capacity_factor=1.0, group_images=2)
                    r = rs.route(logits.reshape(2, 34, 8), "softmax-tc", k=2, capacity_factor=1.0)
                    kept += r.tokens_per_expert.sum(0)
                    req += r.requests_per_expert.sum(0)
                want[(step, block)] = kept
                requests[(step, block)] = req
    analyze_run(tmp / "r.rsrun", tmp / "out")
    rows = read_csv(tmp / "out" / "experts.csv")
    assert len(rows) == 6 * 2 * 8
    for row in rows:
        key = (int(row["step"]), int(row["block"]))
        j = int(row["expert"])
        assert int(row["tokens"]) == want[key][j], (key, j)
        assert int(row["requests"]) == requests[key][j], (key, j)
    layers = read_csv(tmp / "out" / "layers.csv")
    assert {r["tokens"] for r in layers} == {str(3 * 4 * 17)}


def test_framework_picks_count_as_they_are(tmp: Path) -> None:
    picks = np.array([[0, 1], [0, 2], [3, 0]])
    kept = np.array([[True, True], [True, False], [False, False]])
    with rs.Run(tmp / "p.rsrun", experts=4) as run:
        run.step(0)
        run.log_layer(0, expert_index=picks, kept=kept)
        run.log_layer(0, expert_index=picks[:1])
    analyze_run(tmp / "p.rsrun", tmp / "out")
    rows = {int(r["expert"]): r for r in read_csv(tmp / "out" / "experts.csv")}
    assert [int(rows[j]["tokens"]) for j in range(4)] == [3, 2, 0, 0]
    assert [int(rows[j]["requests"]) for j in range(4)] == [4, 2, 1, 1]
    layer = read_csv(tmp / "out" / "layers.csv")[0]
    assert layer["tokens"] == "4" and float(layer["dropped_rate"]) == 0.25
    assert layer["router_entropy"] == "" and layer["z_loss"] == ""


def test_a_job_across_machines_writes_with_a_rollback_journal(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WAL's index is per host: ranks of a job that spans machines (``WORLD_SIZE`` above
    ``LOCAL_WORLD_SIZE``) write their databases with SQLite's rollback journal, and the reader
    adds them up as it does WAL ones; one host keeps WAL."""
    import sqlite3

    def journal(db: Path) -> str:
        with sqlite3.connect(db) as c:
            return str(c.execute("PRAGMA journal_mode").fetchone()[0])

    monkeypatch.delenv("ROUTERSCOPE_RUN_JOURNAL", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        with rs.Run(tmp / "m.rsrun", experts=4) as run:
            run.step(0)
            run.log_layer(0, expert_index=np.array([[rank], [rank], [3]]))
    assert journal(tmp / "m.rsrun" / "run.sqlite") == "delete"
    assert journal(tmp / "m.rsrun" / "ranks" / "rank-1.sqlite") == "delete"
    analyze_run(tmp / "m.rsrun", tmp / "out")
    rows = {int(r["expert"]): int(r["tokens"]) for r in read_csv(tmp / "out" / "experts.csv")}
    assert rows == {0: 2, 1: 2, 2: 0, 3: 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with rs.Run(tmp / "one.rsrun", experts=4) as run:
        run.step(0)
    assert journal(tmp / "one.rsrun" / "run.sqlite") == "wal"


def test_bad_calls_raise_clear_errors(tmp: Path) -> None:
    with rs.Run(tmp / "b.rsrun", experts=4) as run:
        with pytest.raises(ValueError, match="before any step"):
            run.log_layer(0, expert_index=np.zeros((2, 1), np.int64))
        run.step(3)
        with pytest.raises(ValueError, match="steps must increase"):
            run.step(3)
        with pytest.raises(ValueError, match="router= is needed"):
            run.log_layer(0, logits=np.zeros((5, 4), np.float32))
        with pytest.raises(ValueError, match="experts are 0..3"):
            run.log_layer(0, expert_index=np.full((2, 1), 4))
        with pytest.raises(ValueError, match=r"\[tokens, 4\] or \[images, tokens, 4\]"):
            run.log_layer(0, logits=np.zeros((5, 3), np.float32), router="softmax-tc")
        # Logits routed on the worker are checked when logged, not later.
        with pytest.raises(ValueError, match="capacity 125 exceeds the 5 tokens"):
            run.log_layer(0, logits=np.zeros((5, 4), np.float32), router="softmax-ec",
                          capacity_factor=100.0)
        bad = np.zeros((5, 4), np.float32)
        bad[3, 2] = np.nan
        with pytest.raises(ValueError, match=r"logits has a non-finite value NaN at \[3, 2\]"):
            run.log_layer(0, logits=bad, router="softmax-tc")
        with pytest.raises(ValueError, match="do not split into routing groups"):
            run.log_layer(0, logits=np.zeros((3, 5, 4), np.float32), router="softmax-tc",
                          group_images=2)
        with pytest.raises(ValueError, match="register the probe images"):
            with run.snapshot(3):
                pass
    with pytest.raises(ValueError, match="mix two runs"):
        rs.Run(tmp / "b.rsrun", experts=8)
    fifo = tmp / "fifo.rsrun"
    fifo.mkdir()
    os.mkfifo(fifo / "run.sqlite")
    with pytest.raises(OSError, match="a FIFO"):
        rs.Run(fifo, experts=4)


def test_a_snapshot_equals_a_trace_of_the_same_pass(tmp: Path) -> None:
    rng = np.random.default_rng(1)
    probes = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    logits = rng.standard_normal((3, 17, 4)).astype(np.float32)
    with rs.Run(tmp / "s.rsrun", experts=4, model_name="toy") as run:
        run.probe(list(probes), grid=(4, 4), cls_token=True, labels=[0, 1, 0])
        run.step(10)
        run.log_layer(1, logits=rng.standard_normal((8, 4)).astype(np.float32),
                      router="softmax-tc")
        with run.snapshot(10):
            run.log_layer(1, logits=logits, router="softmax-tc", k=1)
    with rs.Trace(tmp / "t.rstrace.safetensors", experts=4, model_name="toy") as trace:
        for im, label in zip(probes, [0, 1, 0]):
            trace.image(im, grid=(4, 4), cls_token=True, label=label)
        for g in range(3):
            trace.log_layer(1, group=g, logits=logits[g], router="softmax-tc", k=1)
    snap = tmp / "s.rsrun" / "snapshots" / "step-000000010.rstrace.safetensors"
    assert snap.read_bytes() == (tmp / "t.rstrace.safetensors").read_bytes()
    # The probe pass is not in the step's training numbers: 8 tokens, not 8 + 51.
    analyze_run(tmp / "s.rsrun", tmp / "out")
    assert read_csv(tmp / "out" / "layers.csv")[0]["tokens"] == "8"
    # Every trace view works on a snapshot as it is.
    assert rs.analyze(snap, progress=False)["images"] == 3


WRITER = textwrap.dedent("""
    import sys, time, numpy as np, routerscope as rs
    run = rs.Run(sys.argv[1], experts=4)
    rng = np.random.default_rng(0)
    step = 0
    while True:
        run.step(step)
        run.log_layer(0, logits=rng.standard_normal((4, 17, 4)).astype(np.float32),
                      router="softmax-tc")
        print(step, flush=True)
        step += 1
        time.sleep(0.02)
""")


def test_a_killed_writer_leaves_its_committed_steps_and_a_reader_follows_it(tmp: Path) -> None:
    path = tmp / "live.rsrun"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        seen = []
        assert proc.stdout is not None
        while len(seen) < 30:
            seen.append(int(proc.stdout.readline()))
        # A reader opened while the writer appends sees committed steps, then newer ones.
        first = analyze_run(path, tmp / "a1")
        n1 = len(read_csv(tmp / "a1" / "layers.csv"))
        assert n1 >= 29, first.stdout
        while len(seen) < 60:
            seen.append(int(proc.stdout.readline()))
        analyze_run(path, tmp / "a2")
        assert len(read_csv(tmp / "a2" / "layers.csv")) > n1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Killed mid-run: every step committed before the kill is there, whole.
    analyze_run(path, tmp / "a3")
    steps = [int(r["step"]) for r in read_csv(tmp / "a3" / "layers.csv")]
    assert steps == list(range(len(steps))) and len(steps) >= 59
    assert all(r["tokens"] == str(4 * 17) for r in read_csv(tmp / "a3" / "layers.csv"))


DDP = textwrap.dedent("""
    import os, sys, numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
    import routerscope as rs

    def work(rank, path, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        rng = np.random.default_rng(rank)
        kept = np.zeros((5, 4), np.int64)
        with rs.Run(path, experts=4) as run:
            assert (run.rank, run.world_size) == (rank, 2)
            for step in range(5):
                run.step(step)
                logits = rng.standard_normal((2 + rank, 10, 4)).astype(np.float32)
                run.log_layer(7, logits=logits, router="softmax-ec", capacity_factor=1.0)
                kept[step] = rs.route(logits, "softmax-ec", capacity_factor=1.0).tokens_per_expert.sum(0)
        np.save(f"{out}-{rank}.npy", kept)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(sys.argv[1], int(sys.argv[2]), sys.argv[3]), nprocs=2)
""")


def test_two_processes_of_a_distributed_job_log_one_run(tmp: Path) -> None:
    require("torch")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp / "ddp.py"
    script.write_text(DDP)
    proc = subprocess.run([sys.executable, str(script), str(tmp / "d.rsrun"), str(port),
                           str(tmp / "kept")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "d.rsrun" / "ranks" / "rank-1.sqlite").exists()
    want = np.load(tmp / "kept-0.npy") + np.load(tmp / "kept-1.npy")
    analyze_run(tmp / "d.rsrun", tmp / "out")
    for row in read_csv(tmp / "out" / "experts.csv"):
        assert int(row["tokens"]) == want[int(row["step"]), int(row["expert"])], row
    assert {r["partial"] for r in read_csv(tmp / "out" / "layers.csv")} == {"0"}


@pytest.mark.parametrize("collapse", [False, True])
def test_the_training_example_flags_its_collapse_and_not_the_healthy_run(
    tmp: Path, collapse: bool
) -> None:
    require("torch")
    run = tmp / ("collapse.rsrun" if collapse else "healthy.rsrun")
    cmd = [sys.executable, str(REPO / "python" / "examples" / "run_torch_train.py"), str(run),
           "--steps", "150", "--snapshot-every", "50"]
    if collapse:
        cmd.append("--collapse")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = analyze_run(run, tmp / "out")
    alerts = json.loads((tmp / "out" / "alerts.json").read_text())["alerts"]
    collapses = [a for a in alerts if a["kind"] == "collapse"]
    if collapse:
        assert collapses and {a["block"] for a in collapses} == {3}, out.stdout
        assert collapses[0]["first_step"] < 100, collapses
    else:
        assert not collapses, out.stdout
    snaps = sorted((run / "snapshots").iterdir())
    assert [p.name for p in snaps] == [f"step-{s:09d}.rstrace.safetensors" for s in (0, 50, 100, 149)]
    churn = [r["churn"] for r in read_csv(tmp / "out" / "layers.csv") if r["churn"]]
    assert len(churn) == 2 * 3  # two blocks, every snapshot after the first


def test_the_flax_recipe_logs_a_run_whose_picks_are_vmoes_routing(tmp: Path) -> None:
    """The Flax example: its layer's own picks (sowed, returned by the jit-compiled step) are
    what the run counts, and on the probe images they are exactly vmoe's Softmax Token Choice
    routing of the logits it logged (``routerscope.route``)."""
    require("flax")
    require("optax")
    from safetensors.numpy import load_file

    run = tmp / "flax.rsrun"
    proc = subprocess.run([sys.executable, str(REPO / "python" / "examples" / "run_flax_train.py"),
                           str(run), "--steps", "40", "--snapshot-every", "20"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    analyze_run(run, tmp / "out")
    layers = read_csv(tmp / "out" / "layers.csv")
    assert [int(r["step"]) for r in layers] == list(range(40))
    assert all(r["block"] == "1" and int(r["tokens"]) == 32 * 16 for r in layers)
    assert all(r["router_entropy"] and r["z_loss"] for r in layers)
    per_step: Dict[int, Tuple[int, int]] = {}
    for r in read_csv(tmp / "out" / "experts.csv"):
        kept, req = per_step.get(int(r["step"]), (0, 0))
        per_step[int(r["step"])] = (kept + int(r["tokens"]), req + int(r["requests"]))
        assert int(r["tokens"]) <= min(int(r["requests"]), 8 * 32)  # 8 slots per image
    assert all(req == 32 * 16 and kept <= req for kept, req in per_step.values())
    snaps = sorted((run / "snapshots").iterdir())
    assert [p.name for p in snaps] == [f"step-{s:09d}.rstrace.safetensors" for s in (0, 20, 39)]
    for snap in snaps:
        t = load_file(str(snap))
        for g in range(8):
            logits = t[f"layers/0/groups/{g}/logits"]
            r = rs.route(logits, "softmax-tc", k=1, capacity_factor=1.25)
            picks = t[f"layers/0/groups/{g}/expert_index"][:, 0]
            kept = t[f"layers/0/groups/{g}/kept"][:, 0]
            assert (np.bincount(picks[kept], minlength=4) == r.tokens_per_expert.reshape(-1)).all()
            assert (np.bincount(picks, minlength=4) == r.requests_per_expert.reshape(-1)).all()
    run_cli(["diff", str(snaps[0]), str(snaps[-1]), "--out", str(tmp / "diff")])
