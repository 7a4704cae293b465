"""SDXL: a tiny two-text-encoder pipeline; kohya files in SDXL's own (sgm) block naming."""
import copy
import re

import pytest
import torch
from safetensors.torch import save_file

import fusion_engine as fe
from fusion_engine.worlds.random import attention_targets, random_lora
from fusion_engine.worlds.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def sdxl_pipe():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True,
    )
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sgm_name(name: str) -> str:
    """diffusers module path -> SDXL's original (sgm) block naming, as kohya writes SDXL LoRAs."""
    def down(m):
        return f"input_blocks_{3 * int(m[1]) + int(m[2]) + 1}_1_"

    def up(m):
        return f"output_blocks_{3 * int(m[1]) + int(m[2])}_1_"

    flat = name.replace(".", "_")
    flat = re.sub(r"^down_blocks_(\d+)_attentions_(\d+)_", down, flat)
    flat = re.sub(r"^up_blocks_(\d+)_attentions_(\d+)_", up, flat)
    return "lora_unet_" + flat.replace("mid_block_attentions_0_", "middle_block_1_")


def test_sdxl_kohya_sgm_names_match_diffusers_and_sample(tmp_path, sdxl_pipe):
    pipe = copy.deepcopy(sdxl_pipe)
    lora = random_lora(pipe.unet, attention_targets(pipe.unet), rank=4, alpha=2.0, strength=3.0, seed=1)
    state = {}
    for name, layer in lora.layers.items():
        key = sgm_name(name)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = layer.lora_a, layer.lora_b
        state[f"{key}.alpha"] = torch.tensor(layer.alpha)
    path = tmp_path / "sdxl_kohya.safetensors"
    save_file(state, path)
    loaded = fe.load_lora(path)
    assert set(loaded.layers) == set(lora.layers)

    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name="subject")
    with torch.no_grad():
        expected = reference.unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
        with fe.attach(pipe.unet, loaded, policy="fls"):
            got = pipe.unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)

    style = random_lora(pipe.unet, attention_targets(pipe.unet), rank=8, alpha=8.0, strength=3.0, seed=2)
    result = fe.FusionPipeline.from_pipe(pipe, loaded, style, policy="fls")(
        "a sbu dog in szn style", num_inference_steps=2, num_images_per_prompt=2, progress=False,
        generator=torch.Generator().manual_seed(0))
    assert len(result.images) == 2 and result.images[0].size == (16, 16)
    assert len(result.trace) == 2 * len(lora.layers)
