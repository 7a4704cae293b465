"""Tiny random FLUX and SD3 pipelines (diffusion transformers) and random LoRAs for them, built offline.

What the DiT tests and the CLI's FLUX/SD3 tests use: every model is initialised from a small config with a
fixed seed, the CLIP tokenizer is CLIP's own vocabulary (``tokenizer.clip_tokenizer``) and the T5 tokenizer a
small Unigram vocabulary (``tokenizer.t5_tokenizer``), so nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..lora import LoRA
from .random import random_lora
from .tokenizer import clip_tokenizer, t5_tokenizer

# the linear layers FLUX LoRAs (diffusers' Flux DreamBooth-LoRA recipe) target, by module-path suffix
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "proj_mlp", "proj_out")
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408)


def _vae(latent_channels: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                         latent_channels=latent_channels,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def _t5():
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval(), tokenizer  # eval: a freshly built T5 runs dropout


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` of random weights (one double and one single block, 16 latent channels, 32 px).

    Args:
        seed: the torch seed every model is initialised with.
        guidance_embeds: a guidance-distilled transformer (FLUX.1-dev) if True, else FLUX.1-schnell's kind.

    Example:
        ```py
        >>> pipe = build_tiny_flux(0)
        >>> image = pipe("a dog", num_inference_steps=2, height=32, width=32).images[0]
        ```
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT))
    text_encoder_2, tokenizer_2 = _t5()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
                        vae=_vae(4, 0.0609, 1.5035), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return _ready(pipe)


def _ready(pipe):
    """Every model in eval mode (models built from configs start in training mode) and no progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of random weights (two joint blocks, 4 latent channels, 32 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16)
    clip_config = CLIPTextConfig(**_TEXT, projection_dim=32)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config)
    text_encoder_3, tokenizer_3 = _t5()
    tokenizer = clip_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(4, 0.0609, 1.5305), text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                                    tokenizer_3=tokenizer_3)
    return _ready(pipe)


def dit_targets(transformer, suffixes=FLUX_TARGETS) -> list[str]:
    """Module paths of the transformer's linear layers whose path ends with one of ``suffixes``."""
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(suffixes)]


def dit_loras(transformer, seed: int = 0, suffixes=FLUX_TARGETS) -> tuple[LoRA, LoRA]:
    """A random subject LoRA (rank 4) and style LoRA (rank 8, alpha 4) on ``suffixes`` of a DiT; the style
    skips the single blocks' ``proj_out``, so some layers fuse with one LoRA absent."""
    targets = dit_targets(transformer, suffixes)
    style_targets = [name for name in targets if not name.endswith("proj_out")]
    subject = random_lora(transformer, targets, rank=4, alpha=4.0, strength=3.0, seed=seed + 1)
    style = random_lora(transformer, style_targets, rank=8, alpha=4.0, strength=3.0, seed=seed + 2)
    return replace(subject, component="transformer"), replace(style, component="transformer")
