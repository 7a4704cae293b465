"""Fused FLS linear: base GEMM, both LoRA deltas, divergence statistics, per-group decision and
the output y0 + d_chosen, with no host synchronisation and shape-only grids.

Mechanism ("speculate, then fix up exactly"). A decision group (one image) spans many row
tiles, so no tile knows the decision when it writes its output. The op launches two kernels over
the same grid (M tiles x N tiles, the N-tiles of a row tile adjacent):

* ``_fls_speculate_kernel``: computes the tile's y0, d_subject and d_style in fp32, writes
  y0 + d_guess (guess = last step's decision for the row's group when the caller passes it,
  else the subject), and stores the tile's per-row partial statistics. The last N-tile of a
  row tile to finish (an atomic ticket) combines the partials of the whole row exactly
  (running max / rescaled sums, the flash-attention trick), turns them into the row's score,
  and atomically adds it into float32 per-group sums (scores, rows, rows whose delta is non-zero:
  a branch with an all-zero delta on a group counts as absent there, as in the reference).
* ``_fls_fix_up_kernel``: every program reads the final group sums, takes the decision for its
  rows, and recomputes + rewrites its tile only for rows whose decision differs from the
  guess (same code path, so the result is identical to a correct guess). Program 0 also writes
  the per-group scores and decisions. When the guess was right every program exits after a
  few loads, so the cost stays near one GEMM; a wrong guess costs the recompute of the
  affected tiles only (at worst 2x, the "recompute" mechanism).

The output is therefore exactly y0 + d_chosen for THIS step, whatever the guess.

Where y0 comes from (the ``BASE`` constexpr of both kernels; one code path, two compiled variants):

* ``_BASE_COMPUTED`` ("fused"): each tile computes its y0 with the Triton GEMM tile
  (``_linear_tile``, fp32 accumulator), the whole op in one kernel pair.
* ``_BASE_LOADED`` ("split", ``base="cublas"``): the launcher first runs the base GEMM in cuBLAS,
  ``y0 = F.linear(x, W, b)`` in x's dtype, exactly the merged / unfused layer's own call, into a
  y0 buffer of its own; the kernels then read their y0 tile from it instead of computing it, and do
  everything else as above (the rank-r expand from the shrink, statistics, y0 + d_guess, fix-up).
  Why: on an H200 Triton's plain GEMM with the same tiles is 1.35-2x slower than cuBLAS at FLUX
  sizes (bench/RESULTS.md), so no kernel that does the base GEMM in Triton gets near the merged
  linear there; the split op costs cuBLAS's GEMM plus a memory-bound epilogue pass.
  Exactness: the speculate kernel writes y0 + d_guess into the OUTPUT buffer, never over y0, so the
  fix-up re-reads the very y0 it needs for rows whose guess was wrong. Recovering y0 as
  out - d_guess instead would save that buffer (M x N in x's dtype: 28 MB at FLUX's
  4608 x 3072 in bf16, one extra write + read, small beside an 87-GFLOP GEMM) but is not exact
  in floating point (out was rounded to x's dtype), so the output would depend on the guess.
  Precision: y0 is rounded to x's dtype once by cuBLAS (as the merged layer rounds it), then upcast;
  the deltas are added in fp32 and the sum rounded again. That is one rounding more than the
  reference contract's "accumulated in float32, rounded once" (fusion_engine/ops/reference.py) and
  than the fused variant: at most half an ulp of y0 in x's dtype per element. The eager same-dtype
  computation the tolerance is measured against rounds y0 the same way and each delta besides, so
  the split variant meets the same per-dtype tolerance (tests/test_kernels.py checks fp32 and bf16);
  its statistics see the rounded y0, as eager FLS would. fp32 y0 follows torch's matmul settings like
  the merged layer (``torch.backends.cuda.matmul.allow_tf32``, False by default: full fp32).
  ``fusion_engine.kernels.utils.fls_base_config`` picks the mode by size class; ``base=`` overrides it.

JS divergence needs the row's LSEs before its second sweep; it stays on the reference path
(see fusion_engine/ops/triton_ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import lora_shrink
from .utils import (
    _DIVERGENCE_COSINE,
    _DIVERGENCE_KL,
    BASE_CODES,
    DIVERGENCE_CODES,
    ROW_GROUP_DTYPES,
    _base_tile,
    _expand_tile,
    as_operands,
    base_mode,
    check_lora_linear_inputs,
    cublas_linear,
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

# the divergence modes (_DIVERGENCE_*) and where y0 comes from (_BASE_*) are constexpr codes shared with the pooled
# kernels: csrc_triton/utils.py

# ---- per-(row, N-tile) partial statistics: slots of the `part` buffer (slot, n_tile, row)
# kl: (max, sum exp) of y0, and (max, sum exp, sum exp * d) of each y1 = y0 + d
_STAT_Y0_MAX = tl.constexpr(0)
_STAT_Y0_SUMEXP = tl.constexpr(1)
_STAT_SUBJECT_MAX = tl.constexpr(2)
_STAT_SUBJECT_SUMEXP = tl.constexpr(3)
_STAT_SUBJECT_EXP_DELTA = tl.constexpr(4)
_STAT_STYLE_MAX = tl.constexpr(5)
_STAT_STYLE_SUMEXP = tl.constexpr(6)
_STAT_STYLE_EXP_DELTA = tl.constexpr(7)
# cosine (all five) and dot (the first two): plain sums
_STAT_SUBJECT_DOT_Y0 = tl.constexpr(0)  # y1_subject . y0
_STAT_STYLE_DOT_Y0 = tl.constexpr(1)  # y1_style . y0
_STAT_Y0_SQNORM = tl.constexpr(2)
_STAT_SUBJECT_SQNORM = tl.constexpr(3)
_STAT_STYLE_SQNORM = tl.constexpr(4)
NUM_STATS = {DIVERGENCE_CODES["kl"]: 8, DIVERGENCE_CODES["cosine"]: 5, DIVERGENCE_CODES["dot"]: 2}
# after the score statistics (at LIVE_SLOT = NUM_STATS[divergence]): "any d != 0 in this tile's row"
_LIVE_SUBJECT = tl.constexpr(0)
_LIVE_STYLE = tl.constexpr(1)
NUM_LIVE = 2

# ---- per-group float32 accumulators: slots of the `gacc` buffer (group, slot)
_GROUP_SUBJECT_SUM = tl.constexpr(0)  # sum of the rows' subject scores
_GROUP_STYLE_SUM = tl.constexpr(1)
_GROUP_ROWS = tl.constexpr(2)
_GROUP_SUBJECT_LIVE = tl.constexpr(3)  # rows whose subject delta is non-zero
_GROUP_STYLE_LIVE = tl.constexpr(4)
_GROUP_SLOTS = tl.constexpr(5)
GROUP_SLOTS = _GROUP_SLOTS.value


# ============================================================================ shared tile helpers

@triton.jit
def _tile_coords(row_group_ptr, M, N, num_pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row tile, column tile, masks, clamped rows and the rows' groups."""
    pid = tl.program_id(0)
    # N-tiles of one row tile are adjacent: they share x in L2 and finish close together
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_am = offs_m % M  # clamped rows: loads stay in bounds without a mask, stores are masked
    group = tl.load(row_group_ptr + offs_am)
    return pid, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, offs_am, group


