"""Fused FLS linear: base GEMM, both LoRA deltas, divergence statistics, per-group decision and
the output y0 + d_chosen, with no host synchronisation and shape-only grids.

Mechanism ("speculate, then fix up exactly"). A decision group (one image) spans many row
tiles, so no tile knows the decision when it writes its output. The op runs one kernel twice:

* PHASE 0, grid (M tiles x N tiles): computes the tile's y0, d_c and d_s in fp32, writes
  y0 + d_guess (guess = last step's decision for the row's group when the caller passes it,
  else the subject), and stores the tile's per-row partial statistics. The last N-tile of a
  row tile to finish (an atomic ticket) combines the partials of the whole row exactly
  (running max / rescaled sums, the flash-attention trick), turns them into the row's score,
  and atomically adds it into float32 per-group sums (scores, rows, rows whose delta is non-zero:
  a branch with an all-zero delta on a group counts as absent there, as in the reference).
* PHASE 1, same grid: every program reads the final group sums, takes the decision for its
  rows, and recomputes + rewrites its tile only for rows whose decision differs from the
  guess (same code path, so the result is identical to a correct guess). Program 0 also writes
  the per-group scores and decisions. When the guess was right every program exits after a
  few loads, so the cost stays near one GEMM; a wrong guess costs the recompute of the
  affected tiles only (at worst 2x, the "recompute" mechanism).

The output is therefore exactly y0 + d_chosen for THIS step, whatever the guess.
JS divergence needs the row's LSEs before its second sweep; it stays on the reference path
(see fusion_engine/ops/triton_ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import lora_shrink
from .utils import _expand_tile, _linear_tile, dot_precision, gemm_config, new_empty, rank_pad

DIV_CODES = {"kl": 0, "cosine": 1, "dot": 2}
NUM_STATS = {0: 8, 1: 5, 2: 2}  # score statistics kept per (row, N-tile); +2 liveness flags
GACC = 5  # per group: sum score_c, sum score_s, rows, rows with d_c != 0, rows with d_s != 0


@triton.jit
def _fls_tile(x_ptr, w_ptr, bias_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n,
              K, rc, rs, subject_scale, style_scale, stride_xm, stride_wn, stride_xam, S_OFF,
              HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr,
              RC_PAD: tl.constexpr, RS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    y0 = _linear_tile(x_ptr, w_ptr, bias_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn,
                      HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    if HAS_C:
        subject_delta = subject_scale * _expand_tile(xa_ptr, subject_b_ptr, offs_am, offs_n, mask_n, rc, stride_xam, 0, RC_PAD, DOT_PRECISION)
    else:
        subject_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_S:
        style_delta = style_scale * _expand_tile(xa_ptr, style_b_ptr, offs_am, offs_n, mask_n, rs, stride_xam, S_OFF, RS_PAD,
                                    DOT_PRECISION)
    else:
        style_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return y0, subject_delta, style_delta


@triton.jit
def _kl_tile_stats(y0m, d, mask_n):
    """Per-row (max, sum exp, sum exp * d) of y1 = y0 + d over this tile's columns."""
    y1 = y0m + d  # masked columns stay -inf
    m1 = tl.max(y1, axis=1)
    e1 = tl.exp(y1 - m1[:, None])
    return m1, tl.sum(e1, axis=1), tl.sum(tl.where(mask_n[None, :], e1 * d, 0.0), axis=1)


@triton.jit
def _merge_lse(m, s, t, m_new_tile, s_tile, t_tile):
    """Combine running (max, sum exp, weighted sum) with one more tile's partials, exactly."""
    m_new = tl.maximum(m, m_new_tile)
    a = tl.exp(m - m_new)
    b = tl.exp(m_new_tile - m_new)
    return m_new, s * a + s_tile * b, t * a + t_tile * b


@triton.jit
def _decide(subject_score, style_score, subject_live, style_live, HAS_C: tl.constexpr, HAS_S: tl.constexpr):
    """True = subject. Ties go to the subject; an absent LoRA never wins, and a branch whose delta
    is exactly zero on every row of the group counts as absent for that group (both zero: subject)."""
    if HAS_C and HAS_S:
        take = tl.where(subject_live == style_live, subject_score >= style_score, subject_live)
    elif HAS_S:
        take = tl.zeros_like(subject_score) != 0.0  # subject absent: always style
    else:
        take = tl.zeros_like(subject_score) == 0.0  # style absent (or both): always subject
    return take


