"""A LoRA pool attached to a diffusers pipeline object: ``fe.attach(pipe, pool=pool)``, then every call may pass
``loras=[...]`` (one entry per prompt or per image). The model part is ``runtime/pool_fusion.py``."""
from __future__ import annotations

import inspect

import torch.nn as nn

from ..errors import AlreadyAttachedError, AttachError, BatchLayoutError, OptionTypeError
from ..runtime.pool_fusion import attach_pool
from ..runtime.pool_trace import PoolTrace
from ..utils.deprecation import renamed_option, warn_renamed
from .attach import PipelineAttachment, attached_pipeline, check_attachable


def loras_per_image(loras, arguments: dict) -> list:
    """``loras`` given per prompt (expanded by ``num_images_per_prompt``, diffusers' prompt-major order) or per
    image; a ``BatchLayoutError`` naming both counts otherwise.

    Args:
        loras: one entry per prompt or per image (a LoRA name or a tuple of names).
        arguments: the pipeline call's arguments by name (``prompt``, ``num_images_per_prompt``).

    Example:
        >>> loras_per_image([("dog", "ink"), "cat"], {"prompt": ["a", "b"], "num_images_per_prompt": 2})
        [('dog', 'ink'), ('dog', 'ink'), 'cat', 'cat']
    """
    if isinstance(loras, str) or not isinstance(loras, (list, tuple)):
        raise OptionTypeError(f"loras must be a list, one entry per prompt or per image (a LoRA name or a tuple of "
                              f"names, e.g. [('dog', 'ink'), 'cat']), got {type(loras).__name__} {loras!r:.80}")
    prompt, per_prompt = arguments.get("prompt"), arguments.get("num_images_per_prompt") or 1
    prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(loras)
    loras = list(loras)
    if len(loras) == prompts:
        return [entry for entry in loras for _ in range(per_prompt)]
    if len(loras) == prompts * per_prompt:
        return loras
    raise BatchLayoutError(f"loras has {len(loras)} entries for {prompts} prompt(s) x {per_prompt} image(s) each: "
                           "give one per prompt or one per image")


class PoolPipelineAttachment(PipelineAttachment):
    """A pool attached to a pipeline: every call may pass ``loras=[...]`` (one per prompt or per image)."""

    def set_loras(self, entries) -> None:
        self.fusion.set_loras(entries)

    def set_assignment(self, entries) -> None:
        """Deprecated name of ``set_loras``."""
        warn_renamed("set_assignment", "set_loras")
        self.set_loras(entries)

    @property
    def pool(self):
        return self.fusion.pool

    def call(self, original, pipe, args, kwargs):
        loras = renamed_option(kwargs.pop("loras", None), kwargs.pop("pairs", None), "pairs", "loras")
        if loras is None:
            return super().call(original, pipe, args, kwargs)
        bound = inspect.signature(original).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        context = self.fusion.context
        with self.fusion.owner.hold(f"a {type(pipe).__name__} call"):  # another thread cannot swap the assignment
            before = context.assignment
            context.set_loras(loras_per_image(loras, bound.arguments))
            try:
                return super().call(original, pipe, args, kwargs)
            finally:
                context.assignment = before
                context._tables.clear()

    def _begin(self) -> None:
        super()._begin()
        if self._trace_enabled:
            self.fusion.context.trace = PoolTrace(self.fusion.layer_names, self.policy.describe())


def attach_pool_target(target, pool, *, trace: bool = True, **options):
    """``fe.attach(target, pool=pool, ...)``: to a pipeline object (``PoolPipelineAttachment``) or a model."""
    if not (hasattr(pool, "layers") and hasattr(pool, "slot")):
        raise AttachError(f"pool must be a fe.LoRAPool, got {type(pool).__name__}")
    if isinstance(target, nn.Module) or not isinstance(getattr(target, "components", None), dict):
        return attach_pool(target, pool, trace=trace, **options)
    if attached_pipeline(target) is not None:
        raise AlreadyAttachedError(f"this pipeline already has a fusion attached ({attached_pipeline(target)!r}); "
                                   "detach it first")
    name = check_attachable(target)
    fusion = attach_pool(getattr(target, name), pool, trace=trace, **options)
    try:
        handle = PoolPipelineAttachment(target, name, fusion, {}, trace)
        handle.install()
    except BaseException:
        fusion.detach()
        raise
    return handle


__all__ = ["PoolPipelineAttachment", "attach_pool_target", "loras_per_image"]
