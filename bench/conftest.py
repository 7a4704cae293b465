"""Collects the CPU benchmark medians so bench/test_bench_fls.py can print ratios of one run."""
from __future__ import annotations

import pytest

MEDIANS: dict[tuple[str, str], float] = {}  # (case, method) -> median seconds, filled by the tests


def pytest_terminal_summary(terminalreporter):
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
