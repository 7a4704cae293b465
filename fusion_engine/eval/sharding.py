"""Sharding without communication: process ``rank`` of ``world`` takes every ``world``-th item; rank 0 then
polls the shards' CSV files until every planned item has a row."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import OptionError
from .report import read_rows


def shard_from_env(environ=os.environ) -> tuple[int, int]:
    """(rank, world size) from the launcher's variables (torchrun, accelerate, ...); (0, 1) when there are none."""
    world = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", environ.get("LOCAL_RANK", "0")))
    if not 0 <= rank < world:
        raise OptionError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def wait_for_rows(out: Path, keys: set, timeout: float, poll: float = 1.0) -> dict:
    """Rows of all shards once every key has one, or what exists when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        rows = read_rows(out)
        if keys <= rows.keys() or time.monotonic() >= deadline:
            return rows
        time.sleep(poll)
