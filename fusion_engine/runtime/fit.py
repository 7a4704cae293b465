"""Does a LoRA pair (or a pool) fit a model? Every target is checked before anything is swapped, and one error lists
every problem, with per-LoRA counts so "made for another base model" is obvious at a glance. ``layer_factors`` gives
a pair's entries at a layer as they fit it (cast to its weight, checked, DoRA's gain): what an attach resolves."""
from __future__ import annotations

import torch.nn as nn

from ..errors import AlreadyAttachedError, ModelMismatchError, preview
from ..lora.checks import check_cast_factor, check_layer_scale
from ..lora.families import SD_UNET, describe_family, families_fit, model_family
from .layers import DynamicLoRALayer, absent_factors, dora_gain
from .pool import resolved_device

FUSABLE_TYPES = (nn.Linear, nn.Conv2d)  # exact types: subclasses may change forward in ways we cannot fuse
_CROSS_ATTENTION_INPUTS = ("attn2.to_k", "attn2.to_v")
_LISTED_PROBLEMS = 10


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def expected_shapes(base: nn.Module, rank: int):
    """(down, up) shapes a rank-``rank`` LoRA needs on ``base``."""
    weight = base.weight
    if isinstance(base, nn.Linear):
        return (rank, weight.shape[1]), (weight.shape[0], rank)
    return (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)


def _module_problem(name: str, module: nn.Module | None) -> str | None:
    """Why no LoRA can go on ``module`` at all (None when it can)."""
    if module is None:
        return f"{name}: no such module in the model"
    if type(module) not in FUSABLE_TYPES:
        return f"{name}: is a {type(module).__name__}; only nn.Linear and nn.Conv2d layers can be fused"
    return None


def _shape_problem(name: str, module: nn.Module, role: str, lora) -> str | None:
    layer = lora.layers[name]
    down_shape, up_shape = expected_shapes(module, layer.rank)
    lora_a, lora_b = tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    if isinstance(module, nn.Linear) and layer.is_conv and layer.lora_a.shape[2:] == (1, 1):
        lora_a, lora_b = lora_a[:2], lora_b[:2]  # 1x1-conv storage of a Linear LoRA
    magnitude = layer.magnitude
    if (lora_a, lora_b) == (down_shape, up_shape):
        if magnitude is None or tuple(magnitude.shape) == (module.weight.shape[0],):
            return None
        return (f"{name}: {role} LoRA ({lora.source}) has a DoRA magnitude of shape {tuple(magnitude.shape)}, but the "
                f"model's {type(module).__name__} has {module.weight.shape[0]} output rows")
    return (
        f"{name}: {role} LoRA ({lora.source}) has A {lora_a} / B {lora_b}, but the model's "
        f"{type(module).__name__} with weight {tuple(module.weight.shape)} needs {down_shape} / {up_shape}"
    )


def _refuse_attached(model: nn.Module, modules: dict[str, nn.Module | None]) -> None:
    """A model that already carries a fusion (or PEFT adapters) at a target cannot take another one."""
    fused = [name for name, module in model.named_modules() if isinstance(module, DynamicLoRALayer)]
    if fused:
        raise AlreadyAttachedError(
            f"this model already holds {len(fused)} fused layer(s) from an earlier attach (e.g. {preview(fused, 3)}); "
            "detach that fusion first (a copy of an attached model carries its fused layers too)"
        )
    adapted = [name for name, module in modules.items() if hasattr(module, "lora_A") or hasattr(module, "base_layer")]
    if adapted:
        raise AlreadyAttachedError(
            f"{len(adapted)} target(s) hold PEFT adapters already (e.g. {preview(adapted, 3)}); attach to the base "
            "model, not one with LoRAs loaded (unet.unload_lora_weights() or a fresh copy)"
        )


