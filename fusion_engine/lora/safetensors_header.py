"""Check a safetensors file's framing before loading it, so a bad file gets a message that says what is wrong.

safetensors itself refuses such files too, but with one message for every case ("invalid shape, data
type, or offset for tensor"). The format is public and tiny: an 8-byte little-endian header length,
a JSON header ``{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the
data section, which the tensors must cover exactly and without overlaps. This only diagnoses; the
tensors are still read by ``safetensors.torch.load_file``.

It reads the header only, never tensor data, and bounds its own work: at most ``MAX_TENSORS`` entries
(parsing stops at the first one over), sizes that fit torch's int64 shapes, so a hostile header costs
milliseconds to refuse instead of minutes and gigabytes.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import LoRAFileError

# Bytes per element of the dtypes safetensors writes; a dtype not listed here is left to safetensors.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_TENSORS = 65_536  # a real LoRA holds a few thousand (SDXL kohya with both text encoders: ~2,500)
MAX_DIM = 2**63 - 1  # torch shapes are int64
_PICKLE_MAGIC = {b"PK\x03\x04": "a zip archive (torch.save / .ckpt / .pt)", b"\x80": "a Python pickle (.ckpt / .bin)"}


class _TooManyEntries(Exception):
    pass


def _not_safetensors(path: Path, why: str) -> LoRAFileError:
    return LoRAFileError(f"{path}: not a safetensors file: {why}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A plausible header length and a JSON object right after it (a header length of 0x80 mod 256 starts
    with the byte a pickle starts with, so the magic bytes alone cannot decide)."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= MAX_HEADER_BYTES and 8 + length <= size and head[8:9] == b"{"


def _header_bytes(path: Path, head: bytes, size: int) -> bytes:
    if not _looks_like_safetensors(head, size):
        for magic, what in _PICKLE_MAGIC.items():
            if head.startswith(magic):
                raise _not_safetensors(path, f"it is {what}; only .safetensors LoRAs are read (pickles can run code)")
    if size < 8:
        raise LoRAFileError(
            f"{path}: truncated: {size} bytes, less than the 8-byte header length of a safetensors file")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES:
        raise _not_safetensors(
            path, f"its first 8 bytes give a header length of {length} bytes (limit {MAX_HEADER_BYTES})")
    if 8 + length > size:
        raise LoRAFileError(
            f"{path}: truncated: the header needs {length} bytes after the first 8, but the file is only {size} bytes"
        )
    with path.open("rb") as handle:
        handle.seek(8)
        return handle.read(length)


def _bounded_object_hook(limit: int):
    """A ``json`` object hook that stops the parse once more than ``limit`` objects were built."""
    count = 0

    def hook(pairs):
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyEntries
        return dict(pairs)

    return hook


def _parse_header(path: Path, raw: bytes) -> dict:
    try:  # tensor entries are objects; so are the header itself and its __metadata__
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_bounded_object_hook(MAX_TENSORS + 2))
    except _TooManyEntries:
        raise LoRAFileError(f"{path}: its header holds more than {MAX_TENSORS} entries; a LoRA holds a few "
                            "thousand at most (refused before reading any tensor)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _not_safetensors(path, f"its header is not UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header


def _check_numel(path: Path, key: str, shape: list) -> None:
    """Every size and every partial product within int64 (early exit: no huge integers from a long shape)."""
    numel = 1
    for size in shape:
        numel *= max(size, 1)
        if numel > MAX_DIM:
            raise LoRAFileError(f"{path}: key {key!r}: header shape {shape!r:.80} is too large: torch sizes are "
                                "int64, at most 2**63 - 1 elements")


def _entry_span(path: Path, key: str, entry) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, after checking that its shape and dtype need exactly that many."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise LoRAFileError(
            f"{path}: header entry for key {key!r} is not {{dtype, shape, data_offsets}}: {entry!r:.120}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise LoRAFileError(f"{path}: key {key!r}: header shape {shape!r:.80} is not a list of sizes")
    _check_numel(path, key, shape)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise LoRAFileError(f"{path}: key {key!r}: header data_offsets {offsets!r:.80} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise LoRAFileError(f"{path}: key {key!r}: header data_offsets [{begin}, {end}] end before they begin")
    if isinstance(dtype, str) and dtype in DTYPE_BYTES:
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if needed != end - begin:
            raise LoRAFileError(
                f"{path}: header lies about key {key!r}: {dtype} shape {tuple(shape)} needs {needed} bytes, "
                f"but its data_offsets [{begin}, {end}] span {end - begin}"
            )
    return begin, end


def check_safetensors_file(path: Path) -> dict:
    """Raise ``LoRAFileError`` naming the key, shape and byte offsets when ``path``'s framing is broken.

    Returns:
        The parsed header (``{key: {dtype, shape, data_offsets}, "__metadata__": {...}}``); no tensor data is read.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    header = _parse_header(path, _header_bytes(path, head, size))
    data_size = size - 8 - struct.unpack("<Q", head[:8])[0]
    spans = sorted((_entry_span(path, key, entry), key) for key, entry in header.items() if key != "__metadata__")
    covered = 0
    for (begin, end), key in spans:
        if begin != covered:
            what = "overlaps the previous tensor" if begin < covered else f"leaves a gap of {begin - covered} bytes"
            raise LoRAFileError(f"{path}: header lies about key {key!r}: it starts at data byte {begin}, which {what} "
                                f"(previous tensors end at {covered})")
        covered = end
    if covered > data_size:
        key = spans[-1][1]
        raise LoRAFileError(
            f"{path}: truncated: key {key!r} ends at data byte {covered}, but only {data_size} bytes of data follow "
            f"the header ({covered - data_size} missing)"
        )
    if covered < data_size:
        raise LoRAFileError(f"{path}: the header covers {covered} bytes of data but {data_size} follow it "
                            f"({data_size - covered} bytes unaccounted for: a header that lies or an appended file)")
    return header
