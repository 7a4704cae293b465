"""LoRA files -> ``LoRA``: diffusers (old and PEFT) and kohya/A1111 layouts, via diffusers' own converters."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

import torch

from ..errors import LoRAFileError, LoRAFileNotFoundError, LoRAFormatError, LoRALayoutError, preview
from .checks import check_alpha, check_layer, check_raw_tensors
from .safetensors_header import check_safetensors_file
from .weights import LoRA, LoRALayer

_UNET_PREFIX = "unet."
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
SDXL_UNET_LAYOUT = SimpleNamespace(layers_per_block=2)
# Where diffusers' save_lora_weights keeps the PEFT config (alphas of PEFT-layout files).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def detect_layout(keys) -> str:
    """Name the file layout from its raw keys (for reporting; conversion is diffusers' job)."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the PEFT adapter config diffusers stores in the header (``{}`` when absent)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if path.is_dir():
        raise LoRAFileNotFoundError(f"{path}: is a folder; pass the .safetensors file inside it "
                                    "(diffusers saves pytorch_lora_weights.safetensors)")
    if not path.is_file():
        raise LoRAFileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoRAFileError(f"{path}: only .safetensors LoRA files are read (pickle files can run code)")
    try:
        check_safetensors_file(path)
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except OSError as error:
        raise LoRAFileError(f"{path}: cannot be read ({error})") from error
    except (SafetensorError, ValueError, RuntimeError) as error:
        if isinstance(error, LoRAFormatError):
            raise
        raise LoRAFileError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, _adapter_config(path, header)


def _adapter_config(path: Path, header: dict) -> dict:
    """The PEFT adapter config diffusers keeps in the safetensors metadata, checked to be a JSON object."""
    try:
        config = json.loads(header.get(ADAPTER_METADATA_KEY) or "{}")
    except json.JSONDecodeError as error:
        raise LoRAFileError(f"{path}: header entry {ADAPTER_METADATA_KEY!r} is not JSON ({error})") from error
    if not isinstance(config, dict):
        raise LoRAFileError(f"{path}: header entry {ADAPTER_METADATA_KEY!r} is a JSON {type(config).__name__}, "
                            "not an object")
    return config


def _diffusers_state_dict(raw: dict[str, torch.Tensor], source: str, unet_config):
    """Run diffusers' own conversion: kohya/old layouts -> ``unet.<module>.lora_{A,B}`` + alphas."""
    from diffusers import StableDiffusionXLPipeline

    if unet_config is None and any(p in k for k in raw for p in _SGM_BLOCKS):
        unet_config = SDXL_UNET_LAYOUT  # only SDXL ships kohya files in its original (sgm) block naming
    try:
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(raw), unet_config=unet_config)
    except Exception as error:  # diffusers raises bare ValueError/KeyError on foreign layouts
        raise LoRALayoutError(f"{source}: diffusers cannot convert this LoRA ({type(error).__name__}: {error})") from error
    return state, alphas or {}


def _to_peft_keys(keys_to_values: Mapping[str, object], source: str = "<state_dict>") -> dict[str, object]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        return convert_unet_state_dict_to_peft(dict(keys_to_values))
    except Exception as error:  # same as above: diffusers' converters raise bare errors on odd keys
        raise LoRALayoutError(f"{source}: diffusers cannot map these keys to UNet modules "
                              f"({type(error).__name__}: {error})") from error


def _alpha_by_module(alphas: Mapping[str, float], source: str = "<state_dict>") -> dict[str, float]:
    """Map diffusers' network-alpha keys (``...to_q_lora.down.weight.alpha``) to module paths."""
    unet_alphas = {k.removeprefix(_UNET_PREFIX): float(v) for k, v in alphas.items() if not k.startswith(_TEXT_PREFIXES)}
    converted = _to_peft_keys(unet_alphas, source)
    return {k.split(".lora_A")[0].removesuffix(".alpha"): v for k, v in converted.items()}


def _metadata_alpha(module: str, metadata: Mapping[str, object], source: str) -> float | None:
    """The alpha a PEFT adapter config (safetensors metadata) gives a module, if any."""
    pattern = metadata.get("alpha_pattern") or {}
    for key, value in (pattern.items() if isinstance(pattern, dict) else ()):
        if module == key or module.endswith("." + key) or _pattern_matches(key, module):
            return _as_alpha(value, f"alpha_pattern[{key!r}]", source)
    alpha = metadata.get("lora_alpha")
    return None if alpha is None else _as_alpha(alpha, "lora_alpha", source)


