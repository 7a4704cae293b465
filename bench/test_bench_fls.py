"""CPU benchmarks of the FLS linear (pytest-benchmark): run with `pytest bench -m bench`.

Three ways to compute one FLS layer on CPU, at shapes that finish in seconds:
* merged  - one F.linear with the chosen delta merged into the weight (the floor);
* reference - fusion_engine.ops.reference.fls_linear (the engine's CPU path: one base GEMM, both
  rank-r deltas, float32 statistics, per-group device-side choice, no host sync);
* naive   - three full branch outputs (y0, y0 + d_subject, y0 + d_style), F.kl_div on each, and a Python
  `if` on `.item()` (a host sync per layer), as a first implementation of the paper would do.
The ratios to `merged` are printed at the end of the run (bench/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fls_baselines import naive_fls

from fusion_engine.ops import reference as R

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.bench

# (M, K, N, rank): a 64x64-latent self-attention projection scaled down, and a 1280-wide one
CASES = {"M2048_K320_N320_r16": (2048, 320, 320, 16), "M512_K1280_N1280_r64": (512, 1280, 1280, 64)}


def _layer(M, K, N, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    lora = [(torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(N, r, generator=g) * 0.1) for _ in range(2)]
    row_group = torch.arange(M) * 2 // M  # two images, contiguous rows
    return x, w, b, lora, row_group


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["merged", "reference", "naive"])
def test_fls_cpu(benchmark, record_median, case, method):
    M, K, N, r = CASES[case]
    x, w, b, lora, row_group = _layer(M, K, N, r)
    (subject_a, subject_b), (style_a, style_b) = lora
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if method == "merged":
        w_merged = w + subject_b @ subject_a
        fn = lambda: F.linear(x, w_merged, b)  # noqa: E731
    elif method == "reference":
        fn = lambda: R.fls_linear(x, w, b, subject_a, subject_b, 1.0, style_a, style_b, 1.0, row_group, 2, "kl")  # noqa: E731
    else:
        fn = lambda: naive_fls(x, w, b, subject_a, subject_b, 1.0, style_a, style_b, 1.0)  # noqa: E731
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
    record_median(case, method, benchmark)