def _context_width_note(model: nn.Module, lora) -> str:
    """'the LoRA's cross-attention takes 768-wide text features, this model's 2048' (SD1.5 vs SDXL), if known."""
    widths = sorted({int(layer.lora_a.shape[1]) for name, layer in lora.layers.items()
                     if name.endswith(_CROSS_ATTENTION_INPUTS)})
    model_width = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if not widths or not isinstance(model_width, int) or widths == [model_width]:
        return ""
    return (f"; its cross-attention layers take {'/'.join(map(str, widths))}-wide text features, "
            f"this model's {model_width}")


def _summary(model: nn.Module, role: str, lora, modules, problems: dict[str, str]) -> str | None:
    """How many of a LoRA's targets match, which do not, and a hint when most do not (None: all match)."""
    total = len(lora.layers)
    missing = [name for name in lora.layers if modules[name] is None]
    misfit = [name for name in lora.layers if modules[name] is not None and name in problems
              and (_module_problem(name, modules[name]) or _shape_problem(name, modules[name], role, lora))]
    matched = total - len(missing) - len(misfit)
    if matched == total:
        return None
    line = f"{role} LoRA ({lora.source}): {matched} of {total} targets match this model"
    if missing:
        line += f"; {len(missing)} missing (e.g. {preview(missing, 3)})"
    if misfit:
        line += f"; {len(misfit)} with other shapes or types (e.g. {preview(misfit, 3)})"
    width_note = _context_width_note(model, lora)  # text-feature width differs: SD1.5 (768) vs SDXL (2048)
    if matched * 2 < total or width_note:
        line += " -> it looks made for another base model" + _families_note(model, lora) + width_note
    return line


def _families_note(model: nn.Module, lora) -> str:
    """What the file and the model are: ': the file is made for FLUX.1 (from its keys), this model is FLUX.1 (...)'."""
    family, mine = getattr(lora, "family", None), model_family(model)
    if family is None:  # a LoRA built in memory
        return " (e.g. an SD1.5 LoRA on an SDXL UNet, or the reverse)"
    note = f": the file is made for {describe_family(family)} (from its keys)"
    if mine is not None:
        note += f", this model is {describe_family(mine)} ({type(model).__name__})"
    if SD_UNET in (family, mine):
        note += ", e.g. an SD1.5 LoRA on an SDXL UNet, or the reverse"
    elif family == mine:
        note += " of another size or version"
    return note


def refuse_other_family(model: nn.Module, loras: dict) -> None:
    """A LoRA whose keys name another model family than the model's (a FLUX.1 LoRA on an SD3 transformer)
    is refused even where some shapes happen to fit, naming both families."""
    mine = model_family(model)
    for role, lora in loras.items():
        family = getattr(lora, "family", None)
        if lora is not None and not families_fit(family, mine):
            raise ModelMismatchError(
                f"cannot attach: the {role} LoRA ({lora.source}) is made for {describe_family(family)} (from its "
                f"keys), but this model is {describe_family(mine)} ({type(model).__name__}); load a LoRA made for "
                f"{describe_family(mine)}")


def layer_factors(lora, name: str, base: nn.Module):
    """(lora_a, lora_b, scale, dora_gain) of ``lora`` at ``name`` cast to the base weight; None if absent there.

    ``dora_gain`` is empty unless the layer is DoRA (see ``layers.dora_gain``).

    A ``LoRAValueError`` names the layer and factor when the cast overflows (float32 7e4 -> float16 Inf)
    or the effective scale is not finite in float32.
    """
    if lora is None or name not in lora.layers:
        return None
    weight = base.weight
    no_gain = absent_factors(base)[3]
    layer = lora.layers[name]
    lora_a = layer.lora_a.to(device=weight.device, dtype=weight.dtype)
    lora_b = layer.lora_b.to(device=weight.device, dtype=weight.dtype)
    check_cast_factor(lora.source, name, "lora_a", layer.lora_a, lora_a)
    check_cast_factor(lora.source, name, "lora_b", layer.lora_b, lora_b)
    check_layer_scale(lora.source, name, lora.layer_scale(name))
    if weight.ndim == 2 and lora_a.ndim == 4:  # kohya stores some Linear LoRAs as 1x1 convs
        lora_a, lora_b = lora_a.flatten(1), lora_b.flatten(1)
    scale = lora.layer_scale(name)
    gain = no_gain if layer.magnitude is None else dora_gain(weight, layer.lora_a, layer.lora_b, scale, layer.magnitude)
    return lora_a, lora_b, scale, gain


