"""Per-attach state the fused layers read on every forward: step, batch layout, decision groups."""
from __future__ import annotations

import torch

from .errors import StepContextError
from .trace import Trace

GRANULARITIES = ("image", "sample", "token", "batch")


class FusionContext:
    """Shared by every fused layer of one attach. Written by the sampler, read by layers and policies.

    Batch layout: with classifier-free guidance the UNet batch is ``copies`` stacked copies of
    ``images`` images (diffusers order: ``[uncond..., cond...]``), so batch row ``b`` is image
    ``b % images``. Without a layout, every batch row is its own image.
    """

    def __init__(self, policy, granularity: str, backend: str, trace: Trace | None):
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        self.policy = policy
        self.granularity = granularity
        self.backend = backend
        self.trace = trace
        self.step: int | None = None
        self.num_steps: int | None = None
        self.branch: str | None = None
        self.images: int | None = None
        self.copies = 1
        self._groups: dict[tuple, tuple[torch.Tensor, int]] = {}

    # -- sampler-facing -------------------------------------------------------------------------
    def set_step(self, step: int, num_steps: int) -> None:
        if not 0 <= step < num_steps:
            raise ValueError(f"step {step} is outside [0, {num_steps})")
        self.step, self.num_steps = int(step), int(num_steps)

    def set_batch_layout(self, images: int | None, copies: int = 1) -> None:
        if images is not None and (images < 1 or copies < 1):
            raise ValueError(f"batch layout needs images >= 1 and copies >= 1, got {images} and {copies}")
        self.images, self.copies = images, copies
        self._groups.clear()

    # -- layer/policy-facing --------------------------------------------------------------------
    def current_step(self) -> int:
        if self.step is None:
            raise StepContextError(
                f"policy {self.policy.name!r} depends on the denoising step: call fusion.set_step(i, num_steps) "
                "before each UNet call (FusionPipeline does this)"
            )
        return self.step

    def progress(self) -> float:
        """Fraction of the run done before this step, in [0, 1)."""
        return self.current_step() / self.num_steps

    def sample_groups(self, batch: int) -> tuple[list[int], int]:
        """Decision group of each batch row, and the group count (host-side, from shapes only)."""
        if self.granularity == "batch":
            return [0] * batch, 1
        if self.granularity == "image" and self.images is not None:
            if batch != self.images * self.copies:
                raise StepContextError(
                    f"granularity 'image': the UNet got a batch of {batch} but the layout says "
                    f"{self.images} image(s) x {self.copies} copies = {self.images * self.copies}"
                )
            return [b % self.images for b in range(batch)], self.images
        return list(range(batch)), batch

    def row_groups(self, batch: int, rows_per_sample: int, device) -> tuple[torch.Tensor, int]:
        """(row -> group map on ``device``, group count) for a (batch * rows_per_sample)-row input.

        Cached per shape and device, so layers of one forward share one small tensor.
        """
        key = (batch, rows_per_sample, str(device), self.granularity)
        if key not in self._groups:
            if self.granularity == "token":
                groups = batch * rows_per_sample
                row_group = torch.arange(groups, device=device, dtype=torch.int32)
            else:
                per_sample, groups = self.sample_groups(batch)
                row_group = torch.tensor(per_sample, dtype=torch.int32).repeat_interleave(rows_per_sample)
                row_group = row_group.to(device)
            self._groups[key] = (row_group, groups)
        return self._groups[key]

    def record(self, layer_index: int, choice, score_c=None, score_s=None) -> None:
        if self.trace is not None:
            self.trace.record(self.step, layer_index, choice, score_c, score_s)
