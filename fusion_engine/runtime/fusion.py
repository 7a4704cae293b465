"""The one attach: swap every LoRA-targeted layer of a model for a fused module, and back, exactly.

A fusion's bank is a pair (subject, style; uniform assignment: every row fuses both) or a ``LoRAPool`` (each image
names its LoRAs, ``Fusion.set_loras``). ``attach_model`` first resolves the attach into a ``Spec`` (the LoRA parts,
aligned to the model, or the pool; the defaults; the policy instance; the target names, checked to fit), then
``install`` builds the context, the trace and the layers from the spec alone and swaps them in (a pipeline resolves
every component before it installs any: ``integration/attach.py``).
"""
from __future__ import annotations

import numbers
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import AlreadyAttachedError, AttachError, OptionError, preview
from ..lora import LoRA, load_lora
from ..lora.align import align_to_model
from ..lora.checks import check_scale
from ..ops import BACKENDS, backend_choice, check_supported
from ..policies import divergence_option, make_policy
from ..utils.deprecation import warn_renamed
from .components import component_defaults, refuse_unsupported_backend, warn_unapplied_components
from .context import FusionContext
from .fit import check_fit, check_pool_fit, find_module, layer_factors
from .layers import DynamicLoRAConv2d, DynamicLoRALayer, DynamicLoRALinear
from .owner import Owner
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


def _swap_in(model: nn.Module, layers: list[DynamicLoRALayer], originals: dict[str, nn.Module]) -> None:
    """Swap every fused layer in, or (on any exception, KeyboardInterrupt included) none of them: every original goes
    back where it is not in place, also the layer whose swap raised half-way."""
    try:
        for layer in layers:
            _set_module(model, layer.name, layer)
    except BaseException:
        for name, original in originals.items():
            if find_module(model, name) is not original:
                _set_module(model, name, original)
        raise


