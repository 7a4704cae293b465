"""The selection record: per step, layer and decision group, the branch taken and both scores.

Layers record device tensors during sampling (no sync); ``gather`` moves everything to the host once.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion_engine.errors import OptionError, OptionTypeError
from fusion_engine.utils.io import write_text

# Choice codes. Selection policies give SUBJECT/STYLE per group; static policies a per-layer code.
STYLE, SUBJECT, BOTH, BASE = 0, 1, 2, -1
# The bound of a model's trace under a plain ``attach``: it stays attached across many calls, so the trace
# keeps only the newest records (a pipeline call scope starts a fresh, whole-call trace instead).
DEFAULT_MAX_RECORDS = 10_000


def max_records(trace) -> int:
    """``attach(..., trace=)`` as a record count: ``True`` -> ``DEFAULT_MAX_RECORDS``, ``False`` -> 0 (no trace), a
    whole number >= 0 as it is; anything else an ``OptionTypeError``."""
    if trace is True:
        return DEFAULT_MAX_RECORDS
    if trace is False or (isinstance(trace, int) and not isinstance(trace, bool) and trace >= 0):
        return int(trace)
    raise OptionTypeError(f"trace must be True, False or a whole number of records >= 0, got {trace!r}")
CHOICE_NAMES = {STYLE: "style", SUBJECT: "subject", BOTH: "both", BASE: "base"}


def choice_code(subject_weight: float, style_weight: float) -> int:
    if subject_weight and style_weight:
        return BOTH
    return SUBJECT if subject_weight else STYLE if style_weight else BASE


@dataclass
class TraceRecord:
    step: int | None
    layer: int
    choice: torch.Tensor  # (groups,) int8, CHOICE codes
    score_subject: torch.Tensor | None  # (groups,) float32, FLS only
    score_style: torch.Tensor | None


class Trace:
    """Decision records; ``max_records`` (None: no bound) keeps only the newest, counting the rest in ``dropped``."""

    def __init__(self, layer_names: list[str], policy: str = "", max_records: int | None = None):
        if max_records is not None and max_records < 1:
            raise OptionError(f"max_records must be >= 1 or None, got {max_records!r}")
        self.layer_names = list(layer_names)
        self.policy = policy
        self.max_records = max_records
        self.recorded = 0  # records ever made, kept or dropped
        self._pending: deque[tuple] = deque(maxlen=max_records)
        self._records: deque[TraceRecord] = deque(maxlen=max_records)

    @property
    def dropped(self) -> int:
        """Records made but no longer held (only with ``max_records``)."""
        return self.recorded - len(self)

    def record(self, step, layer_index, choice, subject_score=None, style_score=None) -> None:
        if isinstance(choice, torch.Tensor):
            choice = choice.detach().to(torch.int8)
            subject_score, style_score = subject_score.detach(), style_score.detach()
        self._pending.append((step, layer_index, choice, subject_score, style_score))
        self.recorded += 1

    def clear(self) -> None:
        self._pending.clear()
        self._records.clear()
        self.recorded = 0

    def gather(self) -> list[TraceRecord]:
        """Move pending device tensors to the host (one transfer per dtype) and return all records."""
        if self._pending:
            device_rows = [p for p in self._pending if isinstance(p[2], torch.Tensor)]
            if device_rows:
                sizes = [row[2].numel() for row in device_rows]
                choices = torch.cat([row[2].flatten() for row in device_rows]).cpu().split(sizes)
                scores = torch.cat([torch.stack([row[3], row[4]]).float() for row in device_rows], 1).cpu()
                scores = scores.split(sizes, dim=1)
                host = iter(zip(choices, scores))
            for step, layer, choice, _, _ in self._pending:
                if isinstance(choice, torch.Tensor):
                    c, s = next(host)
                    self._records.append(TraceRecord(step, layer, c, s[0], s[1]))
                else:
                    self._records.append(TraceRecord(step, layer, torch.tensor([choice], dtype=torch.int8), None, None))
            self._pending.clear()
        return list(self._records)

    def __len__(self) -> int:
        held = len(self._records) + len(self._pending)
        return held if self.max_records is None else min(held, self.max_records)

    @property
    def steps(self) -> list:
        return sorted({r.step for r in self.gather() if r.step is not None})

    def subject_fraction(self) -> torch.Tensor:
        """(steps, layers) share of decision groups that took the subject (NaN: no record;
        0.5 for "both", i.e. direct merge). The last record of a (step, layer) wins."""
        records, steps = self.gather(), self.steps or [None]
        col = {s: i for i, s in enumerate(steps)}
        out = torch.full((len(steps), len(self.layer_names)), float("nan"))
        for r in records:
            value = torch.where(r.choice == BOTH, 0.5, (r.choice == SUBJECT).float())
            out[col[r.step], r.layer] = float("nan") if (r.choice == BASE).all() else value.mean().item()
        return out

    def to_dict(self, max_groups: int = 64) -> dict:
        """JSON-ready dict. Records with more than ``max_groups`` groups (token granularity) are summarised."""
        rows = []
        for r in self.gather():
            row = {"step": r.step, "layer": self.layer_names[r.layer], "groups": r.choice.numel()}
            if r.choice.numel() <= max_groups:
                row["choice"] = [CHOICE_NAMES[int(c)] for c in r.choice]
                if r.score_subject is not None:
                    row["score_subject"] = r.score_subject.tolist()
                    row["score_style"] = r.score_style.tolist()
            else:
                row["subject_fraction"] = (r.choice == SUBJECT).float().mean().item()
                if r.score_subject is not None:
                    row["mean_score_subject"] = r.score_subject.mean().item()
                    row["mean_score_style"] = r.score_style.mean().item()
            rows.append(row)
        return {"policy": self.policy, "layers": self.layer_names, "steps": self.steps, "records": rows}

    def save_json(self, path, max_groups: int = 64) -> Path:
        return write_text(path, json.dumps(self.to_dict(max_groups), indent=1))

    def heatmap(self, path, title: str | None = None) -> Path:
        """Layers x steps picture of the choices (like the paper's Figure 5); PNG via Pillow."""
        from fusion_engine.utils.visual import draw_heatmap

        return draw_heatmap(self.subject_fraction(), self.layer_names, self.steps, path, title or self.policy)
