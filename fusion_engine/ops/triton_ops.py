"""torch.library registration of the Triton kernels of ``fusion_engine.kernels`` (source folder ``csrc_triton/``).

The ops are ``torch.library.custom_op``s with fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces a model through them as single graph nodes (and a
CUDA-graph capture of a compiled or eager step records their launches: grids depend on shapes
only and nothing synchronises with the host).

Device rule: CUDA tensors run the kernels. CPU tensors run them only under the Triton
interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is first imported;
otherwise a BackendError (a RuntimeError) says so (use backend="reference" for plain CPU work).

``divergence="js"`` is not fused (it needs each row's LSEs before a second sweep): it runs the
reference implementation on the same device, which is still free of host synchronisation.

Gradients: the engine's LoRAs and base weights are frozen, so the backward pass returns the
gradient for ``x`` only (through the chosen branch: the decision itself is piecewise constant),
which is what latent-level refinement needs.
"""
from __future__ import annotations

import os

import torch

from ..errors import BackendError
from . import pooled, reference

try:
    import triton  # noqa: F401

    from .. import kernels as _kernels

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    _kernels = None
    _IMPORT_ERROR = exc

Tensor = torch.Tensor


def is_available() -> bool:
    """True when the kernels can run on CUDA tensors (triton imports and a GPU is visible)."""
    return _kernels is not None and not _kernels.INTERPRET and torch.cuda.is_available()


def unsupported(dtype: torch.dtype, ranks) -> str:
    """Why the kernels cannot run a linear layer with this weight dtype and these LoRA ranks ("" if they can)."""
    if _kernels is None:
        return f"backend='triton' needs triton and fusion_engine.kernels importable: {_IMPORT_ERROR!r}"
    if dtype not in _kernels.SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _kernels.SUPPORTED_DTYPES)
        return f"dtype {str(dtype).replace('torch.', '')} is not one the Triton kernels take ({names})"
    too_large = [r for r in ranks if r > _kernels.MAX_RANK]
    if too_large:
        return f"LoRA rank {max(too_large)} exceeds the Triton kernels' limit of {_kernels.MAX_RANK}"
    return ""


def _check_device(x: Tensor) -> None:
    if _kernels is None:
        raise BackendError(f"backend='triton' needs triton and fusion_engine.kernels importable: {_IMPORT_ERROR!r}")
    if x.device.type == "cuda":
        if _kernels.INTERPRET:
            raise BackendError("fusion_engine.kernels was imported with TRITON_INTERPRET=1: kernels only take CPU "
                               "tensors now")
        return
    if x.device.type == "cpu":
        if _kernels.INTERPRET:
            return
        hint = "" if os.environ.get("TRITON_INTERPRET") != "1" else (
            " (TRITON_INTERPRET=1 is set now, but triton was imported before it was)")
        raise BackendError(
            "backend='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton / fusion_engine, or use backend='reference'" + hint)
    raise BackendError(f"backend='triton' supports CUDA (or CPU under TRITON_INTERPRET=1), not {x.device}")