@triton.jit
def _fls_linear_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, subject_b_ptr, style_b_ptr, row_group_ptr, guess_ptr,
    out_ptr, part_ptr, ticket_ptr, gacc_ptr, score_c_ptr, score_s_ptr, choose_ptr,
    M, N, K, rc, rs, num_groups, num_pid_n, subject_scale, style_scale,
    stride_xm, stride_wn, stride_xam, stride_om, S_OFF,
    PHASE: tl.constexpr, DIV: tl.constexpr, LIVE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr,
    HAS_S: tl.constexpr, HAS_GUESS: tl.constexpr, RC_PAD: tl.constexpr, RS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    # N-tiles of one row tile are adjacent: they share x in L2 and finish close together
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_am = offs_m % M
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    group = tl.load(row_group_ptr + offs_am)

    # the guessed decision per row (static when one LoRA is absent: then the guess is always right)
    if HAS_C and HAS_S:
        if HAS_GUESS:
            guess = tl.load(guess_ptr + group) != 0
        else:
            guess = tl.full((BLOCK_M,), True, tl.int1)  # no state yet: guess the subject
    elif HAS_S:
        guess = tl.full((BLOCK_M,), False, tl.int1)
    else:
        guess = tl.full((BLOCK_M,), True, tl.int1)

    if PHASE == 0:
        y0, subject_delta, style_delta = _fls_tile(x_ptr, w_ptr, bias_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n,
                               K, rc, rs, subject_scale, style_scale, stride_xm, stride_wn, stride_xam, S_OFF,
                               HAS_BIAS, HAS_C, HAS_S, RC_PAD, RS_PAD, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                               DOT_PRECISION)
        out = tl.where(guess[:, None], y0 + subject_delta, y0 + style_delta)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

        # ---- per-row partial statistics of this N-tile, layout (stat, n_tile, row): coalesced ----
        part_ptrs = part_ptr + pid_n * M + offs_m
        stat_stride = num_pid_n * M
        if DIV == 0:  # kl: (max, sumexp) of y0 and (max, sumexp, sum exp*d) of each y1
            y0m = tl.where(mask_n[None, :], y0, float("-inf"))
            m0 = tl.max(y0m, axis=1)
            s0 = tl.sum(tl.exp(y0m - m0[:, None]), axis=1)
            m1c, s1c, t1c = _kl_tile_stats(y0m, subject_delta, mask_n)
            m1s, s1s, t1s = _kl_tile_stats(y0m, style_delta, mask_n)
            tl.store(part_ptrs + 0 * stat_stride, m0, mask=mask_m)
            tl.store(part_ptrs + 1 * stat_stride, s0, mask=mask_m)
            tl.store(part_ptrs + 2 * stat_stride, m1c, mask=mask_m)
            tl.store(part_ptrs + 3 * stat_stride, s1c, mask=mask_m)
            tl.store(part_ptrs + 4 * stat_stride, t1c, mask=mask_m)
            tl.store(part_ptrs + 5 * stat_stride, m1s, mask=mask_m)
            tl.store(part_ptrs + 6 * stat_stride, s1s, mask=mask_m)
            tl.store(part_ptrs + 7 * stat_stride, t1s, mask=mask_m)
        else:  # cosine / dot: plain sums (masked columns of y0, d are exact zeros)
            y1c = y0 + subject_delta
            y1s = y0 + style_delta
            tl.store(part_ptrs + 0 * stat_stride, tl.sum(y1c * y0, axis=1), mask=mask_m)
            tl.store(part_ptrs + 1 * stat_stride, tl.sum(y1s * y0, axis=1), mask=mask_m)
            if DIV == 1:
                tl.store(part_ptrs + 2 * stat_stride, tl.sum(y0 * y0, axis=1), mask=mask_m)
                tl.store(part_ptrs + 3 * stat_stride, tl.sum(y1c * y1c, axis=1), mask=mask_m)
                tl.store(part_ptrs + 4 * stat_stride, tl.sum(y1s * y1s, axis=1), mask=mask_m)
        if HAS_C and HAS_S:  # does the row's delta have a non-zero element in this tile
            subject_live = tl.max(tl.where(mask_n[None, :] & (subject_delta != 0.0), 1.0, 0.0), axis=1)
            style_live = tl.max(tl.where(mask_n[None, :] & (style_delta != 0.0), 1.0, 0.0), axis=1)
            tl.store(part_ptrs + LIVE * stat_stride, subject_live, mask=mask_m)
            tl.store(part_ptrs + (LIVE + 1) * stat_stride, style_live, mask=mask_m)

        # ---- the last N-tile of this row tile to arrive reduces the row (split-K style ticket) ----
        tl.debug_barrier()  # all threads' partial stores are issued before the release below
        ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel")
        if ticket == num_pid_n - 1:
            row_ptrs = part_ptr + offs_m
            if DIV == 0:
                m0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                s0 = tl.zeros((BLOCK_M,), tl.float32)
                m1c = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                s1c = tl.zeros((BLOCK_M,), tl.float32)
                t1c = tl.zeros((BLOCK_M,), tl.float32)
                m1s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                s1s = tl.zeros((BLOCK_M,), tl.float32)
                t1s = tl.zeros((BLOCK_M,), tl.float32)
                for t in range(0, num_pid_n):
                    p = row_ptrs + t * M
                    # .cg: read from L2, other programs wrote these
                    tm0 = tl.load(p + 0 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    ts0 = tl.load(p + 1 * stat_stride, mask=mask_m, other=1.0, cache_modifier=".cg")
                    tm1c = tl.load(p + 2 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    ts1c = tl.load(p + 3 * stat_stride, mask=mask_m, other=1.0, cache_modifier=".cg")
                    tt1c = tl.load(p + 4 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    tm1s = tl.load(p + 5 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    ts1s = tl.load(p + 6 * stat_stride, mask=mask_m, other=1.0, cache_modifier=".cg")
                    tt1s = tl.load(p + 7 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    m0, s0, _unused = _merge_lse(m0, s0, s0, tm0, ts0, ts0)
                    m1c, s1c, t1c = _merge_lse(m1c, s1c, t1c, tm1c, ts1c, tt1c)
                    m1s, s1s, t1s = _merge_lse(m1s, s1s, t1s, tm1s, ts1s, tt1s)
                # KL(P(y1)||P(y0)) = E_q1[d] - (LSE(y1) - LSE(y0)); the LSE difference is taken as
                # (m1 - m0) + log(s1 / s0) so the large LSEs never cancel in fp32
                row_c = t1c / s1c - (m1c - m0) - tl.log(s1c / s0)
                row_s = t1s / s1s - (m1s - m0) - tl.log(s1s / s0)
            else:
                pc = tl.zeros((BLOCK_M,), tl.float32)
                ps = tl.zeros((BLOCK_M,), tl.float32)
                n0 = tl.zeros((BLOCK_M,), tl.float32)
                nc = tl.zeros((BLOCK_M,), tl.float32)
                ns = tl.zeros((BLOCK_M,), tl.float32)
                for t in range(0, num_pid_n):
                    p = row_ptrs + t * M
                    pc += tl.load(p + 0 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    ps += tl.load(p + 1 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                    if DIV == 1:
                        n0 += tl.load(p + 2 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                        nc += tl.load(p + 3 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                        ns += tl.load(p + 4 * stat_stride, mask=mask_m, other=0.0, cache_modifier=".cg")
                if DIV == 1:
                    # torch's cosine_similarity: each norm clamped at eps=1e-12
                    r0 = tl.maximum(tl.sqrt(n0), 1e-12)
                    row_c = 1.0 - pc / (tl.maximum(tl.sqrt(nc), 1e-12) * r0)
                    row_s = 1.0 - ps / (tl.maximum(tl.sqrt(ns), 1e-12) * r0)
                else:
                    row_c = -pc
                    row_s = -ps
            row_c = tl.where(mask_m, row_c, 0.0)
            row_s = tl.where(mask_m, row_s, 0.0)
            subject_live = tl.zeros((BLOCK_M,), tl.float32)
            style_live = tl.zeros((BLOCK_M,), tl.float32)
            if HAS_C and HAS_S:
                for t in range(0, num_pid_n):
                    p = row_ptrs + t * M
                    subject_live = tl.maximum(subject_live, tl.load(p + LIVE * stat_stride, mask=mask_m, other=0.0,
                                                        cache_modifier=".cg"))
                    style_live = tl.maximum(style_live, tl.load(p + (LIVE + 1) * stat_stride, mask=mask_m, other=0.0,
                                                        cache_modifier=".cg"))
            # group sums: one scalar atomic per stat when the tile lies in one group (the usual
            # case: groups are images, contiguous runs of rows), else one atomic per row
            g_lo = tl.min(tl.where(mask_m, group, num_groups), axis=0)
            g_hi = tl.max(tl.where(mask_m, group, -1), axis=0)
            if g_lo == g_hi:
                tl.atomic_add(gacc_ptr + g_lo * 5 + 0, tl.sum(row_c, axis=0))
                tl.atomic_add(gacc_ptr + g_lo * 5 + 1, tl.sum(row_s, axis=0))
                tl.atomic_add(gacc_ptr + g_lo * 5 + 2, tl.sum(mask_m.to(tl.float32), axis=0))
                if HAS_C and HAS_S:
                    tl.atomic_add(gacc_ptr + g_lo * 5 + 3, tl.sum(subject_live, axis=0))
                    tl.atomic_add(gacc_ptr + g_lo * 5 + 4, tl.sum(style_live, axis=0))
            else:
                tl.atomic_add(gacc_ptr + group * 5 + 0, row_c, mask=mask_m)
                tl.atomic_add(gacc_ptr + group * 5 + 1, row_s, mask=mask_m)
                tl.atomic_add(gacc_ptr + group * 5 + 2, mask_m.to(tl.float32), mask=mask_m)
                if HAS_C and HAS_S:
                    tl.atomic_add(gacc_ptr + group * 5 + 3, subject_live, mask=mask_m)
                    tl.atomic_add(gacc_ptr + group * 5 + 4, style_live, mask=mask_m)
    else:
        # ---- PHASE 1: the decision is final; fix up rows whose guess was wrong ----
        g_sum_c = tl.load(gacc_ptr + group * 5 + 0)
        g_sum_s = tl.load(gacc_ptr + group * 5 + 1)
        g_cnt = tl.maximum(tl.load(gacc_ptr + group * 5 + 2), 1.0)
        g_live_c = tl.load(gacc_ptr + group * 5 + 3) > 0.0
        g_live_s = tl.load(gacc_ptr + group * 5 + 4) > 0.0
        take = _decide(g_sum_c / g_cnt, g_sum_s / g_cnt, g_live_c, g_live_s, HAS_C, HAS_S)
        wrong = (take != guess) & mask_m
        if tl.max(wrong.to(tl.int32), axis=0) > 0:
            y0, subject_delta, style_delta = _fls_tile(x_ptr, w_ptr, bias_ptr, xa_ptr, subject_b_ptr, style_b_ptr, offs_am, offs_n, mask_n,
                                   K, rc, rs, subject_scale, style_scale, stride_xm, stride_wn, stride_xam, S_OFF,
                                   HAS_BIAS, HAS_C, HAS_S, RC_PAD, RS_PAD, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                                   DOT_PRECISION)
            out = tl.where(take[:, None], y0 + subject_delta, y0 + style_delta)
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=wrong[:, None] & mask_n[None, :])
        if pid == 0:
            for g0 in range(0, num_groups, BLOCK_G):
                offs_g = g0 + tl.arange(0, BLOCK_G)
                mask_g = offs_g < num_groups
                cnt = tl.maximum(tl.load(gacc_ptr + offs_g * 5 + 2, mask=mask_g, other=0.0), 1.0)
                sc = tl.load(gacc_ptr + offs_g * 5 + 0, mask=mask_g, other=0.0) / cnt
                ss = tl.load(gacc_ptr + offs_g * 5 + 1, mask=mask_g, other=0.0) / cnt
                lc = tl.load(gacc_ptr + offs_g * 5 + 3, mask=mask_g, other=0.0) > 0.0
                ls = tl.load(gacc_ptr + offs_g * 5 + 4, mask=mask_g, other=0.0) > 0.0
                tl.store(score_c_ptr + offs_g, sc, mask=mask_g)
                tl.store(score_s_ptr + offs_g, ss, mask=mask_g)
                tl.store(choose_ptr + offs_g, _decide(sc, ss, lc, ls, HAS_C, HAS_S).to(tl.uint8), mask=mask_g)


def fls_linear_fwd(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale, row_group, num_groups,
                   divergence="kl", prev_choose=None):
    """Launch the fused FLS linear. Same contract as reference.fls_linear (kl, cosine, dot).

    ``prev_choose``: optional (G,) bool/uint8 device tensor, the decisions of the previous call of
    this layer; used only as the speculation guess (a wrong guess costs time, never accuracy).
    Returns (out, subject_score, style_score, choose_subject): out (M, N) in x.dtype, scores float32 (G,), bool (G,).
    """
    if divergence not in DIV_CODES:
        raise ValueError(f"the fused kernel supports {tuple(DIV_CODES)}, not {divergence!r}")
    div = DIV_CODES[divergence]
    M, K = x.shape
    N = weight.shape[0]
    rc, rs = subject_a.shape[0], style_a.shape[0]
    dev = x.device
    G = int(num_groups)

    out = new_empty((M, N), x.dtype, dev)
    subject_score = new_empty((G,), torch.float32, dev)
    style_score = new_empty((G,), torch.float32, dev)
    choose = new_empty((G,), torch.uint8, dev)
    if M == 0 or G == 0:
        # nothing to reduce: every group is empty, its mean 0 (as reference.group_mean)
        subject_score.zero_()
        style_score.zero_()
        choose.fill_(0 if (rs > 0 and rc == 0) else 1)
        return out, subject_score, style_score, choose.view(torch.bool)

    # parameters in x's dtype (no-ops in the usual case); contiguous so strides are implicit
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    subject_a, subject_b = subject_a.to(x.dtype).contiguous(), subject_b.to(x.dtype).contiguous()
    style_a, style_b = style_a.to(x.dtype).contiguous(), style_b.to(x.dtype).contiguous()
    row_group = row_group.contiguous()
    xa, s_off = lora_shrink(x, subject_a, style_a)

    cfg = gemm_config(M, N, K, rank_pad(rc) + rank_pad(rs))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    num_m, num_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    part = new_empty((NUM_STATS[div] + 2, num_n, M), torch.float32, dev)
    # one memset for the tickets (int32) and the group sums (float32 zeros are zero bits)
    ws = torch.zeros((num_m + GACC * G,), dtype=torch.int32, device=dev)
    ticket, gacc = ws[:num_m], ws[num_m:].view(torch.float32)
    guess = prev_choose.view(torch.uint8) if prev_choose is not None and prev_choose.dtype == torch.bool else prev_choose

    args = (
        x, weight, bias if bias is not None else x, xa if xa is not None else x, subject_b, style_b, row_group,
        guess if guess is not None else choose,
        out, part, ticket, gacc, subject_score, style_score, choose,
        M, N, K, rc, rs, G, num_n, float(subject_scale), float(style_scale),
        x.stride(0), weight.stride(0), xa.stride(0) if xa is not None else 0, out.stride(0), s_off,
    )
    meta = dict(
        DIV=div, LIVE=NUM_STATS[div], HAS_BIAS=bias is not None, HAS_C=rc > 0, HAS_S=rs > 0, HAS_GUESS=guess is not None,
        RC_PAD=max(rank_pad(rc), 16), RS_PAD=max(rank_pad(rs), 16), BLOCK_G=min(1024, max(16, triton.next_power_of_2(G))),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), num_warps=num_warps,
        num_stages=num_stages, **cfg,
    )
    grid = (num_m * num_n,)
    _fls_linear_kernel[grid](*args, PHASE=0, **meta)
    _fls_linear_kernel[grid](*args, PHASE=1, **meta)
    return out, subject_score, style_score, choose.view(torch.bool)
