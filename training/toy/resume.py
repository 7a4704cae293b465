"""Resume states of the toy world's trainers (``train_base``'s UNet phase, ``train_loras``).

At each checkpoint a trainer writes one file, ``OUT/<prefix><step>/resume_state.pt`` (``torch.save``): the
trained parameters, their EMA, the optimizer's and the LR schedule's state, the step, the data-order generator
and the torch / numpy / python RNG states, and the run's settings. It is written to a temporary name, flushed to
disk and renamed, so a process killed mid-write leaves the previous state whole; only the newest ``KEEP`` states
of a prefix are kept (the checkpoints' weights beside them stay). ``--resume`` continues from the newest one with
the same settings, and refuses, naming the file and the field, when a setting differs.

A resumed run gives the same weights, bit for bit, as one that was never stopped, as long as both run on the same
number of threads (``--threads``, with ``TOY_TRAIN_FIXED_THREADS=1`` so that the count never adapts to the load):
CPU kernels split their sums by thread, so another count gives other roundings (``tests/test_train_resume.py``).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from fusion_engine.errors import InputFileNotFoundError, OptionError

from .common import log

STATE_FILE = "resume_state.pt"
KEEP = 2  # resume states kept per prefix (the newest ones)
# Settings a run may change when it resumes: where it stops, how often it checkpoints, the folder, the role filter.
NOT_COMPARED = ("resume", "out", "stop_after", "checkpoint_every", "only")
# Settings added after states were written: left out of the record at their default, so those states still resume.
ADDED_LATER = {"noise_offset": 0.0, "branch_from": None}


def run_settings(args, **extra) -> dict:
    """The settings a resume state records and a resumed run must repeat: the command line's, less
    ``NOT_COMPARED`` and any ``ADDED_LATER`` at its default, and ``extra`` (what the trainer fixes in code:
    learning rate, EMA decay, role)."""
    return {**{k: v for k, v in sorted(vars(args).items())
               if k not in NOT_COMPARED and not (k in ADDED_LATER and v == ADDED_LATER[k])}, **extra}


def file_digest(path: Path) -> str:
    """sha256 of a file: a resume state names the frozen inputs it was trained on (the base, the VAE)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_states(generator: torch.Generator) -> dict:
    """The data-order generator's state and the process-wide torch, numpy and python ones (tensors and plain
    values only, so that the file loads with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate()}


def set_rng_states(generator: torch.Generator, saved: dict) -> None:
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch"])
    numpy = saved["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def loop_state(step: int, running_loss, seconds: float, optimizer, schedule, generator: torch.Generator) -> dict:
    """The training loop's part of a resume state, the same for every trainer (its weights are the trainer's)."""
    return {"step": step, "running_loss": running_loss, "seconds": seconds, "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": rng_states(generator)}


def restore_loop(state: dict, optimizer, schedule, generator: torch.Generator) -> tuple[int, object, float]:
    """Put ``loop_state``'s part back; returns (first step, running loss, seconds already spent)."""
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    set_rng_states(generator, state["rng"])
    return state["step"], state["running_loss"], state["seconds"]


def states(out: Path, prefix: str) -> list[tuple[int, Path]]:
    """``[(step, file)]`` of the complete resume states ``OUT/<prefix><step>/resume_state.pt``, oldest first
    (a temporary file of a killed write is not one)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    found = [(int(match.group(1)), path / STATE_FILE) for path in Path(out).glob(f"{prefix}*")
             if (match := pattern.fullmatch(path.name)) and (path / STATE_FILE).is_file()]
    return sorted(found)


def save_state(out: Path, prefix: str, step: int, state: dict) -> Path:
    """Write ``state`` as ``OUT/<prefix><step>/resume_state.pt`` atomically, then drop all but the newest
    ``KEEP`` states of ``prefix``."""
    folder = Path(out) / f"{prefix}{step}"
    folder.mkdir(parents=True, exist_ok=True)
    final, partial = folder / STATE_FILE, folder / (STATE_FILE + ".partial")
    with open(partial, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself on disk
    finally:
        os.close(directory)
    for _, old in states(out, prefix)[:-KEEP]:
        old.unlink()
    return final


def discard_states(out: Path, prefix: str) -> None:
    """A run that starts over (no ``--resume``): earlier states of ``prefix`` would belong to another run."""
    for _, old in states(out, prefix):
        log(f"starting over: removing the earlier resume state {old}")
        old.unlink()


def check_settings(path: Path, recorded: dict, current: dict) -> None:
    """Refuse to resume the run in ``path`` with other settings, naming each one that differs."""
    differ = [f"{key}: {recorded.get(key, '<absent>')!r} in the state, {current.get(key, '<absent>')!r} now"
              for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]
    if differ:
        raise OptionError(f"{path}: cannot resume with other settings ({'; '.join(differ)}); rerun with the "
                          "state's settings, or without --resume (and another --out) to start over")


def load_latest(out: Path, prefix: str, settings: dict) -> tuple[Path, dict] | None:
    """The newest resume state of ``prefix`` in ``out`` (``None`` if there is none), after checking that it was
    written with ``settings``."""
    found = states(out, prefix)
    if not found:
        return None
    path = found[-1][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_settings(path, state["settings"], settings)
    log(f"resuming from {path} (step {state['step']})")
    return path, state


def require_state(out: Path, prefix: str) -> InputFileNotFoundError:
    """The error of ``--resume`` where ``out`` holds no state to resume."""
    return InputFileNotFoundError(f"{out}: --resume found no resume state ({prefix}<step>/{STATE_FILE}) to "
                                  "continue from; run without --resume to start")
