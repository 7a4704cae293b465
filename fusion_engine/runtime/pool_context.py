"""Per-attach state of a pool fusion: the context of a pair fusion plus which LoRAs each image names.

The assignment is held by name and resolved to pool slots once per (batch shape, layout, pool version,
step for step-dependent policies), into small device tensors the fused layers of one forward share: the
layers index the pool with them on the device, with no host sync and no loop over images.
"""
from __future__ import annotations

import torch

from ..errors import BatchLayoutError, OptionError, StepContextError, UnknownLoRAError, preview
from .context import FusionContext


def normalize_assignment(entries, pool) -> list[tuple[str, ...]]:
    """Each image's LoRA names as a tuple (a string names one LoRA); errors name the image and the name."""
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
        raise OptionError(f"an assignment is a list with one entry per image (a name or a tuple of names), "
                          f"got {entries!r:.80}")
    images = []
    for image, entry in enumerate(entries):
        names = (entry,) if isinstance(entry, str) else tuple(entry) if isinstance(entry, (tuple, list)) else None
        if not names or not all(isinstance(name, str) for name in names):
            raise OptionError(f"assignment entry {image} must be a LoRA name or a non-empty tuple of names, "
                              f"got {entry!r:.80}")
        if len(set(names)) != len(names):
            raise OptionError(f"assignment entry {image} names a LoRA twice: {names}")
        for name in names:
            if name not in pool:
                raise UnknownLoRAError(f"image {image} names LoRA {name!r}, which is not in the pool (it holds "
                                       f"{preview(pool.names) or 'none'})")
        images.append(names)
    if not images:
        raise OptionError("an assignment needs one entry per image; got an empty list")
    return images


class PoolContext(FusionContext):
    """``FusionContext`` plus the pool and the per-image assignment (see the module docstring)."""

    def __init__(self, pool, policy, granularity: str, backend: str, trace):
        super().__init__(policy, granularity, backend, trace)
        self.pool = pool
        self.assignment: list[tuple[str, ...]] | None = None
        self._tables: dict[tuple, torch.Tensor] = {}

    def set_loras(self, entries) -> None:
        assignment = normalize_assignment(entries, self.pool)
        for names in assignment:
            self.policy.check_named(len(names))
        self.assignment = assignment
        self._tables.clear()

    def update_coefficients(self, layers, device) -> None:
        """Static weights come per image from ``sample_weights``: nothing to fill per layer."""

    def _images_of_rows(self, batch: int) -> list[int]:
        if self.assignment is None:
            raise StepContextError("a pool fusion needs to know which LoRAs each image uses: call "
                                   "fusion.set_loras([(...), ...]) (or pass loras=[...] to the pipeline call)")
        images = self.images if self.images is not None else batch
        if len(self.assignment) != images:
            layout = (f"the batch layout says {self.images} image(s) x {self.copies} copies" if self.images
                      else f"without a batch layout each of the {batch} batch rows is an image")
            raise BatchLayoutError(f"the LoRA lists (loras=) name LoRAs for {len(self.assignment)} image(s), but "
                                   f"{layout}; give one entry per image")
        return [row % images for row in range(batch)]

    def _key(self, kind: str, batch: int, device) -> tuple:
        step = (self.step, self.num_steps) if kind != "slots" and self.policy.needs_step else None
        return (kind, batch, str(device), self.images, self.copies, self.pool.version, step, self.lora_scale)

    def sample_slots(self, batch: int, device) -> torch.Tensor:
        """``(batch, L)`` int64 pool slots of each batch row's image, ``-1`` padded (built once per shape)."""
        return self._table("slots", batch, device, torch.int64, self._image_slots, -1)

    def sample_weights(self, batch: int, device, layer: str | None = None) -> torch.Tensor:
        """``(batch, L)`` float32 static-policy weights of each row's image, times the call's LoRA scale.

        Args:
            layer: the layer asking; a policy whose weights depend on it (``per_layer``: ``klora``) gets one table
                per layer, built once per step and kept together as one entry.
        """
        if not getattr(self.policy, "per_layer", False):
            return self._table("weights", batch, device, torch.float32, self._image_weights, 0.0)
        by_layer = self._table("layer weights", batch, device, None, None, None)
        if layer not in by_layer:
            def per_image(image, names):
                return [w * self.lora_scale for w in self.policy.layer_weights(layer, names, self)]

            by_layer[layer] = self._build(batch, device, torch.float32, per_image, 0.0)
        return by_layer[layer]

    def _image_slots(self, image: int, names: tuple[str, ...]) -> list[int]:
        try:
            return [self.pool.slot(name) for name in names]
        except UnknownLoRAError as error:
            raise UnknownLoRAError(f"image {image}: {error} (removed since the assignment was set?)") from None

    def _image_weights(self, image: int, names: tuple[str, ...]) -> list[float]:
        return [w * self.lora_scale for w in self.policy.image_weights(len(names), self)]

    def _table(self, kind: str, batch: int, device, dtype, per_image, pad) -> torch.Tensor:
        """One row per batch row: ``per_image(image, names)`` of the row's image, padded to the widest image
        (``per_image`` None: an empty dict to fill, e.g. one table per layer)."""
        key = self._key(kind, batch, device)
        if key not in self._tables:
            self._store(key, {} if per_image is None else self._build(batch, device, dtype, per_image, pad))
        return self._tables[key]

    def _build(self, batch: int, device, dtype, per_image, pad) -> torch.Tensor:
        rows = self._images_of_rows(batch)
        width = max(len(names) for names in self.assignment)
        table = [per_image(image, names) for image, names in enumerate(self.assignment)]
        table = [values + [pad] * (width - len(values)) for values in table]
        return torch.tensor([table[image] for image in rows], dtype=dtype).to(device)

    def _store(self, key: tuple, table) -> None:
        if len(self._tables) >= 64:  # a long-lived attach meets many steps and shapes: keep the newest few
            self._tables.clear()
        self._tables[key] = table
