"""Fused LoRA ops with backend dispatch.

``reference``: pure torch (``reference.py``), any device; the oracle.
``triton``: the kernels in ``csrc_triton`` via ``triton_ops`` (CUDA, or CPU under TRITON_INTERPRET=1).
``auto``: triton for CUDA tensors when it imports, else reference.
"""
from __future__ import annotations

import torch

from . import reference
from .reference import DIVERGENCES

BACKENDS = ("auto", "reference", "triton")


def _triton_ops():
    from . import triton_ops  # imported lazily: triton is optional on CPU-only installs

    return triton_ops


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("reference" or "triton") for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        try:
            return "triton" if _triton_ops().is_available() else "reference"
        except ImportError:
            return "reference"
    return backend


def fls_linear(*args, backend: str = "reference", prev_choose=None, **kwargs):
    """See ``reference.fls_linear``; returns (out, subject_score, style_score, choose_subject).

    ``prev_choose``: the layer's last decisions, the Triton kernel's speculation guess (it never
    changes the result, only the cost); the reference ignores it.
    """
    if backend == "triton":
        return _triton_ops().fls_linear(*args, prev_choose=prev_choose, **kwargs)
    return reference.fls_linear(*args, **kwargs)


def mix_linear(*args, backend: str = "reference", **kwargs):
    """See ``reference.mix_linear``."""
    if backend == "triton":
        return _triton_ops().mix_linear(*args, **kwargs)
    return reference.mix_linear(*args, **kwargs)


__all__ = ["BACKENDS", "DIVERGENCES", "fls_linear", "mix_linear", "resolve_backend", "reference"]
