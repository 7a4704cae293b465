"""Static-weight LoRA linear for the direct and schedule policies: y0 + coef[0] d_c + coef[1] d_s.

``coef`` is a float32 device tensor, read inside the kernel, so a schedule can change it between
steps without recompiling, synchronising or re-capturing a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import lora_shrink
from .utils import _expand_tile, _linear_tile, dot_precision, gemm_config, new_empty, rank_pad


@triton.jit
def _mix_linear_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, subject_b_ptr, style_b_ptr, coef_ptr, out_ptr,
    M, N, K, rc, rs, num_pid_n, stride_xm, stride_wn, stride_xam, stride_om, S_OFF,
    HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr,
    RC_PAD: tl.constexpr, RS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    if HAS_C:
        acc += tl.load(coef_ptr) * _expand_tile(xa_ptr, subject_b_ptr, offs_am, offs_n, mask_n, rc, stride_xam, 0,
                                                RC_PAD, DOT_PRECISION)
    if HAS_S:
        acc += tl.load(coef_ptr + 1) * _expand_tile(xa_ptr, style_b_ptr, offs_am, offs_n, mask_n, rs, stride_xam,
                                                    S_OFF, RS_PAD, DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


def mix_linear_fwd(x, weight, bias, subject_a, subject_b, style_a, style_b, coef):
    """Launch the mix linear. Same contract as reference.mix_linear; returns (M, N) in x.dtype."""
    M, K = x.shape
    N = weight.shape[0]
    rc, rs = subject_a.shape[0], style_a.shape[0]
    out = new_empty((M, N), x.dtype, x.device)
    if M == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    subject_a, subject_b = subject_a.to(x.dtype).contiguous(), subject_b.to(x.dtype).contiguous()
    style_a, style_b = style_a.to(x.dtype).contiguous(), style_b.to(x.dtype).contiguous()
    coef = coef.to(torch.float32).contiguous()
    xa, s_off = lora_shrink(x, subject_a, style_a)

    cfg = gemm_config(M, N, K, rank_pad(rc) + rank_pad(rs))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    num_n = triton.cdiv(N, cfg["BLOCK_N"])
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * num_n,)
    _mix_linear_kernel[grid](
        x, weight, bias if bias is not None else x, xa if xa is not None else x, subject_b, style_b, coef, out,
        M, N, K, rc, rs, num_n, x.stride(0), weight.stride(0), xa.stride(0) if xa is not None else 0, out.stride(0), s_off,
        HAS_BIAS=bias is not None, HAS_C=rc > 0, HAS_S=rs > 0,
        RC_PAD=max(rank_pad(rc), 16), RS_PAD=max(rank_pad(rs), 16), EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return out
