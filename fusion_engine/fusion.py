"""attach/detach: swap every LoRA-targeted layer of a model for a fused module, and back, exactly."""
from __future__ import annotations

import weakref

import torch.nn as nn

from .components import component_defaults, refuse_unsupported_backend, warn_unapplied_components
from .context import FusionContext
from .errors import AlreadyAttachedError, AttachError
from .fit import check_fit, find_module
from .lora import LoRA, load_lora
from .lora.align import align_to_model
from .modules import DynamicLoRAConv2d, DynamicLoRALayer, DynamicLoRALinear
from .ops import BACKENDS, check_supported
from .policies import make_policy
from .trace import Trace

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Fusion] = weakref.WeakKeyDictionary()
_DYNAMIC_TYPES = {nn.Linear: DynamicLoRALinear, nn.Conv2d: DynamicLoRAConv2d}


def _as_lora(value, role: str) -> LoRA | None:
    if value is None or isinstance(value, LoRA):
        return value
    try:
        return load_lora(value)
    except TypeError as error:
        raise AttachError(f"{role}: expected a LoRA, a path or a state dict, got {type(value).__name__}") from error


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put every original back where it is not in place: also the layer whose swap raised half-way."""
    for name, original in originals.items():
        if find_module(model, name) is not original:
            _set_module(model, name, original)


def _swap_in(model: nn.Module, layers: list[DynamicLoRALayer], originals: dict[str, nn.Module]) -> None:
    """Swap every fused layer in, or (on any exception, KeyboardInterrupt included) none of them."""
    try:
        for layer in layers:
            _set_module(model, layer.name, layer)
    except BaseException:
        _restore(model, originals)
        raise


class Fusion:
    """Handle of an attached fusion: sampler controls, the trace, and ``detach``.

    Also a context manager: ``with fe.attach(unet, ...) as fusion: ...`` detaches on exit, whatever happens.
    """

    def __init__(self, model, subject, style, context: FusionContext, layers, originals):
        self.model, self.subject, self.style = model, subject, style
        self.context = context
        self.layers: list[DynamicLoRALayer] = layers
        self._originals: dict[str, nn.Module] = originals

    @property
    def policy(self):
        return self.context.policy

    @property
    def trace(self) -> Trace | None:
        return self.context.trace

    @property
    def attached(self) -> bool:
        return bool(self._originals)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def set_step(self, step: int, num_steps: int) -> None:
        """Tell the policies which denoising step the next UNet call belongs to."""
        self.context.set_step(step, num_steps)

    def set_batch_layout(self, images: int | None, copies: int = 1) -> None:
        """The UNet batch is ``copies`` stacked copies of ``images`` images (CFG: copies=2)."""
        self.context.set_batch_layout(images, copies)

    def set_branch(self, branch: str | None) -> None:
        """For policy 'composite': which LoRA's pass the next UNet call is ('subject' or 'style')."""
        self.context.branch = branch

    def detach(self) -> None:
        """Put every original module back (the very same objects: the model is bit-for-bit as before)."""
        for name, original in self._originals.items():
            _set_module(self.model, name, original)
        self._originals = {}
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Fusion({self.policy!r}, layers={len(self.layers)}, granularity={self.context.granularity}, {state})"


def attach(
    model: nn.Module,
    subject=None,
    style=None,
    *,
    policy=None,
    divergence: str = "kl",
    granularity: str | None = None,
    backend: str = "auto",
    trace: bool = True,
    **policy_options,
) -> Fusion:
    """Fuse ``subject`` and ``style`` LoRAs into ``model`` (any diffusers UNet, text encoder or nn.Module).

    Every layer either LoRA targets is swapped for a fused module; a layer targeted by one LoRA fuses
    with the other absent. Nothing is changed unless every target resolves and fits. Policy options:
    ``weights=(wc, ws)`` (direct), ``pattern`` (klora), ``blocks`` (blora), ``tau`` (switch).

    Text encoders take the text-encoder parts of LoRA files (``lora.for_component("text_encoder")``).
    There the defaults are ``policy="direct"`` (both deltas added, as diffusers' ``set_adapters``
    does: the paper selects in the denoiser only, and each LoRA's trigger words need its own text
    delta) and ``granularity="sample"`` (FLS decides once per prompt, over its tokens); ``fls`` and
    ``direct`` are the policies a text encoder can run (it has no denoising step). Elsewhere the
    defaults are ``"fls"`` and ``"image"``. A LoRA whose file also has parts for other components
    warns that this attach leaves them out.

    Example:
        >>> fusion = fe.attach(pipe.unet, subject.for_component("unet"), style.for_component("unet"))
        >>> te = fe.attach(pipe.text_encoder, subject.for_component("text_encoder"),
        ...                style.for_component("text_encoder"))
    """
    subject, style = _as_lora(subject, "subject"), _as_lora(style, "style")
    if subject is None and style is None:
        raise AttachError("attach needs a subject LoRA, a style LoRA, or both")
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if model in _ATTACHED:
        raise AlreadyAttachedError(f"this model already has a fusion attached ({_ATTACHED[model]!r}); detach it first")
    policy, granularity = component_defaults(subject, style, policy, granularity)
    refuse_unsupported_backend(subject, style, backend)
    warn_unapplied_components(subject, style)
    subject, style = align_to_model(subject, model), align_to_model(style, model)
    if policy == "fls":
        policy_options["divergence"] = divergence
    policy = make_policy(policy, **policy_options)

    wanted = set(subject.layers if subject else ()) | set(style.layers if style else ())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted(wanted, key=lambda n: (order.get(n, len(order)), n))
    check_fit(model, names, {"subject": subject, "style": style})

    context = FusionContext(policy, granularity, backend, Trace(names, policy.describe()) if trace else None)
    originals = {name: model.get_submodule(name) for name in names}
    layers = [
        _DYNAMIC_TYPES[type(module)](module, name, index, subject, style, context)
        for index, (name, module) in enumerate(originals.items())
    ]
    for layer in layers:  # what the backend declines fails here, not at its first launch mid-sampling
        kind = "linear" if isinstance(layer, DynamicLoRALinear) else "conv2d"
        check_supported(backend, kind, layer.base.weight.dtype, (layer.subject_rank, layer.style_rank),
                        device=layer.base.weight.device, layer=layer.name)
    policy.setup(layers)

    _swap_in(model, layers, originals)
    fusion = Fusion(model, subject, style, context, layers, originals)
    _ATTACHED[model] = fusion
    return fusion


def attached_fusion(model: nn.Module) -> Fusion | None:
    return _ATTACHED.get(model)


__all__ = ["Fusion", "attach", "attached_fusion"]
