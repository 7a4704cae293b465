"""A replica's LoRA catalogue: a folder of ``NAME.safetensors`` files loaded into its ``LoRAPool`` on first use.

The pool holds at most ``budget_bytes`` (its own ``budget_bytes``); when an ``add`` would pass it, the least
recently used LoRA that no running batch holds is removed and the add is tried again. A LoRA held by a batch
(``acquire`` until ``release``) is never evicted. Names are plain file stems (``schema.check_name``) and each path
is resolved and checked to lie inside the folder, so no name reaches a file outside it (``..``, absolute paths and
symlinks pointing out are refused).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import PoolBudgetError
from .schema import NAME_PATTERN, RequestError, check_name

SUFFIX = ".safetensors"


class Catalogue:
    """LoRA files by name for one pool (see the module docstring).

    Args:
        folder: the catalogue folder (its ``*.safetensors`` files, not sub-folders).
        pool: the replica's ``fe.LoRAPool``, created with ``budget_bytes`` (the limit evictions keep to).
        on_evict: called with each evicted name (a metrics counter).
    """

    def __init__(self, folder, pool, on_evict=None):
        self.folder = Path(folder).resolve(strict=True)
        self.pool = pool
        self.on_evict = on_evict
        self._used: OrderedDict[str, None] = OrderedDict()  # loaded names, least recently used first
        self._held: dict[str, int] = {}  # name -> how many running batches hold it
        self._lock = threading.Lock()
        self.evictions = 0

    def names(self) -> list[str]:
        """The LoRAs this catalogue serves: every ``NAME.safetensors`` in the folder with a valid name."""
        return sorted(path.stem for path in self.folder.glob(f"*{SUFFIX}")
                      if NAME_PATTERN.fullmatch(path.stem) and ".." not in path.stem and self._inside(path))

    def listing(self) -> list[dict]:
        loaded = set(self.pool.names)
        return [{"name": name, "loaded": name in loaded,
                 "bytes": (self.folder / f"{name}{SUFFIX}").stat().st_size} for name in self.names()]

    def _inside(self, path: Path) -> bool:
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return False
        return resolved.is_file() and resolved.parent == self.folder

    def path(self, name: str, where: str = "loras") -> Path:
        """The file of LoRA ``name``: 400 for a name that is no plain file stem, 404 when the folder lacks it."""
        check_name(name, where)
        path = self.folder / f"{name}{SUFFIX}"
        if not self._inside(path):
            raise RequestError(404, f"unknown LoRA {name!r}: the catalogue has no {name}{SUFFIX}", where)
        return path

    def acquire(self, names: tuple[str, ...]) -> None:
        """Load ``names`` into the pool (evicting unheld LoRAs, least recently used first) and hold them until
        ``release(names)``. Raises the loader's error (a bad file), ``RequestError`` 404 (a file gone), or
        ``PoolBudgetError`` when the held LoRAs leave no room; nothing stays held when it raises."""
        held = []
        try:
            for name in names:
                self._load(name)
                with self._lock:
                    self._held[name] = self._held.get(name, 0) + 1
                    held.append(name)
        except BaseException:
            self.release(tuple(held))
            raise

    def release(self, names: tuple[str, ...]) -> None:
        with self._lock:
            for name in names:
                count = self._held.get(name, 0) - 1
                if count > 0:
                    self._held[name] = count
                else:
                    self._held.pop(name, None)

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def _load(self, name: str) -> None:
        with self._lock:
            if name in self.pool:
                self._used.move_to_end(name)
                return
        path = self.path(name)
        from ..lora import load_lora

        lora = load_lora(path)  # a bad file raises here, before the pool changes
        while True:
            try:
                self.pool.add(name, lora)
            except PoolBudgetError:
                if not self._evict_one(name):
                    raise
                continue
            with self._lock:
                self._used[name] = None
            return

    def _evict_one(self, wanted: str) -> bool:
        """Remove the least recently used LoRA no batch holds; False when every loaded one is held."""
        with self._lock:
            victim = next((name for name in self._used if name not in self._held), None)
            if victim is None:
                return False
            del self._used[victim]
        self.pool.remove(victim)
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(victim)
        return True


__all__ = ["Catalogue"]
