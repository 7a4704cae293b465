"""Pooled N-way FLS linear: every sample of the batch runs Feature-Level Selection over its own LoRAs from a pool
(a slot table), with no host synchronisation and a shape-only grid.

Contract: ``fusion_engine.ops.pooled.pooled_fls_linear``. Per decision group, among the ``L`` positions of its
samples' slot rows, a position is a *candidate* when its slot is valid (>= 0) and present at the layer, and *live*
when its delta is non-zero somewhere in the group; the live candidate with the largest score wins, ties to the
earlier position; no live candidate: the first candidate; no candidate: the base output (choice -1).

Mechanism: ``fls_linear``'s "speculate, then fix up exactly", generalised from a pair to ``L`` positions gathered
from the slot table (SGMV-style segments, as ``pooled_mix_linear``). One program owns a BLOCK_M x BLOCK_N tile
*inside one sample* (rows clamped into the sample), so the tile's slots are scalars read on the device. The grid
is ``B * cdiv(T, BLOCK_M) * cdiv(N, BLOCK_N)``, the N-tiles of a row tile adjacent: shapes only, never the slot
table or the decisions, so a step can be captured in a CUDA graph and the assignment changed between replays.

* the pooled shrink (``lora_shrink.pooled_lora_shrink``, its own launch): x_b A_slot^T once per row and position,
  rounded to x's dtype as eager LoRA does, each slot at its own padded rank (not the widest slot's).
* ``_pooled_fls_speculate_kernel``: the tile's y0 in fp32 (its own GEMM, or loaded from cuBLAS's ``F.linear`` for
  ``base="cublas"``, the split variant of ``fls_linear``, same exactness argument: y0 lives in a buffer of its own
  that the fix-up re-reads), then for each of the ``NUM_POSITIONS`` positions (a constexpr, 1..4 in practice) the
  position's delta ``scales[slot] * (x A_slot^T) B_slot^T`` (zeros for slot -1; the expand of the shrink's block
  at the slot's width), its per-row partial statistics
  against y0 and its per-row "non-zero here" flag. Only the guessed position's delta is kept (a select, so no
  position needs its tile alive after its statistics are stored); the tile writes y0 + d_guess, the guess being
  the caller's ``prev_choice`` for the row's group (e.g. the layer's last step), else position 0. The last N-tile
  of a row tile to finish (an atomic ticket) combines the partials of the whole rows exactly (running max /
  rescaled sums for kl, plain sums for cosine and dot: ``fls_linear``'s helpers), and atomically adds into
  float32 per-group sums: the row count, and per position the rows' scores, live rows and candidate rows.
* ``_pooled_fls_fix_up_kernel``: every program reads its rows' final group sums, takes the decision, and only
  where it differs from the guess recomputes the tile (y0 and the chosen positions' deltas by the same helpers,
  so bit-identical to a correct guess) and rewrites those rows. Program 0 also writes every group's (G, L)
  scores and (G,) choices. A right guess costs a few loads per program; a wrong one the affected tiles only.

The output is exactly y0 + d_chosen for THIS call, whatever the guess. Group scores are float32 sums by atomics: on
a GPU their order varies between runs, so two positions with bitwise-equal deltas (the same LoRA named twice, which
an assignment refuses) may differ in the last bit and their tie go either way; the interpreter's order is fixed. The
stacks hold every slot at the layer's largest rank, zero-padded; the kernels read each slot only up to its own
padded rank (``slot_ranks``; padded ranks add exact zeros). JS divergence needs the rows' LSEs before a second
sweep: it stays on the reference path (see fusion_engine/ops/triton_ops.py). Forward only: no autograd is registered
for this op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fls_linear import (
    _STAT_Y0_MAX,
    _STAT_Y0_SUMEXP,
    _cosine_row_score,
    _kl_row_score,
    _kl_tile_stats,
    _load_stat,
    _merge_lse,
    _tile_live,
)
from .lora_shrink import _slot_expand, _slot_rank, check_slot_ranks, pooled_lora_shrink
from .pooled_mix_linear import check_pool_inputs, pool_operands
from .utils import (
    _DIVERGENCE_COSINE,
    _DIVERGENCE_KL,
    BASE_CODES,
    DIVERGENCE_CODES,
    ROW_GROUP_DTYPES,
    _base_tile,
    base_mode,
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

# ---- per-(row, N-tile) partial statistics: slots of the `part` buffer (slot, n_tile, row)
# kl: y0's (max, sum exp) at the pair kernel's slots (_STAT_Y0_MAX, _STAT_Y0_SUMEXP, shared), then per position l
# the (max, sum exp, sum exp * d_l) of y1_l = y0 + d_l
_KL_FIRST = tl.constexpr(2)  # slot of position 0's first statistic
_KL_MAX = tl.constexpr(0)  # offsets inside one position's block
_KL_SUMEXP = tl.constexpr(1)
_KL_EXP_DELTA = tl.constexpr(2)
_KL_PER_POSITION = tl.constexpr(3)
# cosine: y0's squared norm (not at the pair kernel's _STAT_Y0_SQNORM slot: a name of its own), then per position
# (y1_l . y0, |y1_l|^2); dot: per position y1_l . y0
_POOL_STAT_Y0_SQNORM = tl.constexpr(0)
_COSINE_FIRST = tl.constexpr(1)
_COSINE_DOT_Y0 = tl.constexpr(0)
_COSINE_SQNORM = tl.constexpr(1)
_COSINE_PER_POSITION = tl.constexpr(2)
# after the score statistics (at LIVE_SLOT = num_stats(...)), per position: "any d_l != 0 in this tile's row"


def num_stats(code: int, positions: int) -> int:
    """Score statistics per (row, N-tile) for a divergence code and ``positions`` positions (see the slots above)."""
    if code == DIVERGENCE_CODES["kl"]:
        return _KL_FIRST.value + _KL_PER_POSITION.value * positions
    if code == DIVERGENCE_CODES["cosine"]:
        return _COSINE_FIRST.value + _COSINE_PER_POSITION.value * positions
    return positions  # dot


# ---- per-group float32 accumulators: slots of the `gacc` buffer (group, 1 + 3 * NUM_POSITIONS); the pair kernel's
# layout differs (its _GROUP_* names), so these names are the pool's own
_POOL_GROUP_ROWS = tl.constexpr(0)
_GROUP_FIRST = tl.constexpr(1)  # slot of position 0's first sum
_GROUP_SCORE_SUM = tl.constexpr(0)  # offsets inside one position's block: the rows' scores
_GROUP_LIVE = tl.constexpr(1)  # rows whose delta is non-zero
_GROUP_CANDIDATE = tl.constexpr(2)  # rows whose slot is valid and present at the layer
_GROUP_PER_POSITION = tl.constexpr(3)


def group_slots(positions: int) -> int:
    return _GROUP_FIRST.value + _GROUP_PER_POSITION.value * positions


# ============================================================================ shared tile helpers

@triton.jit
def _sample_tile_coords(row_group_ptr, T, N, num_pid_t, num_pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row tile (sample-major, then the sample's tiles), sample, column tile, masks, rows clamped
    into the sample and the rows' groups."""
    pid = tl.program_id(0)
    pid_row = pid // num_pid_n  # N-tiles of one row tile are adjacent: they share x and finish close together
    pid_n = pid % num_pid_n
    sample = pid_row // num_pid_t
    offs_t = (pid_row % num_pid_t) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_t < T
    mask_n = offs_n < N
    offs_am = sample * T + tl.minimum(offs_t, T - 1)  # clamped: loads need no row mask, stores are masked
    group = tl.load(row_group_ptr + offs_am)
    return pid, pid_row, pid_n, sample, offs_n, mask_m, mask_n, offs_am, group


