"""attach/detach: swap every LoRA-targeted layer of a model for a fused module, and back, exactly."""
from __future__ import annotations

import weakref

import torch.nn as nn

from .context import FusionContext
from .errors import AttachError, preview
from .lora import LoRA, load_lora
from .modules import FusedLayer, FusedLoRAConv2d, FusedLoRALinear
from .ops import BACKENDS
from .policies import make_policy
from .trace import Trace

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Fusion]" = weakref.WeakKeyDictionary()
_FUSED_TYPES = {nn.Linear: FusedLoRALinear, nn.Conv2d: FusedLoRAConv2d}


def _as_lora(value, role: str) -> LoRA | None:
    if value is None or isinstance(value, LoRA):
        return value
    try:
        return load_lora(value)
    except TypeError as error:
        raise AttachError(f"{role}: expected a LoRA, a path or a state dict, got {type(value).__name__}") from error


def _expected_shapes(base: nn.Module, rank: int):
    weight = base.weight
    if isinstance(base, nn.Linear):
        return (rank, weight.shape[1]), (weight.shape[0], rank)
    return (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)


def _check_target(name: str, module: nn.Module | None, loras: dict[str, LoRA | None]) -> str | None:
    """Why ``module`` cannot take the LoRAs at ``name``, or None if it can."""
    if module is None:
        return f"{name}: no such module in the model"
    if isinstance(module, FusedLayer):
        return f"{name}: already fused (attach was called twice on this model)"
    if hasattr(module, "lora_A") or hasattr(module, "base_layer"):
        return f"{name}: holds PEFT adapters already; attach to the base model, not one with LoRAs loaded"
    if type(module) not in _FUSED_TYPES:
        return f"{name}: is a {type(module).__name__}; only nn.Linear and nn.Conv2d layers can be fused"
    for role, lora in loras.items():
        if lora is None or name not in lora.layers:
            continue
        layer = lora.layers[name]
        down_shape, up_shape = _expected_shapes(module, layer.rank)
        down, up = tuple(layer.down.shape), tuple(layer.up.shape)
        if isinstance(module, nn.Linear) and layer.is_conv and layer.down.shape[2:] == (1, 1):
            down, up = down[:2], up[:2]  # 1x1-conv storage of a Linear LoRA
        if (down, up) != (down_shape, up_shape):
            return (
                f"{name}: {role} LoRA ({lora.source}) has down {down} / up {up}, but the model's "
                f"{type(module).__name__} with weight {tuple(module.weight.shape)} needs {down_shape} / {up_shape}"
            )
    return None


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class Fusion:
    """Handle of an attached fusion: sampler controls, the trace, and ``detach``.

    Also a context manager: ``with fe.attach(unet, ...) as fusion: ...`` detaches on exit, whatever happens.
    """

    def __init__(self, model, subject, style, context: FusionContext, layers, originals):
        self.model, self.subject, self.style = model, subject, style
        self.context = context
        self.layers: list[FusedLayer] = layers
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

    def __enter__(self) -> "Fusion":
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
    policy="fls",
    divergence: str = "kl",
    granularity: str = "image",
    backend: str = "auto",
    trace: bool = True,
    **policy_options,
) -> Fusion:
    """Fuse ``subject`` and ``style`` LoRAs into ``model`` (any diffusers UNet or nn.Module).

    Every layer either LoRA targets is swapped for a fused module; a layer targeted by one LoRA fuses
    with the other absent. Nothing is changed unless every target resolves and fits. Policy options:
    ``weights=(wc, ws)`` (direct), ``pattern`` (klora), ``blocks`` (blora), ``tau`` (switch).
    """
    subject, style = _as_lora(subject, "subject"), _as_lora(style, "style")
    if subject is None and style is None:
        raise AttachError("attach needs a subject LoRA, a style LoRA, or both")
    if backend not in BACKENDS:
        raise AttachError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if model in _ATTACHED:
        raise AttachError(f"this model already has a fusion attached ({_ATTACHED[model]!r}); detach it first")
    if policy == "fls":
        policy_options["divergence"] = divergence
    policy = make_policy(policy, **policy_options)

    wanted = set(subject.layers if subject else ()) | set(style.layers if style else ())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted(wanted, key=lambda n: (order.get(n, len(order)), n))
    loras = {"subject": subject, "style": style}
    problems = [p for p in (_check_target(n, _find(model, n), loras) for n in names) if p]
    if problems:
        found = sum(_find(model, n) is not None for n in names)
        raise AttachError(
            f"cannot attach: {len(problems)} of {len(names)} LoRA targets do not fit this model "
            f"({found} resolve to modules):\n  " + "\n  ".join(problems[:10])
            + (f"\n  ... (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        )

    context = FusionContext(policy, granularity, backend, Trace(names, policy.describe()) if trace else None)
    originals = {name: model.get_submodule(name) for name in names}
    layers = [
        _FUSED_TYPES[type(module)](module, name, index, subject, style, context)
        for index, (name, module) in enumerate(originals.items())
    ]
    policy.setup(layers)

    swapped = []
    try:
        for layer in layers:
            _set_module(model, layer.name, layer)
            swapped.append(layer.name)
    except BaseException:
        for name in swapped:
            _set_module(model, name, originals[name])
        raise
    fusion = Fusion(model, subject, style, context, layers, originals)
    _ATTACHED[model] = fusion
    return fusion


def attached_fusion(model: nn.Module) -> Fusion | None:
    return _ATTACHED.get(model)


__all__ = ["Fusion", "attach", "attached_fusion"]
