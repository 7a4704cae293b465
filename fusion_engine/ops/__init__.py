"""Fused LoRA ops with backend dispatch.

``reference``: pure torch (``reference.py``), any device; the oracle.
``triton``: the kernels of ``fusion_engine.kernels`` via ``triton_ops`` (CUDA, or CPU under TRITON_INTERPRET=1).
``auto``: triton for CUDA tensors when it imports, else reference; given the layer's size (``resolve_backend``'s
``size``), the fastest backend for its size class on the GPU measurements recorded in the repository
(``backend_choice``).
"""
from __future__ import annotations

import torch

from ..errors import AttachError, OptionError
from ..utils.deprecation import renamed_option
from . import backend_choice, pooled, reference
from .reference import DIVERGENCES

BACKENDS = ("auto", "reference", "triton")
LAYER_KINDS = ("linear", "conv2d")  # conv2d layers run the reference rule on every backend


def _triton_ops():
    from . import triton_ops  # imported lazily: triton is optional on CPU-only installs

    return triton_ops


def resolve_backend(backend: str, device: torch.device, size: dict | None = None) -> str:
    """The concrete backend ("reference" or "triton") for tensors on ``device``.

    ``size`` (optional, for ``"auto"``): the layer call's ``op``, ``M``, ``N``, ``K``, ``rank`` and ``dtype`` (see
    ``backend_choice.choose_backend``); with it, ``"auto"`` on CUDA picks by size class on the recorded
    measurements, without it the kernels wherever they run."""
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        try:
            available = _triton_ops().is_available()
        except ImportError:
            available = False
        if not available or size is None:
            return "triton" if available else "reference"
        return backend_choice.resolve(backend, device_type=device.type, triton_available=True, **size)[0]
    return backend


def check_supported(backend: str, layer_kind: str, dtype: torch.dtype, ranks, *, device="cpu", layer: str = "") -> None:
    """Fail now, not at the first launch mid-sampling, if ``backend`` cannot run this layer.

    Args:
        backend: "auto", "reference" or "triton"; "auto" is checked as what it picks on ``device``.
        layer_kind: "linear" (runs the op of the backend) or "conv2d" (the reference rule on every backend).
        dtype: the layer's weight dtype (activations are expected in it).
        ranks: the LoRA ranks the layer holds (0 = absent), e.g. ``(subject_rank, style_rank)``.
        device: where the layer's weights live.
        layer: the layer's name, for the message.

    Raises:
        AttachError: the Triton kernels are not importable, or decline the dtype or a rank (the
            message names the layer, the value and the limit).
        OptionError: an unknown backend or layer kind.

    Example:
        >>> ops.check_supported("triton", "linear", torch.float16, (64, 256), layer="to_q")  # doctest: +SKIP
        AttachError: layer 'to_q': LoRA rank 256 exceeds the Triton kernels' limit of 128; ...
    """
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if layer_kind not in LAYER_KINDS:
        raise OptionError(f"unknown layer kind {layer_kind!r}; expected one of {LAYER_KINDS}")
    if layer_kind != "linear" or resolve_backend(backend, torch.device(device)) != "triton":
        return
    try:
        problem = _triton_ops().unsupported(dtype, ranks)
    except ImportError as error:
        problem = f"the Triton kernels cannot be imported ({error})"
    if problem:
        raise AttachError(f"layer {layer!r}: {problem}; use backend='reference' for this model")


def fls_linear(*args, backend: str = "reference", prev_choice=None, prev_choose=None, **kwargs):
    """See ``reference.fls_linear``; returns (out, subject_score, style_score, choice).

    ``prev_choice``: the layer's last decisions, the Triton kernel's speculation guess (it never
    changes the result, only the cost); the reference ignores it. ``prev_choose``: its deprecated name.
    """
    prev_choice = renamed_option(prev_choice, prev_choose, "prev_choose", "prev_choice")
    if backend == "triton":
        return _triton_ops().fls_linear(*args, prev_choice=prev_choice, **kwargs)
    return reference.fls_linear(*args, **kwargs)


def mix_linear(*args, backend: str = "reference", **kwargs):
    """See ``reference.mix_linear``."""
    if backend == "triton":
        return _triton_ops().mix_linear(*args, **kwargs)
    return reference.mix_linear(*args, **kwargs)


def pooled_fls_linear(*args, backend: str = "reference", prev_choice=None, slot_ranks=None, base=None, **kwargs):
    """See ``pooled.pooled_fls_linear`` (the LoRA pool's N-way FLS); returns (out, scores, choice).

    ``prev_choice``: the layer's last choices, the Triton kernel's speculation guess (it never changes the result,
    only the cost). ``slot_ranks``: optional (S,) int tensor of each slot's own rank, which the kernels pad to slot by
    slot (None: they read it from the stacks). ``base``: the kernels' "fused" or "cublas" base GEMM (None: by size
    class). The reference ignores all three: none changes the result beyond rounding.
    """
    if backend == "triton":
        return _triton_ops().pooled_fls_linear(*args, prev_choice=prev_choice, slot_ranks=slot_ranks, base=base,
                                               **kwargs)
    return pooled.pooled_fls_linear(*args, **kwargs)


def pooled_mix_linear(*args, backend: str = "reference", slot_ranks=None, base=None, **kwargs):
    """See ``pooled.pooled_mix_linear`` (the LoRA pool's static policies); ``slot_ranks`` and ``base`` as
    ``pooled_fls_linear`` (the Triton kernels' only)."""
    if backend == "triton":
        return _triton_ops().pooled_mix_linear(*args, slot_ranks=slot_ranks, base=base, **kwargs)
    return pooled.pooled_mix_linear(*args, **kwargs)


__all__ = ["BACKENDS", "DIVERGENCES", "LAYER_KINDS", "backend_choice", "check_supported", "fls_linear", "mix_linear",
           "pooled_fls_linear", "pooled_mix_linear", "reference", "resolve_backend"]
