"""attach/detach: swap every LoRA-targeted layer of a model for a fused module, and back, exactly."""
from __future__ import annotations

import numbers
import threading
import weakref

import torch
import torch.nn as nn

from fusion_engine.errors import AlreadyAttachedError, AttachError, preview
from fusion_engine.lora import LoRA, load_lora
from fusion_engine.lora.align import align_to_model
from fusion_engine.lora.checks import check_scale

from .components import component_defaults, refuse_unsupported_backend, warn_unapplied_components
from .context import FusionContext
from .fit import check_fit, find_module
from .layers import DynamicLoRAConv2d, DynamicLoRALayer, DynamicLoRALinear
from .ops import BACKENDS, check_supported
from .owner import Owner
from .policies import divergence_option, make_policy
from .trace import Trace, max_records

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Fusion] = weakref.WeakKeyDictionary()
_ATTACH_LOCK = threading.RLock()  # attach's check-and-register and detach are atomic across threads
_DYNAMIC_TYPES = {nn.Linear: DynamicLoRALinear, nn.Conv2d: DynamicLoRAConv2d}


def as_lora(value, role: str) -> LoRA | None:
    if value is None or isinstance(value, LoRA):
        return value
    try:
        return load_lora(value)
    except TypeError as error:
        raise AttachError(f"{role}: expected a LoRA, a path or a state dict, got {type(value).__name__}") from error


def _lora_scale(forward_kwargs: dict) -> float:
    """diffusers' LoRA scale of one forward: ``cross_attention_kwargs`` (UNets) or ``joint_attention_kwargs``
    (DiTs) ``["scale"]``, 1.0 when absent."""
    for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
        options = forward_kwargs.get(name)
        if options and "scale" in options:
            scale = options["scale"]
            if isinstance(scale, torch.Tensor) and scale.numel() == 1:
                scale = scale.item()
            if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
                scale = float(scale)
            return check_scale(scale, f"{name}['scale']")  # within float32, as load_lora(scale=) takes it
    return 1.0


def _uses_fused_projections(module: nn.Module) -> bool:
    """An attention module computing q/k/v with ``to_qkv``/``to_kv`` (diffusers' ``fuse_qkv_projections``; its
    ``unfuse_qkv_projections`` puts the original processors back but leaves the flag set)."""
    processor = getattr(module, "processor", None)
    return bool(getattr(module, "fused_projections", False)) and type(processor).__name__.startswith("Fused")


