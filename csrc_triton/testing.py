"""Accuracy checks of the Triton ops, shared by tests/test_kernels.py and bench/gpu_table.py.

Imports torch only (the kernels are reached through ``utils``), so it runs where diffusers is not
installed; the float64 oracle is passed in as ``reference`` (``fusion_engine.ops.reference``),
which keeps this package free of imports from the engine above it.

The rules (FlashAttention's tolerance, from the project's DESIGN.md):

* Output and per-group scores: the kernel's max error against a float64 run of the reference is
  at most twice the error of the same computation done eagerly by torch in the input dtype
  (``F.linear`` for the base and for each LoRA factor), plus ``ATOL[dtype]`` times the scale.
* Decisions: equal to the float64 decisions except for groups whose two float64 scores are closer
  than twice the score tolerance (either answer is right there); the output is checked against
  the decision the kernel reported. With one LoRA absent the decision is static and exact.
* Speculation: whatever the guess, the output and decisions are bit-for-bit those of the unguessed call.
* Poison: under ``poisoned_outputs()`` every buffer a launcher allocates starts as NaN / 0x5A, so
  an element a kernel forgets to write fails the checks instead of passing on lucky zeros.
* bf16 under the interpreter: ``interpreter_bf16_dot()`` makes the interpreter's ``tl.dot`` read
  bf16 operands as numbers (it multiplies their raw uint16 bits otherwise), so bf16 kernels can be
  checked on CPU; loads, stores and casts of bf16 are right in the interpreter already.

Example:
    >>> from fusion_engine.ops import reference, triton_ops
    >>> inputs = make_fls_inputs(41, 61, 77, 3, 5, (10, 20, 11), torch.float32, seed=0)
    >>> with poisoned_outputs():
    ...     result = triton_ops.fls_linear(**inputs, divergence="kl")
    >>> check_fls_linear(result, inputs, "kl", reference).assert_ok()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import utils

# added to 2x the eager error, relative to the output / score scale
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@contextlib.contextmanager
def interpreter_bf16_dot():
    """While the block runs, the Triton interpreter's ``tl.dot`` widens bf16 operands to fp32 first.

    The interpreter stores bf16 as uint16 bits and its dot multiplies those bits as integers. A bf16
    x bf16 product is exact in fp32 (8-bit significands), so widening first gives what a GPU's bf16
    dot with an fp32 accumulator computes, up to the order of the additions. bf16 elementwise
    arithmetic stays wrong in the interpreter (the kernels cast to fp32 before any)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot_widened
    try:
        yield
    finally:
        builder.create_dot = create_dot


@contextlib.contextmanager
def forced_base(base: str):
    """While the block runs, the FLS launchers put every layer's base GEMM where ``base`` says ("fused": in the Triton
    kernel; "cublas": the split variant) instead of their size-class choice (``utils.fls_base_config``, read from its
    table at each plan miss). The launchers' plans, which keep the mode they were made with, are dropped on entry and
    exit, so a call with ``base=None`` cannot replay a plan of the other mode (benchmarks compare the two)."""
    from . import fls_linear, pooled_fls_linear, pooled_mix_linear

    def reset(table: dict) -> None:
        utils._FLS_BASE_TABLE.clear()
        utils._FLS_BASE_TABLE.update(table)
        for module in (fls_linear, pooled_fls_linear, pooled_mix_linear):
            module._PLANS.clear()

    saved = dict(utils._FLS_BASE_TABLE)
    reset(dict.fromkeys(saved, base))
    try:
        yield
    finally:
        reset(saved)


@contextlib.contextmanager
def poisoned_outputs():
    """NaN-fill (0x5A for integers) every buffer the launchers allocate while the block runs."""
    before = utils.POISON_OUTPUTS
    utils.POISON_OUTPUTS = True
    try:
        yield
    finally:
        utils.POISON_OUTPUTS = before


