"""The paper's evaluation scores: Style Sim, CLIP Score and DINO Score (cosine similarities of image embeddings).

* Style Sim: CLIP image embedding of the generated image vs the style reference.
* CLIP Score: CLIP image embedding vs the subject reference.
* DINO Score: DINO embedding vs the subject reference.

Images and references are PIL images, lists of them, or (B, 3, H, W) / (3, H, W) tensors in [0, 1]. A single
reference is compared with every image; otherwise references pair up with images one to one. Scores are
fractions in [-1, 1] (the paper prints them as percentages).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import OptionError


def as_image_tensor(images) -> torch.Tensor:
    """PIL image(s) or a tensor in [0, 1] -> a float32 (B, 3, H, W) tensor (no gradient through PIL)."""
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.ndim == 3 else images
    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def embed(encoder, images, batch_size: int = 32) -> torch.Tensor:
    """Embeddings of many images, ``batch_size`` at a time, on the encoder's device."""
    tensor = as_image_tensor(images)
    chunks = [encoder(tensor[i:i + batch_size].to(encoder.device)) for i in range(0, len(tensor), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def _paired_cosine(encoder, images, references, batch_size: int) -> torch.Tensor:
    image_embeddings = embed(encoder, images, batch_size)
    reference_embeddings = embed(encoder, references, batch_size)
    if len(reference_embeddings) == 1:
        reference_embeddings = reference_embeddings.expand_as(image_embeddings)
    elif len(reference_embeddings) != len(image_embeddings):
        raise OptionError(f"{len(reference_embeddings)} references for {len(image_embeddings)} images: "
                         "pass one reference or one per image")
    return F.cosine_similarity(image_embeddings, reference_embeddings, dim=-1).cpu()


def style_sim(clip, images, style_references, batch_size: int = 32) -> torch.Tensor:
    return _paired_cosine(clip, images, style_references, batch_size)


def clip_score(clip, images, subject_references, batch_size: int = 32) -> torch.Tensor:
    return _paired_cosine(clip, images, subject_references, batch_size)


def dino_score(dino, images, subject_references, batch_size: int = 32) -> torch.Tensor:
    return _paired_cosine(dino, images, subject_references, batch_size)


METRICS = ("style_sim", "clip_score", "dino_score")


def score_images(clip, dino, images, subject_references, style_references, batch_size: int = 32) -> dict:
    """All three scores, as {metric: (B,) float tensor on the CPU}."""
    return {
        "style_sim": style_sim(clip, images, style_references, batch_size),
        "clip_score": clip_score(clip, images, subject_references, batch_size),
        "dino_score": dino_score(dino, images, subject_references, batch_size),
    }


__all__ = ["METRICS", "as_image_tensor", "clip_score", "dino_score", "embed", "score_images", "style_sim"]