def _pattern_matches(pattern: str, module: str) -> bool:
    try:
        return re.fullmatch(pattern.lstrip("^"), module) is not None
    except re.error:  # a pattern from the file's metadata that is not a regex: only literal matches count
        return False


def _as_alpha(value, where: str, source: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoRAFormatError(f"{source}: adapter metadata {where} = {value!r:.60} is not a number") from None


def load_lora(source, scale: float = 1.0, unet_config=None) -> LoRA:
    """Load a LoRA from a ``.safetensors`` path or a state dict.

    Accepts diffusers (old ``lora.down``/``lora.up`` and PEFT ``lora_A``/``lora_B``) and kohya/A1111
    (``lora_unet_*``, ``lora_down``/``lora_up``, ``.alpha``) layouts for SD1.x and SDXL UNets. The
    effective per-layer scale is ``alpha / rank * scale`` (alpha = rank when the file has none).
    Text-encoder parts are listed in ``LoRA.ignored``: the method fuses the denoiser only.
    kohya files in SDXL's original block naming (``input_blocks_4_1_...``) are mapped with
    ``unet_config.layers_per_block`` (SDXL's 2 when not given), as diffusers' own loader does.
    """
    if isinstance(source, LoRA):
        return source.with_scale(scale)
    if isinstance(source, Mapping):
        raw, name, metadata = dict(source), "<state_dict>", {}
    else:
        path = Path(source)
        (raw, metadata), name = _read_safetensors(path), str(path)
    if not raw:
        raise LoRALayoutError(f"{name}: holds no tensors")
    check_raw_tensors(raw, name)
    layout = detect_layout(raw)
    if layout == "unknown":
        raise LoRALayoutError(
            f"{name}: unknown key layout: none of its {len(raw)} keys follows diffusers ('...lora.down.weight'), "
            f"PEFT ('...lora_A.weight') or kohya ('lora_unet_...lora_down.weight') naming; keys: {preview(sorted(raw))}"
        )
    state, alphas = _diffusers_state_dict(raw, name, unet_config)

    ignored = sorted(k for k in state if k.startswith(_TEXT_PREFIXES))
    unet_state = {k.removeprefix(_UNET_PREFIX): v for k, v in state.items() if not k.startswith(_TEXT_PREFIXES)}
    if not any("lora_A" in k for k in unet_state):
        unet_state = _to_peft_keys(unet_state, name)
    unet_metadata = {k.removeprefix(_UNET_PREFIX): v for k, v in metadata.items() if k.startswith(_UNET_PREFIX)}
    module_alphas = _alpha_by_module(alphas, name)

    downs, ups, foreign = {}, {}, []
    for key, tensor in unet_state.items():
        if key.endswith(_DOWN):
            downs[key[: -len(_DOWN)]] = tensor
        elif key.endswith(_UP):
            ups[key[: -len(_UP)]] = tensor
        else:
            foreign.append(key)
    if foreign:
        raise LoRALayoutError(
            f"{name}: keys that are not plain LoRA factors (DoRA, LoKr, LoRA bias or an unknown layout): "
            f"{preview(foreign)}"
        )
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise LoRALayoutError(f"{name}: layers with only one of down/up: {preview(unpaired)}")
    if not downs:
        what = f"only text-encoder layers ({len(ignored)} keys)" if ignored else "no UNet LoRA layers"
        raise LoRALayoutError(f"{name}: {what}; the fusion needs denoiser (UNet) layers")

    layers = {}
    for module in sorted(downs):
        lora_a, lora_b = downs[module], ups[module]
        check_layer(module, lora_a, lora_b, name)
        alpha = module_alphas.get(module)
        if alpha is None:
            alpha = _metadata_alpha(module, unet_metadata, name)
        alpha = float(lora_a.shape[0] if alpha is None else alpha)
        check_alpha(module, alpha, name)
        layers[module] = LoRALayer(lora_a=lora_a, lora_b=lora_b, alpha=alpha)
    return LoRA(layers=layers, source=name, layout=layout, scale=float(scale), ignored=ignored)
