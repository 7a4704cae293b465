"""Tiny FLUX.1 and SD3 pipelines built from configs (no downloads), LoRA state dicts in the layouts real trainers
write (from random factors with fixed seeds), and one seeded pipeline call: what the DiT tests share.

Prompt embeddings are given to the pipeline directly (random, seeded): the LoRAs adapt the transformer only, and
no T5 tokenizer exists offline. The pipelines run their own denoising loop; ``output_type="latent"`` keeps the
VAE's clamping from hiding differences.
"""
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

TEXT_DIM, TOKENS = 32, 7


def _vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """One double and one single block, inner width 32 (2 heads of 16)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Two joint blocks (the last one context-pre-only, as in SD3), the first with SD3.5's second attention."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=TEXT_DIM, pooled_projection_dim=64, out_channels=4,
                                        dual_attention_layers=(0,))
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=transformer)


def run(pipe, seed: int = 1, images: int = 1, steps: int = 2) -> torch.Tensor:
    """A full pipeline call with seeded prompt embeddings and latents; SD3 runs classifier-free guidance."""
    generator = torch.Generator().manual_seed(seed)
    pooled = pipe.transformer.config.pooled_projection_dim
    embeds = {"prompt_embeds": torch.randn(images, TOKENS, TEXT_DIM, generator=generator),
              "pooled_prompt_embeds": torch.randn(images, pooled, generator=generator)}
    if isinstance(pipe, StableDiffusion3Pipeline):
        embeds.update(negative_prompt_embeds=torch.randn(images, TOKENS, TEXT_DIM, generator=generator),
                      negative_pooled_prompt_embeds=torch.randn(images, pooled, generator=generator),
                      guidance_scale=4.0)
    with torch.no_grad():
        return pipe(**embeds, num_inference_steps=steps, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(seed + 1000)).images


def linear_names(model, skip: tuple[str, ...] = ()) -> list[str]:
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not any(s in name for s in skip)]


def random_factors(model, names, rank: int, seed: int, strength: float = 0.3) -> dict[str, tuple]:
    """module -> (A (rank, in), B (out, rank)) random and non-zero, seeded."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        weight = model.get_submodule(name).weight
        out[name] = (torch.randn(rank, weight.shape[1], generator=generator) * strength,
                     torch.randn(weight.shape[0], rank, generator=generator) * strength)
    return out


def peft_state_dict(factors, prefix: str = "transformer.", alphas=None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT/ai-toolkit naming: ``transformer.<module>.lora_A.weight``; ``.alpha`` keys when given
    (the FLUX files diffusers reads alphas from, e.g. TheLastBen's)."""
    state = {}
    for name, (lora_a, lora_b) in factors.items():
        state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = lora_a, lora_b
        if alphas is not None:
            state[f"{prefix}{name}.alpha"] = torch.tensor(float(alphas[name]))
    return state


def kohya_flux_state_dict(blocks: int, single_blocks: int, width: int, mlp: int, rank: int, seed: int,
                          sparse_qkv: bool = False, linear1: bool = False, comfyui: bool = False) -> dict:
    """kohya/BFL naming of FLUX: ``lora_unet_double_blocks_0_img_attn_qkv`` (fused q/k/v), ``..._img_mlp_0``,
    ``..._img_mod_lin``, ``lora_unet_single_blocks_0_linear2`` ... with ``.alpha`` != rank.

    ``sparse_qkv``: the fused q/k/v up factor is block-diagonal (what kohya writes when it merged three LoRAs),
    which diffusers splits into three rank/3 LoRAs. ``linear1``: add single blocks' fused q/k/v/mlp input,
    which diffusers splits at FLUX.1-dev's widths (3072 x 3 + 12288). ``comfyui``: ComfyUI's naming of the same
    modules (``diffusion_model.double_blocks.0.img_attn.qkv``).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(path, fan_in, fan_out, up=None):
        name = "diffusion_model." + ".".join(path) if comfyui else "lora_unet_" + "_".join(path)
        state[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
        if up is None:
            up = torch.randn(fan_out, rank, generator=generator) * 0.3
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(float(rank * 2))

    def qkv_up():
        up = torch.randn(3 * width, rank, generator=generator) * 0.3
        if sparse_qkv:
            part = rank // 3
            mask = torch.zeros_like(up)
            for i in range(3):
                mask[i * width:(i + 1) * width, i * part:(i + 1) * part] = 1
            up = up * mask
        return up

    for i in range(blocks):
        for stream in ("img", "txt"):
            block = ("double_blocks", str(i))
            add((*block, f"{stream}_attn", "qkv"), width, 3 * width, qkv_up())
            add((*block, f"{stream}_attn", "proj"), width, width)
            add((*block, f"{stream}_mlp", "0"), width, mlp)
            add((*block, f"{stream}_mlp", "2"), mlp, width)
            add((*block, f"{stream}_mod", "lin"), width, 6 * width)
    for i in range(single_blocks):
        add(("single_blocks", str(i), "linear2"), width + mlp, width)
        add(("single_blocks", str(i), "modulation", "lin"), width, 3 * width)
        if linear1:
            add(("single_blocks", str(i), "linear1"), width, 3 * width + mlp)
    return state


def xlabs_flux_state_dict(rank: int, width: int, seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """XLabs naming of FLUX: ``double_blocks.0.processor.qkv_lora1.down.weight`` (image q/k/v fused), ``qkv_lora2``
    (text), ``proj_lora1`` / ``proj_lora2`` (outputs); no alpha."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, fan_out in (("qkv_lora1", 3 * width), ("qkv_lora2", 3 * width), ("proj_lora1", width),
                          ("proj_lora2", width)):
        key = f"{prefix}double_blocks.0.processor.{name}"
        state[f"{key}.down.weight"] = torch.randn(rank, width, generator=generator) * 0.3
        state[f"{key}.up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
    return state
