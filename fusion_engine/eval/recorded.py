"""OUT/settings.json: the settings an eval folder's rows were made with, and the check a rerun must pass.

Rows are reused across reruns (resumable), so a rerun with other settings would mix old and new images under a
report that states the new settings. ``check_recorded`` compares what this run would do with what OUT records:
every setting that shapes an image or a score (model, dtype, sampler, policy options, encoders, and per pair
its LoRA files by content, prompts and reference images). Seeds and policies are not settings in this sense: a
rerun with more of either extends the same table. Pairs only in one of the two records are not a difference
either (a new pair extends the table; its own entries are recorded).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

from ..errors import OptionError
from ..utils.io import write_text

_MAX_HEADER = 100 << 20  # the loader's own limit on a safetensors header
RESULTS = ("scores", "images", "references", "report.md", "settings.json")  # what "restart" moves aside


def _digest(path: Path) -> str:
    """sha256 of the file's content: for safetensors, of its tensors (name, dtype, shape, bytes) and metadata in
    sorted order, since writers may order the header differently for the same content; else of its bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if path.suffix == ".safetensors":
            try:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size)) if size <= _MAX_HEADER else None
            except (struct.error, ValueError):
                header = None
            if isinstance(header, dict):
                start = 8 + size
                for name in sorted(header):
                    entry = header[name]
                    if name == "__metadata__" or not isinstance(entry, dict):
                        digest.update(json.dumps([name, entry], sort_keys=True).encode())
                        continue
                    begin, end = entry.get("data_offsets", (0, 0))
                    handle.seek(start + begin)
                    digest.update(json.dumps([name, entry.get("dtype"), entry.get("shape")]).encode())
                    digest.update(handle.read(max(0, end - begin)))
                return digest.hexdigest()
            handle.seek(0)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_id(path: Path | None) -> str | None:
    """'name (N bytes, sha256 abc...)': the same file by content, wherever it was copied."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return f"{path} (missing)"
    return f"{path.name} ({path.stat().st_size} bytes, sha256 {_digest(path)[:16]})"


def settings_record(settings, pairs, model: str, encoders: str) -> dict:
    """The flat {setting: value} record of one run (JSON types only)."""
    s = settings
    record = {
        "model": model, "dtype": str(s.dtype) if s.dtype is not None else "default", "steps": s.steps,
        "guidance": s.guidance, "height": s.height, "width": s.width, "backend": s.backend,
        "divergence": s.divergence, "m": s.m, "through_unet": s.through_unet, "encoders": encoders,
    }
    for pair in pairs:
        for key in ("prompt", "subject_prompt", "style_prompt"):
            record[f"pair {pair.name} {key}"] = getattr(pair, key)
        for key in ("subject", "style", "subject_image", "style_image"):
            record[f"pair {pair.name} {key}"] = _file_id(getattr(pair, key))
    return record


def differences(old: dict, new: dict) -> list[str]:
    """'steps: 2 -> 3' for each setting both records hold with different values (pairs in one only: none)."""
    shared = [k for k in new if k in old or not k.startswith("pair ")]
    return [f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in shared if old.get(key) != new[key]]


def check_recorded(out: Path, record: dict, on_mismatch: str, rank: int = 0, world: int = 1) -> list[str]:
    """Compare ``record`` with OUT/settings.json and act by ``on_mismatch``; returns the differences kept.

    Writes (atomically) the merged record: the recorded one plus this run's new pairs, or this run's record
    for a new or restarted OUT. Raises ``OptionError`` naming every differing setting under "refuse".
    """
    path = Path(out) / "settings.json"
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise OptionError(f"{path}: not valid JSON ({error}); move it away to start this folder over") from None
    diff = differences(old, record) if old else []
    if diff and on_mismatch == "refuse":
        raise OptionError(
            f"{out} holds results made with other settings ({path}): " + "; ".join(diff)
            + ". Use another --out, --resume-anyway to keep the old rows (the report lists these differences), "
            "or --restart to move the old results to OUT/superseded/ and start over")
    if diff and on_mismatch == "restart":
        if world > 1:
            raise OptionError("--restart moves files other shards may be writing: run it in a single process")
        aside = Path(out) / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for name in RESULTS:
            if (Path(out) / name).exists():
                shutil.move(str(Path(out) / name), str(aside / name))
        old, diff = {}, []
    merged = {**record, **old} if diff else {**old, **record}
    if rank == 0 and merged != old:
        write_text(path, json.dumps(merged, indent=1, sort_keys=True))
    return diff
