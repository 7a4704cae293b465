"""Attach a fusion to a diffusers pipeline object, so every later ``pipe(...)`` call is fused correctly.

``fe.attach(pipe, subject, style)`` fuses the pipeline's denoiser (``pipe.unet``, or ``pipe.transformer``)
as ``fe.attach(pipe.unet, ...)`` would, and adds what a sampler would otherwise set by hand:

* a **call scope**: the pipeline's class is swapped for a same-named subclass whose ``__call__`` runs the
  pipeline's own ``__call__`` (every argument and default stays the pipeline's) inside a scope that
  validates the call, starts a fresh trace, and chains a ``callback_on_step_end`` that tells the fusion
  which loop step comes next;
* a **forward pre-hook** on the denoiser that, at every denoiser call inside a scope, sets the batch
  layout (``copies = 2`` when ``pipe.do_classifier_free_guidance``, ``images = batch / copies``) and the
  step (``i`` of the pipeline's loop, out of ``pipe.num_timesteps``).

Outside a call scope (driving ``pipe.unet`` yourself) the fusion behaves as one attached to the denoiser:
set the layout and step yourself. ``detach()`` removes the hook, puts the class back and detaches the
denoiser: the pipeline is bit for bit as before.
"""
from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref

import torch.nn as nn

from fusion_engine.errors import AlreadyAttachedError, AttachError, BatchLayoutError, OptionError
from fusion_engine.lora.weights import DENOISERS
from fusion_engine.samplers import uses_true_cfg

from .context import images_in_batch
from .fusion import Fusion, as_lora, attach_model
from .trace import Trace

_PIPELINES: weakref.WeakKeyDictionary[object, PipelineAttachment] = weakref.WeakKeyDictionary()
_FUSED_CLASSES: dict[type, type] = {}


def is_pipeline(target) -> bool:
    """A diffusers pipeline object (anything with a ``components`` dict and a denoiser), not an nn.Module."""
    return not isinstance(target, nn.Module) and isinstance(getattr(target, "components", None), dict)


def denoiser_name(pipe) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline component that fusion targets."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise AttachError(
        f"{type(pipe).__name__} has no denoiser to fuse (looked for {', '.join(DENOISERS)}); "
        "attach to the model yourself with fe.attach(model, ...)"
    )


def pipeline_base_class(pipe) -> type:
    """The pipeline's own class, also while a fusion is attached (which swaps in a same-named subclass)."""
    return getattr(type(pipe), "_fusion_engine_base", type(pipe))


def call_signature(pipe) -> inspect.Signature:
    """The pipeline's own ``__call__`` signature, ``self`` included."""
    return inspect.signature(pipeline_base_class(pipe).__call__)


