"""Static-weight LoRA linear for the direct and schedule policies:
out = y0 + coef[0] d_subject + coef[1] d_style.

Algorithm (one program per BLOCK_M x BLOCK_N output tile): the base GEMM tile in fp32
(``_linear_tile``), plus each present LoRA's expand tile read from the shrink buffer, scaled by
its coefficient, all in fp32, rounded once to the output dtype.

``coef`` is a float32 device tensor, read inside the kernel, so a schedule can change it between
steps without recompiling, synchronising or re-capturing a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import lora_shrink
from .utils import (
    _expand_tile,
    _linear_tile,
    as_operands,
    check_lora_linear_inputs,
    dot_pad,
    dot_precision,
    gemm_config,
    keep_plan,
    launch,
    launch_context,
    may_plan,
    new_empty,
    plan_key,
    require,
)


@triton.jit
def _mix_linear_kernel(
    x_ptr,  # (M, K), unit stride along K
    w_ptr,  # (N, K) contiguous
    bias_ptr,  # (N,); read only when HAS_BIAS
    xa_ptr,  # (M, style_offset + pad(style_rank)): the shrink buffer (lora_shrink)
    subject_b_ptr,  # (N, subject_rank) contiguous
    style_b_ptr,  # (N, style_rank) contiguous
    coef_ptr,  # (2,) float32: [subject coefficient, style coefficient], LoRA scales folded in
    out_ptr,  # (M, N) out, x's dtype
    M, N, K, subject_rank, style_rank, num_pid_n, stride_xm, stride_wn, stride_xam, stride_om,
    style_offset,  # first column of the style block in xa
    HAS_BIAS: tl.constexpr, HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr,
    SUBJECT_RANK_PAD: tl.constexpr, STYLE_RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_am = offs_m % M

    acc = _linear_tile(x_ptr, w_ptr, bias_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn,
                       HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    # coefficients carry the LoRA scales; adding the scaled delta in fp32 = one rounding at the end
    if HAS_SUBJECT:
        acc += tl.load(coef_ptr) * _expand_tile(xa_ptr, subject_b_ptr, offs_am, offs_n, mask_n, subject_rank,
                                                stride_xam, 0, subject_rank, SUBJECT_RANK_PAD, DOT_PRECISION)
    if HAS_STYLE:
        acc += tl.load(coef_ptr + 1) * _expand_tile(xa_ptr, style_b_ptr, offs_am, offs_n, mask_n, style_rank,
                                                    stride_xam, style_offset, style_rank, STYLE_RANK_PAD,
                                                    DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


def mix_linear_fwd(x, weight, bias, subject_a, subject_b, style_a, style_b, coef):
    """Launch the mix linear. Same contract as ``fusion_engine.ops.reference.mix_linear``.

    Args:
        x: (M, K) activations (fp16, bf16 or fp32); the output has its dtype.
        weight, bias: the base linear, (N, K) and (N,) or None.
        subject_a, subject_b, style_a, style_b: (r, K) and (N, r) factors; r == 0 for an absent LoRA.
        coef: (2,) coefficients (LoRA scales folded in), read on the device.

    Returns:
        (M, N) tensor in x.dtype.
    """
    stream, fast = launch_context()
    if fast:
        key = plan_key((x, weight, bias, subject_a, subject_b, style_a, style_b, coef), stream)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(stream, x, weight, bias, subject_a, subject_b, style_a, style_b, coef)
    check_lora_linear_inputs("mix_linear", x, weight, bias, subject_a, subject_b, style_a, style_b)
    require(coef.numel() == 2 and coef.device == x.device, lambda: f"mix_linear: coef must be (2,) on {x.device}, "
            f"got shape {tuple(coef.shape)} on {coef.device}")
    M, K = x.shape
    N = weight.shape[0]
    subject_rank, style_rank = subject_a.shape[0], style_a.shape[0]
    out = new_empty((M, N), x.dtype, x.device)
    if M == 0:
        return out
    operands = as_operands(x, weight, bias, subject_a, subject_b, style_a, style_b)
    coef32 = coef.to(torch.float32).contiguous()
    # a plan replays with the caller's tensors, so only when no operand was converted
    planned = (fast and subject_rank + style_rank > 0 and coef32 is coef and all(a is b for a, b in zip(
        operands, (x, weight, bias, subject_a, subject_b, style_a, style_b)))
        and may_plan())
    x, weight, bias, subject_a, subject_b, style_a, style_b = operands
    launches = [] if planned else None
    xa, style_offset = lora_shrink(x, subject_a, style_a, launches)

    cfg = gemm_config(M, N, K, "mix")
    num_pid_n = triton.cdiv(N, cfg["BLOCK_N"])
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * num_pid_n,)
    launch(
        _mix_linear_kernel, grid, launches, _VARYING,
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, xa_ptr=xa if xa is not None else x,
        subject_b_ptr=subject_b, style_b_ptr=style_b, coef_ptr=coef32, out_ptr=out,
        M=M, N=N, K=K, subject_rank=subject_rank, style_rank=style_rank, num_pid_n=num_pid_n,
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_xam=xa.stride(0) if xa is not None else 0,
        stride_om=out.stride(0), style_offset=style_offset,
        HAS_BIAS=bias is not None, HAS_SUBJECT=subject_rank > 0, HAS_STYLE=style_rank > 0,
        SUBJECT_RANK_PAD=dot_pad(subject_rank), STYLE_RANK_PAD=dot_pad(style_rank),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    if planned and all(launches):
        keep_plan(_PLANS, key, _MixPlan(launches, out.shape, x.dtype, x.device))
    return out


# the arguments a replay passes per call (utils.KernelLaunch); the rest (the shrink buffer, sizes, flags) is the plan's
_VARYING = ("x_ptr", "w_ptr", "bias_ptr", "subject_b_ptr", "style_b_ptr", "coef_ptr", "out_ptr")
_PLANS: dict = {}


class _MixPlan:
    """The launches of one planned ``mix_linear_fwd`` key: shrink into the plan's buffer, then the mix kernel."""

    def __init__(self, launches, out_shape, dtype, device):
        (self.shrink, self.mix), self.out_shape, self.dtype, self.device = launches, out_shape, dtype, device

    def __call__(self, stream, x, weight, bias, subject_a, subject_b, style_a, style_b, coef):
        out = new_empty(self.out_shape, self.dtype, self.device)
        self.shrink(stream, x, subject_a, style_a)
        self.mix(stream, x, weight, x if bias is None else bias, subject_b, style_b, coef, out)
        return out
