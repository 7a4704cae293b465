"""A LoRA pool: many LoRAs held on one device, so every image of a batch can fuse its own (``fe.attach(..., pool=)``).

Storage, per adapted layer: the factors of every pool slot stacked and padded with zeros to the layer's largest
rank, ``a`` ``(S, R, K)`` and ``b`` ``(S, N, R)``, beside ``scales`` ``(S,)`` (alpha / rank times the LoRA's
scale) and ``present`` ``(S,)`` (the slot's LoRA adapts this layer). A conv (LoCon) layer with a kernel larger
than 1x1 stacks ``a`` ``(S, R, C_in, kh, kw)`` (B is a 1x1 conv: ``b`` ``(S, N, R)`` as for a Linear); 1x1-conv
storage is flattened to the Linear shapes and fits an ``nn.Linear`` or a 1x1 ``nn.Conv2d``. A slot is one LoRA,
the same index in every layer; a removed LoRA's slot is zeroed and reused by the next ``add``. Zero padding adds
exact zeros, so a rank-4 LoRA beside a rank-64 one computes the same delta (up to the summation order of the
GEMM).

``nbytes`` counts what the stacks hold on the device, padding and zeroed slots included: it is what a
``budget_bytes`` limits. ``add`` writes into the existing stacks in place when a free slot exists and the rank
fits (tensors keep their identity: a captured CUDA graph stays valid); otherwise the stacks are re-allocated.
"""
from __future__ import annotations

import math
import threading
import warnings
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
        return self.a.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.scales, self.present))