def check_fit(model: nn.Module, names: list[str], loras: dict) -> None:
    """Raise unless every target in ``names`` resolves to a fusable layer that every LoRA's factors fit."""
    modules = {name: find_module(model, name) for name in names}
    _refuse_attached(model, modules)
    refuse_other_family(model, loras)
    problems = {}
    for name, module in modules.items():
        problem = _module_problem(name, module)
        for role, lora in loras.items():
            if problem is None and lora is not None and name in lora.layers:
                problem = _shape_problem(name, module, role, lora)
        if problem:
            problems[name] = problem
    if not problems:
        return
    found = sum(module is not None for module in modules.values())
    summaries = [line for role, lora in loras.items() if lora is not None
                 for line in [_summary(model, role, lora, modules, problems)] if line]
    _refuse(f"cannot attach: {len(problems)} of {len(names)} LoRA targets do not fit this model ({found} resolve to "
            "modules)", list(problems.values()), summaries)


def _refuse(head: str, problems: list[str], summaries=()) -> None:
    """A ``ModelMismatchError``: ``head``, the ``summaries``, then the first ``_LISTED_PROBLEMS`` problems."""
    more = len(problems) - _LISTED_PROBLEMS
    raise ModelMismatchError(f"{head}:\n  " + "\n  ".join([*summaries, *problems[:_LISTED_PROBLEMS]])
                             + (f"\n  ... (+{more} more)" if more > 0 else ""))


def _pool_shape_problem(name: str, module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why pool LoRAs for weight ``shape`` do not fit ``module`` (an nn.Linear or nn.Conv2d), None when they do: a
    conv needs the same kernel (1x1-conv storage, ``(N, K)``, fits a 1x1 conv)."""
    weight = tuple(module.weight.shape)
    if type(module) is nn.Linear:
        fits = weight == tuple(shape)
    else:
        fits = weight == tuple(shape) or (len(shape) == 2 and weight == (*shape, 1, 1))
        if fits and module.groups != 1:
            return (f"{name}: is a grouped Conv2d (groups={module.groups}); the pool fuses conv layers with "
                    "groups=1 only (attach it as a pair)")
    if fits:
        return None
    lora_kernel = "x".join(map(str, shape[2:])) or "1x1 (or a Linear layer's LoRA)"
    kind = "" if type(module) is nn.Linear else (f" (a LoRA kernel of {lora_kernel}, the conv's is "
                                                 f"{'x'.join(map(str, weight[2:]))})")
    return (f"{name}: the pool's LoRAs need weight {tuple(shape)}, the model's {type(module).__name__} is "
            f"{weight}{kind}")


def check_pool_fit(model: nn.Module, pool, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """A ``ModelMismatchError`` (``what`` says which step) listing why pool layers ``shapes`` (name -> base weight
    shape) cannot go on ``model``: missing, not Linear or Conv2d, other shapes (a conv LoRA of another kernel size),
    another device or dtype than the pool's."""
    problems = []
    for name, shape in shapes.items():
        module = find_module(model, name)
        problem = _module_problem(name, module) or _pool_shape_problem(name, module, shape)
        if problem is None and (resolved_device(module.weight.device) != pool.device
                                or module.weight.dtype != pool.dtype):
            problem = (f"{name}: the model's weight is {module.weight.dtype} on {module.weight.device}, the pool "
                       f"is {pool.dtype} on {pool.device}: make the pool with the model's device and dtype")
        problems += [problem] if problem else []
    if problems:
        _refuse(f"{what}: {len(problems)} layer(s) do not fit this model", problems)
