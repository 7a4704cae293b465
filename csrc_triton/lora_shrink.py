"""LoRA shrink: xa = x [A_c; A_s]^T for both adapters in one pass over x.

Run once per op and read by every N-tile of the main kernel. Fusing the shrink into the main
GEMM's K-loop would recompute it once per N-tile: (r_c + r_s) / BLOCK_N extra FLOPs, i.e. +100%
at rank 64 with BLOCK_N=128, against one extra read of x here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, dot_precision, new_empty, rank_pad


@triton.jit
def _lora_shrink_kernel(
    x_ptr, subject_a_ptr, style_a_ptr, xa_ptr,
    M, K, rc, rs, stride_xm, stride_xam,
    S_OFF,  # first column of the style block in xa (= padded subject rank)
    HAS_C: tl.constexpr, HAS_S: tl.constexpr, RC_PAD: tl.constexpr, RS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_am = offs_m % M  # clamped rows: loads stay in bounds without a mask, stores are masked
    offs_k = tl.arange(0, BLOCK_K)
    offs_rc = tl.arange(0, RC_PAD)
    offs_rs = tl.arange(0, RS_PAD)

    x_ptrs = x_ptr + offs_am[:, None] * stride_xm + offs_k[None, :]
    ac_ptrs = subject_a_ptr + offs_rc[None, :] * K + offs_k[:, None]  # (BLOCK_K, RC_PAD) view of A_c^T
    as_ptrs = style_a_ptr + offs_rs[None, :] * K + offs_k[:, None]
    acc_c = tl.zeros((BLOCK_M, RC_PAD), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, RS_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        # padded ranks load zeros, so the padded columns of xa come out exactly zero
        if HAS_C:
            at = tl.load(ac_ptrs, mask=(offs_rc[None, :] < rc) & (offs_k[:, None] < k_left), other=0.0)
            acc_c = tl.dot(xt, at, acc_c, input_precision=DOT_PRECISION)
        if HAS_S:
            at = tl.load(as_ptrs, mask=(offs_rs[None, :] < rs) & (offs_k[:, None] < k_left), other=0.0)
            acc_s = tl.dot(xt, at, acc_s, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        ac_ptrs += BLOCK_K
        as_ptrs += BLOCK_K

    # stored in x's dtype: the expand dot then runs on tensor cores, as eager LoRA does
    out_ptrs = xa_ptr + offs_m[:, None] * stride_xam
    if HAS_C:
        tl.store(out_ptrs + offs_rc[None, :], acc_c.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None])
    if HAS_S:
        tl.store(out_ptrs + S_OFF + offs_rs[None, :], acc_s.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None])


def lora_shrink(x: torch.Tensor, subject_a: torch.Tensor, style_a: torch.Tensor):
    """xa (M, pad(r_c) + pad(r_s)) in x.dtype, or None when both LoRAs are absent.

    Returns (xa, pad(r_c)); the subject block is xa[:, :pad(r_c)], the style block follows.
    """
    M, K = x.shape
    rc, rs = subject_a.shape[0], style_a.shape[0]
    rc_pad, rs_pad = rank_pad(rc), rank_pad(rs)
    if rc_pad + rs_pad == 0 or M == 0:
        return None, rc_pad
    xa = new_empty((M, rc_pad + rs_pad), x.dtype, x.device)
    block_m = 16 if INTERPRET else 64
    block_k = 32 if INTERPRET else 64
    grid = (triton.cdiv(M, block_m),)
    _lora_shrink_kernel[grid](
        x, subject_a, style_a, xa,
        M, K, rc, rs, x.stride(0), xa.stride(0), rc_pad,
        HAS_C=rc > 0, HAS_S=rs > 0, RC_PAD=max(rc_pad, 16), RS_PAD=max(rs_pad, 16),
        BLOCK_M=block_m, BLOCK_K=block_k, EVEN_K=K % block_k == 0, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=4, num_stages=1 if INTERPRET else 3,
    )
    return xa, rc_pad
