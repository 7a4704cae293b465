"""LoRA files -> ``LoRA``: diffusers (old and PEFT), kohya/A1111, BFL and XLabs layouts of SD1.x/SDXL, FLUX.1 and
SD3 LoRAs, each family through its own diffusers converter (see ``families``).

Every part of a file is kept: the UNet's layers, each text encoder's (``LoRA.components``) and
DoRA magnitudes; what cannot be applied (LyCORIS kinds, foreign keys) raises, naming the keys.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import (
    LoRAFileError,
    LoRAFileNotFoundError,
    LoRAFormatError,
    LoRALayoutError,
    LoRAShapeError,
    OptionTypeError,
    preview,
)
from .checks import check_alpha, check_layer, check_raw_tensors, check_scale
from .families import CONVERTERS, FAMILIES, SD_UNET, detect_family, is_transformer_family, refuse_unconvertible
from .lycoris import refuse_lycoris
from .patterns import compile_patterns, first_match
from .safetensors_header import check_safetensors_file
from .weights import COMPONENTS, DENOISER, DENOISERS, TEXT_ENCODERS, TRANSFORMER, LoRA, LoRALayer

_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"
_MAGNITUDE, _DORA_SCALE, _ALPHA = ".lora_magnitude_vector", ".dora_scale", ".alpha"
_FOREIGN = "<foreign>"  # text-encoder keys under a prefix no SD/SDXL loader maps
_UNMAPPED_TEXT_PREFIXES = ("te", "te1", "te2")
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
SDXL_UNET_LAYOUT = SimpleNamespace(layers_per_block=2)
# Where diffusers' save_lora_weights keeps the PEFT config (alphas of PEFT-layout files).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def detect_layout(keys) -> str:
    """Name the file layout from its raw keys (for reporting; conversion is diffusers' job)."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_down." in k for k in keys):
        return "kohya"
    if any(".processor." in k and "lora" in k for k in keys):
        return "xlabs"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    return "unknown"


def _check_layout(keys, source: str) -> str:
    """The layout name, or a ``LoRALayoutError`` listing the keys when no known layout explains them."""
    layout = detect_layout(keys)
    if layout == "unknown":
        keys = sorted(keys)
        raise LoRALayoutError(
            f"{source}: unknown key layout: none of its {len(keys)} keys follows diffusers ('...lora.down.weight'), "
            f"PEFT ('...lora_A.weight') or kohya ('lora_unet_...lora_down.weight') naming; keys: {preview(keys)}"
        )
    return layout


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Tensors, the PEFT adapter config diffusers stores in the header (``{}`` when absent) and the header's
    other metadata (kohya ``ss_*``, ``modelspec.*``).

    The header (framing, key names, layout) is checked before any tensor data is read: a large file
    that is no LoRA is refused after reading its header only.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        raise LoRAFileNotFoundError(f"{path}: is a folder; pass the .safetensors file inside it "
                                    "(diffusers saves pytorch_lora_weights.safetensors)")
    if not path.is_file():
        raise LoRAFileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoRAFileError(f"{path}: only .safetensors LoRA files are read (pickle files can run code)")
    try:
        header = check_safetensors_file(path)
        metadata = header.pop("__metadata__", None)
        metadata = metadata if isinstance(metadata, dict) else {}
        if header:
            refuse_lycoris(header, str(path))
            _check_layout(header, str(path))
        tensors = load_file(str(path))
    except OSError as error:
        raise LoRAFileError(f"{path}: cannot be read ({error})") from error
    except (SafetensorError, ValueError, RuntimeError) as error:
        if isinstance(error, LoRAFormatError):
            raise
        raise LoRAFileError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, _adapter_config(path, metadata), metadata


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


def _diffusers_state_dict(raw: dict[str, torch.Tensor], source: str, unet_config, family: str = SD_UNET):
    """Run the family's own diffusers conversion: kohya/BFL/XLabs/old layouts -> ``<component>.<module>.lora_{A,B}``
    + network alphas (FLUX's kohya converter folds alpha / rank into the factors, as diffusers loads them)."""
    import diffusers

    pipeline = getattr(diffusers, CONVERTERS[family])
    if family == SD_UNET and unet_config is None and any(p in k for k in raw for p in _SGM_BLOCKS):
        unet_config = SDXL_UNET_LAYOUT  # only SDXL ships kohya files in its original (sgm) block naming
    try:
        if family == SD_UNET:
            state, alphas = pipeline.lora_state_dict(dict(raw), unet_config=unet_config)
        elif CONVERTERS[family] == "FluxPipeline":
            # its kohya converter scales text-encoder factors in place (``*=``): give it copies of those
            owned = {k: v.clone() if k.startswith("lora_te") else v for k, v in raw.items()}
            state, alphas = pipeline.lora_state_dict(owned, return_alphas=True)
        else:  # SD3: diffusers converts nothing; alphas come from the PEFT metadata
            state, alphas = pipeline.lora_state_dict(dict(raw)), {}
    except Exception as error:  # diffusers raises bare ValueError/KeyError/AssertionError on foreign layouts
        converter = f"{CONVERTERS[family]}.lora_state_dict"
        raise LoRALayoutError(f"{source}: diffusers' {FAMILIES[family]} converter ({converter}) cannot convert this "
                              f"LoRA ({type(error).__name__}: {error})") from error
    return state, alphas or {}


def _to_peft_keys(keys_to_values: Mapping[str, object], source: str = "<state_dict>") -> dict[str, object]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        return convert_unet_state_dict_to_peft(dict(keys_to_values))
    except Exception as error:  # same as above: diffusers' converters raise bare errors on odd keys
        raise LoRALayoutError(f"{source}: diffusers cannot map these keys to UNet modules "
                              f"({type(error).__name__}: {error})") from error


def _alpha_by_module(alphas: Mapping[str, float], source: str = "<state_dict>",
                     denoiser: str = DENOISER) -> dict[str, float]:
    """Map diffusers' network-alpha keys (``...to_q_lora.down.weight.alpha``, FLUX ``transformer.<module>.alpha``)
    to module paths."""
    unet_alphas = {k.removeprefix(denoiser + "."): float(v)
                   for k, v in alphas.items() if not k.startswith(_TEXT_PREFIXES)}
    converted = _to_peft_keys(unet_alphas, source)
    return {k.split(".lora_A")[0].removesuffix(".alpha"): v for k, v in converted.items()}


def _metadata_alphas(modules: list[str], metadata: Mapping[str, object], source: str) -> dict[str, float]:
    """The alphas a PEFT adapter config (safetensors metadata) gives ``modules``: ``alpha_pattern``
    (PEFT's matching, see ``patterns``), else ``lora_alpha``; modules it gives none are left out."""
    if not modules:
        return {}
    pattern = metadata.get("alpha_pattern") or {}
    pattern = pattern if isinstance(pattern, dict) else {}
    compiled = compile_patterns(pattern, len(modules), "alpha_pattern", source)
    default = metadata.get("lora_alpha")
    alphas = {}
    for module in modules:
        key = first_match(compiled, module)
        if key is not None:
            alphas[module] = _as_alpha(pattern[key], f"alpha_pattern[{key!r}]", source)
        elif default is not None:
            alphas[module] = _as_alpha(default, "lora_alpha", source)
    return alphas


def _as_alpha(value, where: str, source: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoRAFormatError(f"{source}: adapter metadata {where} = {value!r:.60} is not a number") from None


def _split_components(state: Mapping[str, object], denoiser: str = DENOISER) -> dict[str, dict[str, object]]:
    """``{"unet.x": v, "text_encoder.y": w}`` -> ``{"unet": {"x": v}, "text_encoder": {"y": w}}``.

    Keys without a component prefix are the denoiser's (old diffusers attention-processor files, PEFT files saved
    from a bare FLUX/SD3 transformer);
    ``te.``/``te1.``/``te2.`` text-encoder keys, which SD/SDXL loaders do not map, go to ``_FOREIGN``.
    """
    parts: dict[str, dict[str, object]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component in _UNMAPPED_TEXT_PREFIXES:
            component, rest = _FOREIGN, key
        elif component not in COMPONENTS or not rest:
            component, rest = denoiser, key
        parts.setdefault(component, {})[rest] = value
    return parts


def _text_encoder_peft_keys(state: dict[str, object], source: str, component: str) -> dict[str, object]:
    """A text encoder's keys -> ``<module>.lora_A.weight``, as diffusers' ``_load_lora_into_text_encoder`` does."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    peft_keys = all(k.endswith((_DOWN, _UP, _ALPHA)) or _MAGNITUDE in k for k in state)
    if peft_keys and any(k.endswith(_DOWN) for k in state):
        return state  # already PEFT keys: diffusers' round trip would leave them as they are

    # diffusers infers the old layout from "to_out_lora" alone; kohya files adapting only q/k/v have none
    old = any(f".{p}_lora." in k for k in state for p in ("to_q", "to_k", "to_v", "to_out"))
    try:
        state = convert_state_dict_to_diffusers(dict(state), original_type=StateDictType.DIFFUSERS_OLD if old else None)
        return convert_state_dict_to_peft(state)
    except Exception as error:  # diffusers raises bare ValueErrors on key sets it cannot classify
        raise LoRALayoutError(f"{source}: diffusers cannot map the {component} keys to modules "
                              f"({type(error).__name__}: {error}); keys: {preview(sorted(state))}") from error


def _kohya_magnitudes(raw: dict[str, torch.Tensor], source: str) -> dict[int, tuple[str, torch.Tensor]]:
    """Pop kohya ``dora_scale`` keys; key each by the identity of its layer's down factor.

    diffusers' SD/SDXL ``lora_state_dict`` drops ``dora_scale`` (with a warning). Its converters move
    tensors to new keys without copying them, so following the down factor's identity through them
    finds each magnitude's module without parsing any key here.
    """
    magnitudes = {}
    for key in [k for k in raw if k.endswith(_DORA_SCALE)]:
        down = key[: -len(_DORA_SCALE)] + ".lora_down.weight"
        if down not in raw:
            raise LoRALayoutError(
                f"{source}: key {key!r} is a DoRA magnitude without its factors ({down!r} is missing)")
        magnitudes[id(raw[down])] = (key, raw.pop(key))
    return magnitudes


def _magnitude(module: str, key: str, tensor: torch.Tensor, lora_b: torch.Tensor, source: str, kohya: bool):
    """A DoRA magnitude as an (out,) vector: PEFT stores (out,) or (1, out, 1, 1), kohya (out, 1[, 1, 1])."""
    out = lora_b.shape[0]
    rows = tensor.shape[0] == out and tensor.numel() == out if kohya else tensor.numel() == out
    if rows:
        return tensor.reshape(out)
    if kohya and tensor.ndim >= 2 and tensor.shape[0] == 1:
        raise LoRALayoutError(
            f"{source}: layer {module}: key {key!r} {tuple(tensor.shape)} is a DoRA magnitude per input column "
            "(LyCORIS wd_on_out=False); only magnitudes per output row (PEFT/diffusers DoRA, LyCORIS "
            "wd_on_out=True) are supported"
        )
    raise LoRAShapeError(f"{source}: layer {module}: DoRA magnitude {key!r} has shape {tuple(tensor.shape)}, "
                         f"but B {tuple(lora_b.shape)} has {out} output rows")


def _component_layers(state, module_alphas, metadata, kohya_magnitudes, source: str, component: str):
    """PEFT-keyed factors (``<module>.lora_A.weight``, ...) of one component -> ``{module: LoRALayer}``."""
    downs, ups, magnitudes, foreign = {}, {}, {}, []
    for key, tensor in state.items():
        if key.endswith(_DOWN):
            downs[key[: -len(_DOWN)]] = tensor
        elif key.endswith(_UP):
            ups[key[: -len(_UP)]] = tensor
        elif key.endswith((_MAGNITUDE, _MAGNITUDE + ".weight")):
            magnitudes[key.split(_MAGNITUDE)[0]] = (key, tensor)
        else:
            foreign.append(key)
    if foreign:
        raise LoRALayoutError(
            f"{source}: {component} keys that are not LoRA factors or DoRA magnitudes (LoRA bias, or an unknown "
            f"layout): {preview(foreign)}"
        )
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise LoRALayoutError(f"{source}: {component} layers with only one of down/up: {preview(unpaired)}")
    stray = sorted(set(magnitudes) - set(downs))
    if stray:
        raise LoRALayoutError(f"{source}: {component} DoRA magnitudes without LoRA factors: {preview(stray)}")

    metadata_alphas = _metadata_alphas(sorted(set(downs) - set(module_alphas)), metadata, source)
    layers = {}
    for module in sorted(downs):
        lora_a, lora_b = downs[module], ups[module]
        check_layer(module, lora_a, lora_b, source)
        alpha = module_alphas.get(module, metadata_alphas.get(module))
        alpha = float(lora_a.shape[0] if alpha is None else alpha)
        check_alpha(module, alpha, source)
        magnitude = None
        if module in magnitudes:
            magnitude = _magnitude(module, *magnitudes[module], lora_b, source, kohya=False)
        elif id(lora_a) in kohya_magnitudes:
            magnitude = _magnitude(module, *kohya_magnitudes[id(lora_a)], lora_b, source, kohya=True)
        layers[module] = LoRALayer(lora_a=lora_a, lora_b=lora_b, alpha=alpha, magnitude=magnitude)
    return layers


def _denoiser_layers(state, alphas, metadata, kohya_magnitudes, source: str, denoiser: str = DENOISER):
    if not any("lora_A" in k for k in state):
        state = _to_peft_keys(state, source)
    return _component_layers(state, _alpha_by_module(alphas, source, denoiser), metadata, kohya_magnitudes, source,
                             denoiser)


def _text_encoder_layers(state, alphas, metadata, kohya_magnitudes, source: str, component: str):
    """diffusers names kohya alphas after the converted down key (``<down key>.alpha``): convert them alongside."""
    prefix = component + "."
    alpha_keys = {k.removeprefix(prefix): float(v) for k, v in alphas.items() if k.startswith(prefix)}
    converted = _text_encoder_peft_keys({**state, **alpha_keys}, source, component)
    module_alphas = {k.split(_DOWN)[0]: v for k, v in converted.items() if k.endswith(_DOWN + _ALPHA)}
    factors = {k: v for k, v in converted.items() if not k.endswith(_ALPHA)}
    return _component_layers(factors, module_alphas, metadata, kohya_magnitudes, source, component)


def _describe_source(source) -> str:
    if isinstance(source, LoRA):
        return source.source
    return "<state_dict>" if isinstance(source, Mapping) else str(source)[:200]


def load_lora(source, scale: float = 1.0, unet_config=None, text_encoder: bool = True) -> LoRA:
    """Load a LoRA from a ``.safetensors`` path or a state dict.

    Accepts diffusers (old ``lora.down``/``lora.up`` and PEFT ``lora_A``/``lora_B``) and kohya/A1111
    (``lora_unet_*``, ``lora_te*``, ``lora_down``/``lora_up``, ``.alpha``) layouts for SD1.x and SDXL, with
    DoRA magnitudes (PEFT ``lora_magnitude_vector``, kohya ``dora_scale``). FLUX.1 and SD3 files are recognised
    from their keys (kohya ``ss_base_model_version`` / ``modelspec.architecture`` decide what the keys leave
    open; ``LoRA.family``) and converted by that family's diffusers loader (``FluxPipeline.lora_state_dict``,
    ``StableDiffusion3Pipeline.lora_state_dict``): diffusers/PEFT with or without ``transformer.``, ai-toolkit,
    kohya/BFL (``lora_unet_double_blocks_0_img_attn_qkv``: fused q/k/v split as diffusers splits it, alpha / rank
    folded into the factors as diffusers does) and XLabs. Their layers are the ``"transformer"`` component
    (``fe.attach(pipe.transformer, ...)`` or ``fe.attach(pipe, ...)``). The effective per-layer
    scale is ``alpha / rank * scale`` (alpha = rank when the file has none). kohya files in SDXL's
    original block naming (``input_blocks_4_1_...``) are mapped with ``unet_config.layers_per_block``
    (SDXL's 2 when not given), as diffusers' own loader does. A file's header (framing, key names,
    layout) is checked before any tensor data is read, and its metadata never drives unbounded work
    (see ``patterns`` for PEFT's ``alpha_pattern``).

    Args:
        source: a ``.safetensors`` path, a state dict, or a ``LoRA`` (rescaled).
        scale: the user's strength, multiplied into every layer's scale: a finite number within float32's
            range (else ``OptionError``).
        unet_config: the UNet's config, for kohya SDXL files in the original block naming.
        text_encoder: ``False`` leaves the text-encoder parts out (listed in ``LoRA.ignored``).

    Returns:
        A ``LoRA`` whose ``layers`` are the denoiser's (``component``: ``"unet"`` or ``"transformer"``);
        ``components`` / ``for_component`` hold the text-encoder parts (``"text_encoder"``, ``"text_encoder_2"``).

    Example:
        >>> lora = fe.load_lora("dog.safetensors", scale=0.8)
        >>> lora.for_component("text_encoder")  # None when the file adapts the UNet only
    """
    scale = check_scale(scale, f"load_lora({_describe_source(source)})")
    if isinstance(source, LoRA):
        return source.with_scale(scale)
    if isinstance(source, Mapping):
        raw, name, metadata, header = dict(source), "<state_dict>", {}, {}
    elif not isinstance(source, (str, os.PathLike)):
        raise OptionTypeError(f"load_lora: expected a .safetensors path, a state dict or a LoRA, got "
                              f"{type(source).__name__} {source!r:.80}")
    else:
        path = Path(source)
        (raw, metadata, header), name = _read_safetensors(path), str(path)
    if not raw:
        raise LoRALayoutError(f"{name}: holds no tensors")
    check_raw_tensors(raw, name)
    refuse_lycoris(raw, name)
    layout = _check_layout(raw, name)
    family = detect_family(raw, header, name)
    refuse_unconvertible(family, raw, name)
    denoiser = TRANSFORMER if is_transformer_family(family) else DENOISER
    kohya_magnitudes = _kohya_magnitudes(raw, name)
    state, alphas = _diffusers_state_dict(raw, name, unet_config, family)
    parts = _split_components(state, denoiser)
    foreign = parts.pop(_FOREIGN, {})
    if foreign:
        raise LoRALayoutError(f"{name}: text-encoder keys under a prefix diffusers' SD/SDXL loaders do not map "
                              f"(expected {', '.join(COMPONENTS)}): {preview(sorted(foreign))}")
    ignored = []
    if not text_encoder:
        ignored = sorted(f"{c}.{k}" for c in TEXT_ENCODERS for k in parts.pop(c, {}))

    def part_metadata(component):
        return {k.removeprefix(component + "."): v for k, v in metadata.items() if k.startswith(component + ".")}

    stray = sorted(c for c in DENOISERS if c != denoiser and parts.get(c))
    if stray:
        raise LoRALayoutError(f"{name}: a {FAMILIES[family]} LoRA with {stray[0]!r} keys "
                              f"({preview(sorted(parts[stray[0]]), 2)}); its denoiser is the {denoiser}")
    layers = {}
    if parts.get(denoiser):
        layers = _denoiser_layers(parts[denoiser], alphas, part_metadata(denoiser), kohya_magnitudes, name, denoiser)
    others = {c: _text_encoder_layers(parts[c], alphas, part_metadata(c), kohya_magnitudes, name, c)
              for c in TEXT_ENCODERS if parts.get(c)}
    _refuse_lost_magnitudes(kohya_magnitudes, [layers, *others.values()], family, name)
    if not layers and not any(others.values()):
        what = f"only text-encoder layers ({len(ignored)} keys, left out by text_encoder=False)" if ignored \
            else "no LoRA layers"
        raise LoRALayoutError(f"{name}: {what}")
    return LoRA(layers=layers, source=name, layout=layout, scale=float(scale), ignored=ignored,
                component=denoiser, other_components=others, family=family)


def _refuse_lost_magnitudes(kohya_magnitudes, parts, family: str, source: str) -> None:
    """kohya ``dora_scale`` keys whose layer a converter rebuilt (FLUX's folds alpha into new factor tensors)."""
    used = {id(layer.lora_a) for layers in parts for layer in layers.values()}
    lost = sorted(key for down, (key, _) in kohya_magnitudes.items() if down not in used)
    if lost:
        keys = lost
        raise LoRALayoutError(
            f"{source}: kohya DoRA magnitudes ({preview(keys, 2)}) in a {FAMILIES[family]} LoRA: diffusers' converter "
            "for this family drops them (it warns and loads plain LoRA), and fusion_engine will not guess; save the "
            "LoRA in diffusers/PEFT naming (lora_magnitude_vector) to keep DoRA")
