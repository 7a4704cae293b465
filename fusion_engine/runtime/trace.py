"""The selection record: per step, layer and decision group, the position of the LoRA kept, and the scores.

A position indexes the LoRAs an image names, in its order (a pair: 0 = subject, 1 = style; a pool image
``("dog", "watercolor")``: 0 = dog, 1 = watercolor); ``-1`` is the base output (no LoRA there), ``-2`` every named
LoRA mixed (a static policy adding several). A pair's trace shows the subject/style view of these records
(``SUBJECT``/``STYLE``/``BOTH``/``BASE`` codes, ``score_subject``/``score_style``), the shape ``trace.json`` has
always had. Layers record device tensors during sampling (no sync); ``gather`` moves everything to the host once.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OptionError, OptionTypeError
from ..utils.io import write_text

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


ALL = -2  # position code: every named LoRA mixed (a pair's BOTH)
CODE_TO_POSITION = {SUBJECT: 0, STYLE: 1, BOTH: ALL, BASE: -1}
_POSITION_TO_CODE = torch.tensor([BOTH, BASE, SUBJECT, STYLE], dtype=torch.int8)  # indexed by position + 2


def choice_code(subject_weight: float, style_weight: float) -> int:
    if subject_weight and style_weight:
        return BOTH
    return SUBJECT if subject_weight else STYLE if style_weight else BASE


@dataclass
class TraceRecord:
    """One (step, layer) record. ``choice``: ``(groups,)`` positions (int64), or for a pair's view the int8
    ``SUBJECT``/``STYLE``/``BOTH``/``BASE`` codes; ``scores``: ``(groups, positions)`` float32, FLS only."""

    step: int | None
    layer: int
    choice: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def score_subject(self) -> torch.Tensor | None:
        return None if self.scores is None else self.scores[:, 0]

    @property
    def score_style(self) -> torch.Tensor | None:
        return None if self.scores is None else self.scores[:, 1]


def _score_table(scores: tuple) -> torch.Tensor | None:
    """A record's scores as one ``(groups, positions)`` table (a pair's two vectors stacked)."""
    if not scores:
        return None
    return torch.stack(scores, -1) if len(scores) > 1 else scores[0]


def _positions(choice) -> torch.Tensor:
    """A layer's decisions as positions: a pair's bool (True = subject) or int code, or positions as they are."""
    if not isinstance(choice, torch.Tensor):
        return torch.tensor([CODE_TO_POSITION[choice]], dtype=torch.int64)
    if choice.dtype == torch.bool:
        return (~choice).long()
    return choice.long()


class Trace:
    """Decision records; ``max_records`` (None: no bound) keeps only the newest, counting the rest in ``dropped``.

    ``pair``: the trace of a pair (subject at position 0, style at 1): ``gather`` gives its subject/style view.
    """

    def __init__(self, layer_names: list[str], policy: str = "", max_records: int | None = None, pair: bool = True):
        if max_records is not None and max_records < 1:
            raise OptionError(f"max_records must be >= 1 or None, got {max_records!r}")
        self.layer_names = list(layer_names)
        self.policy = policy
        self.max_records = max_records
        self.pair = pair
        self.recorded = 0  # records ever made, kept or dropped
        self._pending: deque[tuple] = deque(maxlen=max_records)
        self._records: deque[TraceRecord] = deque(maxlen=max_records)

    @property
    def dropped(self) -> int:
        """Records made but no longer held (only with ``max_records``)."""
        return self.recorded - len(self)

    def record(self, step, layer_index, choice, *scores) -> None:
        """``choice``: positions, a pair's bool (True = subject) or a static code; ``scores``: one ``(groups,
        positions)`` tensor, or one ``(groups,)`` tensor per position (a pair's subject and style), or none."""
        if isinstance(choice, torch.Tensor):
            choice = choice.detach()
        scores = tuple(score.detach() for score in scores if score is not None)
        self._pending.append((step, layer_index, choice, scores))
        self.recorded += 1

    def clear(self) -> None:
        self._pending.clear()
        self._records.clear()
        self.recorded = 0

    def gather(self) -> list[TraceRecord]:
        """Move pending device tensors to the host (one transfer per kind) and return all records (a pair's in its
        subject/style view)."""
        if self._pending:
            device_rows = [p for p in self._pending if isinstance(p[2], torch.Tensor)]
            if device_rows:
                sizes = [row[2].numel() for row in device_rows]
                choices = torch.cat([_positions(row[2].flatten()) for row in device_rows]).cpu().split(sizes)
                tables = [_score_table(row[3]) for row in device_rows]
                flat = [t.flatten() for t in tables if t is not None]
                flat = iter(torch.cat(flat).float().cpu().split([t.numel() for t in flat]) if flat else ())
                host = iter([(choice, None if t is None else next(flat).reshape(t.shape))
                             for choice, t in zip(choices, tables)])
            for step, layer, choice, _ in self._pending:
                position, scores_row = next(host) if isinstance(choice, torch.Tensor) else (_positions(choice), None)
                self._records.append(TraceRecord(step, layer, position, scores_row))
            self._pending.clear()
        if not self.pair:
            return list(self._records)
        return [TraceRecord(r.step, r.layer, _POSITION_TO_CODE[r.choice + 2], r.scores) for r in self._records]

    def __len__(self) -> int:
        held = len(self._records) + len(self._pending)
        return held if self.max_records is None else min(held, self.max_records)

    @property
    def steps(self) -> list:
        return sorted({r.step for r in self.gather() if r.step is not None})

    def image_summary(self, image: int, names: tuple[str, ...]) -> dict[str, int]:
        """How many (step, layer) decisions of group ``image`` kept each of its LoRAs (``"base"``: none did; ``"all"``:
        a static mix of several). Meaningful at granularity ``"image"``, where group ``image`` is that image."""
        counts = {name: 0 for name in names} | {"base": 0}
        for record in self._positions():
            if image < record.choice.numel():
                position = int(record.choice[image])
                key = "base" if position == -1 else "all" if position == ALL else names[position]
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _positions(self) -> list[TraceRecord]:
        self.gather()
        return list(self._records)

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
                row["choice"] = [CHOICE_NAMES[int(c)] if self.pair else int(c) for c in r.choice]
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
        from ..utils.visual import draw_heatmap

        return draw_heatmap(self.subject_fraction(), self.layer_names, self.steps, path, title or self.policy)
