"""Model dtypes by name, as the command line and settings spell them, and the default per device."""
from __future__ import annotations

import torch

from ..errors import OptionError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` called ``name`` (a key of ``DTYPES``).

    Example:
        ```py
        >>> torch_dtype("bfloat16")
        torch.bfloat16
        ```
    """
    if name not in DTYPES:
        raise OptionError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def default_dtype(device) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere (CPU kernels are slow or missing in half precision)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