def _eager(x: Tensor) -> bool:
    """True where a call may run the launcher directly instead of the registered op: nothing is compiling or
    tracing (the op is what torch.compile and export see), ``x`` is a plain tensor (not a fake or functional
    one) and no gradient is wanted (the op carries the autograd formula). The launcher is what the op runs, so
    the result is the same; the dispatcher's cost per call is not paid."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()))


# --------------------------------------------------------------------------- fls_linear

@torch.library.custom_op("fusion_engine::fls_linear_triton", mutates_args=())
def _fls_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, subject_a: Tensor, subject_b: Tensor, subject_scale: float,
    style_a: Tensor, style_b: Tensor, style_scale: float, row_group: Tensor, num_groups: int, divergence: str,
    prev_choice: Tensor | None, base: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_device(x)
    return _kernels.fls_linear_fwd(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale,
                                   row_group, num_groups, divergence, prev_choice, base)


@_fls_linear_op.register_fake
def _(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale, row_group, num_groups,
      divergence, prev_choice, base):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    scores = x.new_empty((num_groups,), dtype=torch.float32)
    return out, scores, torch.empty_like(scores), x.new_empty((num_groups,), dtype=torch.bool)


def _fls_setup_context(ctx, inputs, output):
    x, weight, _, subject_a, subject_b, subject_scale, style_a, style_b, style_scale, row_group, *_ = inputs
    ctx.save_for_backward(weight, subject_a, subject_b, style_a, style_b, row_group, output[3])
    ctx.scales = (subject_scale, style_scale)


def _lora_grad(g: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """d/dx of scale * (x A^T) B^T applied to g: scale * (g B) A."""
    if a.shape[0] == 0:
        return torch.zeros((g.shape[0], a.shape[1]), dtype=g.dtype, device=g.device)
    return (g @ b.to(g.dtype)) @ (scale * a).to(g.dtype)


def _fls_backward(ctx, grad_out, _gc, _gs, _gch):
    weight, subject_a, subject_b, style_a, style_b, row_group, choice = ctx.saved_tensors
    subject_scale, style_scale = ctx.scales
    gx = grad_out @ weight.to(grad_out.dtype)
    take_subject = choice[row_group.long()].unsqueeze(-1)
    subject_grad = _lora_grad(grad_out, subject_a, subject_b, subject_scale)
    gx = gx + torch.where(take_subject, subject_grad, _lora_grad(grad_out, style_a, style_b, style_scale))
    return (gx,) + (None,) * 13


_fls_linear_op.register_autograd(_fls_backward, setup_context=_fls_setup_context)


def fls_linear(x, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b, style_scale, row_group,
               num_groups, divergence="kl", prev_choice=None, base=None):
    """Fused FLS linear (see ``reference.fls_linear``); returns (out, subject_score, style_score, choice).

    ``prev_choice`` (optional, extra to the reference signature): the (G,) bool decisions this
    layer returned on its previous call (e.g. the last denoising step). It is only the kernel's
    speculation guess: a stale or wrong guess costs a recompute of the affected tiles, never
    accuracy. Keep it in a persistent buffer (``buf.copy_(choice)``) for CUDA-graph replay.
    ``base`` (optional): "fused" or "cublas" overrides the kernels' size-class choice of where the base
    output comes from (see csrc_triton/fls_linear.py; for tests and benchmarks).
    Inputs with more than two dims are flattened to rows; ``row_group`` indexes those rows.
    """
    _check_device(x)
    reference.check_divergence(divergence)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if divergence == "js":
        # JS needs both LSEs before its second sweep: not fused, reference on the same device
        out, sc, ss, ch = reference.fls_linear(x2, weight, bias, subject_a, subject_b, subject_scale, style_a, style_b,
                                               style_scale, row_group, num_groups, divergence)
    else:
        op = _kernels.fls_linear_fwd if _eager(x2) else _fls_linear_op
        out, sc, ss, ch = op(x2, weight, bias, subject_a, subject_b, float(subject_scale), style_a, style_b,
                             float(style_scale), row_group, int(num_groups), divergence, prev_choice, base)
    return out.reshape(*lead, out.shape[-1]), sc, ss, ch


# --------------------------------------------------------------------------- mix_linear

@torch.library.custom_op("fusion_engine::mix_linear_triton", mutates_args=())
def _mix_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, subject_a: Tensor, subject_b: Tensor,
                   style_a: Tensor, style_b: Tensor, coef: Tensor) -> Tensor:
    _check_device(x)
    return _kernels.mix_linear_fwd(x, weight, bias, subject_a, subject_b, style_a, style_b, coef)


@_mix_linear_op.register_fake
def _(x, weight, bias, subject_a, subject_b, style_a, style_b, coef):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _mix_setup_context(ctx, inputs, output):
    _, weight, _, subject_a, subject_b, style_a, style_b, coef = inputs
    ctx.save_for_backward(weight, subject_a, subject_b, style_a, style_b, coef)


def _mix_backward(ctx, grad_out):
    weight, subject_a, subject_b, style_a, style_b, coef = ctx.saved_tensors
    gx = grad_out @ weight.to(grad_out.dtype)
    gx = gx + _lora_grad(grad_out, subject_a, subject_b, 1.0) * coef[0].to(grad_out.dtype)
    gx = gx + _lora_grad(grad_out, style_a, style_b, 1.0) * coef[1].to(grad_out.dtype)
    return (gx,) + (None,) * 7


_mix_linear_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


def mix_linear(x, weight, bias, subject_a, subject_b, style_a, style_b, coef):
    """y0 + coef[0] d_c + coef[1] d_s (see ``reference.mix_linear``); coef a float32 (2,) tensor."""
    _check_device(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    op = _kernels.mix_linear_fwd if _eager(x2) else _mix_linear_op
    out = op(x2, weight, bias, subject_a, subject_b, style_a, style_b, coef)
    return out.reshape(*lead, out.shape[-1])


# --------------------------------------------------------------------------- pooled_mix_linear (the LoRA pool)

def _pooled_mix_linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, a_stack: Tensor, b_stack: Tensor,
                            scales: Tensor, sample_slots: Tensor, sample_weights: Tensor, slot_ranks: Tensor | None,
                            base: str | None) -> Tensor:
    _check_device(x)
    return _kernels.pooled_mix_linear_fwd(x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights,
                                          slot_ranks, base)


_pooled_mix_linear_op = torch.library.custom_op("fusion_engine::pooled_mix_linear_triton", _pooled_mix_linear_impl,
                                                mutates_args=())
_pooled_mix_linear_op.register_fake(lambda x, weight, *_stacks_and_tables: x.new_empty((x.shape[0], weight.shape[0])))


def pooled_mix_linear(x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks=None,
                      base=None):
    """The pool's static-weight linear (see ``fusion_engine.ops.pooled.pooled_mix_linear``); forward only (no
    autograd registration yet: a guided backward runs the reference ops).

    ``slot_ranks`` (optional): (S,) int32/int64 device tensor of each slot's own rank, which the kernels pad to, each
    slot on its own (None: read from the stacks on the device). ``base`` (optional): "fused" or "cublas" overrides
    the size-class choice of where the base output comes from (csrc_triton/pooled_mix_linear.py)."""
    _check_device(x)
    op = _kernels.pooled_mix_linear_fwd if _eager(x) else _pooled_mix_linear_op
    return op(x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks, base)


# --------------------------------------------------------------------------- pooled_fls_linear (the LoRA pool)

def _pooled_fls_linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, a_stack: Tensor, b_stack: Tensor,
                            scales: Tensor, present: Tensor, sample_slots: Tensor, row_group: Tensor, num_groups: int,
                            divergence: str, prev_choice: Tensor | None, slot_ranks: Tensor | None,
                            base: str | None) -> tuple[Tensor, Tensor, Tensor]:
    _check_device(x)
    return _kernels.pooled_fls_linear_fwd(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group,
                                          num_groups, divergence, prev_choice, slot_ranks, base)


def _pooled_fls_linear_fake(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group, num_groups,
                            divergence, prev_choice, slot_ranks, base):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((num_groups, sample_slots.shape[1]), dtype=torch.float32),
            x.new_empty((num_groups,), dtype=torch.int64))


_pooled_fls_linear_op = torch.library.custom_op("fusion_engine::pooled_fls_linear_triton", _pooled_fls_linear_impl,
                                                mutates_args=())
_pooled_fls_linear_op.register_fake(_pooled_fls_linear_fake)


def pooled_fls_linear(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group, num_groups,
                      divergence="kl", prev_choice=None, slot_ranks=None, base=None):
    """The pool's N-way FLS linear (see ``fusion_engine.ops.pooled.pooled_fls_linear``); returns (out, scores,
    choice). Forward only, as ``pooled_mix_linear`` (a guided backward runs the reference ops).

    ``prev_choice`` (optional, extra to the reference signature): the (G,) int64 choices this layer returned on its
    previous call, only the kernel's speculation guess (a stale or wrong guess costs a recompute of the affected
    tiles, never accuracy). ``slot_ranks`` and ``base``: as ``pooled_mix_linear``. ``divergence="js"`` is not
    fused: it runs the pooled reference op on the same device.
    """
    _check_device(x)
    reference.check_divergence(divergence)
    if divergence == "js":
        return pooled.pooled_fls_linear(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group,
                                        num_groups, divergence)
    op = _kernels.pooled_fls_linear_fwd if _eager(x) else _pooled_fls_linear_op
    return op(x, weight, bias, a_stack, b_stack, scales, present, sample_slots, row_group, int(num_groups), divergence,
              prev_choice, slot_ranks, base)


__all__ = ["fls_linear", "is_available", "mix_linear", "pooled_fls_linear", "pooled_mix_linear", "unsupported"]
