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

``fe.attach(pipe, pool=pool)`` attaches a LoRA pool the same way; every call may then pass ``loras=[...]`` (one
entry per prompt or per image) beside its prompts.
"""
from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref

import torch.nn as nn

from ..errors import AlreadyAttachedError, AttachError, BatchLayoutError, OptionError, OptionTypeError
from ..lora.weights import DENOISERS
from ..runtime.context import images_in_batch, normalize_assignment
from ..runtime.fusion import Fusion, as_lora, attach_model, install, resolve
from ..runtime.trace import Trace
from ..samplers import uses_true_cfg
from ..utils.deprecation import renamed_option, warn_renamed

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


def _per_prompt(per_image: list, images_per_prompt: int) -> list:
    """The text encoders' assignment: one entry per prompt (its images must name the same LoRAs: a prompt is encoded
    once for all of them)."""
    prompts = [per_image[i:i + images_per_prompt] for i in range(0, len(per_image), images_per_prompt)]
    for index, entries in enumerate(prompts):
        if any(entry != entries[0] for entry in entries):
            raise BatchLayoutError(f"prompt {index}: its {images_per_prompt} images name different LoRAs "
                                   f"({entries!r:.120}), but the LoRAs' text-encoder parts encode a prompt once for "
                                   "all its images; give the LoRAs per prompt")
    return [entries[0] for entries in prompts]


_FORWARDED = ("context", "policy", "layers", "layer_names", "trace", "attached", "pool", "loras", "describe")


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

    def __getattr__(self, name: str):
        """The denoiser's ``Fusion``'s, for convenience: ``context``, ``policy``, ``layers``, ``layer_names``,
        ``attached``, ``pool``, ``loras``, and ``trace`` (the last pipeline call's: a fresh one per call; None when
        attached with ``trace=False``)."""
        if name in _FORWARDED and "fusion" in self.__dict__:
            return getattr(self.fusion, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def set_loras(self, entries) -> None:
        self.fusion.set_loras(entries)
        for fusion in self.components.values():  # text encoders: one row per prompt (one image per prompt here)
            fusion.context.set_loras(entries)

    def set_assignment(self, entries) -> None:
        """Deprecated name of ``set_loras``."""
        warn_renamed("set_assignment", "set_loras")
        self.set_loras(entries)

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
        """Run the pipeline's own ``__call__`` with the layout and step followed per denoiser call (a pool's
        ``loras=`` set for the call and put back after it)."""
        loras = None
        if self.pool is not None:
            loras = renamed_option(kwargs.pop("loras", None), kwargs.pop("pairs", None), "pairs", "loras")
        if loras is None:
            return self._call(original, pipe, args, kwargs)
        bound = inspect.signature(original).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        per_image = normalize_assignment(loras_per_image(loras, bound.arguments), None)
        contexts = [self.fusion.context, *(fusion.context for fusion in self.components.values())]
        with self.fusion.owner.hold(f"a {type(pipe).__name__} call"):  # another thread cannot swap the assignment
            before = [context.assignment for context in contexts]
            try:
                self.fusion.context.set_loras(per_image)
                for context in contexts[1:]:  # text encoders run once per prompt
                    context.set_loras(_per_prompt(per_image, bound.arguments.get("num_images_per_prompt") or 1))
                return self._call(original, pipe, args, kwargs)
            finally:
                for context, assignment in zip(contexts, before):
                    context.assignment = assignment

    def _call(self, original, pipe, args, kwargs):
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
        context.trace = Trace(self.fusion.layer_names, self.policy.describe(), pair=self.pool is None) \
            if self._trace_enabled else None
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


def attach_pipeline(pipe, subject=None, style=None, *, pool=None, trace: bool = True, **options) -> PipelineAttachment:
    """Fuse ``pipe``'s denoiser and every other component the bank has layers for (text encoders: a pair's parts, a
    pool's ``parts``, each with a text encoder's defaults), and follow its calls. The LoRAs are coerced once and every
    component is resolved before any is installed, so a misfit anywhere raises with the pipeline untouched."""
    if pipe in _PIPELINES:
        raise AlreadyAttachedError(
            f"this pipeline already has a fusion attached ({_PIPELINES[pipe]!r}); detach it first"
        )
    subject, style = as_lora(subject, "subject"), as_lora(style, "style")
    name = check_attachable(pipe)
    specs = {}
    for component, bank in _banks(pipe, subject, style, pool, name).items():
        own = {**options, "trace": trace} if component == name else {"backend": options.get("backend", "auto"),
                                                                      "trace": False}
        specs[component] = resolve(getattr(pipe, component), **bank, **own)
    fusions: dict[str, Fusion] = {}
    try:
        for component, spec in specs.items():
            fusions[component] = install(getattr(pipe, component), spec)
        handle = PipelineAttachment(pipe, name, fusions[name], {c: f for c, f in fusions.items() if c != name}, trace)
        handle.install()
    except BaseException:
        for attached in fusions.values():
            attached.detach()
        raise
    return handle


def attach_target(target, subject=None, style=None, *, pool=None, **options):
    """``fe.attach``: to a diffusers pipeline object (a ``PipelineAttachment``) or to a model (a ``Fusion``)."""
    if is_pipeline(target):
        return attach_pipeline(target, subject, style, pool=pool, **options)
    return attach_model(target, subject, style, pool=pool, **options)


def _part(lora, component: str):
    """The part of ``lora`` for ``component`` when the LoRA carries parts for several components.

    For the denoiser it is the LoRA's denoiser part whatever its name (``"unet"`` or ``"transformer"``): a UNet LoRA
    given to a FLUX pipeline then fails the attach's family check, which names both, instead of vanishing."""
    if lora is None or not getattr(lora, "components", None):
        return lora
    if component in DENOISERS and lora.component in DENOISERS:
        return lora.for_component(lora.component)
    return lora.for_component(component)


def _banks(pipe, subject, style, pool, denoiser: str) -> dict[str, dict]:
    """Each component's bank, as ``resolve`` takes it: the denoiser's, then each other component's the LoRAs have layers
    for (text encoders): a pair's parts, when the LoRA objects carry ``components``, or each part pool the pipeline
    has, with a text encoder's defaults ("direct", per prompt; a pair's come from its parts: ``component_defaults``)."""
    banks = {denoiser: {"subject": _part(subject, denoiser), "style": _part(style, denoiser), "pool": pool}}
    if pool is not None:
        return banks | {component: {"pool": part, "policy": "direct", "granularity": "sample"} for component, part
                        in sorted(pool.parts.items()) if isinstance(getattr(pipe, component, None), nn.Module)}
    for component in sorted(set().union(*(getattr(lora, "components", None) or () for lora in (subject, style)))
                            - set(DENOISERS)):
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise AttachError(f"the LoRAs have layers for {component!r}, which {type(pipe).__name__} does not have")
        parts = [lora.for_component(component) if lora is not None else None for lora in (subject, style)]
        if any(part is not None for part in parts):
            banks[component] = {"subject": parts[0], "style": parts[1]}
    return banks


def attached_pipeline(pipe) -> PipelineAttachment | None:
    return _PIPELINES.get(pipe)


__all__ = ["PipelineAttachment", "attach_pipeline", "attach_target", "attached_pipeline", "call_signature",
           "check_attachable", "loras_per_image",
           "check_call_arguments", "denoiser_name", "is_pipeline", "pipeline_base_class"]
