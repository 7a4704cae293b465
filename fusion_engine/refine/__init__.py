"""Latent-Level Refinement (LLR): steer every denoising step towards both reference images."""
from .refiner import Refinement, Refiner
from .reward import ReferenceEmbeddings, decode_latents, llr_objective
from .x0 import predict_x0

__all__ = ["ReferenceEmbeddings", "Refinement", "Refiner", "decode_latents", "llr_objective", "predict_x0"]
