"""Which base model a LoRA file is for: the SD1.x/SDXL UNet, FLUX.1 or SD3, from its keys (and kohya ``ss_*`` or
modelspec metadata where the keys leave it open), and which diffusers pipeline class converts it.

Every family is converted by diffusers' own ``lora_state_dict`` of that family's pipeline, so a file loads here
exactly as ``pipe.load_lora_weights`` loads it. A model's family comes from its class name (no diffusers import).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import LoRALayoutError, preview

SD_UNET, FLUX, SD3, DIT = "sd-unet", "flux", "sd3", "dit"
# family -> what messages call it; DIT: a transformer file whose keys fit FLUX.1 and SD3 alike
FAMILIES = {
    SD_UNET: "SD1.x/SDXL UNet",
    FLUX: "FLUX.1",
    SD3: "SD3/SD3.5",
    DIT: "FLUX.1 or SD3 transformer (its keys fit both)",
}
# the diffusers pipeline class whose lora_state_dict converts the family's files
CONVERTERS = {SD_UNET: "StableDiffusionXLPipeline", FLUX: "FluxPipeline", SD3: "StableDiffusion3Pipeline",
              DIT: "FluxPipeline"}
_MODEL_FAMILIES = {"UNet2DConditionModel": SD_UNET, "FluxTransformer2DModel": FLUX, "SD3Transformer2DModel": SD3}

_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "unet.", "lora_unet_", "lora_transformer_",
             "model.diffusion_model.")
_MARKERS = {
    # BFL/kohya/ComfyUI/XLabs naming (double_blocks, img_attn, ...) and diffusers' FLUX-only modules
    FLUX: re.compile(r"double_blocks|single_blocks|single_transformer_blocks|proj_mlp|img_attn|txt_attn|img_mlp"
                     r"|txt_mlp|guidance_embedder|guidance_in|x_embedder|query_norm|key_norm"),
    # SAI/kohya SD3 naming (joint_blocks) and SD3-only modules (patch embedding, SD3.5's second attention)
    SD3: re.compile(r"joint_blocks|x_block|context_block|pos_embed|^transformer_blocks[._]\d+[._]attn2"),
    SD_UNET: re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block"),
    DIT: re.compile(r"^(transformer_blocks|context_embedder|time_text_embed|norm_out)[._]"),
}
_TEXT_ENCODER_KEYS = re.compile(r"^(lora_te\d?_|text_encoder|te\d?\.|text_encoders\.)")
# kohya ss_base_model_version / modelspec.architecture values -> family
_METADATA = ((re.compile(r"^flux"), FLUX), (re.compile(r"^(sd3|stable-diffusion-v3)"), SD3),
             (re.compile(r"^(sd_v|sdxl|stable-diffusion-(xl|v1|v2))"), SD_UNET))
_METADATA_KEYS = ("ss_base_model_version", "modelspec.architecture")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _from_metadata(metadata: Mapping) -> str | None:
    for name in _METADATA_KEYS:
        value = metadata.get(name)
        if isinstance(value, str):
            for pattern, family in _METADATA:
                if pattern.match(value.lower()):
                    return family
    return None


def detect_family(keys, metadata: Mapping | None = None, source: str = "<state_dict>") -> str:
    """The family of a LoRA file from its raw keys; metadata decides what keys leave open.

    Args:
        keys: the file's keys as written (kohya ``lora_unet_...``, diffusers/PEFT with or without ``transformer.``,
            BFL ``double_blocks...``, XLabs ``...processor...``).
        metadata: the safetensors header's ``__metadata__`` (kohya ``ss_base_model_version``, ``modelspec.*``).
        source: the file, for the error.

    Returns:
        One of ``FAMILIES``: ``"dit"`` when the keys are a transformer's but fit FLUX.1 and SD3 alike and no
        metadata says which; ``"sd-unet"`` for text-encoder-only files without metadata (the SD/SDXL loader).

    Raises:
        LoRALayoutError: keys of two families in one file, naming one key of each.

    Example:
        >>> detect_family(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
        'flux'
    """
    found: dict[str, str] = {}
    for key in keys:
        if _TEXT_ENCODER_KEYS.match(key):
            continue
        stripped = _strip(key)
        for family, pattern in _MARKERS.items():
            if family not in found and pattern.search(stripped):
                found[family] = key
    if FLUX in found or SD3 in found:
        found.pop(DIT, None)
    if len(found) > 1:
        named = ", ".join(f"{FAMILIES[f]} ({k!r})" for f, k in found.items())
        raise LoRALayoutError(f"{source}: keys of more than one model family: {named}; a LoRA file adapts one "
                              "base model")
    family = next(iter(found), None)
    hinted = _from_metadata(metadata or {})
    if family is None:
        return hinted or SD_UNET
    if family == DIT and hinted in (FLUX, SD3):
        return hinted
    return family


def refuse_unconvertible(family: str, keys, source: str) -> None:
    """SD3 files diffusers 0.42 cannot load: SAI/kohya naming (``joint_blocks``), ``.alpha`` keys (its SD3 loader
    reads alphas from the PEFT metadata only, and refuses such files)."""
    if family != SD3:
        return
    sai = sorted(k for k in keys if "joint_blocks" in k)
    if sai:
        raise LoRALayoutError(
            f"{source}: an SD3 LoRA in SAI/kohya naming ({preview(sai, 2)}): diffusers has no converter "
            "for it, so neither has fusion_engine; save it in diffusers/PEFT naming "
            "(transformer.transformer_blocks.N.attn.to_q.lora_A.weight)")
    alphas = sorted(k for k in keys if k.endswith(".alpha"))
    if alphas:
        raise LoRALayoutError(
            f"{source}: an SD3 LoRA with alpha keys ({preview(alphas, 2)}): diffusers' SD3 loader takes alphas from "
            "the PEFT adapter metadata only (lora_adapter_metadata), and refuses these keys; so does fusion_engine")


def is_transformer_family(family: str | None) -> bool:
    return family in (FLUX, SD3, DIT)


def model_family(model) -> str | None:
    """The family of a denoiser from its class (``None`` for text encoders and other modules)."""
    return _MODEL_FAMILIES.get(type(model).__name__)


def families_fit(lora_family: str | None, model_family_name: str | None) -> bool:
    """Can a LoRA of ``lora_family`` go on a model of ``model_family_name``? Unknown on either side: yes."""
    if lora_family is None or model_family_name is None or lora_family == model_family_name:
        return True
    return lora_family == DIT and model_family_name in (FLUX, SD3)


def describe_family(family: str | None) -> str:
    return FAMILIES.get(family, "an unknown model family") if family else "an unknown model family"