def check_call_arguments(arguments: dict) -> None:
    """Refuse, with a library error naming the value, a call diffusers would run silently wrong.

    ``arguments``: the pipeline call's arguments by name, defaults filled in.
    """
    steps = arguments.get("num_inference_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise OptionError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
    guidance = arguments.get("guidance_scale")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise OptionError(f"guidance_scale must be a finite number >= 0 (<= 1 turns CFG off), got {guidance!r}")
    if arguments.get("prompt_embeds") is None and "prompt" in arguments:
        prompt = arguments["prompt"]
        prompts = [prompt] if prompt is None or isinstance(prompt, str) else list(prompt)
        images_in_batch(prompts, arguments.get("num_images_per_prompt", 1), arguments.get("negative_prompt"))


def _fused_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` opens a fusion call scope (cached)."""
    if cls not in _FUSED_CLASSES:
        original = cls.__call__

        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            scope = _PIPELINES.get(self)
            if scope is None:  # e.g. a deep copy of an attached pipeline: its own call, untouched
                return original(self, *args, **kwargs)
            return scope.call(original, self, args, kwargs)

        namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                     "__doc__": cls.__doc__, "_fusion_engine_base": cls}
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _FUSED_CLASSES[cls]


class PipelineAttachment:
    """Handle of a fusion attached to a pipeline: the denoiser's ``Fusion``, the last call's trace, ``detach``.

    Also a context manager (detaches on exit, whatever happens).
    """

    def __init__(self, pipe, denoiser: str, fusion: Fusion, components: dict[str, Fusion], trace: bool):
        self.pipe, self.denoiser, self.fusion, self.components = pipe, denoiser, fusion, components
        self._trace_enabled = trace
        self._next_step: int | None = None
        self._in_call: int | None = None  # the thread inside a call scope
        self._hook = None
        self._base_class = type(pipe)

    # -- the denoiser's Fusion, for convenience ---------------------------------------------------------------
    @property
    def context(self):
        return self.fusion.context

    @property
    def policy(self):
        return self.fusion.policy

    @property
    def layers(self):
        return self.fusion.layers

    @property
    def layer_names(self) -> list[str]:
        return self.fusion.layer_names

    @property
    def trace(self) -> Trace | None:
        """The last pipeline call's trace (a fresh one per call; None when attached with ``trace=False``)."""
        return self.fusion.trace

    @property
    def attached(self) -> bool:
        return self.fusion.attached

    # -- install / remove -------------------------------------------------------------------------------------
    def install(self) -> None:
        def before_denoiser(module, args, kwargs):
            return self._before_denoiser(module, args, kwargs)

        before_denoiser.fusion_engine_hook = True  # what detach_all strips from copies
        denoiser = getattr(self.pipe, self.denoiser)
        # prepended: the step and layout are set before the Fusion's own pre-hook reads them
        self._hook = denoiser.register_forward_pre_hook(before_denoiser, with_kwargs=True, prepend=True)
        self.pipe.__class__ = _fused_class(self._base_class)
        _PIPELINES[self.pipe] = self

    def detach(self) -> None:
        """Remove the hook, put the pipeline's class back and detach every component: bit for bit as before."""
        if self.fusion.attached:
            self.fusion.owner.check_free("detach")  # before anything changes
        if _PIPELINES.get(self.pipe) is self:
            del _PIPELINES[self.pipe]
        if type(self.pipe) is _FUSED_CLASSES.get(self._base_class):
            self.pipe.__class__ = self._base_class
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for fusion in (*self.components.values(), self.fusion):
            fusion.detach()

    def __enter__(self) -> PipelineAttachment:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        parts = ", ".join([self.denoiser, *self.components])
        return f"PipelineAttachment({type(self.pipe).__name__}: {parts}; {self.fusion!r})"

    # -- one pipeline call ------------------------------------------------------------------------------------
    def call(self, original, pipe, args, kwargs):
        """Run the pipeline's own ``__call__`` with the layout and step followed per denoiser call."""
        signature = inspect.signature(original)
        bound = signature.bind(pipe, *args, **kwargs)
        with_defaults = signature.bind(pipe, *args, **kwargs)
        with_defaults.apply_defaults()
        check_call_arguments(with_defaults.arguments)
        self._refuse_split_guidance(with_defaults.arguments)
        if "callback_on_step_end" in signature.parameters:
            self._chain_step_callback(bound)
        with self.fusion.owner.hold(f"a {type(pipe).__name__} call"):
            self._begin()
            try:
                return original(*bound.args, **bound.kwargs)
            finally:
                self._end()

    def _refuse_split_guidance(self, arguments: dict) -> None:
        """Calls whose denoiser batches break the ``copies`` x ``images`` layout, refused where FLS would pool rows
        per image: FLUX's true CFG (uncond and cond as two transformer calls) and SD3's skip-layer guidance (an
        extra call on the cond rows alone)."""
        context = self.fusion.context
        if not (context.policy.uses_divergence and context.granularity in ("image", "batch")):
            return
        if uses_true_cfg(arguments):
            raise BatchLayoutError(
                f"{type(self.pipe).__name__} with true_cfg_scale={arguments['true_cfg_scale']} and a negative prompt "
                f"runs the uncond and cond passes as two {self.denoiser} calls, so granularity "
                f"{context.granularity!r} cannot pool an image's two passes into one decision (each call would decide "
                "alone). Use fe.FusionPipeline(pipe, ...), whose loop runs both passes as one batch and pools them; or "
                "attach with granularity='sample' to let each call decide alone; or a static policy"
            )
        if arguments.get("skip_guidance_layers") and context.granularity == "image":
            raise BatchLayoutError(
                f"{type(self.pipe).__name__} with skip_guidance_layers={arguments['skip_guidance_layers']} runs an "
                f"extra {self.denoiser} call on the cond rows alone, whose rows granularity 'image' would group by the "
                "CFG layout of the main call (wrong images pooled); drop skip_guidance_layers, or attach with "
                "granularity='sample'"
            )

    def _chain_step_callback(self, bound: inspect.BoundArguments) -> None:
        user = bound.arguments.get("callback_on_step_end")
        tensor_inputs = getattr(user, "tensor_inputs", None)
        if tensor_inputs is not None:  # a PipelineCallback: the pipeline would read its inputs from the object
            bound.arguments["callback_on_step_end_tensor_inputs"] = tensor_inputs

        def on_step_end(pipe, step, timestep, callback_kwargs):
            result = user(pipe, step, timestep, callback_kwargs) if user is not None else {}
            self._next_step = step + 1
            return result

        bound.arguments["callback_on_step_end"] = on_step_end

    def _begin(self) -> None:
        context = self.fusion.context
        context.trace = Trace(self.fusion.layer_names, self.policy.describe()) if self._trace_enabled else None
        context.reset()
        self._next_step, self._in_call = 0, threading.get_ident()

    def _end(self) -> None:
        self._in_call, self._next_step = None, None
        self.fusion.context.reset()

    def _before_denoiser(self, module, args, kwargs):
        if self._in_call != threading.get_ident():  # outside a call, or another thread (the owner check refuses it)
            return None
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0]
        copies = 2 if getattr(self.pipe, "do_classifier_free_guidance", False) else 1
        if batch % copies:
            raise BatchLayoutError(
                f"{type(self.pipe).__name__} runs classifier-free guidance but called the {self.denoiser} with a "
                f"batch of {batch}, not a multiple of 2 copies; attach to pipe.{self.denoiser} and set the layout "
                "with fusion.set_batch_layout(images, copies)"
            )
        context = self.fusion.context
        context.set_batch_layout(batch // copies, copies)
        num_steps = getattr(self.pipe, "_num_timesteps", None) or len(self.pipe.scheduler.timesteps)
        context.set_step(self._next_step, num_steps)
        return None


def check_attachable(pipe) -> str:
    """The denoiser's component name, or an ``AttachError`` saying why this pipeline cannot be followed."""
    name = denoiser_name(pipe)
    if "callback_on_step_end" not in call_signature(pipe).parameters:
        raise AttachError(
            f"{type(pipe).__name__}.__call__ takes no callback_on_step_end, so the fusion cannot follow its steps; "
            f"attach to pipe.{name} instead and call fusion.set_step / set_batch_layout before each denoiser call"
        )
    return name


def attach_pipeline(pipe, subject, style, *, trace: bool = True, **options) -> PipelineAttachment:
    """Fuse ``pipe``'s denoiser (and every other component the LoRAs have layers for) and follow its calls."""
    if pipe in _PIPELINES:
        raise AlreadyAttachedError(
            f"this pipeline already has a fusion attached ({_PIPELINES[pipe]!r}); detach it first"
        )
    subject, style = as_lora(subject, "subject"), as_lora(style, "style")
    name = check_attachable(pipe)
    fusion = attach_model(getattr(pipe, name), _part(subject, name), _part(style, name), trace=trace, **options)
    components: dict[str, Fusion] = {}
    try:
        for component, (component_subject, component_style) in _component_loras(pipe, subject, style, name):
            # the component's own defaults (text encoders: "direct", per prompt); see fusion.attach_model
            components[component] = attach_model(getattr(pipe, component), component_subject, component_style,
                                                 backend=options.get("backend", "auto"), trace=False)
        handle = PipelineAttachment(pipe, name, fusion, components, trace)
        handle.install()
    except BaseException:
        for attached in (*components.values(), fusion):
            attached.detach()
        raise
    return handle


def _part(lora, component: str):
    """The part of ``lora`` for ``component`` when the LoRA carries parts for several components.

    For the denoiser it is the LoRA's denoiser part whatever its name (``"unet"`` or ``"transformer"``): a UNet LoRA
    given to a FLUX pipeline then fails the attach's family check, which names both, instead of vanishing."""
    if lora is None or not getattr(lora, "components", None):
        return lora
    if component in DENOISERS and lora.component in DENOISERS:
        return lora.for_component(lora.component)
    return lora.for_component(component)


def _component_loras(pipe, subject, style, denoiser: str):
    """(component, (subject part, style part)) for each non-denoiser component the LoRAs have layers for
    (text encoders), when the LoRA objects carry ``components``."""
    names = set()
    for lora in (subject, style):
        names |= set(getattr(lora, "components", None) or ())
    for component in sorted(names - set(DENOISERS)):
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise AttachError(f"the LoRAs have layers for {component!r}, which {type(pipe).__name__} does not have")
        parts = tuple(lora.for_component(component) if lora is not None else None for lora in (subject, style))
        if any(part is not None for part in parts):
            yield component, parts


def attached_pipeline(pipe) -> PipelineAttachment | None:
    return _PIPELINES.get(pipe)


__all__ = ["PipelineAttachment", "attach_pipeline", "attached_pipeline", "call_signature", "check_attachable",
           "check_call_arguments", "denoiser_name", "is_pipeline", "pipeline_base_class"]
