"""Force the Triton kernels' speculation guess wrong, to bound the cost of the fix-up pass (benchmarks, tests).

How the guess is kept: every fused layer on the triton backend holds its decisions of its previous call with the
same number of groups in a persistent device buffer (``DynamicLoRALinear._guess``: (G,) bool for the pair kernel,
True = subject; (G,) int64 for a mixed pool batch, the chosen position, -1 = base). The fused kernel writes
y0 + d_guess and the fix-up pass recomputes only the tiles whose group decided otherwise; the layer then copies
this call's decisions into the buffer. The guess changes the time of a call, never its result.

So the fix-up rate of a run (the share of groups whose decision changed since the layer's previous call) lies
between two bounds a benchmark can force:

* right guesses (rate 0): call the model twice on the same inputs; the second call's guesses are the first's
  decisions, which are the second's (the kernels are deterministic). CUDA-graph replays of one input stay there.
* wrong guesses (rate 1): ``force_wrong_guesses(model)`` replaces every kept guess by another decision just before
  each fused layer's forward (a device op, so it is captured into CUDA graphs and replayed with them).

Random LoRA weights make a real run's rate arbitrary; ``guess_buffers`` lets a caller count it (compare the buffers
before and after a call).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def guess_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The speculation buffers a fused layer keeps (empty before its first triton call, or off the triton backend)."""
    kept = getattr(module, "_last_choice", None)
    return list(kept.values()) if isinstance(kept, dict) else []


def fused_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that keep speculation buffers (fused LoRA layers, pair or pool)."""
    return [m for m in model.modules() if isinstance(getattr(m, "_last_choice", None), dict)]


def wrong_guess_(buffer: torch.Tensor) -> torch.Tensor:
    """Replace a kept guess, in place, by a decision that differs from it in every group: the other LoRA of a pair
    (bool buffers); position 1 for a pool group that chose position 0, else position 0 (int64 buffers)."""
    if buffer.dtype == torch.bool:
        return buffer.logical_not_()
    return buffer.copy_((buffer == 0).to(buffer.dtype))


class WrongGuesses:
    """Handle of ``force_wrong_guesses``: ``remove()`` (or leaving a ``with`` block) stops forcing."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> WrongGuesses:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def force_wrong_guesses(model: nn.Module) -> WrongGuesses:
    """Before each forward of every fused layer of ``model``, make its kept guess wrong (``wrong_guess_``); with
    the previous call's decisions in the buffer (same inputs) every group is then fixed up: the worst case.

    Results are unchanged (the fix-up is exact). A layer's buffer appears at its first triton call, so call the
    model once before timing."""
    def hook(module, args):
        for buffer in guess_buffers(module):
            wrong_guess_(buffer)

    return WrongGuesses([layer.register_forward_pre_hook(hook) for layer in fused_layers(model)])


__all__ = ["WrongGuesses", "force_wrong_guesses", "fused_layers", "guess_buffers", "wrong_guess_"]
