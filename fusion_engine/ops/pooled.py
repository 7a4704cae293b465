"""Pure-torch reference of the pooled LoRA ops: every image of a batch fuses its own LoRAs from a pool.

Contract (what a pooled kernel must meet; the single-pair contract of ``reference.py`` holds for each image):

* ``x`` is ``(M, K)`` with ``M = B * T``: ``B`` batch rows (samples) of ``T`` rows each, sample-major, as
  ``x.reshape(-1, K)`` of a ``(B, T, K)`` activation gives them.
* The pool holds, per layer, stacked factors ``a_stack`` ``(S, R, K)`` and ``b_stack`` ``(S, N, R)`` for ``S``
  slots padded with zeros to the layer's padded rank ``R`` (a fixed-capacity pool's ``max_rank``), ``scales``
  ``(S,)`` (alpha / rank times the user's scale, at accumulation precision) and ``present`` ``(S,)`` bool (the
  slot's LoRA targets this layer).
* ``sample_slots`` ``(B, L)`` int64: the pool slots of each sample's LoRAs in the order its image named them,
  ``-1`` for none (images naming fewer than ``L`` LoRAs). An image's CFG copies carry the same row. A ``-1``
  reads the stacks' last slot, which a pool keeps as its zero slot (all zeros, scale 0, never present), never
  another LoRA's factors: a LoRA whose factors overflow cannot reach images that do not name it.
* A LoRA position ``l`` is a *candidate* for a decision group when its slot is valid and present at the layer.
* N-way FLS: per group, among candidates whose delta is non-zero somewhere in the group (``live``), the
  position with the largest score wins; ties go to the earlier position (the order the image named them).
  No live candidate: the first candidate (a no-op either way). No candidate: the base output (choice ``-1``).
  With two positions this is exactly ``reference.decide`` (subject first, style second).
* Scores are reported for every position, candidate or not (a zero delta scores as ``y0`` against itself).
* Gathering the factors per sample is a device index (no host sync, no Python loop over images); the only
  Python loop is over the ``L`` positions.
* Conv (LoCon) layers (``pooled_fls_conv2d``, ``pooled_mix_conv2d``): ``x`` ``(B, C_in, H, W)``, ``a_stack``
  ``(S, R, C_in, kh, kw)`` (or ``(S, R, C_in)`` for 1x1-conv storage) and ``b_stack`` ``(S, N, R)``; a sample's delta
  is the base conv's convolution (stride, padding, dilation, padding mode) with its A, then a 1x1 conv with its B,
  all samples at once as grouped convolutions (``groups=B``). The rows of the rule are the output pixels, channels
  at dim 1, ``H_out * W_out`` rows per sample in row-major pixel order (the single-pair conv module's layout). These
  run here on every backend (there is no Triton conv kernel), as single-pair conv layers do.
* DoRA (``gains``, optional): ``(S, N)`` per slot and output channel, DoRA's ``m / ||W + s B A||`` for a DoRA slot,
  1 for any other (the zero slot included). A position's delta is then PEFT's ``(g - 1) * base_out + g * s * delta``
  with ``base_out`` the base output without its bias, as ``DynamicLoRALayer.branch_delta`` forms it for a pair.
* Precision as in ``reference.py``: every GEMM and convolution in ``x.dtype`` (the model's), its result upcast to the
  accumulation precision for the scales, sums and divergence statistics, the output rounded once to ``x.dtype``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import (
    accumulation_dtype,
    base_linear,
    base_log_probs,
    from_pixel_rows,
    group_mean,
    group_nonzero,
    pixel_rows,
    row_divergence,
)


def gathered_delta(x3: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, slots: torch.Tensor,
                   coef: torch.Tensor) -> torch.Tensor:
    """``coef[b] * (x_b A_{slot_b}^T) B_{slot_b}^T`` for every sample ``b``, flattened to ``(M, N)`` at ``coef``'s
    precision.

    Args:
        x3: ``(B, T, K)``, in the dtype the GEMMs run in (the model's).
        slots: ``(B,)`` int64 slot indices (an unused position: the zero slot, ``coef`` 0).
        coef: ``(B,)`` at accumulation precision.
    """
    a = a_stack[slots].to(x3.dtype)  # (B, R, K)
    b = b_stack[slots].to(x3.dtype)  # (B, N, R)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2)).to(coef.dtype)  # (B, T, N)
    return (delta * coef.reshape(-1, 1, 1)).reshape(-1, b.shape[1])


def dora_delta(delta: torch.Tensor, base_out: torch.Tensor, gains: torch.Tensor | None, index: torch.Tensor,
               ) -> torch.Tensor:
    """``delta`` (rows or ``(B, N, H, W)``, sample-major) as a DoRA slot's: ``(g - 1) * base_out + g * delta`` with
    each sample's gain ``gains[index]``; ``delta`` as it is without ``gains``."""
    if gains is None:
        return delta
    gain = gains[index].to(delta.dtype)  # (B, N)
    if delta.ndim == 4:
        gain = gain[:, :, None, None]
    else:
        gain = gain.repeat_interleave(delta.shape[0] // gain.shape[0], 0)
    return (gain - 1) * base_out + gain * delta


def _unbiased(y0: torch.Tensor, bias: torch.Tensor | None, gains) -> torch.Tensor:
    """The base output without its bias (DoRA's ``base_out``; only formed with ``gains``)."""
    if gains is None or bias is None:
        return y0
    return y0 - bias.to(y0.dtype).reshape(-1, *([1] * (y0.ndim - 2)))


def _position(sample_slots: torch.Tensor, position: int, scales: torch.Tensor, present: torch.Tensor):
    """(slot indices (B,), scale per sample (B,), candidate per sample (B,) bool) of one position; a ``-1`` reads
    the stacks' last row, the pool's zero slot, never another LoRA's factors."""
    slot = sample_slots[:, position]
    valid = slot >= 0
    index = torch.where(valid, slot, scales.shape[0] - 1)
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


def select_n(y0: torch.Tensor, deltas: list[torch.Tensor], candidates: list[torch.Tensor], row_group: torch.Tensor,
             num_groups: int, divergence: str):
    """The N-way FLS rule on precomputed rows (see the module contract), shared by the linear and conv ops.

    Args:
        y0: ``(M, N)`` base features at accumulation precision, ``B`` samples of ``M / B`` rows, sample-major.
        deltas: one ``(M, N)`` delta per position (its scale folded in; zeros where the position has no LoRA).
        candidates: one ``(B,)`` bool per position: the sample's LoRA there targets the layer.
        row_group: ``(M,)`` the decision group of each row; ``num_groups`` groups.
        divergence: ``"kl"``, ``"js"``, ``"cosine"`` or ``"dot"``.

    Returns:
        ``(out, scores, choice)``: ``y0`` plus each group's chosen delta (accumulation precision), ``(G, L)`` scores
        and ``(G,)`` int64 choices (``-1``: base).

    Example:
        >>> out, scores, choice = select_n(y0, [d0, d1], [c0, c1], row_group, groups, "kl")  # doctest: +SKIP
    """
    rows_per_sample = y0.shape[0] // max(candidates[0].shape[0], 1)
    scores, group_candidates, lives = [], [], []
    log_p0 = base_log_probs(y0, divergence)
    for delta, candidate in zip(deltas, candidates):
        scores.append(group_mean(row_divergence(y0 + delta, y0, divergence, log_p0), row_group, num_groups))
        lives.append(group_nonzero(delta, row_group, num_groups))
        row_candidate = candidate.to(y0.dtype).repeat_interleave(rows_per_sample)
        group_candidates.append(y0.new_zeros(num_groups).index_add_(0, row_group.long(), row_candidate) > 0)
    scores, group_candidates, lives = (torch.stack(t, -1) for t in (scores, group_candidates, lives))
    choice = decide_n(scores, group_candidates, lives)
    row_choice = choice[row_group.long()].unsqueeze(-1)
    chosen = torch.zeros_like(y0)
    for position, delta in enumerate(deltas):
        chosen = torch.where(row_choice == position, delta, chosen)
    return y0 + chosen, scores, choice


def _deltas(y0, base_out, sample_slots, scales, present, gains, delta_of, as_rows=lambda t: t):
    """Each position's delta (``delta_of(slot index, coef)``, DoRA applied, then ``as_rows``) and candidates."""
    deltas, candidates = [], []
    for position in range(sample_slots.shape[1]):
        index, coef, candidate = _position(sample_slots, position, scales.to(y0.dtype), present)
        deltas.append(as_rows(dora_delta(delta_of(index, coef), base_out, gains, index)))
        candidates.append(candidate)
    return deltas, candidates


def _mix(y, base_out, sample_slots, scales, sample_weights, gains, delta_of):
    """``y`` plus every position's delta (``delta_of(slot index, coef)``) weighted per sample (see the mix ops)."""
    weights = sample_weights.to(y.dtype)
    for position in range(sample_slots.shape[1]):
        index, coef, _ = _position(sample_slots, position, scales.to(y.dtype), torch.ones_like(scales, dtype=bool))
        if gains is None:
            y = y + delta_of(index, coef * weights[:, position])
            continue
        delta, weight = dora_delta(delta_of(index, coef), base_out, gains, index), weights[:, position]
        y = y + delta * (weight.reshape(-1, 1, 1, 1) if delta.ndim == 4 else
                         weight.repeat_interleave(delta.shape[0] // weight.shape[0])[:, None])
    return y


def pooled_fls_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, scales: torch.Tensor, present: torch.Tensor, sample_slots: torch.Tensor,
                      row_group: torch.Tensor, num_groups: int, divergence: str = "kl", gains=None):
    """N-way FLS linear over pool slots. Returns ``(out, scores, choice)``: ``out`` ``(M, N)`` in ``x.dtype``,
    ``scores`` ``(G, L)`` float32 (float64 for float64 inputs), ``choice`` ``(G,)`` int64 (``-1``: base)."""
    y0 = base_linear(x, weight, bias)
    x3 = x.reshape(sample_slots.shape[0], -1, x.shape[-1])
    deltas, candidates = _deltas(y0, _unbiased(y0, bias, gains), sample_slots, scales, present, gains,
                                 lambda index, coef: gathered_delta(x3, a_stack, b_stack, index, coef))
    out, scores, choice = select_n(y0, deltas, candidates, row_group, num_groups, divergence)
    return out.to(x.dtype), scores, choice


def pooled_mix_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_stack: torch.Tensor,
                      b_stack: torch.Tensor, scales: torch.Tensor, sample_slots: torch.Tensor,
                      sample_weights: torch.Tensor, gains=None) -> torch.Tensor:
    """Static per-image weights: ``y0 + sum_l w[b, l] * s_l * delta_l`` over each sample's named LoRAs.

    ``sample_weights`` ``(B, L)`` float32: the policy's weight of each position for the sample's image (the
    LoRA scale of the call folded in), so a step-dependent policy changes it without recompiling. With ``gains``
    (DoRA) the call's LoRA scale goes in ``scales`` instead (it scales the delta inside DoRA's gain, not the gain).
    """
    y = base_linear(x, weight, bias)
    x3 = x.reshape(sample_slots.shape[0], -1, x.shape[-1])
    return _mix(y, _unbiased(y, bias, gains), sample_slots, scales, sample_weights, gains,
                lambda index, coef: gathered_delta(x3, a_stack, b_stack, index, coef)).to(x.dtype)


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, groups: int, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv``'s convolution (its stride, padding, dilation and padding mode, as ``conv._conv_forward``) of ``x``
    with another ``weight``, in ``groups`` groups and without bias.

    Args:
        x: ``(1, groups * C_in, H, W)``: the samples side by side along channels.
        weight: ``(groups * R, C_in, kh, kw)``: each sample's kernel.
        groups: the number of samples.
        conv: the base layer (an ``nn.Conv2d`` with ``groups == 1``).

    Example:
        >>> grouped_conv2d(x.reshape(1, -1, h, w), a.reshape(-1, *a.shape[2:]), batch, unet.conv_in)  # doctest: +SKIP
    """
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    return F.conv2d(x, weight, None, conv.stride, padding, conv.dilation, groups)


def gathered_conv_delta(x: torch.Tensor, conv: torch.nn.Conv2d, a_stack: torch.Tensor, b_stack: torch.Tensor,
                        slots: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef[b] * B_{slot_b} * (A_{slot_b} * x_b)`` for every sample ``b`` (``*``: ``conv``'s convolution, then a
    1x1 one), ``(B, N, H_out, W_out)`` at ``coef``'s precision, with no loop over samples.

    Args:
        x: ``(B, C_in, H, W)``, in the dtype the convolutions run in (the model's).
        a_stack: ``(S, R, C_in, kh, kw)``; ``b_stack`` ``(S, N, R)``.
        slots: ``(B,)`` int64 slot indices (an unused position: the zero slot, ``coef`` 0).
        coef: ``(B,)`` at accumulation precision.
    """
    batch, channels, height, width = x.shape
    a = a_stack[slots].to(x.dtype)  # (B, R, C_in, kh, kw)
    b = b_stack[slots].to(x.dtype)  # (B, N, R)
    rank, out_channels = a.shape[1], b.shape[1]
    hidden = grouped_conv2d(x.reshape(1, batch * channels, height, width), a.reshape(batch * rank, *a.shape[2:]),
                            batch, conv)  # (1, B * R, H_out, W_out)
    delta = F.conv2d(hidden, b.reshape(batch * out_channels, rank, 1, 1), groups=batch)
    return delta.reshape(batch, out_channels, *delta.shape[2:]).to(coef.dtype) * coef.reshape(-1, 1, 1, 1)


def _conv_setup(x: torch.Tensor, conv: torch.nn.Conv2d, a_stack: torch.Tensor):
    """(the base output y0, convolved in ``x.dtype`` and upcast to accumulation precision, ``a_stack`` with a kernel:
    1x1 storage viewed 5-d)."""
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    y0 = conv._conv_forward(x, conv.weight.to(x.dtype), bias).to(accumulation_dtype(x.dtype))
    return y0, a_stack if a_stack.ndim == 5 else a_stack[..., None, None]


def pooled_fls_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, a_stack: torch.Tensor, b_stack: torch.Tensor,
                      scales: torch.Tensor, present: torch.Tensor, sample_slots: torch.Tensor, row_groups,
                      divergence: str = "kl", gains=None):
    """N-way FLS conv over pool slots (see the module contract): the linear op's rule with channels at dim 1.

    Args:
        x: ``(B, C_in, H, W)``.
        conv: the base ``nn.Conv2d`` (its weight, bias and geometry).
        row_groups: ``pixels -> (row_group, num_groups)``, called once the output size is known (``H_out * W_out``
            pixels a sample): ``row_group`` ``(B * pixels,)`` the decision group of each output pixel, sample-major.

    Returns:
        ``(out, scores, choice)``: ``out`` ``(B, N, H_out, W_out)`` in ``x.dtype``, ``scores`` ``(G, L)``,
        ``choice`` ``(G,)`` int64 (``-1``: base).

    Example:
        >>> groups_of = lambda pixels: context.row_groups(batch, pixels, device)
        >>> out, scores, choice = pooled_fls_conv2d(x, conv, held.a, held.b, held.scales, held.present, slots,
        ...                                         groups_of)  # doctest: +SKIP
    """
    y0, a_stack = _conv_setup(x, conv, a_stack)
    batch, _, height, width = y0.shape
    row_group, num_groups = row_groups(height * width)
    deltas, candidates = _deltas(y0, _unbiased(y0, conv.bias, gains), sample_slots, scales, present, gains,
                                 lambda index, coef: gathered_conv_delta(x, conv, a_stack, b_stack, index, coef),
                                 pixel_rows)
    out, scores, choice = select_n(pixel_rows(y0), deltas, candidates, row_group, num_groups, divergence)
    return from_pixel_rows(out, batch, height, width).to(x.dtype), scores, choice


def pooled_mix_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, a_stack: torch.Tensor, b_stack: torch.Tensor,
                      scales: torch.Tensor, sample_slots: torch.Tensor, sample_weights: torch.Tensor,
                      gains=None) -> torch.Tensor:
    """Static per-image weights on a conv layer: ``y0 + sum_l w[b, l] * s_l * delta_l`` (see ``pooled_mix_linear``).

    Example:
        >>> out = pooled_mix_conv2d(x, conv, held.a, held.b, held.scales, slots, weights)  # doctest: +SKIP
    """
    y, a_stack = _conv_setup(x, conv, a_stack)
    return _mix(y, _unbiased(y, conv.bias, gains), sample_slots, scales, sample_weights, gains,
                lambda index, coef: gathered_conv_delta(x, conv, a_stack, b_stack, index, coef)).to(x.dtype)


__all__ = ["decide_n", "dora_delta", "gathered_conv_delta", "gathered_delta", "grouped_conv2d", "pooled_fls_conv2d",
           "pooled_fls_linear", "pooled_mix_conv2d", "pooled_mix_linear", "select_n"]
