"""A LoRA pool: many LoRAs held on one device, so every image of a batch can fuse its own (``fe.attach(..., pool=)``).

Storage, per adapted layer: the factors of every pool slot stacked and padded with zeros to the layer's padded rank
``R``, ``a`` ``(S, R, K)`` and ``b`` ``(S, N, R)``, beside ``scales`` ``(S,)`` (alpha / rank times the LoRA's
scale) and ``present`` ``(S,)`` (the slot's LoRA adapts this layer). The last of the ``S`` rows is the layer's
ZERO slot: all zeros, scale 0, never present, never a LoRA's. An image naming fewer LoRAs than the widest image of
its batch reads it at its unused positions (slot ``-1`` in an assignment table), never another LoRA's factors
times zero, so a LoRA whose factors overflow cannot turn other images to NaN.

A conv (LoCon) layer with a kernel larger than 1x1 stacks ``a`` ``(S, R, C_in, kh, kw)`` (B is a 1x1 conv: ``b``
``(S, N, R)`` as for a Linear); 1x1-conv storage is flattened to the Linear shapes and fits an ``nn.Linear`` or a
1x1 ``nn.Conv2d``. A slot is one LoRA, the same index in every layer; a removed LoRA's slot is zeroed and reused by
the next ``add``. Zero padding adds exact zeros, so a rank-4 LoRA beside a rank-64 one computes the same delta (up
to the summation order of the GEMM).

Capacity, as vLLM's ``max_loras`` x ``max_lora_rank``:

* A fixed-capacity pool (``max_loras=``, ``max_rank=``) allocates each layer's stacks once, at ``max_loras + 1``
  rows of rank ``max_rank``, when the first LoRA adapting the layer arrives. ``add`` and ``remove`` only write
  into a slot: the stacks never re-allocate and keep their identity (a captured CUDA graph stays valid), and the
  bytes held never creep. A layer whose last LoRA leaves keeps its (zeroed) stacks for the next LoRA there. An
  ``add`` past ``max_loras`` LoRAs, or with a layer wider than ``max_rank``, raises ``PoolBudgetError``.
* Without a capacity (the default) the pool is elastic, sized to what it holds: a layer's rows are the highest
  held slot + 2 (the zero slot included) and its rank the widest LoRA held there. An ``add`` that needs a slot
  or a rank the stacks lack re-allocates them; a ``remove`` re-allocates a layer only when it leaves that
  layer's padding narrower (then trailing free rows go too), and drops a layer no LoRA adapts any more. Any other
  ``remove``, and an ``add`` into a free slot of a rank that fits, keep the stacks' identity.

``nbytes`` counts what the stacks hold on the device, padding, free and zero slots included: it is what a
``budget_bytes`` limits.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from ..errors import LoRAShapeError, OptionError, PoolBudgetError, UnknownLoRAError, preview
from ..lora import LoRA, load_lora
from ..lora.checks import check_cast_factor, check_layer_scale
from ..ops.reference import accumulation_dtype


@dataclass
class PoolLayer:
    """One adapted layer's stacks (see the module docstring)."""

    a: torch.Tensor  # (S, R, K), or (S, R, C_in, kh, kw) for a conv layer
    b: torch.Tensor  # (S, N, R)
    scales: torch.Tensor  # (S,) accumulation dtype
    present: torch.Tensor  # (S,) bool

    @property
    def shape(self) -> tuple[int, ...]:
        """The base layer's weight shape: ``(N, K)``, or ``(N, C_in, kh, kw)`` for a conv layer."""
        return (self.b.shape[1], *self.a.shape[2:])

    @property
    def is_conv(self) -> bool:
        """A conv layer with a kernel larger than 1x1 (its ``a`` is 5-dimensional)."""
        return self.a.ndim == 5

    @property
    def rank(self) -> int:
        """The padded rank ``R`` of the stacks."""
        return self.a.shape[1]

    @property
    def rows(self) -> int:
        """``S``: the slots the stacks hold, the zero slot (the last row) included."""
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.scales, self.present))


