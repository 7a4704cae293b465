"""Collects the CPU benchmark medians so bench/test_bench_fls.py can print ratios of one run."""
from __future__ import annotations

import pytest

MEDIANS: dict[tuple[str, str], float] = {}  # (case, method) -> median seconds, filled by the tests
POOL_MEDIANS: dict[tuple[int, str], float] = {}  # (requests K, method) -> median seconds (bench/test_bench_pool.py)


def pytest_terminal_summary(terminalreporter):
    _pool_summary(terminalreporter)
    if not MEDIANS:
        return
    cases = sorted({case for case, _ in MEDIANS})
    methods = ["merged", "reference", "naive"]
    tr = terminalreporter
    tr.section("FLS CPU ratios (same run; x = median / merged-weight linear median)")
    tr.write_line("| case | merged (ms) | reference FLS | naive eager FLS | naive / reference |")
    tr.write_line("|---|---|---|---|---|")
    for case in cases:
        got = {m: MEDIANS.get((case, m)) for m in methods}
        if None in got.values():
            continue
        floor = got["merged"]
        tr.write_line(f"| {case} | {floor * 1e3:.2f} | {got['reference'] / floor:.2f}x | "
                      f"{got['naive'] / floor:.2f}x | {got['naive'] / got['reference']:.2f}x |")


@pytest.fixture
def record_median():
    def record(case: str, method: str, benchmark) -> None:
        MEDIANS[(case, method)] = benchmark.stats.stats.median

    return record


def _pool_summary(tr) -> None:
    counts = sorted({count for count, _ in POOL_MEDIANS})
    if not counts:
        return
    tr.section("LoRA pool CPU throughput (same run; K requests, K distinct pairs)")
    tr.write_line("| K | pool, fls, one call (images/s) | attach/sample/detach per request (images/s) | ratio | "
                  "pool, direct, one call (images/s) | diffusers set_adapters per request (images/s) | "
                  "pool direct / diffusers |")
    tr.write_line("|---|---|---|---|---|---|---|")
    for count in counts:
        pool, single = POOL_MEDIANS.get((count, "pool")), POOL_MEDIANS.get((count, "per_request"))
        if pool is None or single is None:
            continue
        direct, adapters = POOL_MEDIANS.get((count, "pool_direct")), POOL_MEDIANS.get((count, "diffusers"))
        tail = ("- | - | -" if direct is None or adapters is None
                else f"{count / direct:.2f} | {count / adapters:.2f} | {adapters / direct:.2f}x")
        tr.write_line(f"| {count} | {count / pool:.2f} | {count / single:.2f} | {single / pool:.2f}x | {tail} |")


@pytest.fixture
def record_pool():
    def record(count: int, method: str, benchmark) -> None:
        POOL_MEDIANS[(count, method)] = benchmark.stats.stats.median

    return record
