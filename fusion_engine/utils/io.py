"""Files appear whole or not at all: write to a temporary name beside the target, sync, then rename into place.

Every file the library writes (images, heatmaps, trace JSON, LoRA files, report.md, settings, pairs.toml)
goes through :func:`atomic_write`, so a crash, a ``KeyboardInterrupt``, a full disk or a second process
reading the folder never sees a half-written file: at most a hidden ``.stem.tmp-PID-N.suffix`` file is left
behind and the target is untouched. The eval CSV is appended to with :func:`append_line` (whole lines).

Example:
    >>> from fusion_engine.utils.io import atomic_write, write_text
    >>> with atomic_write("out/image.png") as scratch:
    ...     image.save(scratch, format="PNG")
    >>> write_text("out/settings.json", json.dumps(settings))
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path

_counter = itertools.count()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, *, overwrite: bool = True):
    """Yield a scratch path beside ``path``; once the block has written it, sync it and move it to ``path``.

    Args:
        path: the final file name; its folder is created if missing.
        overwrite: ``False`` refuses to replace an existing ``path`` (``FileExistsError``), atomically: of two
            writers racing for one name, exactly one wins.

    On any error in the block (or while moving), the scratch file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last, so writers that pick the format from the name (PIL, matplotlib) still can
    scratch = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{next(_counter)}{path.suffix}")
    try:
        yield scratch
        _fsync(scratch)
        if overwrite:
            os.replace(scratch, path)
        else:
            os.link(scratch, path)  # FileExistsError if the name is taken; never replaces
    finally:
        scratch.unlink(missing_ok=True)


def write_text(path, text: str, *, overwrite: bool = True) -> Path:
    """``Path(path).write_text(text)``, crash-safe (see :func:`atomic_write`). Returns the path."""
    with atomic_write(path, overwrite=overwrite) as scratch:
        scratch.write_text(text, encoding="utf-8")
    return Path(path)


def save_image(image, path) -> Path:
    """``image.save(path)`` for a PIL image, crash-safe (see :func:`atomic_write`). Returns the path."""
    with atomic_write(path) as scratch:
        image.save(scratch)
    return Path(path)


def append_line(path, line: str) -> None:
    """Append one whole line with one ``write`` call, then fsync: a crash leaves at most a torn last line.

    If the file's last line is torn (no final newline: an earlier crash), the record starts on a line of its
    own, so it is never glued onto the fragment; readers skip the fragment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not line.endswith("\n"):
        line += "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with path.open("rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
