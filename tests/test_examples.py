"""Every script in examples/ runs, on the embedded default world with 2 denoising steps, and writes what it says.

Each runs as a subprocess (as a user would run it), offline, with a timeout; a new example without an entry
here fails ``test_every_example_is_run``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> files (relative to its OUT folder) it must write; the GPU benchmark writes nothing without CUDA.
EXPECTED = {
    "python_api.py": ["fls.png"],
    "diffusers_pipeline.py": ["fls.png"],
    "batch_of_prompts.py": [f"prompt{p}_image{i}.png" for p in range(3) for i in range(2)],
    "trace_and_heatmap.py": ["trace.json", "heatmap.png"],
    "eval_on_your_pairs.py": ["pairs.toml", "eval/report.md", "eval/scores/scores.rank0.csv",
                              *[f"eval/images/my_pair/{p}/seed00{s}.png" for p in ("direct", "fls") for s in (0, 1)]],
    "gpu_benchmark.py": [],
    "custom_policy.py": ["updown.png"],
    "serve_lora_pool.py": [*[f"request{i}.png" for i in range(4)], "results.json"],
    "serve_mixed_pairs.py": [*[f"image{i}.png" for i in range(8)], "results.json"],
}
# Starts a Ray instance (a minute on 2 cores; tests/test_serve_ray.py covers the service in CI), and needs the extra.
NEEDS_RAY = {"serve_mixed_pairs.py"}


def test_every_example_is_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", [pytest.param(name, marks=pytest.mark.slow) if name in NEEDS_RAY else name
                                    for name in sorted(EXPECTED)])
def test_example_runs(script, tmp_path):
    if script in NEEDS_RAY:
        pytest.importorskip("ray.serve", reason="pip install -e '.[serve]' to run this example")
    env = {**os.environ, "FUSION_EXAMPLE_STEPS": "2", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    missing = [name for name in EXPECTED[script] if not (tmp_path / name).is_file()]
    assert not missing, f"{script} did not write {missing}:\n{done.stdout}"
    if script == "gpu_benchmark.py" and "No CUDA device" not in done.stdout:
        assert "benchmarking on" in done.stdout, done.stdout
    if script == "trace_and_heatmap.py":  # not just a file: one record per (step, layer), a choice per group
        trace = json.loads((tmp_path / "trace.json").read_text())
        assert trace["steps"] == [0, 1] and len(trace["records"]) == 2 * len(trace["layers"]) > 0
        assert all(set(r["choice"]) <= {"subject", "style"} for r in trace["records"])
    if script == "serve_lora_pool.py":  # the request naming an unknown LoRA fails alone
        results = json.loads((tmp_path / "results.json").read_text())
        assert [("error" in r) for r in results] == [False] * 4 + [True] and "no_such_lora" in results[4]["error"]

