"""The LLR objective: R = 1 - (S1 + S2 + S3) / 3 of the image decoded from a latent (docs/METHOD.md, Part 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..scoring.metrics import embed


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode, differentiable: latents -> float32 images in [0, 1], clamped like the saved image."""
    config = vae.config
    scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@dataclass
class ReferenceEmbeddings:
    """Embeddings of the references, one row per image of the batch: CLIP(Ic), CLIP(Is), DINO(Is or Ic)."""

    clip_subject: torch.Tensor
    clip_style: torch.Tensor
    dino: torch.Tensor

    @classmethod
    def of(cls, clip, dino, subject_images, style_images, batch: int, dino_reference: str = "style"):
        if dino_reference not in ("style", "subject"):
            raise OptionError(f"dino_reference must be 'style' (the paper) or 'subject', got {dino_reference!r}")

        def rows(encoder, images):
            embeddings = embed(encoder, images)
            if len(embeddings) == 1:
                return embeddings.expand(batch, -1)
            if len(embeddings) != batch:
                raise OptionError(f"{len(embeddings)} reference images for a batch of {batch}: give one or {batch}")
            return embeddings

        dino_images = style_images if dino_reference == "style" else subject_images
        return cls(rows(clip, subject_images), rows(clip, style_images), rows(dino, dino_images))


def llr_objective(vae, clip, dino, x0: torch.Tensor, references: ReferenceEmbeddings):
    """(R per image, (S1, S2, S3) per image) for the clean-latent estimate ``x0``."""
    images = decode_latents(vae, x0)
    clip_embeddings = clip(images)
    s1 = F.cosine_similarity(clip_embeddings, references.clip_subject, dim=-1)
    s2 = F.cosine_similarity(clip_embeddings, references.clip_style, dim=-1)
    s3 = F.cosine_similarity(dino(images), references.dino, dim=-1)
    return 1 - (s1 + s2 + s3) / 3, (s1, s2, s3)
