"""Image encoders for LLR and the metrics: OpenCLIP and a DINO ViT (timm), from local files only.

Each is wrapped as an ``ImageEncoder``: images in [0, 1], shaped (B, 3, H, W), go in; one embedding per
image comes out. Preprocessing (resize, centre crop, mean/std) is done in torch so that gradients flow
through it during refinement; PIL never sits in the gradient path.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FusionEngineError, ModelPathError, OptionError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tiny random configs for tests and the offline default (never meaningful scores).
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
TINY_DINO_NAME = "vit_tiny_patch16_224"
TINY_DINO_OPTIONS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


class ImageEncoder(nn.Module):
    """A vision backbone plus its preprocessing, differentiable end to end.

    Resize keeps the aspect ratio so the shorter side matches the model's input, then centre-crops
    (CLIP's and DINO's evaluation transform), with antialiased bicubic interpolation.
    """

    def __init__(self, backbone: nn.Module, image_size, mean, std, name: str = "encoder"):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.image_size = _pair(image_size)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.mean.device, torch.float32)
        height, width = images.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            scale = max(target_h / height, target_w / width)
            resized = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
            images = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False)
            top, left = (resized[0] - target_h) // 2, (resized[1] - target_w) // 2
            images = images[..., top:top + target_h, left:left + target_w]
        return ((images - self.mean) / self.std).to(self.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, D) float32 embeddings (not normalised)."""
        return self.backbone(self.preprocess(images)).float()

    def extra_repr(self) -> str:
        return f"{self.name}, input={self.image_size}"


def _check_file(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ModelPathError(f"{path}: encoder checkpoint not found (encoders load from local files only)")
    return str(path)


@contextmanager
def _loading(what: str):
    """What open_clip / timm raise for a model they do not know, a config they cannot build or a checkpoint they
    cannot read (pickled, corrupt, another architecture's) as one ``OptionError`` naming ``what``."""
    try:
        yield
    except FusionEngineError:
        raise
    except Exception as error:  # noqa: BLE001 - third-party builders and loaders raise many kinds
        message = " ".join(str(error).split()) or type(error).__name__
        raise OptionError(f"{what}: {message[:300]}") from error


def _warn_random(kind: str, what) -> None:
    warnings.warn(f"{kind} encoder {what!r} has no checkpoint: random weights, scores are meaningless", stacklevel=3)


def load_openclip(model, checkpoint=None, *, device="cpu", dtype=torch.float32, mean=None, std=None) -> ImageEncoder:
    """OpenCLIP's image tower from an architecture name (``"ViT-L-14"``) or a config dict, plus a local checkpoint.

    The config dict is what open_clip's model config JSON files hold (``embed_dim``, ``vision_cfg``,
    ``text_cfg``). ``"local-dir:/folder"`` (open_clip_config.json + weights) also works. The text tower
    is built because open_clip's checkpoints hold it, then dropped.
    """
    import open_clip

    if isinstance(model, str) and model.startswith("hf-hub:"):
        raise OptionError("hf-hub: models would be downloaded; pass an architecture name and a local checkpoint")
    if isinstance(model, dict):
        config = dict(model)
        with _loading("OpenCLIP config: cannot build the model"):
            custom_text = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
            clip = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**config)
            preprocess = {"size": config["vision_cfg"]["image_size"], "mean": OPENAI_MEAN, "std": OPENAI_STD}
        name = "openclip[config]"
    else:
        with _loading(f"OpenCLIP model {model!r}: cannot build it"):
            clip = open_clip.create_model(model, pretrained=None, pretrained_text=False, load_weights=True)
        name = f"openclip[{model}]"
        preprocess = getattr(clip.visual, "preprocess_cfg", None) or {}
    if checkpoint is not None:
        path = _check_file(checkpoint)
        with _loading(f"{path}: cannot load this OpenCLIP checkpoint into {name}"):
            open_clip.load_checkpoint(clip, path, strict=True)
    elif not str(model).startswith("local-dir:"):
        _warn_random("OpenCLIP", name)
    size = preprocess.get("size") or clip.visual.image_size
    visual = clip.visual.to(device=device, dtype=dtype)
    return ImageEncoder(visual, size, mean or preprocess.get("mean", OPENAI_MEAN),
                        std or preprocess.get("std", OPENAI_STD), name).to(device)


def _timm_filter(model):
    """The model family's own checkpoint converter (e.g. ViT's, for original DINO files), if it has one."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_dino(model_name: str, checkpoint=None, *, device="cpu", dtype=torch.float32, mean=None, std=None,
              **timm_options) -> ImageEncoder:
    """A DINO ViT through timm (``"vit_small_patch16_224.dino"``, ``"vit_base_patch16_224.dino"``, ...).

    Built with ``pretrained=False`` and ``num_classes=0`` (the pooled CLS token is the embedding), then the
    local checkpoint (safetensors or torch) is loaded through timm, converted by the family's filter.
    ``mean``/``std`` default to the tag's data config (ImageNet statistics for the ``.dino`` tags).
    """
    import timm

    with _loading(f"DINO model {model_name!r}: cannot build it with timm"):
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_options)
    if checkpoint is not None:
        filter_fn, path = _timm_filter(backbone), _check_file(checkpoint)
        with _loading(f"{path}: cannot load this DINO checkpoint into {model_name}"):
            timm.models.load_checkpoint(backbone, path, strict=False, filter_fn=filter_fn)
    else:
        _warn_random("DINO", model_name)
    config = timm.data.resolve_model_data_config(backbone)
    patch_embed = getattr(backbone, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None) or config["input_size"][1:]
    backbone = backbone.to(device=device, dtype=dtype)
    mean, std = mean or config.get("mean", IMAGENET_MEAN), std or config.get("std", IMAGENET_STD)
    return ImageEncoder(backbone, size, mean, std, f"dino[{model_name}]").to(device)


def tiny_openclip(seed: int = 0, device="cpu") -> ImageEncoder:
    """A random ~0.1M-parameter OpenCLIP image tower (tests, offline default)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_openclip(TINY_OPENCLIP_CONFIG, device=device)


def tiny_dino(seed: int = 0, device="cpu") -> ImageEncoder:
    """A random ~0.1M-parameter ViT standing in for DINO (tests, offline default)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dino(TINY_DINO_NAME, device=device, mean=IMAGENET_MEAN, std=IMAGENET_STD, **TINY_DINO_OPTIONS)


__all__ = ["ImageEncoder", "load_dino", "load_openclip", "tiny_dino", "tiny_openclip"]
