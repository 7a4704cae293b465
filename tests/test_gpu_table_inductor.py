"""bench/gpu_table.py's Inductor table (issue 22: the fused op against the Inductor-compiled reference), smoke mode:
the compiled reference is compared with the eager one and every method gets its ratio; a spent budget starts no
shape. CPU, ``backend="aot_eager"`` (the logic only: GPU timings come from bench/gpu_run.sh)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "bench/gpu_table.py", "--smoke", "--tables", "inductor", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_inductor_table_compares_and_times_every_method():
    rows = [line for line in _run().splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 1, rows
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1]) < 1e-5  # the compiled reference gives the eager reference's output
    assert re.fullmatch(r"[0-9.]+ us", cells[2])  # the merged linear's time, the floor
    assert len(cells) == 7 and all(re.fullmatch(r"[0-9.]+x", c) for c in cells[3:]), cells


def test_inductor_table_starts_no_shape_past_its_budget():
    out = _run("--inductor-budget-s", "-1")
    assert "not started: the table's budget of -1 s is spent" in out and "x |" not in out
