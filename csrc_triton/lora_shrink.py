"""LoRA shrink: xa = x [subject_a; style_a]^T for both adapters in one pass over x.

Run once per op and read by every N-tile of the main kernel. Fusing the shrink into the main
GEMM's K-loop would recompute it once per N-tile: (r_subject + r_style) / BLOCK_N extra FLOPs,
i.e. +100% at rank 64 with BLOCK_N=128, against one extra read of x here.

Algorithm (one program per BLOCK_M rows): walk K in BLOCK_K steps, accumulating the (BLOCK_M,
RANK_PAD) fp32 products of the x tile with each A^T tile (padded rank rows load as zeros), then
store both blocks side by side in x's dtype, so the expand dot runs on tensor cores as eager
LoRA does. The padded columns of each block come out exactly zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import dot_pad, dot_precision, launch, new_empty, rank_pad, require, shrink_config


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (M, K), unit stride along K
    subject_a_ptr,  # (subject_rank, K) contiguous
    style_a_ptr,  # (style_rank, K) contiguous
    xa_ptr,  # (M, style_offset + pad(style_rank)) out: [x subject_a^T | x style_a^T], zero-padded
    M, K, subject_rank, style_rank, stride_xm, stride_xam,
    style_offset,  # first column of the style block in xa (= padded subject rank)
    HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr,
    SUBJECT_RANK_PAD: tl.constexpr, STYLE_RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_am = offs_m % M  # clamped rows: loads stay in bounds without a mask, stores are masked
    offs_k = tl.arange(0, BLOCK_K)
    offs_subject_r = tl.arange(0, SUBJECT_RANK_PAD)
    offs_style_r = tl.arange(0, STYLE_RANK_PAD)

    x_ptrs = x_ptr + offs_am[:, None] * stride_xm + offs_k[None, :]
    # (BLOCK_K, RANK_PAD) views of A^T
    subject_a_ptrs = subject_a_ptr + offs_subject_r[None, :] * K + offs_k[:, None]
    style_a_ptrs = style_a_ptr + offs_style_r[None, :] * K + offs_k[:, None]
    subject_acc = tl.zeros((BLOCK_M, SUBJECT_RANK_PAD), dtype=tl.float32)
    style_acc = tl.zeros((BLOCK_M, STYLE_RANK_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        # padded ranks load zeros, so the padded columns of xa come out exactly zero
        if HAS_SUBJECT:
            at = tl.load(subject_a_ptrs, mask=(offs_subject_r[None, :] < subject_rank) & (offs_k[:, None] < k_left),
                         other=0.0)
            subject_acc = tl.dot(xt, at, subject_acc, input_precision=DOT_PRECISION)
        if HAS_STYLE:
            at = tl.load(style_a_ptrs, mask=(offs_style_r[None, :] < style_rank) & (offs_k[:, None] < k_left),
                         other=0.0)
            style_acc = tl.dot(xt, at, style_acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        subject_a_ptrs += BLOCK_K
        style_a_ptrs += BLOCK_K

    out_ptrs = xa_ptr + offs_m[:, None] * stride_xam
    if HAS_SUBJECT:
        tl.store(out_ptrs + offs_subject_r[None, :], subject_acc.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None])
    if HAS_STYLE:
        tl.store(out_ptrs + style_offset + offs_style_r[None, :], style_acc.to(xa_ptr.dtype.element_ty),
                 mask=mask_m[:, None])


def lora_shrink(x: torch.Tensor, subject_a: torch.Tensor, style_a: torch.Tensor, plan: list | None = None):
    """xa (M, pad(r_subject) + pad(r_style)) in x.dtype, or None when both LoRAs are absent.

    Args:
        x: (M, K) with unit stride along K.
        subject_a, style_a: (r, K) contiguous, in x.dtype; r == 0 for an absent LoRA.
        plan: a caller's launch plan (a list): the launch is appended for replays into the same xa, with
            x, subject_a and style_a given per call (``utils.KernelLaunch``).

    Returns:
        (xa, pad(r_subject)): the subject block is xa[:, :pad(r_subject)], the style block follows.
    """
    M, K = x.shape
    subject_rank, style_rank = subject_a.shape[0], style_a.shape[0]
    require(x.stride(1) == 1 and subject_a.is_contiguous() and style_a.is_contiguous(),
            "lora_shrink: x needs unit stride along K and the A factors must be contiguous")
    require(subject_a.shape[1] == K and style_a.shape[1] == K and subject_a.dtype == style_a.dtype == x.dtype,
            lambda: f"lora_shrink: A factors must be (r, K={K}) in {x.dtype}, got {tuple(subject_a.shape)} "
            f"{subject_a.dtype} and {tuple(style_a.shape)} {style_a.dtype}")
    subject_pad, style_pad = rank_pad(subject_rank), rank_pad(style_rank)
    if subject_pad + style_pad == 0 or M == 0:
        return None, subject_pad
    xa = new_empty((M, subject_pad + style_pad), x.dtype, x.device)
    cfg = shrink_config(M, K)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    launch(
        _lora_shrink_kernel, grid, plan, ("x_ptr", "subject_a_ptr", "style_a_ptr"),
        x_ptr=x, subject_a_ptr=subject_a, style_a_ptr=style_a, xa_ptr=xa,
        M=M, K=K, subject_rank=subject_rank, style_rank=style_rank,
        stride_xm=x.stride(0), stride_xam=xa.stride(0), style_offset=subject_pad,
        HAS_SUBJECT=subject_rank > 0, HAS_STYLE=style_rank > 0,
        SUBJECT_RANK_PAD=dot_pad(subject_rank), STYLE_RANK_PAD=dot_pad(style_rank),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    return xa, subject_pad
