"""torch.compile with a clean fallback: try once, warn once, run eager from then on."""
from __future__ import annotations

import warnings

import torch

from ..errors import OptionError


def wants_compile(mode, device: torch.device) -> bool:
    """``True``: always try; ``False``: never; ``"auto"``: on CUDA only (on a CPU, compiling costs tens of
    seconds and gains little for these small graphs)."""
    if mode not in (True, False, "auto"):
        raise OptionError(f"compile must be True, False or 'auto', got {mode!r}")
    return mode is True or (mode == "auto" and device.type == "cuda")


class CompiledOrEager:
    """Calls ``fn`` compiled; the first failure (no compiler, unsupported op, ...) switches to eager for good."""

    def __init__(self, fn, enabled: bool):
        self.eager = fn
        self.compiled = enabled
        self.fn = torch.compile(fn) if enabled else fn

    def fall_back(self, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile failed for the LLR score ({type(error).__name__}: {first_line}); "
                      "running it eagerly", RuntimeWarning, stacklevel=3)
        self.fn, self.compiled = self.eager, False

    def __call__(self, *args):
        if self.compiled:
            try:
                return self.fn(*args)
            except Exception as error:  # noqa: BLE001 - any compile failure means "run eager"; eager re-raises bugs
                self.fall_back(error)
        return self.fn(*args)

    def warm_up(self, example: torch.Tensor, *args) -> None:
        """Compile forward and backward now, before sampling, so a failure never lands mid-run."""
        if not self.compiled:
            return
        try:
            with torch.enable_grad():
                x = example.detach().requires_grad_(True)
                torch.autograd.grad(self.fn(x, *args)[0].sum(), x)
        except Exception as error:  # noqa: BLE001
            self.fall_back(error)
