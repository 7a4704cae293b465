"""LoRA shrink: xa = x [subject_a; style_a]^T for both adapters in one pass over x; and the pool's shrink, x_b A_slot^T
once per row and position (``pooled_lora_shrink``), each slot at its own padded rank.

Run once per op and read by every N-tile of the main kernel. Fusing the shrink into the main
GEMM's K-loop would recompute it once per N-tile: (r_subject + r_style) / BLOCK_N extra FLOPs,
i.e. +100% at rank 64 with BLOCK_N=128, against one extra read of x here.

Algorithm (one program per BLOCK_M rows): walk K in BLOCK_K steps, accumulating the (BLOCK_M,
RANK_PAD) fp32 products of the x tile with each A^T tile (padded rank rows load as zeros), then
store both blocks side by side in x's dtype, so the expand dot runs on tensor cores as eager
LoRA does. The padded columns of each block come out exactly zero.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from .utils import (
    _expand_tile,
    dot_pad,
    dot_precision,
    launch,
    may_plan,
    new_empty,
    rank_pad,
    require,
    shrink_config,
)


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


# ============================================================================ the pool: shrink once, expand per tile
# As punica's / vLLM's shrink then expand: the pooled kernels read x A_slot^T from a buffer written once per row and
# position (``xa`` (M, L * RANK_PAD), position l's block at columns l * RANK_PAD), instead of recomputing it in every
# N-tile (rank / BLOCK_N extra FLOPs per LoRA and a second pass over x per N-tile). Each slot is padded to its own
# rank's width (16, 32, 64 or 128: ``dot_pad`` of the slot's rank), not to the widest slot of the stacks: a rank-4
# LoRA beside a rank-64 one costs a 16-wide shrink and expand. The width is picked on the device from the slot's
# rank (a runtime branch per width up to RANK_PAD = dot_pad(R), the stacks' rank), so the grid and the compiled
# kernel do not depend on the assignment. The shrink and the expand take the same branch for a slot, so the expand
# reads exactly the columns the shrink wrote (padded ones as exact zeros); a slot of rank 0 (or -1) is skipped.


@triton.jit
def _slot_shrink_block(x_ptr, a_ptr, xa_ptr, offs_am, offs_m, mask_m, rank, K, stride_xm, stride_xam, col0,
                       WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Store the (BLOCK_M, WIDTH) block x A^T of one slot's A (rows beyond ``rank`` load as zeros) into xa at column
    ``col0``, rounded to xa's dtype (as eager LoRA rounds x A^T)."""
    offs_r = tl.arange(0, WIDTH)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_am[:, None] * stride_xm + offs_k[None, :]
    at_ptrs = a_ptr + offs_r[None, :] * K + offs_k[:, None]  # (BLOCK_K, WIDTH) view of A^T
    acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
            at = tl.load(at_ptrs, mask=offs_r[None, :] < rank, other=0.0)
        else:
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            at = tl.load(at_ptrs, mask=(offs_r[None, :] < rank) & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        at_ptrs += BLOCK_K
    tl.store(xa_ptr + offs_m[:, None] * stride_xam + col0 + offs_r[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=mask_m[:, None])


@triton.jit
def _pooled_shrink_kernel(
    x_ptr,  # (B * T, K), unit stride along K
    a_ptr,  # (S, R, K) contiguous: every slot's A, zero-padded to the stacks' rank R
    ranks_ptr,  # (S,) int32/int64: each slot's own rank (<= R; 0 = nothing at this layer)
    slots_ptr,  # (B, NUM_POSITIONS) int64: each sample's slots, -1 = none
    xa_ptr,  # (B * T, NUM_POSITIONS * RANK_PAD) out, x's dtype: position l's block at columns l * RANK_PAD
    T, K, R, num_pid_t, stride_xm, stride_xam,
    NUM_POSITIONS: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (row tile of a sample, position): x_rows A_slot^T at the slot's own padded width."""
    pid = tl.program_id(0)
    position = tl.program_id(1)
    sample = pid // num_pid_t
    offs_t = (pid % num_pid_t) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_t < T
    offs_m = sample * T + offs_t
    offs_am = sample * T + tl.minimum(offs_t, T - 1)  # clamped into the sample: loads need no row mask
    slot = tl.load(slots_ptr + sample * NUM_POSITIONS + position)
    if slot >= 0:
        rank = tl.minimum(tl.load(ranks_ptr + slot).to(tl.int32), R)
        a_slot = a_ptr + slot * R * K
        col0 = position * RANK_PAD
        if rank > 0:
            if rank <= 16:
                _slot_shrink_block(x_ptr, a_slot, xa_ptr, offs_am, offs_m, mask_m, rank, K, stride_xm, stride_xam,
                                   col0, 16, BLOCK_M, BLOCK_K, EVEN_K, DOT_PRECISION)
            else:
                if RANK_PAD >= 32:
                    if rank <= 32:
                        _slot_shrink_block(x_ptr, a_slot, xa_ptr, offs_am, offs_m, mask_m, rank, K, stride_xm,
                                           stride_xam, col0, 32, BLOCK_M, BLOCK_K, EVEN_K, DOT_PRECISION)
                    else:
                        if RANK_PAD >= 64:
                            if rank <= 64:
                                _slot_shrink_block(x_ptr, a_slot, xa_ptr, offs_am, offs_m, mask_m, rank, K, stride_xm,
                                                   stride_xam, col0, 64, BLOCK_M, BLOCK_K, EVEN_K, DOT_PRECISION)
                            else:
                                if RANK_PAD >= 128:
                                    _slot_shrink_block(x_ptr, a_slot, xa_ptr, offs_am, offs_m, mask_m, rank, K,
                                                       stride_xm, stride_xam, col0, 128, BLOCK_M, BLOCK_K, EVEN_K,
                                                       DOT_PRECISION)


@triton.jit
def _slot_expand(xa_ptr, b_ptr, offs_am, offs_n, mask_n, rank, R, stride_xam, col0, RANK_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of (x A_slot^T) B_slot^T from the pooled shrink's block at ``col0``, at the
    width the shrink used for this rank (zeros for rank 0). ``b_ptr``: the slot's B, (N, R) contiguous."""
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if rank > 0:
        if rank <= 16:
            delta = _expand_tile(xa_ptr, b_ptr, offs_am, offs_n, mask_n, rank, stride_xam, col0, R, 16,
                                 DOT_PRECISION)
        else:
            if RANK_PAD >= 32:
                if rank <= 32:
                    delta = _expand_tile(xa_ptr, b_ptr, offs_am, offs_n, mask_n, rank, stride_xam, col0, R, 32,
                                         DOT_PRECISION)
                else:
                    if RANK_PAD >= 64:
                        if rank <= 64:
                            delta = _expand_tile(xa_ptr, b_ptr, offs_am, offs_n, mask_n, rank, stride_xam, col0, R,
                                                 64, DOT_PRECISION)
                        else:
                            if RANK_PAD >= 128:
                                delta = _expand_tile(xa_ptr, b_ptr, offs_am, offs_n, mask_n, rank, stride_xam, col0,
                                                     R, 128, DOT_PRECISION)
    return delta


@triton.jit
def _slot_rank(ranks_ptr, slot, R):
    """A valid slot's rank as the shrink read it (clamped to the stacks' rank R)."""
    return tl.minimum(tl.load(ranks_ptr + slot).to(tl.int32), R)


_RANKS: dict = {}  # id(a_stack) -> (weakref to it, its version counter, its ranks)
_MAX_RANKS = 512
SLOT_RANK_DTYPES = (torch.int32, torch.int64)


def stack_ranks(a_stack: torch.Tensor) -> torch.Tensor:
    """(S,) int32 on the stacks' device: each slot's rank, 1 + the last row of its A with a non-zero element (0 for
    an all-zero slot, as the pool's zero slot and free slots are). Rows past it are the stacks' zero padding: they
    add exact zeros for finite activations, so skipping them changes no result.

    Computed on the device (no host synchronisation); kept per stack and reused while the stack's version counter
    is unchanged (a pool's ``add``/``remove`` write the stacks in place, which bumps it), except during a CUDA-graph
    capture, which records the computation so every replay recomputes it. A caller that knows the ranks (the pool)
    passes them as ``slot_ranks`` instead."""
    S, R = a_stack.shape[:2]
    try:
        version = a_stack._version
    except RuntimeError:  # an inference tensor has no version counter: no reuse
        version = None
    capturing = not may_plan()  # a graph must record the computation, never read a value kept from before it
    cached = None if capturing else _RANKS.get(id(a_stack))
    if version is not None and cached is not None and cached[0]() is a_stack and cached[1] == version:
        return cached[2]
    if R == 0:
        ranks = torch.zeros(S, dtype=torch.int32, device=a_stack.device)
    else:
        nonzero = a_stack.reshape(S, R, -1).ne(0).any(-1)
        rows = torch.arange(1, R + 1, dtype=torch.int32, device=a_stack.device)
        ranks = torch.where(nonzero, rows, 0).amax(-1).to(torch.int32)
    if version is not None and not capturing:
        if len(_RANKS) >= _MAX_RANKS:
            _RANKS.pop(next(iter(_RANKS)))
        _RANKS[id(a_stack)] = (weakref.ref(a_stack), version, ranks)
    return ranks


def pooled_lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, slot_ranks: torch.Tensor, sample_slots: torch.Tensor,
                       plan: list | None = None) -> torch.Tensor:
    """xa (M, L * dot_pad(R)) in x.dtype: for every sample b, position l and row, x A_slot^T with slot =
    sample_slots[b, l], at the slot's own padded width (see above; columns past it, and blocks of slot -1 or rank 0,
    are not written and never read).

    Args:
        x: (M, K) with unit stride along K, M = B * T sample-major.
        a_stack: (S, R, K) contiguous in x.dtype.
        slot_ranks: (S,) int32/int64, each slot's rank (``stack_ranks``).
        sample_slots: (B, L) int64 contiguous, -1 = none.
        plan: a caller's launch plan (a list): the launch is appended for replays into the same xa, with x, the stack,
            the ranks and the slot table given per call (``utils.KernelLaunch``).
    """
    M, K = x.shape
    R = a_stack.shape[1]
    batch, positions = sample_slots.shape
    T = M // batch
    rank_pad = dot_pad(R)
    xa = new_empty((M, positions * rank_pad), x.dtype, x.device)
    cfg = shrink_config(T, K)
    num_pid_t = triton.cdiv(T, cfg["BLOCK_M"])
    launch(
        _pooled_shrink_kernel, (batch * num_pid_t, positions), plan, ("x_ptr", "a_ptr", "ranks_ptr", "slots_ptr"),
        x_ptr=x, a_ptr=a_stack, ranks_ptr=slot_ranks, slots_ptr=sample_slots, xa_ptr=xa,
        T=T, K=K, R=R, num_pid_t=num_pid_t, stride_xm=x.stride(0), stride_xam=xa.stride(0),
        NUM_POSITIONS=positions, RANK_PAD=rank_pad, EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    return xa


def check_slot_ranks(op: str, slot_ranks, a_stack: torch.Tensor) -> torch.Tensor:
    """``slot_ranks`` checked ((S,) int32/int64 on the stacks' device, contiguous), or ``stack_ranks(a_stack)`` when
    None. Values are not read (that would synchronise): the kernels clamp them to the stacks' rank."""
    if slot_ranks is None:
        return stack_ranks(a_stack)
    S = a_stack.shape[0]
    require(tuple(slot_ranks.shape) == (S,) and slot_ranks.dtype in SLOT_RANK_DTYPES
            and slot_ranks.device == a_stack.device and slot_ranks.is_contiguous(),
            lambda: f"{op}: slot_ranks must be (S={S},) int32/int64 contiguous on {a_stack.device}, got "
            f"{tuple(slot_ranks.shape)} {slot_ranks.dtype} on {slot_ranks.device}")
    return slot_ranks
