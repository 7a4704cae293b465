"""Attach a LoRA pool to a model once; each image names its LoRAs: ``fe.attach(model, pool=pool)`` and ``set_loras``.

Every Linear (Conv2d) layer a pool LoRA adapts is swapped for a ``PooledLoRALinear`` (``PooledLoRAConv2d``: conv
layers run the pooled conv reference ops whatever the backend, as single-pair conv layers do); each image then fuses
the LoRAs it names (one, a pair, or more) with the policy, and an image's result is the one a single-pair
attach of its own pair gives (``tests/test_pool_equivalence.py``). LoRAs added to the pool while attached are
taken at once (their new layers are swapped in); removed ones leave their layers running the others.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import ModelMismatchError, OptionError
from ..ops import check_supported
from ..policies import divergence_option
from ..policies.pool import make_pool_policy
from ..utils.deprecation import warn_renamed
from .fit import check_fit, find_module
from .fusion import _ATTACH_LOCK, _ATTACHED, Fusion, _already_attached, _swap_in, in_module_order, register
from .pool import resolved_device
from .pool_context import PoolContext
from .pool_layers import PooledLoRAConv2d, PooledLoRALinear
from .pool_trace import PoolTrace
from .trace import max_records


def _pooled_layer(module: nn.Module, name: str, index: int, context):
    """The pool's stand-in for ``module``: a ``PooledLoRAConv2d`` for an ``nn.Conv2d``, else a ``PooledLoRALinear``."""
    kind = PooledLoRAConv2d if type(module) is nn.Conv2d else PooledLoRALinear
    return kind(module, name, index, context)


def _shape_problem(name: str, module: nn.Module, shape: tuple[int, ...]) -> str | None:
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


