"""Fused LoRA ops with backend dispatch.

``reference``: pure torch (``reference.py``), any device; the oracle.
``triton``: the kernels in ``csrc_triton`` via ``triton_ops`` (CUDA, or CPU under TRITON_INTERPRET=1).
``auto``: triton for CUDA tensors when it imports, else reference.
"""
from __future__ import annotations

import torch

from fusion_engine.errors import AttachError, OptionError
from fusion_engine.utils.deprecation import renamed_option

from . import reference
from .reference import DIVERGENCES

BACKENDS = ("auto", "reference", "triton")
LAYER_KINDS = ("linear", "conv2d")  # conv2d layers run the reference rule on every backend


def _triton_ops():
    from fusion_engine.ops import triton_ops  # imported lazily: triton is optional on CPU-only installs

    return triton_ops


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("reference" or "triton") for tensors on ``device``."""
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        try:
            return "triton" if _triton_ops().is_available() else "reference"
        except ImportError:
            return "reference"
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


__all__ = ["BACKENDS", "DIVERGENCES", "LAYER_KINDS", "check_supported", "fls_linear", "mix_linear",
           "reference", "resolve_backend"]
