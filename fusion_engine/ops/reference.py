"""Pure-torch reference of the fused LoRA ops: the CPU path and the oracle for the Triton kernels.

Contract shared with the kernels of ``fusion_engine.kernels`` (source folder ``csrc_triton/``; both must agree on
every point):

* ``x`` is ``(M, K)``; ``weight`` ``(N, K)``; ``bias`` ``(N,)`` or ``None``.
* A LoRA is ``a`` ``(r, K)`` and ``b`` ``(N, r)``; an absent LoRA has ``r == 0``.
* ``row_group`` ``(M,)`` int32/int64 maps each row to a decision group in ``[0, num_groups)``.
* Divergence statistics are float32 whatever the input dtype (float64 for float64 inputs, so the
  reference can serve as a float64 oracle); a group's score is the mean of its
  rows' scores. Larger score = "perturbs the base features more":
  ``kl`` KL(P(y1) || P(y0)), ``js`` JS(P(y1), P(y0)), ``cosine`` 1 - cos(y1, y0), ``dot`` -(y1 . y0),
  with P = softmax over the last dimension.
* The subject branch wins ties (equal group scores, both branches present and non-zero).
* A layer where one LoRA is absent always takes the present one. A branch whose delta is exactly zero
  on every row of a group counts as absent for that group (an all-zero B, or inputs in A's null
  space): otherwise ``dot`` (where y0 . y0 can beat (y0 + d) . y0) and ties of shift-invariant
  divergences (``kl``/``js`` with d constant along channels, ``cosine`` with d parallel to y0) could
  pick a LoRA that adds nothing over one that does. Both zero: the subject (a no-op either way).
  Kernels: a per-group "any d != 0" flag per branch, reduced like the scores.
* Outputs are accumulated in float32 (float64 for float64 inputs) and rounded once to ``x.dtype``.
* Here, every GEMM (and convolution) runs in ``x.dtype``, the model's, as eager torch / cuBLAS / PEFT run it: half
  precision on tensor cores for fp16/bf16 models, and exactly the old float32 code for float32 ones. Each GEMM's result
  is upcast to the accumulation precision and everything after it (bias, scales, sums, the divergence statistics:
  softmax, LSE, KL, cosine, dot and the group means) runs there, rounded once at the end. For half inputs this is
  within FlashAttention's rule of the float64 oracle (tests/test_half_precision.py); the oracle is this code run in
  float64. A raw delta ``(x A^T) B^T`` is formed in ``x.dtype`` before its scale, as PEFT forms it.
  One documented exception: the kernels' split variant (``base="cublas"``, the default for
  FLUX-sized layers) takes y0 from cuBLAS already rounded to ``x.dtype`` (the merged layer's own
  ``F.linear``) and adds the deltas in float32, so y0 is rounded once more; it is held to the same
  tolerance against this reference (see csrc_triton/fls_linear.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import OptionError

DIVERGENCES = ("kl", "js", "cosine", "dot")


def check_divergence(divergence: str) -> str:
    """``divergence`` if it is one of ``DIVERGENCES``, else an ``OptionError`` that lists them."""
    if divergence not in DIVERGENCES:
        raise OptionError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return divergence


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every model dtype, float64 kept for float64 (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x A^T) B^T, both GEMMs in ``x.dtype``, returned at accumulation precision; zeros for an absent (rank-0) LoRA."""
    acc = accumulation_dtype(x.dtype)
    if a.shape[0] == 0:
        return x.new_zeros(x.shape[0], b.shape[0], dtype=acc)
    return ((x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()).to(acc)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b: the GEMM in ``x.dtype``, upcast to accumulation precision, the bias added there."""
    acc = accumulation_dtype(x.dtype)
    y0 = (x @ weight.to(x.dtype).t()).to(acc)
    return y0 if bias is None else y0 + bias.to(acc)


def base_log_probs(y0: torch.Tensor, divergence: str) -> torch.Tensor | None:
    """log P(y0) when ``divergence`` needs it (``kl``, ``js``), else None: computed once per layer call and
    passed to every branch's ``row_divergence`` (the same values as computing it there)."""
    return F.log_softmax(y0, dim=-1) if divergence in ("kl", "js") else None


def row_divergence(y1: torch.Tensor, y0: torch.Tensor, divergence: str,
                   log_p0: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row perturbation score of y1 against y0 (both float32, rows x channels); ``log_p0``: optional
    ``base_log_probs(y0, divergence)``, when several branches are scored against one y0."""
    check_divergence(divergence)
    if log_p0 is None:
        log_p0 = base_log_probs(y0, divergence)
    if divergence == "kl":
        log_p1 = F.log_softmax(y1, dim=-1)
        return (log_p1.exp() * (log_p1 - log_p0)).sum(-1)
    if divergence == "js":
        log_p1 = F.log_softmax(y1, dim=-1)
        log_m = torch.logaddexp(log_p1, log_p0) - math.log(2.0)
        kl_1m = (log_p1.exp() * (log_p1 - log_m)).sum(-1)
        kl_0m = (log_p0.exp() * (log_p0 - log_m)).sum(-1)
        return 0.5 * (kl_1m + kl_0m)
    if divergence == "cosine":
        return 1.0 - F.cosine_similarity(y1, y0, dim=-1, eps=1e-12)
    return -(y1 * y0).sum(-1)  # "dot"


def pixel_rows(t: torch.Tensor) -> torch.Tensor:
    """A conv layer's ``(B, C, H, W)`` features as the rule's rows: ``(B * H * W, C)``, one row per output pixel,
    sample-major, pixels in row-major order (the layout of the single-pair and the pooled conv ops)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def from_pixel_rows(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """``pixel_rows`` undone: ``(B * H * W, C)`` rows back to ``(B, C, H, W)``."""
    return rows.reshape(batch, height, width, rows.shape[1]).permute(0, 3, 1, 2)


def group_mean(values: torch.Tensor, row_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of per-row values within each group (float32, on the device, no host sync)."""
    index = row_group.long()
    sums = values.new_zeros(num_groups).index_add_(0, index, values)
    counts = values.new_zeros(num_groups).index_add_(0, index, torch.ones_like(values))
    return sums / counts.clamp_min(1.0)


def group_nonzero(delta: torch.Tensor, row_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G,) bool: does the delta have any non-zero element in the group (on the device, no host sync)."""
    row_live = (delta != 0).any(-1).to(torch.float32)
    return row_live.new_zeros(num_groups).index_add_(0, row_group.long(), row_live) > 0


def decide(subject_score: torch.Tensor, style_score: torch.Tensor, has_subject: bool, has_style: bool,
                   subject_live: torch.Tensor | None = None, style_live: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group decision, True = subject. Ties go to the subject; an absent LoRA never wins.

    ``subject_live``/``style_live`` (optional (G,) bool): groups where that branch's delta is non-zero; a
    branch that is not live is absent for the group (see the module contract).
    """
    if not has_style:
        return torch.ones_like(subject_score, dtype=torch.bool)
    if not has_subject:
        return torch.zeros_like(subject_score, dtype=torch.bool)
    choice = subject_score >= style_score
    if subject_live is not None and style_live is not None:
        choice = torch.where(subject_live == style_live, choice, subject_live)  # exactly one live: it wins
    return choice


def select_rows(y0, subject_delta, style_delta, choice, row_group):
    """y0 + the chosen delta per row, float32."""
    take_subject = choice[row_group.long()].unsqueeze(-1)
    return y0 + torch.where(take_subject, subject_delta, style_delta)


def fls_select(y0, subject_delta, style_delta, row_group, num_groups, divergence, has_subject, has_style):
    """The FLS rule on precomputed float32 base features and deltas (rows x channels).

    Shared by the linear op and the conv module, which only differ in how they get y0 and deltas.
    """
    log_p0 = base_log_probs(y0, divergence)
    subject_score = group_mean(row_divergence(y0 + subject_delta, y0, divergence, log_p0), row_group, num_groups)
    style_score = group_mean(row_divergence(y0 + style_delta, y0, divergence, log_p0), row_group, num_groups)
    subject_live = style_live = None  # liveness only matters when both LoRAs are present (see decide)
    if has_subject and has_style:
        subject_live, style_live = (group_nonzero(d, row_group, num_groups) for d in (subject_delta, style_delta))
    choice = decide(subject_score, style_score, has_subject, has_style, subject_live, style_live)
    out = select_rows(y0, subject_delta, style_delta, choice, row_group)
    return out, subject_score, style_score, choice


def fls_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    subject_a: torch.Tensor,
    subject_b: torch.Tensor,
    subject_scale: float,
    style_a: torch.Tensor,
    style_b: torch.Tensor,
    style_scale: float,
    row_group: torch.Tensor,
    num_groups: int,
    divergence: str = "kl",
):
    """Fused FLS linear. Returns (out, subject_score, style_score, choice); scores float32 (G,),
    choice bool (G,)."""
    y0 = base_linear(x, weight, bias)
    subject_delta = subject_scale * lora_delta(x, subject_a, subject_b)
    style_delta = style_scale * lora_delta(x, style_a, style_b)
    out, subject_score, style_score, choice = fls_select(
        y0, subject_delta, style_delta, row_group, num_groups, divergence, subject_a.shape[0] > 0, style_a.shape[0] > 0
    )
    return out.to(x.dtype), subject_score, style_score, choice


def mix_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    subject_a: torch.Tensor,
    subject_b: torch.Tensor,
    style_a: torch.Tensor,
    style_b: torch.Tensor,
    coef: torch.Tensor,
) -> torch.Tensor:
    """Static-weight linear for direct and schedule policies: y0 + coef[0] dc + coef[1] ds.

    ``coef`` is a float32 device tensor of shape (2,) with the LoRA scales already folded in, so a
    policy can change it between steps without recompiling or synchronising.
    """
    y = base_linear(x, weight, bias)
    coef = coef.to(y.dtype)
    for index, (a, b) in enumerate(((subject_a, subject_b), (style_a, style_b))):
        if a.shape[0] > 0:  # an absent LoRA adds nothing (its zeros are not materialised)
            y = y + coef[index] * lora_delta(x, a, b)
    return y.to(x.dtype)
