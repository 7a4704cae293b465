"""Shared pieces of the LoRA-linear kernels: config choice and the @triton.jit tile helpers.

Every kernel here computes, for one (BLOCK_M x BLOCK_N) output tile,
    y0 = x W^T + b          (fp32 accumulator)
    d  = (x A^T) B^T        (the "shrink" x A^T is precomputed once per op by lora_shrink)
so the helpers are shared and the FLS kernel's two phases produce bit-identical tiles.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton picks the interpreter when a @triton.jit function is *defined*, i.e. when this package is
# imported, so the flag that matters is the environment at import time, not at call time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_RANK = 128

# Testing hook: when True, every buffer a launcher allocates uninitialised (outputs, scores,
# decisions, partial statistics, the shrink buffer) is filled with NaN / 0x5A first, so an element
# a kernel forgets to write shows up in the tests instead of passing on lucky zeros.
POISON_OUTPUTS = False


def new_empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan") if dtype.is_floating_point else 0x5A)
    return t


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def rank_pad(r: int) -> int:
    """Padded rank used for the shrink buffer and tl.dot (tl.dot needs every dim >= 16)."""
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} exceeds the kernels' limit of {MAX_RANK}")
    return 0 if r == 0 else max(16, next_pow2(r))


def dot_precision(dtype: torch.dtype):
    """fp32 inputs must not silently drop to tf32 (torch's matmul default is full fp32)."""
    return "ieee" if dtype == torch.float32 else None


def gemm_config(M: int, N: int, K: int, rank_total: int) -> dict:
    """Fixed block sizes (autotune does not run under the interpreter, and re-running a kernel
    that accumulates with atomics would need reset hooks). Chosen by shape only, so the grid is
    capturable in a CUDA graph. GPU values are a starting point: measure with bench/gpu_table.py.
    """
    if INTERPRET:
        # tiny tiles: the interpreter is numpy per program; several tiles per dim exercise masks
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    # the FLS epilogue keeps three fp32 tiles alive (y0, d_c, d_s): 64x128 keeps them in registers
    block_m = 32 if M <= 256 else 64  # small M (cross-attention k/v): more programs
    block_n = 128 if N >= 512 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=8 if block_m * block_n >= 8192 else 4,
                num_stages=3)


@triton.jit
def _linear_tile(x_ptr, w_ptr, bias_ptr, offs_m, offs_n, mask_n, K, stride_xm, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 tile of x W^T + b. offs_m is already clamped into [0, M) so x loads need no row mask."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k0
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wt = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _expand_tile(xa_ptr, b_ptr, offs_m, offs_n, mask_n, r, stride_xam, R_OFF, R_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 tile of (x A^T) B^T from the shrink buffer; its padded columns hold zeros."""
    offs_r = tl.arange(0, R_PAD)
    xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + R_OFF + offs_r[None, :])
    # B is (N, r) contiguous; read it as the (R_PAD, BLOCK_N) tile of B^T
    bt = tl.load(b_ptr + offs_n[None, :] * r + offs_r[:, None],
                 mask=(offs_r[:, None] < r) & mask_n[None, :], other=0.0)
    return tl.dot(xa, bt, input_precision=DOT_PRECISION)