@triton.jit
def _guessed_rows(guess_ptr, group, HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr, HAS_GUESS: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """The speculated decision per row, True = subject (static when one LoRA is absent: then the
    guess is always right)."""
    if HAS_SUBJECT and HAS_STYLE:
        if HAS_GUESS:
            guess = tl.load(guess_ptr + group) != 0
        else:
            guess = tl.full((BLOCK_M,), True, tl.int1)  # no state yet: guess the subject
    elif HAS_STYLE:
        guess = tl.full((BLOCK_M,), False, tl.int1)
    else:
        guess = tl.full((BLOCK_M,), True, tl.int1)
    return guess


@triton.jit
def _delta_tiles(xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n, subject_rank, style_rank,
                 subject_scale, style_scale, stride_xam, style_offset, HAS_SUBJECT: tl.constexpr,
                 HAS_STYLE: tl.constexpr, SUBJECT_RANK_PAD: tl.constexpr, STYLE_RANK_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 tiles of both scaled deltas from the shrink buffer (zeros for an absent LoRA)."""
    if HAS_SUBJECT:
        subject_delta = subject_scale * _expand_tile(xa_ptr, subject_b_ptr, offs_am, offs_n, mask_n, subject_rank,
                                                     stride_xam, 0, subject_rank, SUBJECT_RANK_PAD, DOT_PRECISION)
    else:
        subject_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_STYLE:
        style_delta = style_scale * _expand_tile(xa_ptr, style_b_ptr, offs_am, offs_n, mask_n, style_rank,
                                                 stride_xam, style_offset, style_rank, STYLE_RANK_PAD, DOT_PRECISION)
    else:
        style_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return subject_delta, style_delta


@triton.jit
def _base_and_delta_tiles(x_ptr, w_ptr, bias_ptr, y0_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n,
                          mask_n, K, subject_rank, style_rank, subject_scale, style_scale, stride_xm, stride_wn,
                          stride_y0m, stride_xam, style_offset, BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr, SUBJECT_RANK_PAD: tl.constexpr,
                          STYLE_RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 tiles of y0 and both scaled deltas, y0 computed or loaded as ``BASE`` says. Both kernels
    get their tiles here, so a fixed-up tile is bit-identical to a correctly guessed one."""
    y0 = _base_tile(x_ptr, w_ptr, bias_ptr, y0_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn, stride_y0m,
                    BASE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    subject_delta, style_delta = _delta_tiles(
        xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n, subject_rank, style_rank, subject_scale,
        style_scale, stride_xam, style_offset, HAS_SUBJECT, HAS_STYLE, SUBJECT_RANK_PAD, STYLE_RANK_PAD, BLOCK_M,
        BLOCK_N, DOT_PRECISION)
    return y0, subject_delta, style_delta


@triton.jit
def _decide(subject_score, style_score, subject_live, style_live, HAS_SUBJECT: tl.constexpr,
            HAS_STYLE: tl.constexpr):
    """True = subject. Ties go to the subject; an absent LoRA never wins, and a branch whose delta
    is exactly zero on every row of the group counts as absent for that group (both zero: subject)."""
    if HAS_SUBJECT and HAS_STYLE:
        take = tl.where(subject_live == style_live, subject_score >= style_score, subject_live)
    elif HAS_STYLE:
        take = tl.zeros_like(subject_score) != 0.0  # subject absent: always style
    else:
        take = tl.zeros_like(subject_score) == 0.0  # style absent (or both): always subject
    return take


@triton.jit
def _group_decision(gacc_ptr, groups, mask, HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr):
    """(subject score, style score, decision) of the given groups from their final sums."""
    rows = tl.maximum(tl.load(gacc_ptr + groups * _GROUP_SLOTS + _GROUP_ROWS, mask=mask, other=0.0), 1.0)
    subject_score = tl.load(gacc_ptr + groups * _GROUP_SLOTS + _GROUP_SUBJECT_SUM, mask=mask, other=0.0) / rows
    style_score = tl.load(gacc_ptr + groups * _GROUP_SLOTS + _GROUP_STYLE_SUM, mask=mask, other=0.0) / rows
    subject_live = tl.load(gacc_ptr + groups * _GROUP_SLOTS + _GROUP_SUBJECT_LIVE, mask=mask, other=0.0) > 0.0
    style_live = tl.load(gacc_ptr + groups * _GROUP_SLOTS + _GROUP_STYLE_LIVE, mask=mask, other=0.0) > 0.0
    take = _decide(subject_score, style_score, subject_live, style_live, HAS_SUBJECT, HAS_STYLE)
    return subject_score, style_score, take


# ============================================================================ speculate helpers

@triton.jit
def _kl_tile_stats(y0m, d, mask_n):
    """Per-row (max, sum exp, sum exp * d) of y1 = y0 + d over this tile's columns."""
    y1 = y0m + d  # masked columns stay -inf
    m1 = tl.max(y1, axis=1)
    e1 = tl.exp(y1 - m1[:, None])
    return m1, tl.sum(e1, axis=1), tl.sum(tl.where(mask_n[None, :], e1 * d, 0.0), axis=1)


@triton.jit
def _tile_live(delta, mask_n):
    """1.0 per row where the delta has a non-zero element in this tile's columns."""
    return tl.max(tl.where(mask_n[None, :] & (delta != 0.0), 1.0, 0.0), axis=1)


@triton.jit
def _kl_row_score(y1_max, y1_sumexp, y1_exp_delta, y0_max, y0_sumexp):
    """KL(P(y1)||P(y0)) = E_q1[d] - (LSE(y1) - LSE(y0)) from whole-row statistics; the LSE difference is
    taken as (m1 - m0) + log(s1 / s0) so the large LSEs never cancel in fp32."""
    return y1_exp_delta / y1_sumexp - (y1_max - y0_max) - tl.log(y1_sumexp / y0_sumexp)


@triton.jit
def _cosine_row_score(dot_y0, y1_sqnorm, y0_sqnorm):
    """1 - cos(y1, y0) from whole-row sums, each norm clamped at eps=1e-12 as torch's cosine_similarity."""
    return 1.0 - dot_y0 / (tl.maximum(tl.sqrt(y1_sqnorm), 1e-12) * tl.maximum(tl.sqrt(y0_sqnorm), 1e-12))


@triton.jit
def _store_tile_stats(part_ptrs, stat_stride, mask_m, mask_n, y0, subject_delta, style_delta,
                      DIVERGENCE: tl.constexpr, LIVE_SLOT: tl.constexpr, HAS_SUBJECT: tl.constexpr,
                      HAS_STYLE: tl.constexpr):
    """This N-tile's per-row partial statistics (and liveness flags) into their slots."""
    if DIVERGENCE == _DIVERGENCE_KL:
        y0m = tl.where(mask_n[None, :], y0, float("-inf"))
        y0_max = tl.max(y0m, axis=1)
        y0_sumexp = tl.sum(tl.exp(y0m - y0_max[:, None]), axis=1)
        subject_max, subject_sumexp, subject_exp_delta = _kl_tile_stats(y0m, subject_delta, mask_n)
        style_max, style_sumexp, style_exp_delta = _kl_tile_stats(y0m, style_delta, mask_n)
        tl.store(part_ptrs + _STAT_Y0_MAX * stat_stride, y0_max, mask=mask_m)
        tl.store(part_ptrs + _STAT_Y0_SUMEXP * stat_stride, y0_sumexp, mask=mask_m)
        tl.store(part_ptrs + _STAT_SUBJECT_MAX * stat_stride, subject_max, mask=mask_m)
        tl.store(part_ptrs + _STAT_SUBJECT_SUMEXP * stat_stride, subject_sumexp, mask=mask_m)
        tl.store(part_ptrs + _STAT_SUBJECT_EXP_DELTA * stat_stride, subject_exp_delta, mask=mask_m)
        tl.store(part_ptrs + _STAT_STYLE_MAX * stat_stride, style_max, mask=mask_m)
        tl.store(part_ptrs + _STAT_STYLE_SUMEXP * stat_stride, style_sumexp, mask=mask_m)
        tl.store(part_ptrs + _STAT_STYLE_EXP_DELTA * stat_stride, style_exp_delta, mask=mask_m)
    else:  # cosine / dot: plain sums (masked columns of y0, d are exact zeros)
        y1_subject = y0 + subject_delta
        y1_style = y0 + style_delta
        tl.store(part_ptrs + _STAT_SUBJECT_DOT_Y0 * stat_stride, tl.sum(y1_subject * y0, axis=1), mask=mask_m)
        tl.store(part_ptrs + _STAT_STYLE_DOT_Y0 * stat_stride, tl.sum(y1_style * y0, axis=1), mask=mask_m)
        if DIVERGENCE == _DIVERGENCE_COSINE:
            tl.store(part_ptrs + _STAT_Y0_SQNORM * stat_stride, tl.sum(y0 * y0, axis=1), mask=mask_m)
            tl.store(part_ptrs + _STAT_SUBJECT_SQNORM * stat_stride, tl.sum(y1_subject * y1_subject, axis=1),
                     mask=mask_m)
            tl.store(part_ptrs + _STAT_STYLE_SQNORM * stat_stride, tl.sum(y1_style * y1_style, axis=1), mask=mask_m)
    if HAS_SUBJECT and HAS_STYLE:  # does the row's delta have a non-zero element in this tile
        subject_live = _tile_live(subject_delta, mask_n)
        style_live = _tile_live(style_delta, mask_n)
        tl.store(part_ptrs + (LIVE_SLOT + _LIVE_SUBJECT) * stat_stride, subject_live, mask=mask_m)
        tl.store(part_ptrs + (LIVE_SLOT + _LIVE_STYLE) * stat_stride, style_live, mask=mask_m)


@triton.jit
def _merge_lse(m, s, t, m_new_tile, s_tile, t_tile):
    """Combine running (max, sum exp, weighted sum) with one more tile's partials, exactly."""
    m_new = tl.maximum(m, m_new_tile)
    a = tl.exp(m - m_new)
    b = tl.exp(m_new_tile - m_new)
    return m_new, s * a + s_tile * b, t * a + t_tile * b


@triton.jit
def _load_stat(row_ptrs, slot, stat_stride, mask_m, other):
    # .cg: read from L2, other programs wrote these
    return tl.load(row_ptrs + slot * stat_stride, mask=mask_m, other=other, cache_modifier=".cg")


@triton.jit
def _row_scores(row_ptrs, M, stat_stride, num_pid_n, mask_m, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's subject and style score from the partial statistics of all its N-tiles."""
    if DIVERGENCE == _DIVERGENCE_KL:
        y0_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        y0_sumexp = tl.zeros((BLOCK_M,), tl.float32)
        subject_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        subject_sumexp = tl.zeros((BLOCK_M,), tl.float32)
        subject_exp_delta = tl.zeros((BLOCK_M,), tl.float32)
        style_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        style_sumexp = tl.zeros((BLOCK_M,), tl.float32)
        style_exp_delta = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            tile_y0_max = _load_stat(p, _STAT_Y0_MAX, stat_stride, mask_m, 0.0)
            tile_y0_sumexp = _load_stat(p, _STAT_Y0_SUMEXP, stat_stride, mask_m, 1.0)
            tile_subject_max = _load_stat(p, _STAT_SUBJECT_MAX, stat_stride, mask_m, 0.0)
            tile_subject_sumexp = _load_stat(p, _STAT_SUBJECT_SUMEXP, stat_stride, mask_m, 1.0)
            tile_subject_exp_delta = _load_stat(p, _STAT_SUBJECT_EXP_DELTA, stat_stride, mask_m, 0.0)
            tile_style_max = _load_stat(p, _STAT_STYLE_MAX, stat_stride, mask_m, 0.0)
            tile_style_sumexp = _load_stat(p, _STAT_STYLE_SUMEXP, stat_stride, mask_m, 1.0)
            tile_style_exp_delta = _load_stat(p, _STAT_STYLE_EXP_DELTA, stat_stride, mask_m, 0.0)
            y0_max, y0_sumexp, _unused = _merge_lse(y0_max, y0_sumexp, y0_sumexp, tile_y0_max, tile_y0_sumexp,
                                                    tile_y0_sumexp)
            subject_max, subject_sumexp, subject_exp_delta = _merge_lse(
                subject_max, subject_sumexp, subject_exp_delta, tile_subject_max, tile_subject_sumexp,
                tile_subject_exp_delta)
            style_max, style_sumexp, style_exp_delta = _merge_lse(
                style_max, style_sumexp, style_exp_delta, tile_style_max, tile_style_sumexp, tile_style_exp_delta)
        row_subject = _kl_row_score(subject_max, subject_sumexp, subject_exp_delta, y0_max, y0_sumexp)
        row_style = _kl_row_score(style_max, style_sumexp, style_exp_delta, y0_max, y0_sumexp)
    else:
        subject_dot = tl.zeros((BLOCK_M,), tl.float32)
        style_dot = tl.zeros((BLOCK_M,), tl.float32)
        y0_sqnorm = tl.zeros((BLOCK_M,), tl.float32)
        subject_sqnorm = tl.zeros((BLOCK_M,), tl.float32)
        style_sqnorm = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            subject_dot += _load_stat(p, _STAT_SUBJECT_DOT_Y0, stat_stride, mask_m, 0.0)
            style_dot += _load_stat(p, _STAT_STYLE_DOT_Y0, stat_stride, mask_m, 0.0)
            if DIVERGENCE == _DIVERGENCE_COSINE:
                y0_sqnorm += _load_stat(p, _STAT_Y0_SQNORM, stat_stride, mask_m, 0.0)
                subject_sqnorm += _load_stat(p, _STAT_SUBJECT_SQNORM, stat_stride, mask_m, 0.0)
                style_sqnorm += _load_stat(p, _STAT_STYLE_SQNORM, stat_stride, mask_m, 0.0)
        if DIVERGENCE == _DIVERGENCE_COSINE:
            row_subject = _cosine_row_score(subject_dot, subject_sqnorm, y0_sqnorm)
            row_style = _cosine_row_score(style_dot, style_sqnorm, y0_sqnorm)
        else:
            row_subject = -subject_dot
            row_style = -style_dot
    return tl.where(mask_m, row_subject, 0.0), tl.where(mask_m, row_style, 0.0)


@triton.jit
def _row_liveness(row_ptrs, M, stat_stride, num_pid_n, mask_m, LIVE_SLOT: tl.constexpr, HAS_SUBJECT: tl.constexpr,
                  HAS_STYLE: tl.constexpr, BLOCK_M: tl.constexpr):
    """1.0 where the row's subject (style) delta has a non-zero element in any of its N-tiles."""
    subject_live = tl.zeros((BLOCK_M,), tl.float32)
    style_live = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_SUBJECT and HAS_STYLE:
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            subject_live = tl.maximum(subject_live, _load_stat(p, LIVE_SLOT + _LIVE_SUBJECT, stat_stride, mask_m, 0.0))
            style_live = tl.maximum(style_live, _load_stat(p, LIVE_SLOT + _LIVE_STYLE, stat_stride, mask_m, 0.0))
    return subject_live, style_live


@triton.jit
def _accumulate_groups(gacc_ptr, group, mask_m, row_subject, row_style, subject_live, style_live, num_groups,
                       HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr):
    """Add the rows' scores, counts and liveness into their groups' sums: one scalar atomic per slot
    when the tile lies in one group (the usual case: groups are images, contiguous runs of rows),
    else one atomic per row."""
    g_lo = tl.min(tl.where(mask_m, group, num_groups), axis=0)
    g_hi = tl.max(tl.where(mask_m, group, -1), axis=0)
    if g_lo == g_hi:
        sums = gacc_ptr + g_lo * _GROUP_SLOTS  # one group's slots
        tl.atomic_add(sums + _GROUP_SUBJECT_SUM, tl.sum(row_subject, axis=0))
        tl.atomic_add(sums + _GROUP_STYLE_SUM, tl.sum(row_style, axis=0))
        tl.atomic_add(sums + _GROUP_ROWS, tl.sum(mask_m.to(tl.float32), axis=0))
        if HAS_SUBJECT and HAS_STYLE:
            tl.atomic_add(sums + _GROUP_SUBJECT_LIVE, tl.sum(subject_live, axis=0))
            tl.atomic_add(sums + _GROUP_STYLE_LIVE, tl.sum(style_live, axis=0))
    else:
        row_sums = gacc_ptr + group * _GROUP_SLOTS  # each row's group's slots
        tl.atomic_add(row_sums + _GROUP_SUBJECT_SUM, row_subject, mask=mask_m)
        tl.atomic_add(row_sums + _GROUP_STYLE_SUM, row_style, mask=mask_m)
        tl.atomic_add(row_sums + _GROUP_ROWS, mask_m.to(tl.float32), mask=mask_m)
        if HAS_SUBJECT and HAS_STYLE:
            tl.atomic_add(row_sums + _GROUP_SUBJECT_LIVE, subject_live, mask=mask_m)
            tl.atomic_add(row_sums + _GROUP_STYLE_LIVE, style_live, mask=mask_m)


# ============================================================================ the two kernels

@triton.jit
def _fls_speculate_kernel(
    x_ptr,  # (M, K), unit stride along K; read only when BASE == _BASE_COMPUTED
    w_ptr,  # (N, K) contiguous: the base weight; read only when BASE == _BASE_COMPUTED
    bias_ptr,  # (N,); read only when HAS_BIAS and BASE == _BASE_COMPUTED
    y0_ptr,  # (M, N) x's dtype: F.linear(x, W, b) (cuBLAS); read only when BASE == _BASE_LOADED
    xa_ptr,  # (M, style_offset + pad(style_rank)): x [subject_a; style_a]^T (lora_shrink)
    subject_b_ptr,  # (N, subject_rank) contiguous
    style_b_ptr,  # (N, style_rank) contiguous
    row_group_ptr,  # (M,) int32/int64: each row's decision group in [0, num_groups)
    guess_ptr,  # (num_groups,) uint8: the speculated decisions (1 = subject); read only when HAS_GUESS
    out_ptr,  # (M, N) out, x's dtype: y0 + d_guess
    part_ptr,  # (LIVE_SLOT + NUM_LIVE, num_pid_n, M) float32 scratch: per-tile partial statistics
    ticket_ptr,  # (cdiv(M, BLOCK_M),) int32, zeroed: N-tiles of each row tile done so far
    gacc_ptr,  # (num_groups, GROUP_SLOTS) float32, zeroed: per-group sums
    M, N, K, subject_rank, style_rank, num_groups, num_pid_n, subject_scale, style_scale,
    stride_xm, stride_wn, stride_y0m, stride_xam, stride_om,
    style_offset,  # first column of the style block in xa
    DIVERGENCE: tl.constexpr, LIVE_SLOT: tl.constexpr, BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr, HAS_GUESS: tl.constexpr, SUBJECT_RANK_PAD: tl.constexpr,
    STYLE_RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Speculate: write y0 + d_guess and the tile's statistics; the row tile's last N-tile reduces
    the rows' scores into the group sums."""
    pid, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, offs_am, group = _tile_coords(
        row_group_ptr, M, N, num_pid_n, BLOCK_M, BLOCK_N)
    guess = _guessed_rows(guess_ptr, group, HAS_SUBJECT, HAS_STYLE, HAS_GUESS, BLOCK_M)
    y0, subject_delta, style_delta = _base_and_delta_tiles(
        x_ptr, w_ptr, bias_ptr, y0_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n, K, subject_rank,
        style_rank, subject_scale, style_scale, stride_xm, stride_wn, stride_y0m, stride_xam, style_offset, BASE,
        HAS_BIAS, HAS_SUBJECT, HAS_STYLE, SUBJECT_RANK_PAD, STYLE_RANK_PAD, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
        DOT_PRECISION)
    out = tl.where(guess[:, None], y0 + subject_delta, y0 + style_delta)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # layout (slot, n_tile, row): a tile's stores are coalesced
    stat_stride = num_pid_n * M
    _store_tile_stats(part_ptr + pid_n * M + offs_m, stat_stride, mask_m, mask_n, y0, subject_delta, style_delta,
                      DIVERGENCE, LIVE_SLOT, HAS_SUBJECT, HAS_STYLE)

    # the last N-tile of this row tile to arrive reduces the row (split-K style ticket)
    tl.debug_barrier()  # all threads' partial stores are issued before the release below
    ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel")
    if ticket == num_pid_n - 1:
        row_ptrs = part_ptr + offs_m
        row_subject, row_style = _row_scores(row_ptrs, M, stat_stride, num_pid_n, mask_m, DIVERGENCE, BLOCK_M)
        subject_live, style_live = _row_liveness(row_ptrs, M, stat_stride, num_pid_n, mask_m, LIVE_SLOT,
                                                 HAS_SUBJECT, HAS_STYLE, BLOCK_M)
        _accumulate_groups(gacc_ptr, group, mask_m, row_subject, row_style, subject_live, style_live, num_groups,
                           HAS_SUBJECT, HAS_STYLE)


@triton.jit
def _fls_fix_up_kernel(
    x_ptr,  # (M, K), unit stride along K; read only when BASE == _BASE_COMPUTED
    w_ptr,  # (N, K) contiguous; read only when BASE == _BASE_COMPUTED
    bias_ptr,  # (N,); read only when HAS_BIAS and BASE == _BASE_COMPUTED
    y0_ptr,  # (M, N) x's dtype: the y0 the speculate kernel read; read only when BASE == _BASE_LOADED
    xa_ptr,  # (M, style_offset + pad(style_rank)): the shrink buffer
    subject_b_ptr,  # (N, subject_rank) contiguous
    style_b_ptr,  # (N, style_rank) contiguous
    row_group_ptr,  # (M,) int32/int64
    guess_ptr,  # (num_groups,) uint8; read only when HAS_GUESS
    out_ptr,  # (M, N) in/out: rows whose guess was wrong are rewritten
    gacc_ptr,  # (num_groups, GROUP_SLOTS) float32: the final group sums
    subject_score_ptr,  # (num_groups,) float32 out
    style_score_ptr,  # (num_groups,) float32 out
    choice_ptr,  # (num_groups,) uint8 out (viewed as bool by the launcher)
    M, N, K, subject_rank, style_rank, num_groups, num_pid_n, subject_scale, style_scale,
    stride_xm, stride_wn, stride_y0m, stride_xam, stride_om,
    style_offset,  # first column of the style block in xa
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SUBJECT: tl.constexpr, HAS_STYLE: tl.constexpr,
    HAS_GUESS: tl.constexpr, SUBJECT_RANK_PAD: tl.constexpr, STYLE_RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decide + fix up: the decision is final; recompute and rewrite the rows whose guess was wrong.
    Program 0 also writes every group's scores and decision."""
    pid, pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, offs_am, group = _tile_coords(
        row_group_ptr, M, N, num_pid_n, BLOCK_M, BLOCK_N)
    guess = _guessed_rows(guess_ptr, group, HAS_SUBJECT, HAS_STYLE, HAS_GUESS, BLOCK_M)
    _, _, take = _group_decision(gacc_ptr, group, mask_m, HAS_SUBJECT, HAS_STYLE)
    wrong = (take != guess) & mask_m
    if tl.max(wrong.to(tl.int32), axis=0) > 0:
        y0, subject_delta, style_delta = _base_and_delta_tiles(
            x_ptr, w_ptr, bias_ptr, y0_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n, K,
            subject_rank, style_rank, subject_scale, style_scale, stride_xm, stride_wn, stride_y0m, stride_xam,
            style_offset, BASE, HAS_BIAS, HAS_SUBJECT, HAS_STYLE, SUBJECT_RANK_PAD, STYLE_RANK_PAD, BLOCK_M, BLOCK_N,
            BLOCK_K, EVEN_K, DOT_PRECISION)
        out = tl.where(take[:, None], y0 + subject_delta, y0 + style_delta)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=wrong[:, None] & mask_n[None, :])
    if pid == 0:
        for g0 in range(0, num_groups, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_g = offs_g < num_groups
            subject_score, style_score, take_g = _group_decision(gacc_ptr, offs_g, mask_g, HAS_SUBJECT, HAS_STYLE)
            tl.store(subject_score_ptr + offs_g, subject_score, mask=mask_g)
            tl.store(style_score_ptr + offs_g, style_score, mask=mask_g)
            tl.store(choice_ptr + offs_g, take_g.to(tl.uint8), mask=mask_g)


# ============================================================================ launcher

def fls_linear_fwd(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale, row_group,
                   num_groups, divergence="kl", prev_choice=None, base=None):
    """Launch the fused FLS linear. Same contract as ``fusion_engine.ops.reference.fls_linear``
    for ``divergence`` in ``DIVERGENCE_CODES`` (kl, cosine, dot).

    Args:
        x: (M, K) activations (fp16, bf16 or fp32); the output has its dtype.
        weight, bias: the base linear, (N, K) and (N,) or None.
        subject_a, subject_b, style_a, style_b: (r, K) and (N, r) factors; r == 0 for an absent LoRA.
        subject_scale, style_scale: the LoRA scales (alpha / rank).
        row_group: (M,) int32/int64, each row's decision group in [0, num_groups).
        num_groups: G.
        divergence: "kl", "cosine" or "dot".
        prev_choice: optional (G,) bool/uint8 device tensor, the decisions of the previous call of
            this layer; used only as the speculation guess (a wrong guess costs time, never accuracy).
        base: where y0 comes from: "fused" (the kernels' own GEMM), "cublas" (the split variant:
            ``F.linear`` into a y0 buffer the kernels read; see the module docstring), or None for the
            size-class default of ``fusion_engine.kernels.utils.fls_base_config``.

    Returns:
        (out, subject_score, style_score, choice): out (M, N) in x.dtype, scores float32 (G,),
        choice bool (G,).
    """
    stream, fast = launch_context()
    if fast:
        key = plan_key((x, weight, bias, subject_a, subject_b, style_a, style_b, row_group, prev_choice),
                       num_groups, divergence, base, stream)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(stream, x, weight, bias, subject_a, subject_b, float(subject_scale), style_a, style_b,
                        float(style_scale), row_group, prev_choice)
    require(divergence in DIVERGENCE_CODES, lambda: f"fls_linear: the fused kernel supports "
            f"{tuple(DIVERGENCE_CODES)}, not {divergence!r}")
    check_lora_linear_inputs("fls_linear", x, weight, bias, subject_a, subject_b, style_a, style_b)
    M, K = x.shape
    N = weight.shape[0]
    G = int(num_groups)
    require(G >= 0, lambda: f"fls_linear: num_groups must be >= 0, got {G}")
    require(tuple(row_group.shape) == (M,) and row_group.dtype in ROW_GROUP_DTYPES and row_group.device == x.device,
            lambda: f"fls_linear: row_group must be (M={M},) int32/int64 on {x.device}, got "
            f"{tuple(row_group.shape)} {row_group.dtype} on {row_group.device}")
    require(prev_choice is None or (tuple(prev_choice.shape) == (G,) and prev_choice.dtype in (torch.bool, torch.uint8)
                                    and prev_choice.device == x.device),
            lambda: f"fls_linear: prev_choice must be (G={G},) bool/uint8 on {x.device}, got "
            f"{None if prev_choice is None else (tuple(prev_choice.shape), prev_choice.dtype, prev_choice.device)}")
    base = base_mode(base, M, N, K, "fls_linear")
    code = DIVERGENCE_CODES[divergence]
    subject_rank, style_rank = subject_a.shape[0], style_a.shape[0]
    dev = x.device

    out = new_empty((M, N), x.dtype, dev)
    subject_score = new_empty((G,), torch.float32, dev)
    style_score = new_empty((G,), torch.float32, dev)
    choice = new_empty((G,), torch.uint8, dev)
    if M == 0 or G == 0:
        # nothing to reduce: every group is empty, its mean 0 (as reference.group_mean)
        subject_score.zero_()
        style_score.zero_()
        choice.fill_(0 if (style_rank > 0 and subject_rank == 0) else 1)
        return out, subject_score, style_score, choice.view(torch.bool)

    operands = as_operands(x, weight, bias, subject_a, subject_b, style_a, style_b)
    # a plan replays with the caller's tensors, so only when as_operands changed none of them
    planned = (fast and subject_rank + style_rank > 0 and all(a is b for a, b in zip(
        operands, (x, weight, bias, subject_a, subject_b, style_a, style_b))) and row_group.is_contiguous()
        and may_plan())
    x, weight, bias, subject_a, subject_b, style_a, style_b = operands
    row_group = row_group.contiguous()
    launches = [] if planned else None
    xa, style_offset = lora_shrink(x, subject_a, style_a, launches)

    cfg = gemm_config(M, N, K, "fls")
    # split: the merged layer's own cuBLAS call, into a buffer of its own (the kernels never overwrite it)
    y0 = cublas_linear(x, weight, bias) if base == "cublas" else None
    num_pid_m, num_pid_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    live_slot = NUM_STATS[code]
    part = new_empty((live_slot + NUM_LIVE, num_pid_n, M), torch.float32, dev)
    # one memset for the tickets (int32) and the group sums (float32 zeros are zero bits)
    workspace = torch.zeros((num_pid_m + GROUP_SLOTS * G,), dtype=torch.int32, device=dev)
    ticket, gacc = workspace[:num_pid_m], workspace[num_pid_m:].view(torch.float32)
    guess = prev_choice
    if guess is not None and guess.dtype == torch.bool:
        guess = guess.view(torch.uint8)

    shared = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, y0_ptr=y0 if y0 is not None else x,
        xa_ptr=xa if xa is not None else x,
        subject_b_ptr=subject_b, style_b_ptr=style_b, row_group_ptr=row_group,
        guess_ptr=guess if guess is not None else choice, out_ptr=out, gacc_ptr=gacc,
        M=M, N=N, K=K, subject_rank=subject_rank, style_rank=style_rank, num_groups=G, num_pid_n=num_pid_n,
        subject_scale=float(subject_scale), style_scale=float(style_scale),
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_y0m=y0.stride(0) if y0 is not None else 0,
        stride_xam=xa.stride(0) if xa is not None else 0, stride_om=out.stride(0), style_offset=style_offset,
        BASE=BASE_CODES[base], HAS_BIAS=bias is not None, HAS_SUBJECT=subject_rank > 0, HAS_STYLE=style_rank > 0,
        HAS_GUESS=guess is not None, SUBJECT_RANK_PAD=dot_pad(subject_rank), STYLE_RANK_PAD=dot_pad(style_rank),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    grid = (num_pid_m * num_pid_n,)
    launch(_fls_speculate_kernel, grid, launches, _SPECULATE_VARYING, part_ptr=part, ticket_ptr=ticket,
           DIVERGENCE=code, LIVE_SLOT=live_slot, **shared)
    launch(_fls_fix_up_kernel, grid, launches, _FIX_UP_VARYING, subject_score_ptr=subject_score,
           style_score_ptr=style_score, choice_ptr=choice,
           BLOCK_G=min(1024, max(16, triton.next_power_of_2(G))), **shared)
    if planned and all(launches):
        keep_plan(_PLANS, key, _FLSPlan(launches, out.shape, G, x.dtype, dev, workspace, base == "cublas",
                                        guess is not None))
    return out, subject_score, style_score, choice.view(torch.bool)


# the arguments a replay passes per call (utils.KernelLaunch); the rest (scratch, sizes, flags) is the plan's
_SPECULATE_VARYING = ("x_ptr", "w_ptr", "bias_ptr", "y0_ptr", "subject_b_ptr", "style_b_ptr", "row_group_ptr",
                      "guess_ptr", "out_ptr", "subject_scale", "style_scale")
_FIX_UP_VARYING = _SPECULATE_VARYING + ("subject_score_ptr", "style_score_ptr", "choice_ptr")
_PLANS: dict = {}


class _FLSPlan:
    """The launches of one planned ``fls_linear_fwd`` key (see ``utils.KernelLaunch``): shrink, speculate, fix-up
    into the plan's shrink / statistics buffers, the workspace zeroed in place, fresh outputs."""

    def __init__(self, launches, out_shape, groups, dtype, device, workspace, split, has_guess):
        self.shrink, self.speculate, self.fix_up = launches
        self.out_shape, self.groups, self.dtype, self.device = out_shape, groups, dtype, device
        self.workspace, self.split, self.has_guess = workspace, split, has_guess

    def __call__(self, stream, x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale,
                 row_group, prev_choice):
        dev, groups = self.device, self.groups
        out = new_empty(self.out_shape, self.dtype, dev)
        subject_score = new_empty((groups,), torch.float32, dev)
        style_score = new_empty((groups,), torch.float32, dev)
        choice = new_empty((groups,), torch.uint8, dev)
        self.workspace.zero_()
        self.shrink(stream, x, subject_a, style_a)
        y0 = cublas_linear(x, weight, bias) if self.split else x
        guess = choice if prev_choice is None else (
            prev_choice.view(torch.uint8) if prev_choice.dtype == torch.bool else prev_choice)
        tensors = (x, weight, x if bias is None else bias, y0, subject_b, style_b, row_group, guess, out,
                   subject_scale, style_scale)
        self.speculate(stream, *tensors)
        self.fix_up(stream, *tensors, subject_score, style_score, choice)
        return out, subject_score, style_score, choice.view(torch.bool)