def _fit_problems(model: nn.Module, pool, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why pool layers ``shapes`` (name -> base weight shape) cannot go on ``model``: missing, not Linear or Conv2d,
    other shapes (a conv LoRA of another kernel size), another device or dtype than the pool's."""
    problems = []
    for name, shape in shapes.items():
        module = find_module(model, name)
        if module is None:
            problems.append(f"{name}: no such module in the model")
        elif type(module) not in (nn.Linear, nn.Conv2d):
            problems.append(f"{name}: is a {type(module).__name__}; the pool fuses nn.Linear and nn.Conv2d layers "
                            "only")
        elif problem := _shape_problem(name, module, shape):
            problems.append(problem)
        elif resolved_device(module.weight.device) != pool.device or module.weight.dtype != pool.dtype:
            problems.append(f"{name}: the model's weight is {module.weight.dtype} on {module.weight.device}, the pool "
                            f"is {pool.dtype} on {pool.device}: make the pool with the model's device and dtype")
    return problems


def _raise_misfit(problems: list[str], what: str) -> None:
    if problems:
        raise ModelMismatchError(f"{what}: {len(problems)} layer(s) do not fit this model:\n  "
                                 + "\n  ".join(problems[:10]) + (f"\n  ... (+{len(problems) - 10} more)"
                                                                 if len(problems) > 10 else ""))


class PoolFusion(Fusion):
    """Handle of a pool attached to a model: ``set_loras``, the trace, ``detach`` (see ``Fusion``)."""

    def __init__(self, model, pool, context: PoolContext, layers, originals):
        super().__init__(model, None, None, context, layers, originals)
        self.pool = pool

    def set_loras(self, entries) -> None:
        """Which LoRAs each image fuses, one entry per image (a name or a tuple of names, in priority order):
        ``[("dog", "watercolor"), ("cat", "pixel-art"), "dog"]``. CFG copies follow their image. Names are
        checked now (``UnknownLoRAError`` naming the image and the name) and resolved to slots per call."""
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

    # -- the pool's watcher protocol: LoRAs added while attached -------------------------------------------------
    def check_pool_layers(self, lora_name: str, shapes: dict[str, tuple[int, int]]) -> None:
        covered = set(self.layer_names)
        _raise_misfit(_fit_problems(self.model, self.pool, {n: s for n, s in shapes.items() if n not in covered}),
                      f"cannot add pool LoRA {lora_name!r} while attached")

    def cover_pool_layers(self, names: list[str]) -> None:
        covered = set(self.layer_names)
        new = [name for name in names if name not in covered]
        if not new or not self.attached:
            return
        originals = {name: self.model.get_submodule(name) for name in new}
        layers = [_pooled_layer(module, name, len(self.layers) + i, self.context)
                  for i, (name, module) in enumerate(originals.items())]
        _swap_in(self.model, layers, originals)
        self.layers.extend(layers)
        self._originals.update(originals)
        if self.context.trace is not None:
            self.context.trace.layer_names.extend(new)

    def detach(self) -> None:
        super().detach()
        self.pool.unwatch(self)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"PoolFusion({self.policy.describe()}, {len(self.pool)} LoRAs, layers={len(self.layers)}, {state})"


def pool_policy(policy, divergence: str | None, granularity: str, policy_options: dict):
    """The pool policy for these attach options, or the ``OptionError`` an attach would raise (a policy the pool
    does not run, granularity ``"batch"``)."""
    if granularity == "batch":
        raise OptionError("granularity 'batch' with a LoRA pool: images that name different LoRAs cannot share one "
                          "decision; use 'image' (default), 'sample' or 'token'")
    return make_pool_policy(policy, **policy_options, **divergence_option(policy, divergence))


def attach_pool(model: nn.Module, pool, *, policy=None, divergence: str | None = None, granularity: str | None = None,
                backend: str = "auto", trace: bool | int = True, targets=(), **policy_options) -> PoolFusion:
    """Attach ``pool`` to ``model``: every Linear (Conv2d) layer a pool LoRA adapts (and every name in ``targets``,
    for LoRAs added later) becomes a ``PooledLoRALinear`` (``PooledLoRAConv2d``). Nothing changes unless every layer
    fits.

    Args:
        policy: ``"fls"`` (default: N-way FLS), ``"direct"`` (``weights=`` per position), ``"switch"`` (``tau=``),
            ``"klora"`` (``pattern=``; K-LoRA per image and layer, see ``policies.pool.PoolKLoRA``).
        divergence: FLS's divergence: ``"kl"`` (default), ``"js"``, ``"cosine"``, ``"dot"``; refused with any other
            policy (it would be ignored).
        granularity: ``"image"`` (default), ``"sample"`` or ``"token"``; ``"batch"`` is refused (images with
            different LoRAs cannot share a decision).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``: where it resolves to triton (``"auto"`` on CUDA), N-way
            FLS runs the pooled FLS kernel (kl, cosine, dot; ``js`` the pooled reference op on the same device)
            and ``direct``, ``switch`` and ``klora`` the pooled mix kernel; elsewhere the pooled reference ops (pure
            torch, any device). The pooled kernels are forward only: a forward that carries a gradient to the layer's
            input (guidance) runs the reference ops, whatever the backend. Conv (LoCon) layers run the pooled conv
            reference ops on every backend.
        trace: as in ``attach_model``; the records are ``PoolRecord``s (positions in each image's names).
    """
    granularity = granularity or "image"
    policy = pool_policy(policy, divergence, granularity, policy_options)
    with _ATTACH_LOCK:
        if model in _ATTACHED:
            raise _already_attached(_ATTACHED[model])
        names = in_module_order(model, set(pool.layers) | set(targets))
        check_fit(model, names, {})
        shapes = {name: pool.layers[name].shape if name in pool.layers else
                  tuple(getattr(find_module(model, name), "weight", None).shape) for name in names}
        _raise_misfit(_fit_problems(model, pool, shapes), "cannot attach the pool")
        for name in names:  # what the backend declines fails here, not at the first launch
            weight = model.get_submodule(name).weight
            kind = "linear" if weight.ndim == 2 else "conv2d"  # conv2d: the reference ops on every backend
            check_supported(backend, kind, weight.dtype, (pool.layers[name].rank if name in pool.layers else 0,),
                            device=weight.device, layer=name)
        records = max_records(trace)
        trace_object = PoolTrace(names, policy.describe(), records) if records else None
        context = PoolContext(pool, policy, granularity, backend, trace_object)
        originals = {name: model.get_submodule(name) for name in names}
        layers = [_pooled_layer(module, name, index, context) for index, (name, module) in
                  enumerate(originals.items())]
        _swap_in(model, layers, originals)
        fusion = register(model, PoolFusion(model, pool, context, layers, originals))
        pool.watch(fusion)
    return fusion


__all__ = ["PoolFusion", "attach_pool", "pool_policy"]
