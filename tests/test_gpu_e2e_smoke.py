"""Issue 22's CI check of the end-to-end GPU benchmark: ``bench/gpu_e2e.py --smoke`` (CPU, tiny SDXL UNet and FLUX
transformer, reference backend) runs every setup's code path and writes one row per setup and mode as it goes, the
whole-pipeline rows (fls alone, fls + LLR) last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")
pytest.importorskip("peft")
PIPELINE_ROWS = ("fe fls (pipeline, 1 image)", "fe fls + LLR (pipeline, 1 image)")


def test_gpu_e2e_smoke_writes_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # the smoke run never launches a kernel
    res = subprocess.run([sys.executable, "bench/gpu_e2e.py", "--smoke", "--out-dir", str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert (tmp_path / "e2e.csv").read_text().count("\n") == len(rows) + 1  # header + the same rows
    for model in ("sdxl", "flux"):
        mine = {r["setup"]: r for r in rows if r["model"] == model}
        assert all(r["depth"] == 1 for r in mine.values())
        measured = [r for r in mine.values() if r["ms_per_call"] is not None]
        assert not [r for r in mine.values() if (r["note"] or "").startswith("failed")], mine
        assert mine["merged (fuse_lora, both adapters)"]["ratio_to_merged"] == 1.0
        for setup in ("diffusers/PEFT 2 adapters unmerged (set_adapters)", "fe fls reference", "fe direct reference",
                      "fe klora reference"):
            assert mine[setup]["ms_per_call"] > 0 and mine[setup]["ratio_to_merged"] > 0
        pool = [r for r in measured if r["setup"].startswith(("pool fls", "per request fls"))]
        assert len(pool) == 2 and all(r["images_per_call"] == 2 for r in pool)
        triton = [r for r in mine.values() if "triton" in r["setup"]]
        assert triton and all("no CUDA device" in r["note"] for r in triton)  # skipped with the reason
        fls, llr = mine[PIPELINE_ROWS[0]], mine[PIPELINE_ROWS[1]]
        for row in (fls, llr):  # measured, one image per call, eager only; no peak-memory counter on a CPU
            assert row["ms_per_call"] > 0 and row["images_per_call"] == 1 and row["mode"] == "eager"
            assert "peak_gib" in row and row["peak_gib"] is None and row["ratio_to_merged"] is None
        assert f"time x fls pipeline {llr['ms_per_call'] / fls['ms_per_call']:.2f}" in llr["note"]
    assert [r["setup"] for r in rows[-4:]] == list(PIPELINE_ROWS) * 2  # last: SDXL's, then FLUX's
    assert "depth 1" in res.stdout and "roofline floor" in res.stdout


def test_gpu_e2e_pipeline_rows_skipped_over_budget(tmp_path, monkeypatch):
    """Out of --llr-budget-s, the whole-pipeline rows are written as skipped, without building anything."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_e2e

    rec = gpu_e2e.Recorder(tmp_path, budget_s=-1)
    gpu_e2e.PipelineRows(gpu_e2e.parse_args(["--smoke"]), "sdxl", rec).run()
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [r["setup"] for r in rows] == list(PIPELINE_ROWS)
    assert all(r["ms_per_call"] is None and r["note"] == "skipped: over --llr-budget-s" for r in rows)


@pytest.mark.parametrize("memory_with_checkpointing", [True, False])
def test_gpu_e2e_llr_row_out_of_memory_retries_with_checkpointing(tmp_path, monkeypatch, memory_with_checkpointing):
    """An LLR call that runs out of memory is measured again with gradient checkpointing (the note says so); out of
    memory again, the row says it failed."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_e2e
    import torch

    calls = []

    class Pipeline:  # stands in for a FusionPipeline with refine=
        refine = type("Refiner", (), {"gradient_checkpointing": False})()

        def __call__(self, *args, **kwargs):
            calls.append(self.refine.gradient_checkpointing)
            if not (self.refine.gradient_checkpointing and memory_with_checkpointing):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    rows = gpu_e2e.PipelineRows(gpu_e2e.parse_args(["--smoke"]), "sdxl", gpu_e2e.Recorder(tmp_path, budget_s=1e9))
    rows.ms_fls = 1e-3
    rows.measure(PIPELINE_ROWS[1], Pipeline(), {})
    (row,) = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert calls == [False, True]
    if memory_with_checkpointing:
        assert row["ms_per_call"] > 0 and "gradient checkpointing (out of memory without)" in row["note"]
        assert "time x fls pipeline" in row["note"]
    else:
        assert row["ms_per_call"] is None and row["note"].startswith("failed: OutOfMemoryError")

