"""``LoRA`` -> safetensors file in a layout other tools read: PEFT (diffusers), old diffusers, kohya."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loader import ADAPTER_METADATA_KEY
from .weights import LoRA

LAYOUTS = ("peft", "diffusers", "kohya")


def _peft_config(lora: LoRA) -> dict:
    """The adapter config diffusers writes beside PEFT-layout weights (it carries the alphas)."""
    ranks = {name: layer.rank for name, layer in lora.layers.items()}
    alphas = {name: layer.alpha for name, layer in lora.layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "unet.r": r,
        "unet.lora_alpha": alpha,
        "unet.rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "unet.alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "unet.target_modules": sorted(lora.layers),
    }


def lora_to_state_dict(lora: LoRA, layout: str = "peft") -> dict[str, torch.Tensor]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {LAYOUTS}")
    out = {}
    for name, layer in lora.layers.items():
        lora_a, lora_b = layer.lora_a.contiguous(), layer.lora_b.contiguous()
        if layout == "peft":
            out[f"unet.{name}.lora_A.weight"], out[f"unet.{name}.lora_B.weight"] = lora_a, lora_b
        elif layout == "diffusers":
            out[f"unet.{name}.lora.down.weight"], out[f"unet.{name}.lora.up.weight"] = lora_a, lora_b
        else:
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = lora_a, lora_b
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def save_lora(lora: LoRA, path, layout: str = "peft") -> Path:
    """Write ``lora`` as a ``.safetensors`` file. The old diffusers layout has no alpha: it needs alpha == rank."""
    path = Path(path)
    if layout == "diffusers" and any(layer.alpha != layer.rank for layer in lora.layers.values()):
        raise ValueError(f"{path}: the old diffusers layout stores no alpha; use 'peft' or 'kohya' for alpha != rank")
    metadata = {"format": "pt"}
    if layout == "peft":
        metadata[ADAPTER_METADATA_KEY] = json.dumps(_peft_config(lora), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_to_state_dict(lora, layout), str(path), metadata=metadata)
    return path
