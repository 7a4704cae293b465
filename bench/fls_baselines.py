"""The eager baselines the FLS benchmarks compare against, written once for bench/test_bench_fls.py
and bench/gpu_table.py (torch only)."""
from __future__ import annotations

import torch.nn.functional as F


def naive_fls(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale):
    """FLS as a first implementation of the paper would write it: three full branch outputs
    (y0, y0 + d_subject, y0 + d_style), F.kl_div on each, and a Python `if` on `.item()` (a host
    sync per layer, so not capturable in a CUDA graph). One decision for the whole batch."""
    y0 = F.linear(x, weight, bias)
    y_subject = y0 + F.linear(F.linear(x, subject_a), subject_b) * subject_scale
    y_style = y0 + F.linear(F.linear(x, style_a), style_b) * style_scale
    log_p0 = F.log_softmax(y0.float(), -1)
    subject_kl = F.kl_div(log_p0, F.log_softmax(y_subject.float(), -1), log_target=True, reduction="batchmean")
    style_kl = F.kl_div(log_p0, F.log_softmax(y_style.float(), -1), log_target=True, reduction="batchmean")
    return y_subject if subject_kl.item() >= style_kl.item() else y_style  # host sync
