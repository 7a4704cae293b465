"""``backend="auto"`` by size class: the fastest backend on the GPU measurements recorded in the repository.

The measurements live in ``measured_backends.json`` beside this module, copied from bench/RESULTS.md with their
provenance (card, date, commit, source table). A *size class* is (op kind, M/N/K class, rank bucket, dtype, mode):

* op: ``"fls"``, ``"mix"``, ``"pooled_fls"``, ``"pooled_mix"``;
* M/N/K class: ``small_m`` / ``mid`` / ``large``, the classes of the kernels' tuned tables (csrc_triton/utils.py),
  with their bounds in the JSON;
* rank bucket: the padded rank the kernels compute at (16, 32, 64, 128);
* dtype (``torch.bfloat16``...); mode: ``"graph"`` (CUDA-graph replays) or ``"eager"``.

``choose_backend`` is a pure function of those and the measurements: among ``reference``, ``reference-compiled``
(the reference path under ``torch.compile``/Inductor) and ``triton``, the fastest where one table measured at least
two of them side by side for the size class. Where none did, it relaxes the class one field at a time (dtype, mode,
rank bucket, M/N/K class, then the pair op for a pooled one: the same kernel family) and says which; where no table
compares backends at all, it falls back to the backend with the best evidence: the one whose measurements put it
closest to the merged-weight floor. Every answer comes with its reason, for ``describe``.

Off CUDA, or where triton does not import, the kernels cannot run: the answer is ``reference`` with that reason.
``reference-compiled`` is a valid answer of the choice but not a backend the layers run: a model compiled by the
user runs the reference ops under Inductor, so ``resolve`` maps it to ``reference`` and says so.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OptionError

CANDIDATES = ("reference", "reference-compiled", "triton")
OPS = ("fls", "mix", "pooled_fls", "pooled_mix")
MODES = ("graph", "eager")
RANK_BUCKETS = (16, 32, 64, 128)
MEASUREMENTS_FILE = Path(__file__).with_name("measured_backends.json")
_PAIR_OF = {"pooled_fls": "fls", "pooled_mix": "mix"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class SizeClass:
    op: str
    shape: str  # small_m / mid / large
    rank: int  # the rank bucket
    dtype: torch.dtype
    mode: str

    def __str__(self) -> str:
        return f"{self.op} {self.shape} r<={self.rank} {str(self.dtype).replace('torch.', '')} {self.mode}"


def load_measurements(path: Path = MEASUREMENTS_FILE) -> dict:
    """The measurement file, checked: ``OptionError`` names the file and the entry or field at fault."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"backend measurements {path}: cannot be read as JSON ({error})") from error
    for key in ("sources", "size_classes", "measurements"):
        if key not in data:
            raise OptionError(f"backend measurements {path}: missing the key {key!r}")
    for index, entry in enumerate(data["measurements"]):
        where = f"backend measurements {path}: measurements[{index}]"
        missing = [k for k in ("source", "table", "op", "size_classes", "rank", "dtype", "mode", "unit", "values")
                   if k not in entry]
        if missing:
            raise OptionError(f"{where}: missing {missing}")
        if entry["source"] not in data["sources"]:
            raise OptionError(f"{where}: source {entry['source']!r} is not one of {sorted(data['sources'])}")
        if entry["op"] not in OPS or entry["mode"] not in MODES or entry["dtype"] not in _DTYPES:
            raise OptionError(f"{where}: op/mode/dtype {entry['op']!r}/{entry['mode']!r}/{entry['dtype']!r} not in "
                              f"{OPS}/{MODES}/{tuple(_DTYPES)}")
        bad = [b for b, v in entry["values"].items() if b not in CANDIDATES or not float(v) > 0]
        if bad or not entry["values"]:
            raise OptionError(f"{where}: values must map backends of {CANDIDATES} to positive numbers, got "
                              f"{entry['values']}")
    return data


@functools.lru_cache(maxsize=1)
def _default_measurements() -> dict:
    return load_measurements()


def rank_bucket(rank: int) -> int:
    """The padded rank the kernels compute at (16..128); ranks beyond 128 fall in the last bucket."""
    return next((bucket for bucket in RANK_BUCKETS if rank <= bucket), RANK_BUCKETS[-1])


def shape_class(rows: int, out_features: int, in_features: int, bounds: dict) -> str:
    """The M/N/K class of an (M, K) x (N, K)^T linear within the JSON's ``size_classes`` bounds."""
    if rows <= bounds["max_m"]:
        return "small_m"
    if rows * out_features * in_features >= bounds["min_mnk"] or in_features >= bounds["min_k"]:
        return "large"
    return "mid"


def size_class(op: str, M: int, N: int, K: int, rank: int, dtype: torch.dtype, mode: str = "graph",
               measurements: dict | None = None) -> SizeClass:
    """The size class of one layer call (see the module docstring); ``OptionError`` for an unknown op or mode."""
    if op not in OPS:
        raise OptionError(f"choose_backend: op must be one of {OPS}, got {op!r}")
    if mode not in MODES:
        raise OptionError(f"choose_backend: mode must be one of {MODES}, got {mode!r}")
    data = _default_measurements() if measurements is None else measurements
    return SizeClass(op, shape_class(M, N, K, data["size_classes"]), rank_bucket(rank), dtype, mode)


def _matches(entry: dict, cls: SizeClass, relaxed: frozenset) -> bool:
    return ((entry["op"] == cls.op)
            and ("shape" in relaxed or cls.shape in entry["size_classes"])
            and ("rank" in relaxed or rank_bucket(entry["rank"]) == cls.rank)
            and ("dtype" in relaxed or _DTYPES[entry["dtype"]] == cls.dtype)
            and ("mode" in relaxed or entry["mode"] == cls.mode))


