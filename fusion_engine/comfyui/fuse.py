"""The fusion inside ComfyUI: per-layer forward wrappers on a MODEL clone, deciding with the engine's own layers.

Nothing here imports ComfyUI at module level: ``comfy`` is imported inside the functions that ComfyUI calls when it
runs the nodes, so ``import fusion_engine`` never needs it.

How it works, per fused MODEL (a ``ModelPatcher`` clone; the shared model and its other clones are never touched):

* The two LoRA files are read by ComfyUI itself (``comfy.utils.load_torch_file``, ``comfy.lora_convert``,
  ``comfy.lora.model_lora_keys_unet`` / ``load_lora``), so every key layout ComfyUI loads maps here too. Each plain
  LoRA patch becomes an engine ``LoRALayer`` named by the diffusers path of the layer
  (``comfy.utils.unet_to_diffusers``), the names ``fe.attach`` uses, so presets such as B-LoRA's blocks apply.
* Every targeted ``Linear`` / ``Conv2d`` gets an object patch ``"<path>.forward"``: for the duration of sampling its
  forward is the engine's ``DynamicLoRALinear`` / ``DynamicLoRAConv2d`` (the very classes ``fe.attach`` swaps in),
  computing both deltas and choosing through ``fusion_engine.ops``. No weight is merged; ComfyUI puts the original
  forwards back when it unloads or switches models.
* ComfyUI's casting stays in the path: when a layer casts its weights per call (low-VRAM partial loading, weight
  patches applied on the fly) the engine layer reads the weight and bias ComfyUI's ``cast_bias_weight`` returns.
* A ``DIFFUSION_MODEL`` wrapper runs once per denoiser call: it reads the batch layout from ``cond_or_uncond``
  (rows ``b`` and ``b + images`` are one image, as in diffusers), the step from ``sigmas`` against
  ``sample_sigmas``, and plays the part of ``Fusion``'s forward hooks (static policies' coefficient table, the
  trace). When ComfyUI splits an image's cond and uncond chunks into separate calls (``calc_cond_batch`` when free
  memory is short, or conds that cannot be concatenated), the first call at a sigma decides and the later calls at
  the same sigma reuse its decisions, so each image keeps one decision per layer and evaluation.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

from ..errors import AttachError, FusionEngineError, LoRAFileNotFoundError, LoRAShapeError, OptionError
from ..lora import LoRA, LoRALayer
from ..ops import check_supported
from ..ops.reference import accumulation_dtype, base_linear, from_pixel_rows, lora_delta, pixel_rows, select_rows
from ..policies import make_policy
from ..runtime.context import FusionContext
from ..runtime.fit import layer_factors
from ..runtime.layers import DynamicLoRAConv2d, DynamicLoRALinear
from ..runtime.trace import DEFAULT_MAX_RECORDS, Trace

ATTACHMENT = "fusion_engine"  # ModelPatcher attachment and wrapper key
POLICY_NAMES = ("fls", "direct", "klora", "blora", "switch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EVALUATIONS_KEPT = 400  # model calls per sampling whose decisions the trace holds
_TOLERANCE = 1e-5  # relative: a call's sigma equals a schedule point within float rounding


class ComfyFusionError(FusionEngineError):
    """A fusion node input ComfyUI cannot run: the message names the file, field or model at fault."""


# --------------------------------------------------------------------------------------------- ComfyUI access
def comfy_modules():
    """ComfyUI's modules this pack uses, imported when a node runs (never at ``import fusion_engine``)."""
    import comfy.lora
    import comfy.model_management
    import comfy.ops
    import comfy.patcher_extension
    import comfy.utils

    try:
        from comfy import lora_convert
    except ImportError:  # older ComfyUI: no key conversion step
        lora_convert = None
    return comfy, lora_convert


def folder_paths_module():
    """``folder_paths`` as upstream ComfyUI names it, or the pip-installable fork's ``comfy.cmd.folder_paths``."""
    try:
        import folder_paths
    except ImportError:
        from comfy.cmd import folder_paths
    return folder_paths


