"""bench/launch_overhead.py --smoke: every launcher goes through Triton's real sm_90 compile and launch path with
the stand-in driver, its planned (replayed) launches are the JIT's launches, and the table and JSON hold every row.

Runs in a subprocess without TRITON_INTERPRET (the compiler, not the interpreter); the first run on a machine
compiles the kernels for sm_90 (tens of seconds on 2 cores), later runs reuse Triton's cache."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")

CASES = ("fls fused", "fls split (cublas base)", "mix (direct)", "pooled fls", "pooled mix (direct)")


def test_launch_overhead_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "launch.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "launch_overhead.py"), "--smoke", "--json", str(out)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # shrink + speculate + fix-up for both FLS variants, shrink + mix, speculate + fix-up, one pooled mix launch
    assert "planned launches identical to the JIT's: 13 launches of 5 launchers" in res.stdout, res.stdout
    rows = json.loads(out.read_text())["rows"]
    got = {(row["name"], row["path"]) for row in rows}
    for case in CASES:
        assert {(case, "module"), (case, "op"), (case, "launcher")} <= got, sorted(got)
    assert {("F.linear", "op"), ("merged model (nn.Linear)", "module"), ("reference fls", "module"),
            ("reference fls", "op")} <= got
    for row in rows:  # module rows are differences of two model timings: on a busy CPU they may be noise only
        assert row["us"] > 0 or row["path"] == "module", row
        assert math.isfinite(row["ratio"]), row
        assert f"| {row['name']} | {row['path']} | {row['us']:.1f} |" in res.stdout