class Fusion:
    """Handle of an attached fusion: sampler controls, the trace, and ``detach``.

    Also a context manager: ``with fe.attach(unet, ...) as fusion: ...`` detaches on exit, whatever happens.
    One thread at a time runs the model while attached (``owner``): a forward, or a detach, from a second
    thread during a first thread's forward raises ``ConcurrentUseError`` naming the first thread.
    """

    def __init__(self, model, subject, style, context: FusionContext, layers, originals):
        self.model, self.subject, self.style = model, subject, style
        self.pool = context.pool  # a pool fusion's bank (None for a pair)
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

    # -- a pool's assignment, and its watcher protocol (LoRAs added while attached) ----------------------------
    def set_loras(self, entries) -> None:
        """A pool fusion: which LoRAs each image fuses, one entry per image (a name or a tuple of names, in priority
        order): ``[("dog", "watercolor"), ("cat", "pixel-art"), "dog"]``. CFG copies follow their image. Names are
        checked now (``UnknownLoRAError`` naming the image and the name) and resolved to slots per call."""
        if self.pool is None:
            raise OptionError("set_loras names LoRAs per image from a pool; this fusion fuses one subject/style pair")
        self.owner.check_free("set_loras")  # not while another thread runs the model
        self.context.set_loras(entries)

    def set_assignment(self, entries) -> None:
        """Deprecated name of ``set_loras``."""
        warn_renamed("set_assignment", "set_loras")
        self.set_loras(entries)

    @property
    def loras(self) -> list[tuple[str, ...]] | None:
        """Each image's LoRA names, as the last ``set_loras`` (or the running call's ``loras=``) gave them."""
        return self.context.assignment

    @property
    def assignment(self) -> list[tuple[str, ...]] | None:
        """Deprecated name of ``loras``."""
        warn_renamed("assignment", "loras")
        return self.loras

    def check_pool_layers(self, lora_name: str, shapes: dict[str, tuple[int, int]]) -> None:
        covered = set(self.layer_names)
        check_pool_fit(self.model, self.pool, {n: s for n, s in shapes.items() if n not in covered},
                       f"cannot add pool LoRA {lora_name!r} while attached")

    def cover_pool_layers(self, names: list[str]) -> None:
        covered = set(self.layer_names)
        new = [name for name in names if name not in covered]
        if not new or not self.attached:
            return
        originals = {name: self.model.get_submodule(name) for name in new}
        layers = _layers(originals, {}, self.context, start=len(self.layers))
        _swap_in(self.model, layers, originals)
        self.layers.extend(layers)
        self._originals.update(originals)
        if self.context.trace is not None:
            self.context.trace.layer_names.extend(new)

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
        if self.pool is not None:
            self.pool.unwatch(self)

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def describe(self) -> str:
        """What runs: the fusion, then the backend per layer. With ``backend="auto"`` on CUDA, each layer's
        choice for the size class of its last call and the measurement (or fallback) behind it.

        Example:
            >>> fusion = fe.attach(pipe, subject=subject, style=style)
            >>> pipe(prompt); print(fusion.describe())
        """
        head = repr(self)
        if self.context.backend != "auto":
            return f"{head}\nbackend={self.context.backend!r} on every layer, as asked"
        choices, waiting = [], 0
        for layer in self.layers:
            size = getattr(layer, "last_size", None)
            if size is None:
                waiting += 1
                continue
            choices.append((layer.name, *backend_choice.resolve("auto", device_type="cuda",
                                                                triton_available=True, **size)))
        lines = [head]
        if choices:
            lines.append(backend_choice.describe(choices))
        if waiting:
            lines.append(f'backend="auto": {waiting} layers not yet called on CUDA (off CUDA every layer runs the '
                         "reference ops; LoCon and DoRA layers always do)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        if self.pool is not None:
            return f"Fusion({self.policy.describe()}, {len(self.pool)} LoRAs, layers={len(self.layers)}, {state})"
        return f"Fusion({self.policy!r}, layers={len(self.layers)}, granularity={self.context.granularity}, {state})"


@dataclass
class Spec:
    """One resolved attach: everything ``install`` needs, nothing it has to look up in ``lora/`` or ``policies/``."""

    names: list[str]  # the target layers, in the model's module order, checked to fit
    policy: object  # the policy instance
    granularity: str
    backend: str
    max_records: int  # 0: no trace
    subject: object = None  # a pair's bank: the LoRA parts aligned to the model (None: absent) ...
    style: object = None
    factors: dict = field(default_factory=dict)  # ... and per layer its two entries (a, b, scale, gain) or None
    pool: object = None  # a pool's bank


def check_bank(subject, style, pool, what: str = "attach") -> None:
    """An ``AttachError`` unless ``what`` gets a bank: a subject and/or a style, or a ``fe.LoRAPool`` alone."""
    if pool is None and subject is None and style is None:
        raise AttachError(f"{what} needs a subject LoRA, a style LoRA, or both (or a pool=)")
    if pool is not None and (subject is not None or style is not None):
        raise AttachError(f"{what} takes a subject/style pair or a pool=, not both")
    if pool is not None and not (hasattr(pool, "layers") and hasattr(pool, "slot")):
        raise AttachError(f"pool must be a fe.LoRAPool, got {type(pool).__name__}")


def resolve(model: nn.Module, subject=None, style=None, *, pool=None, policy=None, divergence: str | None = None,
            granularity: str | None = None, backend: str = "auto", trace: bool | int = True, targets=(),
            **policy_options) -> Spec:
    """``attach_model``'s first step, which changes nothing: its bank resolved for ``model`` into a ``Spec``, or the
    error that refuses it. A pair (``LoRA`` objects or None: ``as_lora`` coerces): the component's defaults, the parts
    aligned to the model and checked to fit, each layer's two entries cast to its base weight. A pool: the target names
    (its layers and ``targets``) checked to fit. Either: the policy built, the backend's kernels checked."""
    check_bank(subject, style, pool)
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if pool is None:
        if model in _ATTACHED:  # before resolving (checked again under the lock in install)
            raise _already_attached(_ATTACHED[model])
        policy, granularity = component_defaults(subject, style, policy, granularity)
        refuse_unsupported_backend(subject, style, backend)
        warn_unapplied_components(subject, style)
        subject, style = align_to_model(subject, model), align_to_model(style, model)
    policy = make_policy(policy, pool=pool is not None, **policy_options, **divergence_option(policy, divergence))
    if pool is None:
        names = in_module_order(model, set(subject.layers if subject else ()) | set(style.layers if style else ()))
        check_fit(model, names, {"subject": subject, "style": style})
        _refuse_fused_projections(model)
        factors = {name: (layer_factors(subject, name, model.get_submodule(name)),
                          layer_factors(style, name, model.get_submodule(name))) for name in names}
        ranks = {name: tuple(0 if f is None else f[0].shape[0] for f in factors[name]) for name in names}
    else:
        names, factors = in_module_order(model, set(pool.layers) | set(targets)), {}
        check_fit(model, names, {})
        shapes = {name: pool.layers[name].shape if name in pool.layers else
                  tuple(getattr(find_module(model, name), "weight", None).shape) for name in names}
        check_pool_fit(model, pool, shapes, "cannot attach the pool")
        ranks = {name: (pool.layers[name].rank if name in pool.layers else 0,) for name in names}
    for name in names:  # what the backend declines fails here, not at its first launch mid-sampling
        weight = model.get_submodule(name).weight
        kind = "linear" if weight.ndim == 2 else "conv2d"  # conv2d: the reference ops on every backend
        check_supported(backend, kind, weight.dtype, ranks[name], device=weight.device, layer=name)
    return Spec(names, policy, granularity or "image", backend, max_records(trace), subject, style, factors, pool)


def _layers(originals: dict[str, nn.Module], factors: dict, context, start: int = 0) -> list[DynamicLoRALayer]:
    return [_DYNAMIC_TYPES[type(module)](module, name, start + index, *factors.get(name, (None, None)), context)
            for index, (name, module) in enumerate(originals.items())]


def install(model: nn.Module, spec: Spec) -> Fusion:
    """Build the trace, the context and the fused layers of ``spec`` and swap them into ``model``, all or none.
    Under the attach lock: of two threads attaching to one model, one wins."""
    with _ATTACH_LOCK:
        if model in _ATTACHED:
            raise _already_attached(_ATTACHED[model])
        trace = Trace(spec.names, spec.policy.describe(), spec.max_records, pair=spec.pool is None) \
            if spec.max_records else None
        context = FusionContext(spec.policy, spec.granularity, spec.backend, trace, spec.pool)
        originals = {name: model.get_submodule(name) for name in spec.names}
        layers = _layers(originals, spec.factors, context)
        if spec.pool is None:
            spec.policy.setup(layers)
        _swap_in(model, layers, originals)
        fusion = register(model, Fusion(model, spec.subject, spec.style, context, layers, originals))
        if spec.pool is not None:
            spec.pool.watch(fusion)
    return fusion


def attach_model(model: nn.Module, subject=None, style=None, *, pool=None, policy=None, divergence: str | None = None,
                 granularity: str | None = None, backend: str = "auto", trace: bool | int = True,
                 **policy_options) -> Fusion:
    """Fuse a bank of LoRAs into ``model`` (any diffusers UNet, text encoder or nn.Module): a ``subject`` and
    ``style`` pair (every row fuses both), or a ``pool`` (each image fuses the LoRAs it names: ``set_loras``).

    Pair: every layer either LoRA targets is swapped for a fused module; a layer targeted by one LoRA fuses
    with the other absent. Pool: every Linear (Conv2d) layer a pool LoRA adapts, and every name in ``targets=``
    (for LoRAs added later). Nothing is changed unless every target resolves and fits.

    Args:
        policy: ``"fls"`` (default; ``"direct"`` on a text encoder), ``"direct"``, ``"klora"``, ``"blora"``,
            ``"switch"``, ``"composite"``, or a ``Policy`` instance. Policy options: ``weights=(wc, ws)``
            (direct), ``pattern`` (klora), ``blocks`` (blora), ``tau`` (switch). A pool runs each of them by
            position over each image's names in order (position 0 is a pair's subject, 1 its style): ``"fls"``
            N-way, ``"direct"`` with ``weights=`` per position, ``"switch"`` in turns, ``"klora"`` per layer,
            ``"blora"`` positions 0 and 1 in their blocks, ``"composite"`` the pass's position.
        divergence: FLS's divergence: ``"kl"`` (default), ``"js"``, ``"cosine"``, ``"dot"``; refused with any other
            policy (it would be ignored).
        granularity: which rows decide together: ``"image"`` (default; ``"sample"`` on a text encoder),
            ``"sample"``, ``"token"``, ``"batch"`` (a pool's images then decide each position together).
        backend: ``"auto"``, ``"reference"``, ``"triton"``. On triton a pair (and a pool batch whose images all name
            the same LoRAs) runs the pair kernels, a mixed pool batch the pooled ones (forward only: one carrying a
            gradient to the layer's input runs the reference ops).
            Conv (LoCon) layers run the reference ops on every backend.
        trace: record decisions: ``True`` keeps the last ``DEFAULT_MAX_RECORDS`` records (a model that stays
            attached never grows without bound), an int keeps that many, ``False`` records nothing.

    Text encoders take the text-encoder parts of LoRA files (``lora.for_component("text_encoder")``), with the
    defaults ``policy="direct"`` (both deltas added, as diffusers' ``set_adapters``: each LoRA's trigger words need
    its own text delta) and ``granularity="sample"``; ``fls`` and ``direct`` run there (no denoising step). A LoRA
    whose file also has parts for other components warns that this attach leaves them out.

    Example:
        >>> with fe.attach(unet, subject.for_component("unet"), style.for_component("unet")) as fusion:
        ...     fusion.set_batch_layout(images=2, copies=2)
        ...     noise = unet(latents, t, encoder_hidden_states=embeds).sample
        >>> te = fe.attach(pipe.text_encoder, subject.for_component("text_encoder"),
        ...                style.for_component("text_encoder"))
    """
    if pool is None:
        subject, style = as_lora(subject, "subject"), as_lora(style, "style")
    return install(model, resolve(model, subject, style, pool=pool, policy=policy, divergence=divergence,
                                  granularity=granularity, backend=backend, trace=trace, **policy_options))


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


__all__ = ["Fusion", "Spec", "attach_model", "attached_fusion", "check_bank", "detach_all", "install", "resolve"]