# --------------------------------------------------------------------------------------------- the step
def step_of(sigma: float, schedule) -> tuple[int, int]:
    """(step, number of steps) of a denoiser call at ``sigma`` in the descending ``schedule`` (``sample_sigmas``,
    which ends with the final sigma). A call at a schedule point takes that point's step; a call between two points
    (Heun's and the SDE samplers' intermediate sigmas) takes the interval's earlier step."""
    points = [float(s) for s in schedule]
    steps = max(len(points) - 1, 1)
    for index in range(min(len(points), steps) - 1, -1, -1):
        if points[index] >= sigma - _TOLERANCE * max(abs(sigma), 1e-8):
            return index, steps
    return 0, steps


# --------------------------------------------------------------------------------------------- LoRA files
def _lora_path(name: str) -> str:
    folder_paths = folder_paths_module()
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise LoRAFileNotFoundError(
            f"LoRA {name!r} is not in ComfyUI's loras folder(s) {folder_paths.get_folder_paths('loras')}; pick a "
            "file from the list, or put it in models/loras"
        )
    return path


def _adapter_factors(patch, where: str):
    """(up, down, alpha) of a plain LoRA patch, in ComfyUI's ``LoRAAdapter`` (new) or ``("lora", ...)`` (old) form."""
    kind = getattr(patch, "name", None)
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2:
        kind, weights = patch
    if kind != "lora":
        raise ComfyFusionError(f"{where}: a {kind or type(patch).__name__!s} patch; the fusion takes plain LoRA "
                               "(lora_up/lora_down) layers only (LoHa, LoKr, OFT, full diffs are not fused)")
    up, down, alpha, mid, dora_scale, reshape = (list(weights) + [None] * 6)[:6]
    for value, what in ((mid, "a Tucker middle factor (lora_mid)"), (dora_scale, "DoRA (dora_scale)"),
                        (reshape, "reshape_weight")):
        if value is not None:
            raise ComfyFusionError(f"{where}: {what} is not supported by the fusion node")
    return up, down, alpha


def _layer_factors(up, down, alpha, module: nn.Module, file: str, key: str) -> LoRALayer:
    up, down = up.float(), down.float()
    weight = module.weight
    if isinstance(module, nn.Conv2d):
        down = down if down.ndim == 4 else down[:, :, None, None]
        up = up if up.ndim == 4 else up[:, :, None, None]
        fits = (up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1]
                and down.shape[2:] == weight.shape[2:] and tuple(up.shape[2:]) == (1, 1))
    else:
        down, up = down.flatten(1), up.flatten(1)
        fits = up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1]
    fits = fits and up.shape[1] == down.shape[0]
    if not fits:
        raise LoRAShapeError(f"LoRA {file!r}: {key} has factors up {tuple(up.shape)} / down {tuple(down.shape)} that "
                             f"do not fit the model's weight {tuple(weight.shape)}: the LoRA is for another model")
    rank = down.shape[0]
    return LoRALayer(down, up, float(alpha) if alpha is not None else float(rank))