def make_fls_inputs(M, K, N, subject_rank, style_rank, group_sizes, dtype, seed, *, bias=True, interleave=False,
                    device="cpu", bias_std=1.0, b_std=(0.5, 0.5), scales=(0.8, 1.25), with_x=True) -> dict:
    """Random keyword arguments of ``fls_linear`` (fresh, never zeros): x (M, K), weight (N, K),
    LoRAs of the given ranks (0 = absent), rows in groups of ``group_sizes`` (contiguous, or
    scattered over tiles with ``interleave``). ``with_x=False`` leaves x out (x=None)."""
    assert sum(group_sizes) == M, f"group sizes {group_sizes} do not add up to M={M}"
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    row_group = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(group_sizes)])
    x = rnd(M, K) if with_x else None
    inputs = dict(
        x=x, weight=rnd(N, K, std=K ** -0.5), bias=rnd(N, std=bias_std) if bias else None,
        subject_a=rnd(subject_rank, K, std=K ** -0.5), subject_b=rnd(N, subject_rank, std=b_std[0]),
        subject_scale=scales[0],
        style_a=rnd(style_rank, K, std=K ** -0.5), style_b=rnd(N, style_rank, std=b_std[1]), style_scale=scales[1],
        row_group=row_group, num_groups=len(group_sizes),
    )
    if interleave:  # rows of a group scattered across tiles: the kernel's per-row atomic path
        inputs["row_group"] = row_group[torch.randperm(M, generator=g, device=device)]
    return inputs


def mix_inputs(fls_inputs: dict, coef: torch.Tensor) -> dict:
    """Keyword arguments of ``mix_linear`` from those of ``fls_linear`` (scales folded into ``coef``)."""
    keys = ("x", "weight", "bias", "subject_a", "subject_b", "style_a", "style_b")
    return {**{k: fls_inputs[k] for k in keys}, "coef": coef}