def _refuse_fused_projections(model: nn.Module) -> None:
    fused = [name for name, module in model.named_modules() if _uses_fused_projections(module)]
    if fused:
        raise AttachError(
            f"{len(fused)} attention module(s) have fused q/k/v projections (e.g. {preview(fused, 2)}): their "
            "to_q/to_k/to_v weights are no longer used, so LoRAs there would vanish; call "
            "model.unfuse_qkv_projections() (or pipe.unfuse_qkv_projections()) before attaching"
        )


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
    One thread at a time runs the model while attached (``owner``): a forward, or a detach, from a second
    thread during a first thread's forward raises ``ConcurrentUseError`` naming the first thread.
    """

    def __init__(self, model, subject, style, context: FusionContext, layers, originals):
        self.model, self.subject, self.style = model, subject, style
        self.context = context
        self.layers: list[DynamicLoRALayer] = layers
        self._originals: dict[str, nn.Module] = originals
        self.owner = Owner(f"{type(model).__name__} (fused)")
        self._hooks = []
        self._overrides: dict = {}

    def _install_hooks(self) -> None:
        """Per forward: hold ``owner`` (released even if it raises) and read ``cross_attention_kwargs["scale"]``.
        On the model: ``disable_lora``/``enable_lora`` act on the fusion; ``fuse_qkv_projections`` is refused."""
        context = self.context

        @torch.compiler.disable
        def before(module, args, kwargs):
            self.owner.acquire(f"a {type(module).__name__} forward")
            context.lora_scale = _lora_scale(kwargs)
            if self.layers:
                context.update_coefficients(self.layers, self.layers[0].base.weight.device)
            context.in_forward = True

        @torch.compiler.disable
        def after(module, args, output):
            context.in_forward = False
            try:
                context.collect(self.layers)
            finally:
                self.owner.release()

        before.fusion_engine_hook = after.fusion_engine_hook = True  # what detach_all strips from copies
        self._hooks = [self.model.register_forward_pre_hook(before, with_kwargs=True),
                       self.model.register_forward_hook(after, always_call=True)]
        self._overrides = {name: method for name, method in self._model_overrides().items()
                           if hasattr(self.model, name) and name not in vars(self.model)}
        vars(self.model).update(self._overrides)

    def _model_overrides(self) -> dict:
        def disable_lora():
            """Fused layers run as their base layers until ``enable_lora()`` (the fusion stays attached)."""
            self.context.enabled = False

        def enable_lora():
            self.context.enabled = True

        def fuse_qkv_projections():
            raise AttachError(
                f"fuse_qkv_projections() on a model with a fusion attached would merge the base q/k/v weights only "
                f"and drop the LoRAs of {len(self.layers)} fused layers; detach first, or keep the projections apart"
            )

        overrides = {"disable_lora": disable_lora, "enable_lora": enable_lora,
                     "fuse_qkv_projections": fuse_qkv_projections}
        for method in overrides.values():
            method.fusion_engine_hook = True  # what detach_all strips from copies
        return overrides

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
        with _ATTACH_LOCK:
            if self._originals:
                self.owner.check_free("detach")
            for name, original in self._originals.items():
                _set_module(self.model, name, original)
            self._originals = {}
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            for name in getattr(self, "_overrides", {}):
                vars(self.model).pop(name, None)
            self._overrides = {}
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Fusion({self.policy!r}, layers={len(self.layers)}, granularity={self.context.granularity}, {state})"


def attach_model(
    model: nn.Module,
    subject=None,
    style=None,
    *,
    policy=None,
    divergence: str | None = None,
    granularity: str | None = None,
    backend: str = "auto",
    trace: bool | int = True,
    **policy_options,
) -> Fusion:
    """Fuse ``subject`` and ``style`` LoRAs into ``model`` (any diffusers UNet, text encoder or nn.Module).

    Every layer either LoRA targets is swapped for a fused module; a layer targeted by one LoRA fuses
    with the other absent. Nothing is changed unless every target resolves and fits.

    Args:
        policy: ``"fls"`` (default; ``"direct"`` on a text encoder), ``"direct"``, ``"klora"``, ``"blora"``,
            ``"switch"``, ``"composite"``, or a ``Policy`` instance. Policy options: ``weights=(wc, ws)``
            (direct), ``pattern`` (klora), ``blocks`` (blora), ``tau`` (switch).
        divergence: FLS's divergence: ``"kl"`` (default), ``"js"``, ``"cosine"``, ``"dot"``; refused with any other
            policy (it would be ignored).
        granularity: which rows decide together: ``"image"`` (default; ``"sample"`` on a text encoder),
            ``"sample"``, ``"token"``, ``"batch"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``.
        trace: record decisions: ``True`` keeps the last ``DEFAULT_MAX_RECORDS`` records (a model that stays
            attached never grows without bound), an int keeps that many, ``False`` records nothing.

    Text encoders take the text-encoder parts of LoRA files (``lora.for_component("text_encoder")``).
    There the defaults are ``policy="direct"`` (both deltas added, as diffusers' ``set_adapters``
    does: the paper selects in the denoiser only, and each LoRA's trigger words need its own text
    delta) and ``granularity="sample"`` (FLS decides once per prompt, over its tokens); ``fls`` and
    ``direct`` are the policies a text encoder can run (it has no denoising step). Elsewhere the
    defaults are ``"fls"`` and ``"image"``. A LoRA whose file also has parts for other components
    warns that this attach leaves them out.

    Example:
        >>> with fe.attach(unet, subject.for_component("unet"), style.for_component("unet")) as fusion:
        ...     fusion.set_batch_layout(images=2, copies=2)
        ...     noise = unet(latents, t, encoder_hidden_states=embeds).sample
        >>> te = fe.attach(pipe.text_encoder, subject.for_component("text_encoder"),
        ...                style.for_component("text_encoder"))
    """
    subject, style = as_lora(subject, "subject"), as_lora(style, "style")
    if subject is None and style is None:
        raise AttachError("attach needs a subject LoRA, a style LoRA, or both")
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if model in _ATTACHED:  # checked again under the lock below
        raise _already_attached(_ATTACHED[model])
    policy, granularity = component_defaults(subject, style, policy, granularity)
    refuse_unsupported_backend(subject, style, backend)
    warn_unapplied_components(subject, style)
    subject, style = align_to_model(subject, model), align_to_model(style, model)
    policy = make_policy(policy, **policy_options, **divergence_option(policy, divergence))

    with _ATTACH_LOCK:  # check-and-register is atomic: of two threads attaching to one model, one wins
        if model in _ATTACHED:
            raise _already_attached(_ATTACHED[model])
        names = in_module_order(model, set(subject.layers if subject else ()) | set(style.layers if style else ()))
        check_fit(model, names, {"subject": subject, "style": style})
        _refuse_fused_projections(model)

        records = max_records(trace)
        trace_object = Trace(names, policy.describe(), records) if records else None
        context = FusionContext(policy, granularity, backend, trace_object)
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
        fusion = register(model, Fusion(model, subject, style, context, layers, originals))
    return fusion


def in_module_order(model: nn.Module, wanted) -> list[str]:
    """``wanted`` layer names in the model's module order (names the model lacks last, by name)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(wanted, key=lambda n: (order.get(n, len(order)), n))