def read_lora(name: str, strength: float, model, clip=None):
    """(denoiser part as an engine ``LoRA`` named by diffusers paths, {layer: ComfyUI module path}, CLIP patches).

    ComfyUI maps the keys; a file none of whose keys fit the model (or CLIP) raises, naming the file."""
    comfy, lora_convert = comfy_modules()
    path = _lora_path(name)
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise ComfyFusionError(f"LoRA {name!r} ({path}) cannot be read: {error}") from error
    if lora_convert is not None:
        state = lora_convert.convert_lora(state)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    try:
        patches = comfy.lora.load_lora(state, key_map, log_missing=False)
    except Exception as error:
        raise ComfyFusionError(f"LoRA {name!r}: ComfyUI cannot map its keys: {error}") from error
    model_keys = set(model.model.state_dict().keys())
    unet = {k: v for k, v in patches.items() if _weight_key(k) in model_keys}
    clip_patches = {k: v for k, v in patches.items() if k not in unet}
    if not unet and not (clip is not None and clip_patches):
        sample = sorted(state)[:3]
        raise ComfyFusionError(
            f"LoRA {name!r}: none of its {len(state)} keys (e.g. {sample}) maps to a layer of this "
            f"{model_family(model)} model: it is for another model family, or not a LoRA"
        )
    names = diffusers_names(model)
    layers, paths = {}, {}
    for key, patch in unet.items():
        if not isinstance(key, str):
            raise ComfyFusionError(f"LoRA {name!r}: {key[0]} takes the LoRA as a slice of a fused weight; the node "
                                   "fuses whole layers only")
        if not key.endswith(".weight"):
            raise ComfyFusionError(f"LoRA {name!r}: {key} is a bias patch; the node fuses LoRA weights only")
        module_path = key[: -len(".weight")]
        module = comfy.utils.get_attr(model.model, module_path)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ComfyFusionError(f"LoRA {name!r}: {module_path} is a {type(module).__name__}; the node fuses "
                                   "Linear and Conv2d layers")
        up, down, alpha = _adapter_factors(patch, f"LoRA {name!r} at {module_path}")
        layer_name = names.get(module_path, module_path)
        layers[layer_name] = _layer_factors(up, down, alpha, module, name, module_path)
        paths[layer_name] = module_path
    lora = LoRA(layers, source=path, layout="comfyui", scale=float(strength)) if layers else None
    return lora, paths, clip_patches


def _weight_key(key) -> str:
    return key if isinstance(key, str) else key[0]