def to_float64(inputs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def eager_branches(inputs: dict):
    """Same-dtype eager torch: (y0, y0 + d_subject, y0 + d_style), every intermediate in the dtype."""
    x = inputs["x"]
    y0 = F.linear(x, inputs["weight"], inputs["bias"])

    def branch(a, b, scale):
        return y0 if a.shape[0] == 0 else y0 + F.linear(F.linear(x, a), b) * scale

    return (y0, branch(inputs["subject_a"], inputs["subject_b"], inputs["subject_scale"]),
            branch(inputs["style_a"], inputs["style_b"], inputs["style_scale"]))


@dataclass
class KernelCheck:
    """Errors and tolerances of one check; ``problems`` lists what failed (empty = ok)."""

    out_error: float = 0.0
    out_tol: float = 0.0
    score_error: float = 0.0
    score_tol: float = 0.0
    near_tie_flips: int = 0  # groups decided unlike float64 where its scores are within the tolerance (allowed)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def assert_ok(self) -> None:
        assert self.ok, "; ".join(self.problems) + f" ({self})"


def check_fls_linear(result, inputs: dict, divergence: str, reference) -> KernelCheck:
    """Check ``result = (out, subject_score, style_score, choice)`` of the Triton
    ``fls_linear`` on ``inputs`` against a float64 run of ``reference`` (see the module rules)."""
    out, subject_score, style_score, choice = result
    check = KernelCheck()
    dtype = inputs["x"].dtype
    G, row_group = inputs["num_groups"], inputs["row_group"]
    check.expect(out.dtype == dtype and subject_score.dtype == style_score.dtype == torch.float32
                 and choice.dtype == torch.bool, f"dtypes {out.dtype}, {subject_score.dtype}, {choice.dtype}")
    check.expect(set(choice.view(torch.uint8).tolist()) <= {0, 1}, "decision buffer not (fully) written")
    check.expect(bool(torch.isfinite(subject_score).all() and torch.isfinite(style_score).all()
                      and torch.isfinite(out).all()), "non-finite (unwritten?) output or scores")

    a64 = to_float64(inputs)
    _, ref_subject, ref_style, ref_choice = reference.fls_linear(**a64, divergence=divergence)
    # scores: 2x the eager same-dtype error (statistics in float32 from the rounded branch outputs)
    y0e, y_subject_e, y_style_e = eager_branches(inputs)
    eager_subject = reference.group_mean(reference.row_divergence(y_subject_e.float(), y0e.float(), divergence),
                                         row_group, G)
    eager_style = reference.group_mean(reference.row_divergence(y_style_e.float(), y0e.float(), divergence),
                                       row_group, G)
    scale = max([1.0] + [t.abs().max().item() for t in (ref_subject, ref_style) if t.numel()])
    check.score_tol = (2 * max(max_error(eager_subject, ref_subject), max_error(eager_style, ref_style))
                       + ATOL[dtype] * scale)
    check.score_error = max(max_error(subject_score, ref_subject), max_error(style_score, ref_style))
    check.expect(check.score_error <= check.score_tol, f"score error {check.score_error:.3e} > {check.score_tol:.3e}")

    # decisions: exact except where the float64 scores are within the tolerance of each other
    has_subject, has_style = inputs["subject_a"].shape[0] > 0, inputs["style_a"].shape[0] > 0
    if not (has_subject and has_style):
        check.expect(torch.equal(choice, reference.decide(subject_score, style_score, has_subject, has_style)),
                     "an absent LoRA won a group")
    close = (ref_subject - ref_style).abs() <= 2 * check.score_tol
    check.near_tie_flips = int((choice[close] != ref_choice[close]).sum())
    check.expect(torch.equal(choice[~close], ref_choice[~close]),
                 f"decisions {choice.tolist()} != float64 {ref_choice.tolist()} outside close groups {close.tolist()}")

    # output: against float64 with the decision the kernel reported
    y0 = reference.base_linear(a64["x"], a64["weight"], a64["bias"])
    subject_delta = inputs["subject_scale"] * reference.lora_delta(a64["x"], a64["subject_a"], a64["subject_b"])
    style_delta = inputs["style_scale"] * reference.lora_delta(a64["x"], a64["style_a"], a64["style_b"])
    ref_out = reference.select_rows(y0, subject_delta, style_delta, choice, row_group)
    eager_out = torch.where(choice[row_group.long()].unsqueeze(-1), y_subject_e, y_style_e)
    check.out_tol = 2 * max_error(eager_out, ref_out) + ATOL[dtype] * max(1.0, ref_out.abs().max().item())
    check.out_error = max_error(out, ref_out)
    check.expect(check.out_error <= check.out_tol, f"output error {check.out_error:.3e} > {check.out_tol:.3e}")
    return check


def check_mix_linear(out, inputs: dict, reference) -> KernelCheck:
    """Check the Triton ``mix_linear`` output on ``inputs`` (its keyword arguments) against float64."""
    check = KernelCheck()
    dtype, coef = inputs["x"].dtype, inputs["coef"]
    ref = reference.mix_linear(**to_float64(inputs))
    eager = F.linear(inputs["x"], inputs["weight"], inputs["bias"])
    for role, c in (("subject", coef[0]), ("style", coef[1])):
        a, b = inputs[f"{role}_a"], inputs[f"{role}_b"]
        if a.shape[0]:
            eager = eager + F.linear(F.linear(inputs["x"], a), b) * c.to(dtype)
    check.out_tol = 2 * max_error(eager, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item())
    check.out_error = max_error(out, ref)
    check.expect(out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}")
    check.expect(check.out_error <= check.out_tol, f"output error {check.out_error:.3e} > {check.out_tol:.3e}")
    return check


def check_speculation(fls_linear, inputs: dict, divergence: str, guesses) -> KernelCheck:
    """Run ``fls_linear`` without a guess and with each of ``guesses`` ((G,) bool tensors): the
    outputs and decisions must be bitwise equal, the scores equal to float32 rounding (atomics)."""
    check = KernelCheck()
    base, subject_score, style_score, choice = fls_linear(**inputs, divergence=divergence)
    for i, guess in enumerate(guesses):
        out, subject_score2, style_score2, choice2 = fls_linear(**inputs, divergence=divergence, prev_choice=guess)
        check.out_error = max(check.out_error, max_error(out, base))
        check.expect(torch.equal(out, base), f"guess {i} ({guess.tolist()}): output differs from the unguessed call")
        check.expect(torch.equal(choice2, choice), f"guess {i}: decisions {choice2.tolist()} != {choice.tolist()}")
        check.expect(torch.allclose(subject_score2, subject_score, rtol=1e-6, atol=1e-6)
                     and torch.allclose(style_score2, style_score, rtol=1e-6, atol=1e-6), f"guess {i}: scores differ")
    return check