def register(model: nn.Module, fusion):
    """Record ``fusion`` (its layers already swapped in) as ``model``'s: its attaching thread, its hooks. Call under
    ``_ATTACH_LOCK``."""
    fusion.attached_by = threading.current_thread().name
    fusion._install_hooks()
    _ATTACHED[model] = fusion
    return fusion


def _already_attached(other: Fusion) -> AlreadyAttachedError:
    """The error for a second attach, the same whichever check finds it (before or under the attach lock)."""
    return AlreadyAttachedError(f"this model already has a fusion attached ({other!r}, attached by thread "
                                f"{other.attached_by!r}); detach it first")


def attached_fusion(model: nn.Module) -> Fusion | None:
    return _ATTACHED.get(model)


def detach_all(model: nn.Module) -> nn.Module:
    """Strip every dynamic LoRA layer from ``model`` in place, putting each base layer back; returns ``model``.

    For a copy of an attached model (``copy.deepcopy``), which carries fused layers but no ``Fusion`` handle.
    On a model that is attached itself, this detaches its fusion.

    Example:
        >>> clean = fe.detach_all(copy.deepcopy(attached_unet))
    """
    fusion = _ATTACHED.get(model)
    if fusion is not None:
        fusion.detach()
    dynamic = [(name, module) for name, module in model.named_modules() if isinstance(module, DynamicLoRALayer)]
    for name, module in dynamic:
        _set_module(model, name, module.base)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):  # an attached model's copy holds its hooks
        for key, hook in list(hooks.items()):
            if getattr(hook, "fusion_engine_hook", False):
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
                model._forward_pre_hooks_with_kwargs.pop(key, None)
    for name, value in list(vars(model).items()):
        if getattr(value, "fusion_engine_hook", False):
            del vars(model)[name]
    return model


__all__ = ["Fusion", "attach_model", "attached_fusion", "detach_all"]
