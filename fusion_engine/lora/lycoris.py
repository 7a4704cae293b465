"""LyCORIS kinds other than LoRA/LoCon (LoHa, LoKr, ...): recognised by their keys and refused by name.

diffusers cannot convert them either; without this check its converter fails with a dump of every
key it could not rename. LoCon (kohya ``lora_down``/``lora_up`` on conv layers) is plain LoRA and loads.
"""
from __future__ import annotations

from ..errors import LoRALayoutError, preview

# Key-name markers (the part after the module prefix) -> the format's name.
_MARKERS = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa", "hada_t1": "LoHa",
    "hada_t2": "LoHa",
    "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr", "lokr_w2": "LoKr", "lokr_w2_a": "LoKr",
    "lokr_w2_b": "LoKr", "lokr_t2": "LoKr",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT",
    "on_input": "(IA)^3",
    "a1": "GLoRA", "a2": "GLoRA", "b1": "GLoRA", "b2": "GLoRA",
    "diff": "LyCORIS full (weight difference)", "diff_b": "LyCORIS full (weight difference)",
}


def _marker(key: str) -> str | None:
    """The LyCORIS marker of a key (``lora_unet_x.hada_w1_a`` -> ``hada_w1_a``), if it has one."""
    if not key.startswith(("lora_unet_", "lora_te", "lycoris_")):
        return None
    parts = key.split(".")
    for part in parts[1:]:
        if part in _MARKERS:
            return part
    return None


def refuse_lycoris(keys, source: str) -> None:
    """Raise a ``LoRALayoutError`` naming the format when ``keys`` hold a LyCORIS kind this library cannot apply."""
    found: dict[str, list[str]] = {}
    for key in keys:
        marker = _marker(key)
        if marker is not None:
            found.setdefault(_MARKERS[marker], []).append(key)
    if not found:
        return
    kinds = sorted(found)
    examples = preview(sorted(k for kind in kinds for k in found[kind]), 2)
    raise LoRALayoutError(
        f"{source}: a LyCORIS {'/'.join(kinds)} file ({examples}); {' and '.join(kinds)} "
        f"{'is' if len(kinds) == 1 else 'are'} not supported: fusion_engine applies LoRA, LoCon and DoRA "
        "files only (extract a LoRA from the model it makes, e.g. with kohya's extract_lora_from_models.py)"
    )
