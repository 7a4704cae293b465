"""``LoRA`` -> safetensors file in a layout other tools read: PEFT (diffusers), old diffusers, kohya.

Every component is written (UNet and text encoders), and DoRA magnitudes with their layers. The LoRA's user
strength (``lora.scale``) is folded into each written alpha, so the file loads with the effect the in-memory LoRA
has: ``load_lora(save_lora(load_lora(f, scale=0.5), g))`` scales each layer as ``load_lora(f, scale=0.5)`` does.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import OptionError
from ..utils.io import atomic_write
from .loader import ADAPTER_METADATA_KEY
from .weights import DENOISER, TRANSFORMER, LoRA, LoRALayer

LAYOUTS = ("peft", "diffusers", "kohya")


def _written_alpha(lora: LoRA, layer: LoRALayer) -> float:
    """The alpha a file needs for this layer's effective scale: ``alpha / rank * lora.scale`` == written / rank."""
    return float(layer.alpha) * lora.scale


def _peft_config(lora: LoRA, component: str, layers: dict[str, LoRALayer]) -> dict:
    """The adapter config diffusers writes beside PEFT-layout weights (it carries the alphas)."""
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: _written_alpha(lora, layer) for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(layers),
    }
    if any(layer.is_dora for layer in layers.values()):
        config["use_dora"] = True
    return {f"{component}.{key}": value for key, value in config.items()}


def _kohya_prefix(lora: LoRA, component: str, name: str) -> str:
    """kohya's key for a module: ``lora_unet_``/``lora_te_``/``lora_te1_``/``lora_te2_`` + the path with ``_``.

    kohya names CLIP layers from the ``text_model`` level, which transformers 5 flattened away.
    """
    if component == DENOISER:
        return "lora_unet_" + name.replace(".", "_")
    if component == "text_encoder":
        prefix = "lora_te1_" if "text_encoder_2" in lora.components else "lora_te_"
    else:
        prefix = "lora_te2_"
    if not name.startswith(("text_model.", "text_projection")):
        name = "text_model." + name
    return prefix + name.replace(".", "_")


def _layer_keys(lora: LoRA, component: str, name: str, layer: LoRALayer, layout: str) -> dict[str, torch.Tensor]:
    lora_a, lora_b = layer.lora_a.contiguous(), layer.lora_b.contiguous()
    out = {}
    if layout == "kohya":
        key = _kohya_prefix(lora, component, name)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = lora_a, lora_b
        out[f"{key}.alpha"] = torch.tensor(_written_alpha(lora, layer))
        if layer.is_dora:  # kohya/LyCORIS: one magnitude per output row, shaped like a weight's first dim
            out[f"{key}.dora_scale"] = layer.magnitude.reshape(-1, *([1] * (lora_a.ndim - 1))).contiguous()
        return out
    key = f"{component}.{name}"
    if layout == "peft":
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = lora_a, lora_b
    elif component == DENOISER:
        out[f"{key}.lora.down.weight"], out[f"{key}.lora.up.weight"] = lora_a, lora_b
    else:
        out[f"{key}.lora_linear_layer.down.weight"], out[f"{key}.lora_linear_layer.up.weight"] = lora_a, lora_b
    if layer.is_dora:
        out[f"{key}.lora_magnitude_vector"] = layer.magnitude.contiguous()
    return out


def lora_to_state_dict(lora: LoRA, layout: str = "peft") -> dict[str, torch.Tensor]:
    if layout not in LAYOUTS:
        raise OptionError(f"unknown LoRA layout {layout!r}; expected one of {LAYOUTS}")
    if layout != "peft" and TRANSFORMER in lora.components:
        raise OptionError(f"layout {layout!r} is written for UNet LoRAs only; a FLUX/SD3 transformer LoRA is written "
                          "in the 'peft' layout (transformer.<module>.lora_A.weight, as diffusers saves it)")
    out = {}
    for component, layers in lora.components.items():
        for name, layer in layers.items():
            out.update(_layer_keys(lora, component, name, layer, layout))
    return out


def save_lora(lora: LoRA, path, layout: str = "peft") -> Path:
    """Write ``lora`` as a ``.safetensors`` file. The old diffusers layout has no alpha: it needs alpha == rank."""
    path = Path(path)
    layers = [layer for part in lora.components.values() for layer in part.values()]
    if layout == "diffusers" and any(_written_alpha(lora, layer) != layer.rank for layer in layers):
        raise OptionError(f"{path}: the old diffusers layout stores no alpha, so it holds only alpha / rank * scale "
                          f"== 1 (this LoRA: scale {lora.scale}, alphas {lora.alphas()}, ranks {lora.ranks()}); "
                          "use 'peft' or 'kohya'")
    metadata = {"format": "pt"}
    if layout == "peft":
        config = {key: value for component, part in lora.components.items()
                  for key, value in _peft_config(lora, component, part).items()}
        metadata[ADAPTER_METADATA_KEY] = json.dumps(config, sort_keys=True)
    with atomic_write(path) as scratch:
        save_file(lora_to_state_dict(lora, layout), str(scratch), metadata=metadata)
    return path
