"""Pure-torch reference of the pooled LoRA ops: every image of a batch fuses its own LoRAs from a pool.

Contract (what a pooled kernel must meet; the single-pair contract of ``reference.py`` holds for each image):

* ``x`` is ``(M, K)`` with ``M = B * T``: ``B`` batch rows (samples) of ``T`` rows each, sample-major, as
  ``x.reshape(-1, K)`` of a ``(B, T, K)`` activation gives them.
* The pool holds, per layer, stacked factors ``a_stack`` ``(S, R, K)`` and ``b_stack`` ``(S, N, R)`` for ``S``
  slots padded with zeros to the layer's largest rank ``R``, ``scales`` ``(S,)`` (alpha / rank times the user's
  scale, at accumulation precision) and ``present`` ``(S,)`` bool (the slot's LoRA targets this layer).
* ``sample_slots`` ``(B, L)`` int64: the pool slots of each sample's LoRAs in the order its image named them,
  ``-1`` for none (images naming fewer than ``L`` LoRAs). An image's CFG copies carry the same row.
* A LoRA position ``l`` is a *candidate* for a decision group when its slot is valid and present at the layer.
* N-way FLS: per group, among candidates whose delta is non-zero somewhere in the group (``live``), the
  position with the largest score wins; ties go to the earlier position (the order the image named them).
  No live candidate: the first candidate (a no-op either way). No candidate: the base output (choice ``-1``).
  With two positions this is exactly ``reference.decide`` (subject first, style second).
* Scores are reported for every position, candidate or not (a zero delta scores as ``y0`` against itself).
* Gathering the factors per sample is a device index (no host sync, no Python loop over images); the only
  Python loop is over the ``L`` positions.
"""
from __future__ import annotations

import torch

from .reference import base_linear, group_mean, group_nonzero, row_divergence


def gathered_delta(x3: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, slots: torch.Tensor,
                   coef: torch.Tensor) -> torch.Tensor:
    """``coef[b] * (x_b A_{slot_b}^T) B_{slot_b}^T`` for every sample ``b``, flattened to ``(M, N)``.

    Args:
        x3: ``(B, T, K)`` at accumulation precision.
        slots: ``(B,)`` int64, valid slot indices (an invalid position has ``coef`` 0).
        coef: ``(B,)`` at accumulation precision.
    """
    a = a_stack[slots].to(x3.dtype)  # (B, R, K)
    b = b_stack[slots].to(x3.dtype)  # (B, N, R)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, N)
    return (delta * coef.reshape(-1, 1, 1)).reshape(-1, b.shape[1])


def _position(sample_slots: torch.Tensor, position: int, scales: torch.Tensor, present: torch.Tensor):
    """(valid slot indices (B,), scale per sample (B,), candidate per sample (B,) bool) of one position."""
    slot = sample_slots[:, position]
    valid = slot >= 0
    index = slot.clamp_min(0)
    return index, scales[index] * valid, present[index] & valid


def decide_n(scores: torch.Tensor, candidate: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """N-way decision per group: ``(G,)`` int64 position, ``-1`` for none (see the module contract).

    Args:
        scores: ``(G, L)`` float, larger = perturbs the base features more.
        candidate: ``(G, L)`` bool, the position's LoRA targets the layer for this group.
        live: ``(G, L)`` bool, the position's delta is non-zero somewhere in the group.
    """
    usable = candidate & live
    best = torch.where(usable, scores, torch.full_like(scores, -torch.inf)).argmax(-1)  # first maximum: ties
    first_candidate = candidate.to(torch.int8).argmax(-1)
    choice = torch.where(usable.any(-1), best, first_candidate)
    return torch.where(candidate.any(-1), choice, torch.full_like(choice, -1))


def pooled_fls_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, scales: torch.Tensor, present: torch.Tensor, sample_slots: torch.Tensor,
                      row_group: torch.Tensor, num_groups: int, divergence: str = "kl"):
    """N-way FLS linear over pool slots. Returns ``(out, scores, choice)``: ``out`` ``(M, N)`` in ``x.dtype``,
    ``scores`` ``(G, L)`` float32 (float64 for float64 inputs), ``choice`` ``(G,)`` int64 (``-1``: base)."""
    batch = sample_slots.shape[0]
    y0 = base_linear(x, weight, bias)
    x3 = x.to(y0.dtype).reshape(batch, -1, x.shape[-1])
    rows_per_sample = x3.shape[1]
    deltas, scores, candidates, lives = [], [], [], []
    for position in range(sample_slots.shape[1]):
        index, coef, candidate = _position(sample_slots, position, scales.to(y0.dtype), present)
        delta = gathered_delta(x3, a_stack, b_stack, index, coef)
        deltas.append(delta)
        scores.append(group_mean(row_divergence(y0 + delta, y0, divergence), row_group, num_groups))
        lives.append(group_nonzero(delta, row_group, num_groups))
        row_candidate = candidate.to(y0.dtype).repeat_interleave(rows_per_sample)
        candidates.append(y0.new_zeros(num_groups).index_add_(0, row_group.long(), row_candidate) > 0)
    scores, candidates, lives = (torch.stack(t, -1) for t in (scores, candidates, lives))
    choice = decide_n(scores, candidates, lives)
    row_choice = choice[row_group.long()].unsqueeze(-1)
    chosen = torch.zeros_like(y0)
    for position, delta in enumerate(deltas):
        chosen = torch.where(row_choice == position, delta, chosen)
    return (y0 + chosen).to(x.dtype), scores, choice


def pooled_mix_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, scales: torch.Tensor, sample_slots: torch.Tensor,
                      sample_weights: torch.Tensor) -> torch.Tensor:
    """Static per-image weights: ``y0 + sum_l w[b, l] * s_l * delta_l`` over each sample's named LoRAs.

    ``sample_weights`` ``(B, L)`` float32: the policy's weight of each position for the sample's image (the
    LoRA scale of the call folded in), so a step-dependent policy changes it without recompiling.
    """
    batch = sample_slots.shape[0]
    y = base_linear(x, weight, bias)
    x3 = x.to(y.dtype).reshape(batch, -1, x.shape[-1])
    weights = sample_weights.to(y.dtype)
    for position in range(sample_slots.shape[1]):
        index, coef, _ = _position(sample_slots, position, scales.to(y.dtype), torch.ones_like(scales, dtype=bool))
        y = y + gathered_delta(x3, a_stack, b_stack, index, coef * weights[:, position])
    return y.to(x.dtype)


__all__ = ["decide_n", "gathered_delta", "pooled_fls_linear", "pooled_mix_linear"]