def _cite(entry: dict, data: dict) -> str:
    source = data["sources"][entry["source"]]
    values = ", ".join(f"{backend} {value:g}" for backend, value in sorted(entry["values"].items(),
                                                                           key=lambda item: item[1]))
    return (f"{values} ({entry['unit']}; {entry['table']}; {source['card']}, {source['date']}, commit "
            f"{source['commit']}, {source['where']})")


# relaxations, in order: each step drops one more field of the size class
_RELAXATIONS = ((), ("dtype",), ("dtype", "mode"), ("dtype", "mode", "rank"), ("dtype", "mode", "rank", "shape"))


def _compared(cls: SizeClass, allowed: tuple, data: dict):
    """(entry, relaxed fields, op used) of the first side-by-side table (>= 2 allowed backends) found while relaxing
    the class, or None."""
    ops = (cls.op,) + ((_PAIR_OF[cls.op],) if cls.op in _PAIR_OF else ())
    for op in ops:
        target = SizeClass(op, cls.shape, cls.rank, cls.dtype, cls.mode)
        for relaxed in _RELAXATIONS:
            for entry in data["measurements"]:
                if _matches(entry, target, frozenset(relaxed)) and sum(b in entry["values"] for b in allowed) >= 2:
                    return entry, relaxed, op
    return None


def choose_backend(op: str, M: int, N: int, K: int, rank: int, dtype: torch.dtype, *, mode: str = "graph",
                   device_type: str = "cuda", triton_available: bool = True,
                   measurements: dict | None = None) -> tuple[str, str]:
    """The backend ``"auto"`` picks for one layer call, and why.

    Args:
        op: "fls", "mix", "pooled_fls" or "pooled_mix".
        M, N, K: the linear's rows, output and input features; rank: the widest LoRA rank it holds.
        dtype: the activations' dtype; mode: "graph" (CUDA-graph replays) or "eager".
        device_type: where the tensors are ("cuda", "cpu", "mps", ...).
        triton_available: whether the Triton kernels import and a GPU is visible.
        measurements: the measurement data (``load_measurements``); None: the file shipped with the package.

    Returns:
        (backend, reason): backend one of ``CANDIDATES``; reason a sentence naming the measurement (card, date,
        commit, table) or the fallback taken.

    Example:
        >>> choose_backend("fls", 8192, 640, 640, 64, torch.bfloat16)[0]
        'triton'
    """
    data = _default_measurements() if measurements is None else measurements
    cls = size_class(op, M, N, K, rank, dtype, mode, data)
    if device_type != "cuda" or not triton_available:
        why = "the Triton kernels need CUDA" if device_type != "cuda" else "the Triton kernels are not available"
        return "reference", f"{cls}: reference ({why}; no measurement of the compiled reference off a GPU)"
    found = _compared(cls, CANDIDATES, data)
    if found is not None:
        entry, relaxed, used_op = found
        values = {b: v for b, v in entry["values"].items() if b in CANDIDATES}
        best = min(values, key=values.get)
        unmeasured = [b for b in CANDIDATES if b not in values]
        how = "measured for this size class" if not relaxed and used_op == op else (
            "measured for the nearest class" + (f" (ignoring {', '.join(relaxed)})" if relaxed else "")
            + (f" of the pair op {used_op}, the same kernel family" if used_op != op else ""))
        missing = f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""
        return best, f"{cls}: {best}, {how}: {_cite(entry, data)}{missing}"
    # no table compares backends: the one whose own measurements put it nearest the merged-weight floor
    evidence = [e for e in data["measurements"]
                if e["op"] in (op, _PAIR_OF.get(op)) and e["unit"].startswith("x merged")]
    if evidence:
        entry = min(evidence, key=lambda e: (not _matches(e, cls, frozenset()), min(e["values"].values())))
        best = min(entry["values"], key=entry["values"].get)
        return best, (f"{cls}: {best}, no side-by-side measurement of the backends; best evidence: "
                      f"{_cite(entry, data)}")
    return "triton", (f"{cls}: triton, no measurement at all for this op; the kernels are the default where they "
                      f"run")


def resolve(backend: str, *, op: str, M: int, N: int, K: int, rank: int, dtype: torch.dtype, device_type: str,
            triton_available: bool, mode: str = "graph") -> tuple[str, str]:
    """A backend the layers run ("reference" or "triton") for ``backend="auto"`` and this size class, with the
    reason; ``reference-compiled`` maps to ``reference`` (the engine has no compiled-reference layer: a model
    compiled by its user runs the reference ops under Inductor)."""
    chosen, reason = _cached_choice(op, M, N, K, rank, dtype, mode, device_type, triton_available)
    if chosen == "reference-compiled":
        return "reference", reason + " (runs as reference: compile the model with torch.compile to get Inductor's)"
    return chosen, reason


@functools.lru_cache(maxsize=4096)
def _cached_choice(op, M, N, K, rank, dtype, mode, device_type, triton_available):
    return choose_backend(op, M, N, K, rank, dtype, mode=mode, device_type=device_type,
                          triton_available=triton_available)


def describe(choices) -> str:
    """A text table of ``(layer, backend, reason)`` rows, one line each, for an attachment's ``describe()``."""
    lines = ['backend="auto" by size class (fusion_engine/ops/measured_backends.json):']
    lines += [f"  {layer}: {backend} - {reason}" for layer, backend, reason in choices]
    return "\n".join(lines)


__all__ = ["CANDIDATES", "OPS", "SizeClass", "choose_backend", "describe", "load_measurements", "rank_bucket",
           "resolve", "size_class"]