@triton.jit
def _guessed_positions(guess_ptr, group, HAS_GUESS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The speculated position per row (int32; -1 = base): the caller's guess for the row's group, else 0."""
    if HAS_GUESS:
        guess = tl.load(guess_ptr + group).to(tl.int32)
    else:
        guess = tl.zeros((BLOCK_M,), tl.int32)  # no state yet: guess the first position
    return guess


@triton.jit
def _position_delta(xa_ptr, b_ptr, ranks_ptr, scales_ptr, slots_ptr, sample, position, offs_am, offs_n, mask_n, N, R,
                    stride_xam, NUM_POSITIONS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    RANK_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 tile of position ``position``'s scaled delta for this sample (zeros for slot -1), from the pooled
    shrink's block. Both kernels compute their deltas here, so a fixed-up tile is bit-identical to a correctly
    guessed one."""
    slot = tl.load(slots_ptr + sample * NUM_POSITIONS + position)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if slot >= 0:
        delta = tl.load(scales_ptr + slot) * _slot_expand(xa_ptr, b_ptr + slot * N * R, offs_am, offs_n, mask_n,
                                                          _slot_rank(ranks_ptr, slot, R), R, stride_xam,
                                                          position * RANK_PAD, RANK_PAD, BLOCK_M, BLOCK_N,
                                                          DOT_PRECISION)
    return delta


@triton.jit
def _group_score(sums, rows, position):
    """Mean score of one position from the group sums at ``sums`` (the group's slots), ``rows`` clamped at 1."""
    return tl.load(sums + _GROUP_FIRST + position * _GROUP_PER_POSITION + _GROUP_SCORE_SUM) / rows


@triton.jit
def _group_rows(sums):
    return tl.maximum(tl.load(sums + _POOL_GROUP_ROWS), 1.0)


@triton.jit
def _group_choice(gacc_ptr, groups, NUM_POSITIONS: tl.constexpr, GROUP_STRIDE: tl.constexpr):
    """The decision (int32 position, -1 = base) of the given groups from their final sums: the live candidate
    with the largest mean score (ties: the earlier position), else the first candidate, else -1."""
    sums = gacc_ptr + groups * GROUP_STRIDE
    rows = _group_rows(sums)
    best = tl.full(groups.shape, -1, tl.int32)
    best_score = tl.zeros(groups.shape, tl.float32)
    first_candidate = tl.full(groups.shape, -1, tl.int32)
    for position in tl.static_range(NUM_POSITIONS):
        block = sums + _GROUP_FIRST + position * _GROUP_PER_POSITION
        score = _group_score(sums, rows, position)
        candidate = tl.load(block + _GROUP_CANDIDATE) > 0.0
        usable = candidate & (tl.load(block + _GROUP_LIVE) > 0.0)
        better = usable & ((best < 0) | (score > best_score))  # strictly larger: ties stay with the earlier one
        best = tl.where(better, position, best)
        best_score = tl.where(better, score, best_score)
        first_candidate = tl.where(candidate & (first_candidate < 0), position, first_candidate)
    return tl.where(best >= 0, best, first_candidate)


# ============================================================================ speculate helpers

@triton.jit
def _store_base_stats(part_ptrs, stat_stride, mask_m, mask_n, y0, DIVERGENCE: tl.constexpr):
    """y0's per-row partials of this N-tile: (max, sum exp) for kl, the squared norm for cosine, none for dot."""
    if DIVERGENCE == _DIVERGENCE_KL:
        y0m = tl.where(mask_n[None, :], y0, float("-inf"))
        y0_max = tl.max(y0m, axis=1)
        tl.store(part_ptrs + _STAT_Y0_MAX * stat_stride, y0_max, mask=mask_m)
        tl.store(part_ptrs + _STAT_Y0_SUMEXP * stat_stride, tl.sum(tl.exp(y0m - y0_max[:, None]), axis=1),
                 mask=mask_m)
    elif DIVERGENCE == _DIVERGENCE_COSINE:
        tl.store(part_ptrs + _POOL_STAT_Y0_SQNORM * stat_stride, tl.sum(y0 * y0, axis=1), mask=mask_m)


@triton.jit
def _store_position_stats(part_ptrs, stat_stride, mask_m, mask_n, y0, delta, position, DIVERGENCE: tl.constexpr,
                          LIVE_SLOT: tl.constexpr):
    """One position's per-row partials of this N-tile against y0, and its liveness flag."""
    if DIVERGENCE == _DIVERGENCE_KL:
        stat = part_ptrs + (_KL_FIRST + position * _KL_PER_POSITION) * stat_stride
        m1, s1, t1 = _kl_tile_stats(tl.where(mask_n[None, :], y0, float("-inf")), delta, mask_n)
        tl.store(stat + _KL_MAX * stat_stride, m1, mask=mask_m)
        tl.store(stat + _KL_SUMEXP * stat_stride, s1, mask=mask_m)
        tl.store(stat + _KL_EXP_DELTA * stat_stride, t1, mask=mask_m)
    else:  # cosine / dot: plain sums (masked columns of y0 and d are exact zeros)
        y1 = y0 + delta
        if DIVERGENCE == _DIVERGENCE_COSINE:
            stat = part_ptrs + (_COSINE_FIRST + position * _COSINE_PER_POSITION) * stat_stride
            tl.store(stat + _COSINE_DOT_Y0 * stat_stride, tl.sum(y1 * y0, axis=1), mask=mask_m)
            tl.store(stat + _COSINE_SQNORM * stat_stride, tl.sum(y1 * y1, axis=1), mask=mask_m)
        else:
            tl.store(part_ptrs + position * stat_stride, tl.sum(y1 * y0, axis=1), mask=mask_m)
    tl.store(part_ptrs + (LIVE_SLOT + position) * stat_stride, _tile_live(delta, mask_n), mask=mask_m)


@triton.jit
def _row_base_stats(row_ptrs, M, stat_stride, num_pid_n, mask_m, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """y0's whole-row statistics from its N-tiles: kl (max, sum exp), cosine (squared norm, unused), dot zeros."""
    first = tl.zeros((BLOCK_M,), tl.float32)
    second = tl.zeros((BLOCK_M,), tl.float32)
    if DIVERGENCE == _DIVERGENCE_KL:
        first = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            tile_sumexp = _load_stat(p, _STAT_Y0_SUMEXP, stat_stride, mask_m, 1.0)
            first, second, _unused = _merge_lse(first, second, second, _load_stat(p, _STAT_Y0_MAX, stat_stride,
                                                                                   mask_m, 0.0),
                                                tile_sumexp, tile_sumexp)
    elif DIVERGENCE == _DIVERGENCE_COSINE:
        for t in range(0, num_pid_n):
            first += _load_stat(row_ptrs + t * M, _POOL_STAT_Y0_SQNORM, stat_stride, mask_m, 0.0)
    return first, second


@triton.jit
def _row_score(row_ptrs, M, stat_stride, num_pid_n, mask_m, y0_first, y0_second, position, DIVERGENCE: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """One position's score per row from the partials of all the row's N-tiles (0 on masked rows)."""
    if DIVERGENCE == _DIVERGENCE_KL:
        y0_max, y0_sumexp = y0_first, y0_second
        first = _KL_FIRST + position * _KL_PER_POSITION
        y1_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        y1_sumexp = tl.zeros((BLOCK_M,), tl.float32)
        y1_exp_delta = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            y1_max, y1_sumexp, y1_exp_delta = _merge_lse(
                y1_max, y1_sumexp, y1_exp_delta, _load_stat(p, first + _KL_MAX, stat_stride, mask_m, 0.0),
                _load_stat(p, first + _KL_SUMEXP, stat_stride, mask_m, 1.0),
                _load_stat(p, first + _KL_EXP_DELTA, stat_stride, mask_m, 0.0))
        score = _kl_row_score(y1_max, y1_sumexp, y1_exp_delta, y0_max, y0_sumexp)
    elif DIVERGENCE == _DIVERGENCE_COSINE:
        first = _COSINE_FIRST + position * _COSINE_PER_POSITION
        dot_y0 = tl.zeros((BLOCK_M,), tl.float32)
        sqnorm = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(0, num_pid_n):
            p = row_ptrs + t * M
            dot_y0 += _load_stat(p, first + _COSINE_DOT_Y0, stat_stride, mask_m, 0.0)
            sqnorm += _load_stat(p, first + _COSINE_SQNORM, stat_stride, mask_m, 0.0)
        score = _cosine_row_score(dot_y0, sqnorm, y0_first)
    else:
        dot_y0 = tl.zeros((BLOCK_M,), tl.float32)
        for t in range(0, num_pid_n):
            dot_y0 += _load_stat(row_ptrs + t * M, position, stat_stride, mask_m, 0.0)
        score = -dot_y0
    return tl.where(mask_m, score, 0.0)


@triton.jit
def _row_live(row_ptrs, M, stat_stride, num_pid_n, mask_m, slot_index, BLOCK_M: tl.constexpr):
    """1.0 where the row's flag at ``slot_index`` is set in any of its N-tiles."""
    live = tl.zeros((BLOCK_M,), tl.float32)
    for t in range(0, num_pid_n):
        live = tl.maximum(live, _load_stat(row_ptrs + t * M, slot_index, stat_stride, mask_m, 0.0))
    return live


@triton.jit
def _add_to_groups(gacc_ptr, group, mask_m, one_group, g_lo, slot_index, values, GROUP_STRIDE: tl.constexpr):
    """Add the rows' ``values`` into their groups' sum at ``slot_index``: one scalar atomic when the tile lies in
    one group (images: contiguous runs of rows), else one atomic per row (token granularity)."""
    if one_group:
        tl.atomic_add(gacc_ptr + g_lo * GROUP_STRIDE + slot_index, tl.sum(values, axis=0))
    else:
        tl.atomic_add(gacc_ptr + group * GROUP_STRIDE + slot_index, values, mask=mask_m)


@triton.jit
def _reduce_rows(part_ptr, gacc_ptr, slots_ptr, present_ptr, sample, offs_am, mask_m, group, M, stat_stride,
                 num_pid_n, num_groups, DIVERGENCE: tl.constexpr, LIVE_SLOT: tl.constexpr,
                 NUM_POSITIONS: tl.constexpr, GROUP_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The whole rows of a finished row tile: each position's row scores, liveness and candidacy into the groups'
    sums, and the row count."""
    row_ptrs = part_ptr + offs_am
    g_lo = tl.min(tl.where(mask_m, group, num_groups), axis=0)
    one_group = g_lo == tl.max(tl.where(mask_m, group, -1), axis=0)
    rows = mask_m.to(tl.float32)
    _add_to_groups(gacc_ptr, group, mask_m, one_group, g_lo, _POOL_GROUP_ROWS, rows, GROUP_STRIDE)
    y0_first, y0_second = _row_base_stats(row_ptrs, M, stat_stride, num_pid_n, mask_m, DIVERGENCE, BLOCK_M)
    for position in tl.static_range(NUM_POSITIONS):
        block = _GROUP_FIRST + position * _GROUP_PER_POSITION
        score = _row_score(row_ptrs, M, stat_stride, num_pid_n, mask_m, y0_first, y0_second, position, DIVERGENCE,
                           BLOCK_M)
        _add_to_groups(gacc_ptr, group, mask_m, one_group, g_lo, block + _GROUP_SCORE_SUM, score, GROUP_STRIDE)
        live = _row_live(row_ptrs, M, stat_stride, num_pid_n, mask_m, LIVE_SLOT + position, BLOCK_M)
        _add_to_groups(gacc_ptr, group, mask_m, one_group, g_lo, block + _GROUP_LIVE, live, GROUP_STRIDE)
        slot = tl.load(slots_ptr + sample * NUM_POSITIONS + position)
        candidate = (slot >= 0) & (tl.load(present_ptr + tl.maximum(slot, 0)) != 0)
        _add_to_groups(gacc_ptr, group, mask_m, one_group, g_lo, block + _GROUP_CANDIDATE,
                       rows * candidate.to(tl.float32), GROUP_STRIDE)


# ============================================================================ the two kernels

@triton.jit
def _pooled_fls_speculate_kernel(
    x_ptr,  # (B * T, K), unit stride along K; read only when BASE == _BASE_COMPUTED
    w_ptr,  # (N, K) contiguous: the base weight; read only when BASE == _BASE_COMPUTED
    bias_ptr,  # (N,); read only when HAS_BIAS and BASE == _BASE_COMPUTED
    y0_ptr,  # (B * T, N) x's dtype: F.linear(x, W, b) (cuBLAS); read only when BASE == _BASE_LOADED
    xa_ptr,  # (B * T, NUM_POSITIONS * RANK_PAD): the pooled shrink's buffer
    b_ptr,  # (S, N, R) contiguous: every slot's B, zero-padded to the rank R
    ranks_ptr,  # (S,) int32/int64: each slot's own rank
    scales_ptr,  # (S,) float32: each slot's LoRA scale
    present_ptr,  # (S,) uint8: the slot's LoRA adapts this layer
    slots_ptr,  # (B, NUM_POSITIONS) int64: each sample's slots, -1 = none
    row_group_ptr,  # (B * T,) int32/int64: each row's decision group in [0, num_groups)
    guess_ptr,  # (num_groups,) int64: the speculated positions (-1 = base); read only when HAS_GUESS
    out_ptr,  # (B * T, N) out, x's dtype: y0 + d_guess
    part_ptr,  # (LIVE_SLOT + NUM_POSITIONS, num_pid_n, B * T) float32 scratch: per-tile partial statistics
    ticket_ptr,  # (B * num_pid_t,) int32, zeroed: N-tiles of each row tile done so far
    gacc_ptr,  # (num_groups, GROUP_STRIDE) float32, zeroed: per-group sums
    M, T, N, K, R, num_groups, num_pid_t, num_pid_n, stride_xm, stride_wn, stride_y0m, stride_xam, stride_om,
    DIVERGENCE: tl.constexpr, LIVE_SLOT: tl.constexpr, GROUP_STRIDE: tl.constexpr, BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GUESS: tl.constexpr, NUM_POSITIONS: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Speculate: write y0 + d_guess and the tile's statistics; the row tile's last N-tile reduces the rows into
    the group sums."""
    pid, pid_row, pid_n, sample, offs_n, mask_m, mask_n, offs_am, group = _sample_tile_coords(
        row_group_ptr, T, N, num_pid_t, num_pid_n, BLOCK_M, BLOCK_N)
    guess = _guessed_positions(guess_ptr, group, HAS_GUESS, BLOCK_M)
    y0 = _base_tile(x_ptr, w_ptr, bias_ptr, y0_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn, stride_y0m,
                    BASE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    # layout (slot, n_tile, row): a tile's stores are coalesced
    stat_stride = num_pid_n * M
    part_ptrs = part_ptr + pid_n * M + offs_am
    _store_base_stats(part_ptrs, stat_stride, mask_m, mask_n, y0, DIVERGENCE)
    chosen = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for position in tl.static_range(NUM_POSITIONS):
        delta = _position_delta(xa_ptr, b_ptr, ranks_ptr, scales_ptr, slots_ptr, sample, position, offs_am, offs_n,
                                mask_n, N, R, stride_xam, NUM_POSITIONS, BLOCK_M, BLOCK_N, RANK_PAD, DOT_PRECISION)
        _store_position_stats(part_ptrs, stat_stride, mask_m, mask_n, y0, delta, position, DIVERGENCE, LIVE_SLOT)
        chosen = tl.where(guess[:, None] == position, delta, chosen)
    out_ptrs = out_ptr + offs_am[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, (y0 + chosen).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    # the last N-tile of this row tile to arrive reduces the rows (split-K style ticket)
    tl.debug_barrier()  # all threads' partial stores are issued before the release below
    ticket = tl.atomic_add(ticket_ptr + pid_row, 1, sem="acq_rel")
    if ticket == num_pid_n - 1:
        _reduce_rows(part_ptr, gacc_ptr, slots_ptr, present_ptr, sample, offs_am, mask_m, group, M, stat_stride,
                     num_pid_n, num_groups, DIVERGENCE, LIVE_SLOT, NUM_POSITIONS, GROUP_STRIDE, BLOCK_M)


@triton.jit
def _pooled_fls_fix_up_kernel(
    x_ptr,  # (B * T, K), unit stride along K; read only when BASE == _BASE_COMPUTED
    w_ptr,  # (N, K) contiguous; read only when BASE == _BASE_COMPUTED
    bias_ptr,  # (N,); read only when HAS_BIAS and BASE == _BASE_COMPUTED
    y0_ptr,  # (B * T, N) x's dtype: the y0 the speculate kernel read; read only when BASE == _BASE_LOADED
    xa_ptr,  # (B * T, NUM_POSITIONS * RANK_PAD): the pooled shrink's buffer
    b_ptr,  # (S, N, R) contiguous
    ranks_ptr,  # (S,) int32/int64
    scales_ptr,  # (S,) float32
    slots_ptr,  # (B, NUM_POSITIONS) int64
    row_group_ptr,  # (B * T,) int32/int64
    guess_ptr,  # (num_groups,) int64; read only when HAS_GUESS
    out_ptr,  # (B * T, N) in/out: rows whose guess was wrong are rewritten
    gacc_ptr,  # (num_groups, GROUP_STRIDE) float32: the final group sums
    scores_ptr,  # (num_groups, NUM_POSITIONS) float32 out
    choice_ptr,  # (num_groups,) int64 out: the chosen position, -1 = base
    T, N, K, R, num_groups, num_pid_t, num_pid_n, stride_xm, stride_wn, stride_y0m, stride_xam, stride_om,
    GROUP_STRIDE: tl.constexpr, BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GUESS: tl.constexpr,
    NUM_POSITIONS: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Decide + fix up: the decision is final; recompute and rewrite the rows whose guess was wrong. Program 0 also
    writes every group's scores and choice."""
    pid, pid_row, pid_n, sample, offs_n, mask_m, mask_n, offs_am, group = _sample_tile_coords(
        row_group_ptr, T, N, num_pid_t, num_pid_n, BLOCK_M, BLOCK_N)
    guess = _guessed_positions(guess_ptr, group, HAS_GUESS, BLOCK_M)
    take = _group_choice(gacc_ptr, group, NUM_POSITIONS, GROUP_STRIDE)
    wrong = (take != guess) & mask_m
    if tl.max(wrong.to(tl.int32), axis=0) > 0:
        y0 = _base_tile(x_ptr, w_ptr, bias_ptr, y0_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn, stride_y0m,
                        BASE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
        chosen = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for position in tl.static_range(NUM_POSITIONS):
            if tl.max((wrong & (take == position)).to(tl.int32), axis=0) > 0:  # only the positions rows take
                delta = _position_delta(xa_ptr, b_ptr, ranks_ptr, scales_ptr, slots_ptr, sample, position, offs_am,
                                        offs_n, mask_n, N, R, stride_xam, NUM_POSITIONS, BLOCK_M, BLOCK_N, RANK_PAD,
                                        DOT_PRECISION)
                chosen = tl.where(take[:, None] == position, delta, chosen)
        out_ptrs = out_ptr + offs_am[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, (y0 + chosen).to(out_ptr.dtype.element_ty), mask=wrong[:, None] & mask_n[None, :])
    if pid == 0:
        for g0 in range(0, num_groups, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            mask_g = offs_g < num_groups
            groups = tl.minimum(offs_g, num_groups - 1)  # clamped: loads in bounds, stores masked
            tl.store(choice_ptr + offs_g, _group_choice(gacc_ptr, groups, NUM_POSITIONS, GROUP_STRIDE).to(tl.int64),
                     mask=mask_g)
            sums = gacc_ptr + groups * GROUP_STRIDE
            rows = _group_rows(sums)
            for position in tl.static_range(NUM_POSITIONS):
                tl.store(scores_ptr + offs_g * NUM_POSITIONS + position, _group_score(sums, rows, position),
                         mask=mask_g)


# ============================================================================ launcher

def pooled_fls_linear_fwd(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group, num_groups,
                          divergence="kl", prev_choice=None, slot_ranks=None, base=None):
    """Launch the pooled N-way FLS linear. Same contract as ``fusion_engine.ops.pooled.pooled_fls_linear`` for
    ``divergence`` in ``DIVERGENCE_CODES`` (kl, cosine, dot).

    Args:
        x: (M, K) activations, M = B * T sample-major (fp16, bf16 or fp32); the output has its dtype.
        weight, bias: the base linear, (N, K) and (N,) or None.
        a_stack, b_stack: (S, R, K) and (S, N, R), the pool's stacks of one layer (cast to x's dtype).
        scales: (S,) each slot's LoRA scale; present: (S,) bool, the slot's LoRA adapts this layer.
        sample_slots: (B, L) int64 slots per sample, -1 = none; B must divide M.
        row_group: (M,) int32/int64, each row's decision group in [0, num_groups).
        num_groups: G.
        divergence: "kl", "cosine" or "dot".
        prev_choice: optional (G,) int64 device tensor, the choices of the previous call of this layer; used only
            as the speculation guess (a wrong or stale guess costs time, never accuracy).
        slot_ranks: optional (S,) int32/int64 device tensor, each slot's own rank (the pool knows them); None: read
            from the stacks on the device (``lora_shrink.stack_ranks``, kept while the stacks are unchanged).
        base: where y0 comes from: "fused" (the kernels' own GEMM), "cublas" (``F.linear`` into a y0 buffer the
            kernels read: the split variant of ``fls_linear``), or None for the size-class default of
            ``fusion_engine.kernels.utils.fls_base_config``.

    Returns:
        (out, scores, choice): out (M, N) in x.dtype, scores (G, L) float32, choice (G,) int64 (-1 = base).
    """
    stream, fast = launch_context()
    if fast:
        key = plan_key((x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group, prev_choice,
                        slot_ranks), num_groups, divergence, base, stream)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(stream, x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group,
                        prev_choice, slot_ranks)
    require(divergence in DIVERGENCE_CODES, lambda: f"pooled_fls_linear: the fused kernel supports "
            f"{tuple(DIVERGENCE_CODES)}, not {divergence!r}")
    check_pool_inputs("pooled_fls_linear", x, weight, bias, a_stack, b_stack, scales, sample_slots)
    (M, K), N, (S, R) = x.shape, weight.shape[0], a_stack.shape[:2]
    batch, positions = sample_slots.shape
    G = int(num_groups)
    require(G >= 0, lambda: f"pooled_fls_linear: num_groups must be >= 0, got {G}")
    require(tuple(present.shape) == (S,) and present.dtype == torch.bool and present.device == x.device,
            lambda: f"pooled_fls_linear: present must be (S={S},) bool on {x.device}, got {tuple(present.shape)} "
            f"{present.dtype} on {present.device}")
    require(tuple(row_group.shape) == (M,) and row_group.dtype in ROW_GROUP_DTYPES and row_group.device == x.device,
            lambda: f"pooled_fls_linear: row_group must be (M={M},) int32/int64 on {x.device}, got "
            f"{tuple(row_group.shape)} {row_group.dtype} on {row_group.device}")
    require(prev_choice is None or (tuple(prev_choice.shape) == (G,) and prev_choice.dtype == torch.int64
                                    and prev_choice.device == x.device),
            lambda: f"pooled_fls_linear: prev_choice must be (G={G},) int64 on {x.device}, got "
            f"{None if prev_choice is None else (tuple(prev_choice.shape), prev_choice.dtype, prev_choice.device)}")
    base = base_mode(base, M, N, K, "pooled_fls_linear")
    ranks = check_slot_ranks("pooled_fls_linear", slot_ranks, a_stack)
    dev = x.device
    out = new_empty((M, N), x.dtype, dev)
    scores = new_empty((G, positions), torch.float32, dev)
    choice = new_empty((G,), torch.int64, dev)
    if M == 0 or G == 0:
        # no rows: every group is empty, its mean 0 and no position a candidate (as the reference)
        scores.zero_()
        choice.fill_(-1)
        return out, scores, choice

    inputs = (x, weight, bias, a_stack, b_stack, scales, sample_slots, row_group, present)
    x, weight, bias, a_stack, b_stack = pool_operands(x, weight, bias, a_stack, b_stack)
    scales, sample_slots = scales.to(torch.float32).contiguous(), sample_slots.contiguous()
    row_group, present = row_group.contiguous(), present.contiguous()
    operands = (x, weight, bias, a_stack, b_stack, scales, sample_slots, row_group, present)
    # a plan replays with the caller's tensors, so only when no operand was converted
    planned = fast and all(a is b for a, b in zip(operands, inputs)) and may_plan()
    T = M // batch
    code = DIVERGENCE_CODES[divergence]
    launches = [] if planned else None
    xa = pooled_lora_shrink(x, a_stack, ranks, sample_slots, launches)
    # split: the merged layer's own cuBLAS call, into a buffer of its own (the kernels never overwrite it)
    y0 = cublas_linear(x, weight, bias) if base == "cublas" else None
    cfg = gemm_config(T, N, K, "fls")
    num_pid_t, num_pid_n = triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    live_slot, group_stride = num_stats(code, positions), group_slots(positions)
    part = new_empty((live_slot + positions, num_pid_n, M), torch.float32, dev)
    # one memset for the tickets (int32) and the group sums (float32 zeros are zero bits)
    workspace = torch.zeros((batch * num_pid_t + group_stride * G,), dtype=torch.int32, device=dev)
    ticket, gacc = workspace[:batch * num_pid_t], workspace[batch * num_pid_t:].view(torch.float32)

    shared = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, y0_ptr=y0 if y0 is not None else x,
        xa_ptr=xa, b_ptr=b_stack, ranks_ptr=ranks, scales_ptr=scales, slots_ptr=sample_slots,
        row_group_ptr=row_group, guess_ptr=prev_choice if prev_choice is not None else choice,
        out_ptr=out, gacc_ptr=gacc, T=T, N=N, K=K, R=R, num_groups=G, num_pid_t=num_pid_t, num_pid_n=num_pid_n,
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_y0m=y0.stride(0) if y0 is not None else 0,
        stride_xam=xa.stride(0), stride_om=out.stride(0), GROUP_STRIDE=group_stride, BASE=BASE_CODES[base],
        HAS_BIAS=bias is not None, HAS_GUESS=prev_choice is not None, NUM_POSITIONS=positions, RANK_PAD=dot_pad(R),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    grid = (batch * num_pid_t * num_pid_n,)
    launch(_pooled_fls_speculate_kernel, grid, launches, _POOL_SPECULATE_VARYING,
           present_ptr=present.view(torch.uint8), part_ptr=part, ticket_ptr=ticket, M=M, DIVERGENCE=code,
           LIVE_SLOT=live_slot, **shared)
    launch(_pooled_fls_fix_up_kernel, grid, launches, _POOL_FIX_UP_VARYING, scores_ptr=scores, choice_ptr=choice,
           BLOCK_G=min(1024, max(16, triton.next_power_of_2(G))), **shared)
    if planned and all(launches):
        keep_plan(_PLANS, key, _PooledFLSPlan(launches, out.shape, scores.shape, x.dtype, dev, workspace,
                                              base == "cublas"))
    return out, scores, choice


# the arguments a replay passes per call (utils.KernelLaunch); the rest (scratch, sizes, flags) is the plan's
_POOL_SHARED_VARYING = ("x_ptr", "w_ptr", "bias_ptr", "y0_ptr", "b_ptr", "ranks_ptr", "scales_ptr", "slots_ptr",
                        "row_group_ptr", "guess_ptr", "out_ptr")
_POOL_SPECULATE_VARYING = _POOL_SHARED_VARYING + ("present_ptr",)
_POOL_FIX_UP_VARYING = _POOL_SHARED_VARYING + ("scores_ptr", "choice_ptr")
_PLANS: dict = {}


class _PooledFLSPlan:
    """The launches of one planned ``pooled_fls_linear_fwd`` key: the shrink into the plan's buffer, speculate and
    fix-up into the plan's statistics buffer, the workspace zeroed in place, fresh outputs (and cuBLAS's y0 for the
    split variant)."""

    def __init__(self, launches, out_shape, scores_shape, dtype, device, workspace, split):
        (self.shrink, self.speculate, self.fix_up), self.workspace = launches, workspace
        self.out_shape, self.scores_shape, self.dtype, self.device = out_shape, scores_shape, dtype, device
        self.split = split

    def __call__(self, stream, x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group,
                 prev_choice, slot_ranks):
        dev = self.device
        ranks = check_slot_ranks("pooled_fls_linear", slot_ranks, a_stack)
        out = new_empty(self.out_shape, self.dtype, dev)
        scores = new_empty(self.scores_shape, torch.float32, dev)
        choice = new_empty(self.scores_shape[:1], torch.int64, dev)
        self.workspace.zero_()
        self.shrink(stream, x, a_stack, ranks, sample_slots)
        y0 = cublas_linear(x, weight, bias) if self.split else x
        tensors = (x, weight, x if bias is None else bias, y0, b_stack, ranks, scales, sample_slots, row_group,
                   choice if prev_choice is None else prev_choice, out)
        self.speculate(stream, *tensors, present.view(torch.uint8))
        self.fix_up(stream, *tensors, scores, choice)
        return out, scores, choice