def diffusers_names(model) -> dict[str, str]:
    """ComfyUI module path (``diffusion_model.input_blocks.1.1...to_q``) -> diffusers path (``down_blocks.0...to_q``),
    by ComfyUI's own conversion table; empty where ComfyUI has none for this model."""
    comfy, _ = comfy_modules()
    config = getattr(model.model.model_config, "unet_config", {})
    table = comfy.utils.unet_to_diffusers(config)
    out = {}
    for diffusers_key, comfy_key in table.items():
        if diffusers_key.endswith(".weight"):
            out["diffusion_model." + comfy_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    return out


def model_family(model) -> str:
    return type(model.model.model_config).__name__


def refuse_unsupported(model) -> None:
    """Only UNet models (SD1.x, SD2.x, SDXL) are fused: DiTs fuse q/k/v into one weight, LoRAs arrive as slices."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if not isinstance(model.model.diffusion_model, UNetModel):
        raise ComfyFusionError(
            f"model family {model_family(model)} ({type(model.model.diffusion_model).__name__}) is not supported: "
            "the fusion node handles UNet models (SD1.x, SD2.x, SDXL). FLUX and SD3 fuse q/k/v into one weight "
            "that LoRAs patch by slices, and per-slice decisions are not implemented yet"
        )


# --------------------------------------------------------------------------------------------- the fused layers
class CallWeights(nn.Module):
    """The base layer as an engine layer sees it: the ComfyUI module's weight and bias, or, while a call casts them
    (``comfy_cast_weights``, weight patches applied on the fly), the ones ComfyUI's cast returned for that call.
    The ComfyUI module is not a submodule here, so moving the fused layer never moves the model's weights."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["module"] = module
        self.__dict__["current"] = None

    @property
    def weight(self):
        current = self.__dict__["current"]
        return self.__dict__["module"].weight if current is None else current[0]

    @property
    def bias(self):
        current = self.__dict__["current"]
        return self.__dict__["module"].bias if current is None else current[1]

    def _conv_forward(self, x, weight, bias):
        return self.__dict__["module"]._conv_forward(x, weight, bias)


def casts_per_call(module: nn.Module) -> bool:
    """ComfyUI's own test (comfy.ops): this call's weight comes from ``cast_bias_weight``."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


class FusionState:
    """Everything one fused MODEL holds: the engine layers, their context, the trace, the split bookkeeping."""

    def __init__(self, layers, paths, context: FusionContext, trace: Trace, family: str):
        self.layers = layers
        self.paths = paths  # layer name -> ComfyUI module path
        self.context = context
        self.trace = trace
        self.family = family
        self.calls = 0  # denoiser calls of the last sampling
        self.split_calls = 0  # of which reused an earlier call's decisions (cond/uncond split)
        self._evaluation = None  # (sigma, images) of the partial call that decided
        self._decided: dict[int, torch.Tensor] = {}  # layer index -> decisions of that call
        self._reusing = False

    # called by ComfyUI's wrappers -------------------------------------------------------------------------------
    def start_sampling(self) -> None:
        self.trace.clear()
        self.calls = self.split_calls = 0
        self._evaluation, self._decided = None, {}

    def denoiser_call(self, executor, args, kwargs):
        x, options = args[0], call_options(args, kwargs)
        chunks = list(options.get("cond_or_uncond") or [0])
        if x.shape[0] % len(chunks):
            raise ComfyFusionError(f"batch of {x.shape[0]} rows does not split into the {len(chunks)} cond/uncond "
                                   f"chunks ComfyUI reports ({chunks})")
        images = x.shape[0] // len(chunks)
        context = self.context
        sigma = self._set_step(options)
        # ComfyUI runs one prompt at a time: the state below belongs to this call until it returns.
        self._prepare_split(sigma, images, chunks)
        context.set_batch_layout(images, len(chunks))
        context.lora_scale = 1.0
        if self.layers:
            context.update_coefficients(self.layers, x.device)
        context.in_forward = True
        try:
            return executor(*args, **kwargs)
        finally:
            context.in_forward = False
            context.collect(self.layers)
            self.calls += 1

    def _set_step(self, options) -> float | None:
        sigmas, schedule = options.get("sigmas"), options.get("sample_sigmas")
        if sigmas is None or schedule is None:
            if self.context.policy.needs_step:
                raise ComfyFusionError(f"policy {self.context.policy.name!r} depends on the step, but ComfyUI passed "
                                       "no sigmas/sample_sigmas to the model: run it through a KSampler")
            return None
        sigma = float(sigmas.flatten()[0])
        step, steps = step_of(sigma, schedule)
        self.context.set_step(step, steps)
        return sigma

    def _prepare_split(self, sigma, images, chunks) -> None:
        """A call holding only some of an image's chunks (cond, uncond) at the sigma of the call that decided
        reuses that call's decisions; any other call decides afresh."""
        partial = len(set(chunks)) < 2
        evaluation = (sigma, images)
        self._reusing = bool(partial and self._evaluation == evaluation and self._decided
                             and self.context.policy.uses_divergence)
        if self._reusing:
            self.split_calls += 1
        else:
            self._evaluation, self._decided = (evaluation if partial else None), {}

    # called by the patched forwards -----------------------------------------------------------------------------
    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        view = layer.base
        module = view.module
        if layer.subject_a.device != x.device:
            layer.to(x.device)
        if casts_per_call(module):
            comfy, _ = comfy_modules()
            view.__dict__["current"] = comfy.ops.cast_bias_weight(module, x)[:2]
        try:
            if self._reusing and self.context.in_forward and layer.index in self._decided:
                return reuse_decisions(layer, x, self._decided[layer.index])
            out = layer(x)
            kept = layer.__dict__.get("kept_decisions")
            if self._evaluation is not None and kept is not None and isinstance(kept[0], torch.Tensor):
                self._decided[layer.index] = kept[0]
            return out
        finally:
            view.__dict__["current"] = None


def call_options(args, kwargs) -> dict:
    """``transformer_options`` of a DIFFUSION_MODEL wrapper call: ``(x, timesteps, context, y, control,
    transformer_options)`` positionally, or by keyword."""
    options = kwargs.get("transformer_options")
    if options is None:
        options = args[5] if len(args) > 5 and isinstance(args[5], dict) else {}
    return options


def reuse_decisions(layer, x: torch.Tensor, choose: torch.Tensor) -> torch.Tensor:
    """The layer's output with ``choose`` (per decision group, True = subject) from an earlier call of the same
    evaluation, instead of deciding on this call's rows: the same deltas, the reference rule's row selection."""
    context, base = layer.context, layer.base
    acc = accumulation_dtype(x.dtype)
    bias = None if base.bias is None else base.bias.to(acc)
    if isinstance(layer, DynamicLoRAConv2d):
        xs = x.to(acc)
        y0 = layer._conv(xs, base.weight.to(acc), bias)
        subject_raw = layer._raw_delta(xs, y0, layer.subject_a, layer.subject_b)
        style_raw = layer._raw_delta(xs, y0, layer.style_a, layer.style_b)
        batch, _, height, width = y0.shape
        rows_per_sample, to_rows = height * width, pixel_rows
    else:
        rows = x.reshape(-1, x.shape[-1])
        y0 = base_linear(rows, base.weight, base.bias)
        subject_raw = lora_delta(rows, layer.subject_a, layer.subject_b)
        style_raw = lora_delta(rows, layer.style_a, layer.style_b)
        batch, rows_per_sample = x.shape[0], rows.shape[0] // max(x.shape[0], 1)
        to_rows = None
    base_out = y0 if bias is None or not layer.has_dora else y0 - bias.reshape(-1, *([1] * (y0.ndim - 2)))
    subject_delta = layer.branch_delta("subject", base_out, subject_raw)
    style_delta = layer.branch_delta("style", base_out, style_raw)
    row_group, groups = context.row_groups(batch, rows_per_sample, x.device)
    if groups != choose.numel():
        raise ComfyFusionError(f"layer {layer.name!r}: the split call has {groups} decision groups but the call that "
                               f"decided had {choose.numel()}; use granularity 'image' or 'batch'")
    if to_rows is None:
        out = select_rows(y0, subject_delta, style_delta, choose, row_group)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
    out = select_rows(to_rows(y0), to_rows(subject_delta), to_rows(style_delta), choose, row_group)
    return from_pixel_rows(out, batch, height, width).to(x.dtype)


def parse_options(text: str) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise OptionError(f"policy_options: not JSON ({error.msg} at character {error.pos}): {text!r:.80}") from None
    if not isinstance(options, dict):
        raise OptionError(f"policy_options: expected a JSON object such as {{\"tau\": 3}}, got {text!r:.80}")
    return options


def build_fusion(model, subject, style, paths, *, policy: str, divergence: str, granularity: str, backend: str,
                 policy_options: dict):
    """A clone of ``model`` whose targeted layers run the engine's fused layers while ComfyUI samples it."""
    comfy, _ = comfy_modules()
    if policy not in POLICY_NAMES:
        raise OptionError(f"unknown policy {policy!r}; expected one of {POLICY_NAMES}")
    options = dict(policy_options)
    if policy == "fls":
        options["divergence"] = divergence
    policy_object = make_policy(policy, **options)
    names = _module_order(model, paths)
    # Cleared when each sampling starts; the bound keeps a whole sampling of up to 400 model calls (an SDXL LoRA's
    # ~700 layers at 30 Heun steps is 60 calls) and stops a model called outside a sampler from growing it forever.
    trace = Trace(names, policy_object.describe(), max(DEFAULT_MAX_RECORDS, len(names) * EVALUATIONS_KEPT))
    context = FusionContext(policy_object, granularity, backend, trace)
    layers = []
    for index, name in enumerate(names):
        module = comfy.utils.get_attr(model.model, paths[name])
        if module.weight.dtype not in FLOAT_DTYPES:
            raise ComfyFusionError(f"layer {paths[name]}: weights in {module.weight.dtype} (e.g. fp8) are not "
                                   "supported by the fusion node yet; load the model in fp16/bf16/fp32")
        cls = DynamicLoRAConv2d if isinstance(module, nn.Conv2d) else DynamicLoRALinear
        base = CallWeights(module)
        layer = cls(base, name, index, layer_factors(subject, name, base), layer_factors(style, name, base), context)
        kind = "conv2d" if cls is DynamicLoRAConv2d else "linear"
        check_supported(backend, kind, module.weight.dtype, (layer.subject_rank, layer.style_rank),
                        device=comfy.model_management.get_torch_device(), layer=name)
        layers.append(layer)
    policy_object.setup(layers)
    state = FusionState(layers, paths, context, trace, model_family(model))
    fused = model.clone()
    for layer in layers:
        fused.add_object_patch(paths[layer.name] + ".forward", _patched_forward(state, layer))
    pe = comfy.patcher_extension
    fused.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, ATTACHMENT,
                               lambda executor, *a, **k: state.denoiser_call(executor, a, k))
    fused.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, ATTACHMENT, _outer_sample(state))
    fused.set_attachments(ATTACHMENT, state)
    return fused, state


