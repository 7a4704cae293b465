"""Files appear whole or not at all: write aside, then rename over the target.

Every file the library writes (images, heatmaps, trace JSON, LoRA files, report.md, CSV headers, pairs.toml)
goes through :func:`atomic_write`, so a crash, a ``KeyboardInterrupt`` or a second process reading the folder
never sees a half-written file: ``os.replace`` within one folder is atomic on POSIX and Windows.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a scratch path beside ``path``; when the block ends cleanly, rename it over ``path``.

    The scratch name keeps ``path``'s suffix (Pillow picks the image format from it) and holds the process id,
    so concurrent writers (sharded eval runs) never share one. On an error the scratch file is removed and
    ``path`` is left as it was. Parent folders are created.

    Args:
        path: the file to write (str or ``Path``).

    Example:
        ```py
        >>> from fusion_engine.io import atomic_write
        >>> with atomic_write("out/grid.png") as scratch:
        ...     image.save(scratch)
        ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.stem}.{os.getpid()}.writing{path.suffix}")
    try:
        yield scratch
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_write`). Returns the path."""
    path = Path(path)
    with atomic_write(path) as scratch:
        scratch.write_text(text)
    return path


def save_image(image, path) -> Path:
    """``image.save(path)`` for a PIL image, atomically (see :func:`atomic_write`). Returns the path."""
    path = Path(path)
    with atomic_write(path) as scratch:
        image.save(scratch)
    return path
