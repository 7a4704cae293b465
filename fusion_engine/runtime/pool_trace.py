"""The selection record of a pool fusion: per step, layer and decision group, the position of the LoRA kept.

A position indexes the LoRAs an image named, in its order (``("dog", "watercolor")``: 0 = dog, 1 = watercolor);
``-1`` is the base output (none of the image's LoRAs adapts the layer). Layers record device tensors during
sampling (no sync); ``gather`` moves them to the host once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import OptionError


@dataclass
class PoolRecord:
    step: int | None
    layer: int
    choice: torch.Tensor  # (groups,) int64 position, -1 = base
    scores: torch.Tensor | None  # (groups, positions) float32, FLS only


class PoolTrace:
    """Decision records of a pool fusion; ``max_records`` (None: no bound) keeps only the newest."""

    def __init__(self, layer_names: list[str], policy: str = "", max_records: int | None = None):
        if max_records is not None and max_records < 1:
            raise OptionError(f"max_records must be >= 1 or None, got {max_records!r}")
        self.layer_names, self.policy, self.max_records = list(layer_names), policy, max_records
        self.recorded = 0
        self._records: deque[PoolRecord] = deque(maxlen=max_records)
        self._pending: deque[PoolRecord] = deque(maxlen=max_records)

    def record(self, step, layer_index, choice, scores=None, _unused=None) -> None:
        """Called by the fused layers through ``FusionContext.collect`` (same signature as ``Trace.record``)."""
        scores = None if scores is None else scores.detach()
        self._pending.append(PoolRecord(step, layer_index, choice.detach(), scores))
        self.recorded += 1

    def gather(self) -> list[PoolRecord]:
        for record in self._pending:
            scores = None if record.scores is None else record.scores.float().cpu()
            self._records.append(PoolRecord(record.step, record.layer, record.choice.cpu(), scores))
        self._pending.clear()
        return list(self._records)

    def clear(self) -> None:
        self._pending.clear()
        self._records.clear()
        self.recorded = 0

    def __len__(self) -> int:
        held = len(self._records) + len(self._pending)
        return held if self.max_records is None else min(held, self.max_records)

    @property
    def dropped(self) -> int:
        return self.recorded - len(self)

    @property
    def steps(self) -> list:
        return sorted({r.step for r in self.gather() if r.step is not None})

    def image_summary(self, image: int, names: tuple[str, ...]) -> dict[str, int]:
        """How many (step, layer) decisions of group ``image`` kept each of its LoRAs (``"base"``: none did).
        Meaningful at granularity ``"image"``, where group ``image`` is that image."""
        counts = {name: 0 for name in names} | {"base": 0}
        for record in self.gather():
            if image < record.choice.numel():
                position = int(record.choice[image])
                counts["base" if position < 0 else names[position]] += 1
        return counts