def resolved_device(device) -> torch.device:
    """``device`` as the tensors placed there report it: ``"cuda"`` -> ``cuda:<current>``, ``"cpu:0"`` -> ``cpu``,
    ``"mps"`` -> ``mps:0``; so ``LoRAPool(device="cuda")`` matches a model on ``cuda:0`` whatever form is given."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None:
        backend = getattr(torch, device.type, None)
        current = getattr(backend, "current_device", None)
        available = getattr(backend, "is_available", lambda: False)
        return torch.device(device.type, current() if current is not None and available() else 0)
    return device


def _weight_shape(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[int, ...]:
    """The base weight shape one LoRA's (A (r, ...), B (N, r)) adapts: ``(N, *A.shape[1:])``."""
    return (lora_b.shape[0], *lora_a.shape[1:])


def _layer_bytes(rows: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    out_features, in_features = shape[0], math.prod(shape[1:])
    factors = rows * rank * (in_features + out_features) * torch.empty(0, dtype=dtype).element_size()
    return factors + rows * (torch.empty(0, dtype=accumulation_dtype(dtype)).element_size() + 1)


def _pool_factors(lora: LoRA, name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B (N, r)) of a LoRA layer as the pool stores it: A (r, K) for a Linear or 1x1-conv storage (flattened),
    (r, C_in, kh, kw) for a conv (LoCon) layer; a B that is not a 1x1 conv is refused."""
    lora_a, lora_b = layer.lora_a, layer.lora_b
    if lora_b.ndim == 4 and lora_b.shape[2:] != (1, 1):
        raise LoRAShapeError(f"{lora.source}: layer {name}: B {tuple(lora_b.shape)} is not a 1x1 conv; the LoRA pool "
                             "takes conv (LoCon) layers whose B is 1x1 (kohya's and PEFT's layout)")
    if lora_a.ndim == 4 and lora_a.shape[2:] == (1, 1):
        lora_a = lora_a.flatten(1)
    return lora_a, lora_b.flatten(1)


class LoRAPool:
    """LoRAs by name on one device, for ``fe.attach(model_or_pipe, pool=pool)`` and per-image assignments.

    Args:
        device: where the stacked factors live (the model's device).
        dtype: the factors' dtype (the model's dtype); scales are kept at accumulation precision.
        budget_bytes: optional limit on ``nbytes``; an ``add`` past it raises ``PoolBudgetError`` and changes
            nothing.
        max_loras, max_rank: the pool's fixed capacity (both or neither): at most ``max_loras`` LoRAs at once,
            each of rank at most ``max_rank`` at every layer. Each layer's stacks are allocated once at that
            capacity and never re-allocated (see the module docstring). Without them the pool is elastic.

    Example:
        >>> pool = fe.LoRAPool(device="cuda", dtype=torch.float16, max_loras=8, max_rank=64)
        >>> pool.add("dog", "dog_lora.safetensors"); pool.add("watercolor", fe.load_lora("wc.safetensors", scale=0.8))
        >>> fusion = fe.attach(pipe, pool=pool, policy="fls")
        >>> pipe(["a dog", "a cat"], loras=[("dog", "watercolor"), ("cat", "pixel-art")])
    """

    def __init__(self, device="cpu", dtype: torch.dtype = torch.float32, budget_bytes: int | None = None, *,
                 max_loras: int | None = None, max_rank: int | None = None):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise OptionError(f"LoRAPool: dtype must be a floating torch.dtype, got {dtype!r}")
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise OptionError(f"LoRAPool: budget_bytes must be a whole number >= 0 or None, got {budget_bytes!r}")
        for label, value in (("max_loras", max_loras), ("max_rank", max_rank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionError(f"LoRAPool: {label} must be a whole number >= 1 or None, got {value!r}")
        if (max_loras is None) != (max_rank is None):
            raise OptionError(f"LoRAPool: a fixed capacity needs both max_loras and max_rank, got "
                              f"max_loras={max_loras!r}, max_rank={max_rank!r}")
        try:
            device = resolved_device(device)
        except (RuntimeError, TypeError):
            raise OptionError(f"LoRAPool: device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
        self.device, self.dtype, self.budget_bytes = device, dtype, budget_bytes
        self.max_loras, self.max_rank = max_loras, max_rank
        self.layers: dict[str, PoolLayer] = {}  # the layers some held LoRA adapts
        self._idle: dict[str, PoolLayer] = {}  # fixed capacity: zeroed stacks of layers no held LoRA adapts now
        self._slots: dict[str, int] = {}  # name -> slot
        self._ranks: dict[str, dict[str, tuple[int, float]]] = {}  # name -> layer -> (the LoRA's rank, its scale)
        self._magnitudes: dict[str, dict[int, torch.Tensor]] = {}  # DoRA: layer -> slot -> magnitude (N,)
        self.parts: dict[str, LoRAPool] = {}  # component (text encoders) -> the pool of the LoRAs' parts there
        self.is_part = False  # one of another pool's ``parts``: it holds only the LoRAs with layers there
        self._lock = threading.RLock()
        self._watchers: list[weakref.ref] = []
        self.version = 0  # bumped by every add/remove: assignments resolve names to slots again

    # -- what the pool holds ------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """LoRA names in slot order."""
        return sorted(self._slots, key=self._slots.get)

    @property
    def nbytes(self) -> int:
        """Bytes the stacks hold on the device (padding, free and zero slots, idle layers' stacks included)."""
        return sum(layer.nbytes for layer in (*self.layers.values(), *self._idle.values()))

    @property
    def fixed(self) -> bool:
        """The pool has a fixed capacity (``max_loras`` x ``max_rank``): its stacks never re-allocate."""
        return self.max_loras is not None

    @property
    def capacity(self) -> int:
        """LoRA slots (the zero slot not counted): ``max_loras``, or for an elastic pool the highest held slot + 1."""
        return self.max_loras if self.fixed else max(self._slots.values(), default=-1) + 1

    def __contains__(self, name) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, name: str) -> int:
        """The slot of LoRA ``name``; ``UnknownLoRAError`` naming the pool's LoRAs when it holds none."""
        try:
            return self._slots[name]
        except (KeyError, TypeError):
            raise UnknownLoRAError(f"no LoRA named {name!r} in the pool (it holds {preview(self.names) or 'none'})") \
                from None

    def layer(self, name: str) -> PoolLayer | None:
        return self.layers.get(name)

    def lora_layers(self, name: str) -> dict[str, tuple[int, float]]:
        """Layer -> (rank, scale) of LoRA ``name`` as added (its own rank, not the stack's padded one; the scale
        as a float, alpha / rank times the LoRA's scale). ``UnknownLoRAError`` when the pool holds no ``name``."""
        self.slot(name)
        return self._ranks[name]

    def magnitudes(self, layer_name: str) -> dict[int, torch.Tensor]:
        """DoRA: slot -> magnitude ``(N,)`` (accumulation precision) of each DoRA LoRA at ``layer_name``; the fused
        layer turns them into gains against its base weight (``DynamicLoRALayer.pool_gains``)."""
        return self._magnitudes.get(layer_name, {})

    def factors(self, name: str, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, K) or (r, C_in, kh, kw), B (N, r)) of LoRA ``name`` at ``layer_name``, unpadded, as the pool holds
        them."""
        layers = self.lora_layers(name)
        if layer_name not in layers:
            raise OptionError(f"LoRAPool.factors: LoRA {name!r} has no layer {layer_name!r} (it adapts "
                              f"{len(layers)} layers: {preview(list(layers))})")
        rank = layers[layer_name][0]
        held, slot = self.layers[layer_name], self.slot(name)
        return held.a[slot, :rank].contiguous(), held.b[slot, :, :rank].contiguous()

    def __deepcopy__(self, memo) -> LoRAPool:
        """The pool itself: a deep copy of a model attached to a pool shares the pool (it is a device-wide store
        of factors, not part of the model; ``fe.detach_all(copy)`` strips the copy's fused layers)."""
        return self

    def __repr__(self) -> str:
        capacity = f", max_loras={self.max_loras}, max_rank={self.max_rank}" if self.fixed else ""
        return (f"LoRAPool({len(self)} LoRAs: {preview(self.names)}, layers={len(self.layers)}, "
                f"nbytes={self.nbytes}{capacity}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    # -- attached fusions ---------------------------------------------------------------------------------------
    def watch(self, fusion) -> None:
        """``fusion`` (a pool fusion) checks and covers the layers of every LoRA added later."""
        self._watchers.append(weakref.ref(fusion))

    def unwatch(self, fusion) -> None:
        self._watchers = [ref for ref in self._watchers if ref() is not None and ref() is not fusion]

    def _live_watchers(self) -> list:
        return [w for w in (ref() for ref in self._watchers) if w is not None]

    # -- add / remove -------------------------------------------------------------------------------------------
    def _prepare(self, name: str, lora: LoRA) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Per layer: (A, B) cast to the pool and the scale; every check before anything changes."""
        prepared = {}
        for layer_name, layer in lora.layers.items():
            lora_a, lora_b = _pool_factors(lora, layer_name, layer)
            cast_a = lora_a.to(device=self.device, dtype=self.dtype)
            cast_b = lora_b.to(device=self.device, dtype=self.dtype)
            check_cast_factor(lora.source, layer_name, "lora_a", lora_a, cast_a)
            check_cast_factor(lora.source, layer_name, "lora_b", lora_b, cast_b)
            scale = lora.layer_scale(layer_name)
            check_layer_scale(lora.source, layer_name, scale)
            held = self._stacks(layer_name)  # an idle layer's stacks too: they take the next LoRA there
            shape = _weight_shape(cast_a, cast_b)
            if held is not None and held.shape != shape:
                raise LoRAShapeError(
                    f"pool LoRA {name!r} ({lora.source}): layer {layer_name} has A {tuple(cast_a.shape)} / B "
                    f"{tuple(cast_b.shape)} (weight {shape}), but the pool's LoRAs there have weight {held.shape}: "
                    "a LoRA made for another base model")
            if self.fixed and cast_a.shape[0] > self.max_rank:
                raise PoolBudgetError(
                    f"LoRAPool.add({name!r}) ({lora.source}): layer {layer_name} has rank {cast_a.shape[0]}, over the "
                    f"pool's max_rank={self.max_rank}; build the pool with a larger max_rank")
            prepared[layer_name] = (cast_a, cast_b, scale)
        return prepared

    def _stacks(self, layer_name: str) -> PoolLayer | None:
        return self.layers.get(layer_name, self._idle.get(layer_name))

    def _target(self, held: PoolLayer | None, top: int, rank: int) -> tuple[int, int]:
        """(rows, padded rank) a layer's stacks need with slots up to ``top`` held and a LoRA of ``rank`` there."""
        if self.fixed:
            return self.max_loras + 1, self.max_rank
        return max(held.rows if held is not None else 0, top + 2), max(held.rank if held is not None else 0, rank)

    def _plan(self, slot: int, prepared) -> dict[str, tuple[PoolLayer | None, tuple[int, ...], int, int]]:
        """Per layer after adding ``prepared`` at ``slot``: (its stacks now or None, weight shape, rows, rank)."""
        top = max(slot, *self._slots.values()) if self._slots else slot
        plan = {}
        for layer_name in set(self.layers) | set(self._idle) | set(prepared):
            held = self._stacks(layer_name)
            shape = held.shape if held is not None else _weight_shape(*prepared[layer_name][:2])
            rank = prepared[layer_name][0].shape[0] if layer_name in prepared else 0
            plan[layer_name] = (held, shape, *self._target(held, top, rank))
        return plan

    def _free_slot(self, name: str) -> int:
        free = sorted(set(range(self.capacity)) - set(self._slots.values()))
        if free:
            return free[0]
        if self.fixed:
            raise PoolBudgetError(f"LoRAPool.add({name!r}): the pool holds max_loras={self.max_loras} LoRAs "
                                  "already; remove one first or build the pool with a larger max_loras")
        return self.capacity

    def add(self, name: str, lora) -> LoRAPool:
        """Put LoRA ``lora`` (a ``LoRA``, a file path or a state dict) in the pool as ``name``; returns the pool.

        Allowed while a fusion is attached, between calls (during another thread's call: ``ConcurrentUseError``):
        the fusion takes the new LoRA's layers at once.
        DoRA layers keep their magnitudes beside the stacks (``magnitudes``). A LoRA's parts for other components (its
        text encoders') go, under the same name, into that component's pool (``parts``), which a pipeline attach
        fuses into the component.
        Raises ``OptionError`` (a name in use), ``LoRAShapeError`` (a layer shaped unlike the pool's
        LoRAs there, e.g. a conv LoRA of another kernel size; a conv B that is not 1x1), ``ModelMismatchError`` (a
        layer the attached model lacks or that does not fit it), ``PoolBudgetError``.
        Nothing changes when it raises.
        """
        if not isinstance(name, str) or not name:
            raise OptionError(f"LoRAPool.add: the name must be a non-empty string, got {name!r}")
        if not isinstance(lora, LoRA):
            lora = load_lora(lora)
        with self._lock:
            self._add(name, lora)
            try:  # the LoRA's text-encoder parts, each in its component's pool (same name; same capacity)
                for component in sorted(set(lora.components) - {lora.component}):
                    part = self.parts.get(component) or LoRAPool(self.device, self.dtype, max_loras=self.max_loras,
                                                                 max_rank=self.max_rank)
                    part.is_part = True
                    part.add(name, lora.for_component(component))
                    self.parts[component] = part
            except BaseException:
                self.remove(name)  # and its parts added so far
                raise
        return self

    def _add(self, name: str, lora: LoRA) -> None:
        """``add`` for this pool's own component (the denoiser, or a part pool's component)."""
        if name in self._slots:
            raise OptionError(f"LoRAPool.add: a LoRA named {name!r} is in the pool already; remove it first")
        prepared = self._prepare(name, lora)
        slot = self._free_slot(name)
        plan = self._plan(slot, prepared)
        after = sum(_layer_bytes(rows, rank, shape, self.dtype) for _, shape, rows, rank in plan.values())
        if self.budget_bytes is not None and after > self.budget_bytes:
            raise PoolBudgetError(
                f"LoRAPool.add({name!r}): the pool would hold {after} bytes, over its budget of "
                f"{self.budget_bytes} (it holds {self.nbytes} bytes in {len(self)} LoRAs now; the LoRA has "
                f"{len(prepared)} layers); remove a LoRA first or raise budget_bytes")
        shapes = {layer_name: _weight_shape(a, b) for layer_name, (a, b, _) in prepared.items()}
        for watcher in self._live_watchers():
            watcher.owner.check_free(f"LoRAPool.add({name!r})")  # not while another thread runs the model
            watcher.check_pool_layers(name, shapes)
        self._commit(slot, plan, prepared)
        for layer_name, layer in lora.layers.items():
            if layer.magnitude is not None:
                magnitude = layer.magnitude.detach().reshape(-1)
                self._magnitudes.setdefault(layer_name, {})[slot] = magnitude.to(
                    device=self.device, dtype=accumulation_dtype(self.dtype))
        self._slots[name] = slot
        self._ranks[name] = {layer_name: (a.shape[0], scale) for layer_name, (a, _, scale) in prepared.items()}
        self.version += 1
        try:
            for watcher in self._live_watchers():
                watcher.cover_pool_layers(list(prepared))
        except BaseException:
            self.remove(name)
            raise

    def _commit(self, slot: int, plan, prepared) -> None:
        """Write ``prepared`` into ``slot``; re-allocate only stacks the ``plan`` finds too small (never when fixed)."""
        for layer_name, (held, _, rows, rank) in plan.items():
            if held is None or (held.rows, held.rank) != (rows, rank):
                held = self._allocated(layer_name, held, rows, rank, prepared)
            if layer_name in prepared:
                lora_a, lora_b, scale = prepared[layer_name]
                self._idle.pop(layer_name, None)
                self.layers[layer_name] = held
                held.a[slot].zero_()
                held.b[slot].zero_()
                held.a[slot, : lora_a.shape[0]].copy_(lora_a)
                held.b[slot, :, : lora_a.shape[0]].copy_(lora_b)
                held.scales[slot] = scale
                held.present[slot] = True
            elif layer_name in self.layers:
                self.layers[layer_name] = held

    def _allocated(self, layer_name: str, held: PoolLayer | None, rows: int, rank: int, prepared) -> PoolLayer:
        """A layer's stacks allocated at ``rows`` (the zero slot last) and ``rank``, the held LoRA slots copied in."""
        shape = held.shape if held is not None else _weight_shape(*prepared[layer_name][:2])
        out_features, in_shape = shape[0], shape[1:]
        options = dict(device=self.device, dtype=self.dtype)
        grown = PoolLayer(torch.zeros(rows, rank, *in_shape, **options),
                          torch.zeros(rows, out_features, rank, **options),
                          torch.zeros(rows, dtype=accumulation_dtype(self.dtype), device=self.device),
                          torch.zeros(rows, dtype=torch.bool, device=self.device))
        if held is not None:  # elastic only: a fixed pool allocates a layer once
            slots, kept = min(held.rows, rows) - 1, min(held.rank, rank)  # the zero slot stays zero
            grown.a[:slots, :kept].copy_(held.a[:slots, :kept])
            grown.b[:slots, :, :kept].copy_(held.b[:slots, :, :kept])
            grown.scales[:slots].copy_(held.scales[:slots])
            grown.present[:slots].copy_(held.present[:slots])
        return grown

    def remove(self, name: str) -> LoRAPool:
        """Take LoRA ``name`` out (allowed while attached, between calls): its slot is zeroed for reuse, in place.
        A layer no LoRA adapts any more leaves ``layers`` (a fixed pool keeps its zeroed stacks for the next LoRA
        there); an elastic pool re-allocates a layer whose widest LoRA left, at the rank and rows still needed
        (see the module docstring). Returns the pool."""
        with self._lock:
            slot = self.slot(name)
            for part in self.parts.values():
                if name in part:
                    part.remove(name)
            for watcher in self._live_watchers():
                watcher.owner.check_free(f"LoRAPool.remove({name!r})")
            del self._slots[name]
            adapted = self._ranks.pop(name)
            for layer_name in adapted:
                self._magnitudes.get(layer_name, {}).pop(slot, None)
                held = self.layers[layer_name]
                held.a[slot].zero_()
                held.b[slot].zero_()
                held.scales[slot] = 0.0
                held.present[slot] = False
                if not bool(held.present.any()):
                    del self.layers[layer_name]
                    if self.fixed:
                        self._idle[layer_name] = held
                    continue
                if not self.fixed:
                    rank = max(ranks[layer_name][0] for ranks in self._ranks.values() if layer_name in ranks)
                    if rank < held.rank:  # no stale wider padding: the layer narrows (and sheds trailing free rows)
                        rows = max(self._slots.values()) + 2
                        self.layers[layer_name] = self._allocated(layer_name, held, rows, rank, {})
            self.version += 1
        return self


__all__ = ["LoRAPool", "PoolLayer", "resolved_device"]