def _weight_shape(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[int, ...]:
    """The base weight shape one LoRA's (A (r, ...), B (N, r)) adapts: ``(N, *A.shape[1:])``."""
    return (lora_b.shape[0], *lora_a.shape[1:])


def _layer_bytes(slots: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    out_features, in_features = shape[0], math.prod(shape[1:])
    factors = slots * rank * (in_features + out_features) * torch.empty(0, dtype=dtype).element_size()
    return factors + slots * (torch.empty(0, dtype=accumulation_dtype(dtype)).element_size() + 1)


def _pool_factors(lora: LoRA, name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B (N, r)) of a LoRA layer as the pool stores it: A (r, K) for a Linear or 1x1-conv storage (flattened),
    (r, C_in, kh, kw) for a conv (LoCon) layer; a B that is not a 1x1 conv, and DoRA layers, are refused."""
    lora_a, lora_b = layer.lora_a, layer.lora_b
    if lora_b.ndim == 4 and lora_b.shape[2:] != (1, 1):
        raise LoRAShapeError(f"{lora.source}: layer {name}: B {tuple(lora_b.shape)} is not a 1x1 conv; the LoRA pool "
                             "takes conv (LoCon) layers whose B is 1x1 (kohya's and PEFT's layout)")
    if lora_a.ndim == 4 and lora_a.shape[2:] == (1, 1):
        lora_a = lora_a.flatten(1)
    if layer.magnitude is not None:
        raise OptionError(f"{lora.source}: layer {name}: a DoRA layer; the LoRA pool takes plain LoRA layers only "
                          "(attach it as a pair with fe.attach(model, subject, style))")
    return lora_a, lora_b.flatten(1)


class LoRAPool:
    """LoRAs by name on one device, for ``fe.attach(model_or_pipe, pool=pool)`` and per-image assignments.

    Args:
        device: where the stacked factors live (the model's device).
        dtype: the factors' dtype (the model's dtype); scales are kept at accumulation precision.
        budget_bytes: optional limit on ``nbytes``; an ``add`` past it raises ``PoolBudgetError`` and changes
            nothing.

    Example:
        >>> pool = fe.LoRAPool(device="cuda", dtype=torch.float16, budget_bytes=2 << 30)
        >>> pool.add("dog", "dog_lora.safetensors"); pool.add("watercolor", fe.load_lora("wc.safetensors", scale=0.8))
        >>> fusion = fe.attach(pipe, pool=pool, policy="fls")
        >>> pipe(["a dog", "a cat"], loras=[("dog", "watercolor"), ("cat", "pixel-art")])
    """

    def __init__(self, device="cpu", dtype: torch.dtype = torch.float32, budget_bytes: int | None = None):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise OptionError(f"LoRAPool: dtype must be a floating torch.dtype, got {dtype!r}")
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise OptionError(f"LoRAPool: budget_bytes must be a whole number >= 0 or None, got {budget_bytes!r}")
        self.device, self.dtype, self.budget_bytes = torch.device(device), dtype, budget_bytes
        self.layers: dict[str, PoolLayer] = {}
        self._slots: dict[str, int] = {}  # name -> slot
        self._ranks: dict[str, dict[str, tuple[int, float]]] = {}  # name -> layer -> (the LoRA's rank, its scale)
        self._capacity = 0
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
        """Bytes the stacks hold on the device (padding and zeroed slots included)."""
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def capacity(self) -> int:
        return self._capacity

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

    def factors(self, name: str, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, K) or (r, C_in, kh, kw), B (N, r)) of LoRA ``name`` at ``layer_name``, unpadded, as the pool holds
        them."""
        rank = self.lora_layers(name)[layer_name][0]
        held, slot = self.layers[layer_name], self.slot(name)
        return held.a[slot, :rank].contiguous(), held.b[slot, :, :rank].contiguous()

    def __deepcopy__(self, memo) -> LoRAPool:
        """The pool itself: a deep copy of a model attached to a pool shares the pool (it is a device-wide store
        of factors, not part of the model; ``fe.detach_all(copy)`` strips the copy's fused layers)."""
        return self

    def __repr__(self) -> str:
        return (f"LoRAPool({len(self)} LoRAs: {preview(self.names)}, layers={len(self.layers)}, "
                f"nbytes={self.nbytes}, device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})")

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
            held = self.layers.get(layer_name)
            shape = _weight_shape(cast_a, cast_b)
            if held is not None and held.shape != shape:
                raise LoRAShapeError(
                    f"pool LoRA {name!r} ({lora.source}): layer {layer_name} has A {tuple(cast_a.shape)} / B "
                    f"{tuple(cast_b.shape)} (weight {shape}), but the pool's LoRAs there have weight {held.shape}: "
                    "a LoRA made for another base model")
            prepared[layer_name] = (cast_a, cast_b, scale)
        return prepared

    def _bytes_after(self, prepared, capacity: int) -> int:
        total = 0
        for layer_name in set(self.layers) | set(prepared):
            held = self.layers.get(layer_name)
            shape = held.shape if held is not None else _weight_shape(*prepared[layer_name][:2])
            rank = max(held.rank if held is not None else 0,
                       prepared[layer_name][0].shape[0] if layer_name in prepared else 0)
            total += _layer_bytes(capacity, rank, shape, self.dtype)
        return total

    def add(self, name: str, lora) -> LoRAPool:
        """Put LoRA ``lora`` (a ``LoRA``, a file path or a state dict) in the pool as ``name``; returns the pool.

        Allowed while a fusion is attached, between calls (during another thread's call: ``ConcurrentUseError``):
        the fusion takes the new LoRA's layers at once.
        Raises ``OptionError`` (a name in use; a DoRA layer), ``LoRAShapeError`` (a layer shaped unlike the pool's
        LoRAs there, e.g. a conv LoRA of another kernel size; a conv B that is not 1x1), ``ModelMismatchError`` (a
        layer the attached model lacks or that does not fit it), ``PoolBudgetError``.
        Nothing changes when it raises.
        """
        if not isinstance(name, str) or not name:
            raise OptionError(f"LoRAPool.add: the name must be a non-empty string, got {name!r}")
        if not isinstance(lora, LoRA):
            lora = load_lora(lora)
        if lora.other_components:
            warnings.warn(f"LoRAPool.add({name!r}): the pool fuses the denoiser only; the LoRA's parts for "
                          f"{sorted(lora.other_components)} are left out", UserWarning, stacklevel=2)
        with self._lock:
            if name in self._slots:
                raise OptionError(f"LoRAPool.add: a LoRA named {name!r} is in the pool already; remove it first")
            prepared = self._prepare(name, lora)
            free = sorted(set(range(self._capacity)) - set(self._slots.values()))
            slot = free[0] if free else self._capacity
            capacity = max(self._capacity, slot + 1)
            after = self._bytes_after(prepared, capacity)
            if self.budget_bytes is not None and after > self.budget_bytes:
                raise PoolBudgetError(
                    f"LoRAPool.add({name!r}): the pool would hold {after} bytes, over its budget of "
                    f"{self.budget_bytes} (it holds {self.nbytes} bytes in {len(self)} LoRAs now; the LoRA has "
                    f"{len(prepared)} layers); remove a LoRA first or raise budget_bytes")
            shapes = {layer_name: _weight_shape(a, b) for layer_name, (a, b, _) in prepared.items()}
            for watcher in self._live_watchers():
                watcher.owner.check_free(f"LoRAPool.add({name!r})")  # not while another thread runs the model
                watcher.check_pool_layers(name, shapes)
            self._commit(slot, capacity, prepared)
            self._slots[name] = slot
            self._ranks[name] = {layer_name: (a.shape[0], scale) for layer_name, (a, _, scale) in prepared.items()}
            self.version += 1
            try:
                for watcher in self._live_watchers():
                    watcher.cover_pool_layers(list(prepared))
            except BaseException:
                self.remove(name)
                raise
        return self

    def _commit(self, slot: int, capacity: int, prepared) -> None:
        for layer_name in set(self.layers) | set(prepared):
            held = self.layers.get(layer_name)
            lora_a, lora_b, scale = prepared.get(layer_name, (None, None, 0.0))
            rank = max(held.rank if held is not None else 0, lora_a.shape[0] if lora_a is not None else 0)
            if held is None or held.rank < rank or capacity != self._capacity:
                held = self._grown(layer_name, held, capacity, rank, prepared)
                self.layers[layer_name] = held
            if lora_a is not None:
                held.a[slot].zero_()
                held.b[slot].zero_()
                held.a[slot, : lora_a.shape[0]].copy_(lora_a)
                held.b[slot, :, : lora_a.shape[0]].copy_(lora_b)
                held.scales[slot] = scale
                held.present[slot] = True
        self._capacity = capacity

    def _grown(self, layer_name: str, held: PoolLayer | None, capacity: int, rank: int, prepared) -> PoolLayer:
        """A layer's stacks re-allocated for ``capacity`` slots of ``rank``, the held slots copied in."""
        shape = held.shape if held is not None else _weight_shape(*prepared[layer_name][:2])
        out_features, in_shape = shape[0], shape[1:]
        options = dict(device=self.device, dtype=self.dtype)
        grown = PoolLayer(torch.zeros(capacity, rank, *in_shape, **options),
                          torch.zeros(capacity, out_features, rank, **options),
                          torch.zeros(capacity, dtype=accumulation_dtype(self.dtype), device=self.device),
                          torch.zeros(capacity, dtype=torch.bool, device=self.device))
        if held is not None:
            slots, old_rank = min(held.a.shape[0], capacity), held.rank
            grown.a[:slots, :old_rank].copy_(held.a[:slots])
            grown.b[:slots, :, :old_rank].copy_(held.b[:slots])
            grown.scales[:slots].copy_(held.scales[:slots])
            grown.present[:slots].copy_(held.present[:slots])
        return grown

    def remove(self, name: str) -> LoRAPool:
        """Take LoRA ``name`` out (allowed while attached, between calls): its slot is zeroed for reuse; a layer
        no LoRA adapts any more is dropped, and trailing free slots are released. Returns the pool."""
        with self._lock:
            slot = self.slot(name)
            for watcher in self._live_watchers():
                watcher.owner.check_free(f"LoRAPool.remove({name!r})")
            del self._slots[name]
            del self._ranks[name]
            for layer_name in list(self.layers):
                held = self.layers[layer_name]
                held.a[slot].zero_()
                held.b[slot].zero_()
                held.scales[slot] = 0.0
                held.present[slot] = False
                if not bool(held.present.any()):
                    del self.layers[layer_name]
            capacity = max(self._slots.values(), default=-1) + 1
            if capacity < self._capacity:
                for layer_name, held in list(self.layers.items()):
                    self.layers[layer_name] = self._grown(layer_name, held, capacity, held.rank, {})
                self._capacity = capacity
            self.version += 1
        return self


__all__ = ["LoRAPool", "PoolLayer"]
