"""Per-attach state the fused layers read on every forward: step, batch layout, decision groups."""
from __future__ import annotations

import warnings

import torch

from fusion_engine.errors import BatchLayoutError, StepContextError, StepRangeError

from .trace import Trace, choice_code

GRANULARITIES = ("image", "sample", "token", "batch")


def images_in_batch(prompts: list, num_images_per_prompt: int, negative_prompt=None) -> int:
    """How many images a sampler call makes; a ``BatchLayoutError`` when the prompts cannot form a batch."""
    if not prompts:
        raise BatchLayoutError("no prompt given: the prompt list is empty, so there is no image to group")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise BatchLayoutError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
    if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != len(prompts):
        raise BatchLayoutError(
            f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one string, or one per prompt"
        )
    return len(prompts) * num_images_per_prompt


class FusionContext:
    """Shared by every fused layer of one attach. Written by the sampler, read by layers and policies.

    Batch layout: with classifier-free guidance the UNet batch is ``copies`` stacked copies of
    ``images`` images (diffusers order: ``[uncond..., cond...]``), so batch row ``b`` is image
    ``b % images``. Without a layout, every batch row is its own image.
    """

    def __init__(self, policy, granularity: str, backend: str, trace: Trace | None):
        if granularity not in GRANULARITIES:
            raise BatchLayoutError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        self.policy = policy
        self.granularity = granularity
        self.backend = backend
        self.trace = trace  # also sets ``tracing``
        self.step: int | None = None
        self.num_steps: int | None = None
        self.branch: str | None = None
        self.images: int | None = None
        self.copies = 1
        self._groups: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._warned_no_layout = False
        self.in_forward = False  # inside the attached model's forward (its pre-hook filled ``coefficients``)
        self.coefficients: dict[str, torch.Tensor] = {}  # device -> (layers, 2) float32, static policies
        self.lora_scale = 1.0  # diffusers' cross_attention_kwargs={"scale": s}, read per forward
        self.enabled = True  # False: every fused layer is its base layer (disable_lora)

    @property
    def trace(self) -> Trace | None:
        return self._trace

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        self._trace = trace
        self.tracing = trace is not None  # a plain bool: what a compiled forward reads (never the Trace)

    # -- sampler-facing -------------------------------------------------------------------------
    def set_step(self, step: int, num_steps: int) -> None:
        if not 0 <= step < num_steps:
            raise StepRangeError(f"step {step} is outside [0, {num_steps})")
        self.step, self.num_steps = int(step), int(num_steps)

    def set_batch_layout(self, images: int | None, copies: int = 1) -> None:
        if images is not None and (images < 1 or copies < 1):
            # images = prompts x num_images_per_prompt: 0 means an empty prompt list or 0 images per prompt
            raise BatchLayoutError(
                f"batch layout needs images >= 1 and copies >= 1, got images={images}, copies={copies} "
                "(an empty prompt list or num_images_per_prompt=0 gives images=0)"
            )
        if (images, copies) != (self.images, self.copies):
            self.images, self.copies = images, copies
            self._groups.clear()

    def reset(self) -> None:
        """Forget the step and the batch layout (a pipeline call scope starts and ends with this)."""
        self.step = self.num_steps = None
        self.branch = None
        self.set_batch_layout(None)

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
                raise BatchLayoutError(
                    f"granularity 'image': the UNet got a batch of {batch} but the layout says "
                    f"{self.images} image(s) x {self.copies} copies = {self.images * self.copies}; rows cannot be "
                    "pooled per image (call fusion.set_batch_layout to match the batch, or use granularity "
                    "'sample' or 'batch')"
                )
            return [b % self.images for b in range(batch)], self.images
        if self.granularity == "image" and batch > 1:
            self._warn_no_layout(batch)
        return list(range(batch)), batch

    def _warn_no_layout(self, batch: int) -> None:
        if not self._warned_no_layout:
            self._warned_no_layout = True
            warnings.warn(
                f"granularity 'image' but no batch layout: the {batch} batch rows decide one by one, so a CFG "
                "image's uncond and cond rows decide apart. Attach to the pipeline instead (fe.attach(pipe, ...) "
                "infers the layout per call), call fusion.set_batch_layout(images, copies), or pass "
                "granularity='sample' if per-row decisions are what you want",
                UserWarning, stacklevel=3,
            )

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

    def update_coefficients(self, layers, device) -> None:
        """Static policies: every layer's (w_subject * scale, w_style * scale) for the coming forward, computed on
        the host (the step, the branch, the LoRA scale) and copied into one persistent device table in place.
        Runs before each forward of the attached model, outside any compiled graph."""
        if self.policy.uses_divergence or not layers:
            return
        rows = []
        for layer in layers:
            weights = self.policy.weights(layer, self)
            subject_scale, style_scale = layer.lora_scales
            rows.append((weights[0] * subject_scale, weights[1] * style_scale))
            layer.keep_decisions(choice_code(weights[0] * layer.has_subject, weights[1] * layer.has_style))
        values = torch.tensor(rows, dtype=torch.float32)
        key = str(device)
        table = self.coefficients.get(key)
        if table is None or table.shape != values.shape:
            self.coefficients[key] = values.to(device)
        else:
            table.copy_(values)

    def collect(self, layers) -> None:
        """Move each layer's decisions of the last forward into the trace, at the current step.

        Called after every forward of the attached model (eagerly, outside any compiled graph): layers only
        keep their last decisions as tensors, so neither the step nor the trace's size reaches a graph.
        """
        for layer in layers:
            kept = layer.__dict__.pop("kept_decisions", None)
            if kept is not None and self._trace is not None:
                self._trace.record(self.step, layer.index, *kept)