def _patched_forward(state: FusionState, layer):
    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise ComfyFusionError(f"layer {layer.name!r} was called with extra arguments; the fusion wraps plain "
                                   "Linear/Conv2d forwards")
        return state.forward(layer, x)

    return forward


def _outer_sample(state: FusionState):
    def wrapper(executor, *args, **kwargs):
        state.start_sampling()
        return executor(*args, **kwargs)

    return wrapper


def _module_order(model, paths: dict[str, str]) -> list[str]:
    order = {name: i for i, (name, _) in enumerate(model.model.named_modules())}
    return sorted(paths, key=lambda n: (order.get(paths[n], math.inf), n))


def fusion_state(model) -> FusionState | None:
    """The fusion a MODEL carries (from the Fuse node), or None."""
    getter = getattr(model, "get_attachment", None)
    return getter(ATTACHMENT) if getter is not None else None


def fuse(model, clip, subject_name: str | None, subject_strength: float, style_name: str | None,
         style_strength: float, *, policy="fls", divergence="kl", granularity="image", backend="auto",
         policy_options=""):
    """The Fuse node's work: (fused MODEL clone, CLIP clone with both LoRAs' text-encoder parts added (direct)).

    Nothing is changed on ``model`` or ``clip``: every check runs before the clone is made."""
    refuse_unsupported(model)
    if fusion_state(model) is not None:
        raise AttachError("this MODEL already carries a subject+style fusion; fuse once per model (chain plain "
                          "LoRA loaders before the fusion node instead)")
    options = parse_options(policy_options)
    chosen = [(role, name, strength) for role, name, strength in
              (("subject", subject_name, subject_strength), ("style", style_name, style_strength)) if name]
    if not chosen:
        raise ComfyFusionError("no LoRA chosen: pick a subject LoRA, a style LoRA, or both")
    parts, paths, clip_parts = {"subject": None, "style": None}, {}, []
    for role, name, strength in chosen:
        lora, lora_paths, clip_patches = read_lora(name, strength, model, clip)
        parts[role] = lora
        paths.update(lora_paths)
        clip_parts.append((clip_patches, strength))
    if not paths:
        raise ComfyFusionError(f"the chosen LoRAs {[name for _, name, _ in chosen]} have no denoiser layers to fuse")
    fused, _ = build_fusion(model, parts["subject"], parts["style"], paths, policy=policy, divergence=divergence,
                            granularity=granularity, backend=backend, policy_options=options)
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        for patches, strength in clip_parts:  # text encoders: both deltas added, as LoraLoader does (direct)
            new_clip.add_patches(patches, strength)
    return fused, new_clip
