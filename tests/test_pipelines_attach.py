"""fe.attach(pipe) and FusionPipeline against the plain pipeline with the fused UNet set up by hand.

For txt2img, img2img, inpaint, ControlNet and IP-Adapter (tiny random models built here) and SDXL txt2img:
attach-on-pipe output == FusionPipeline output == the plain pipeline with ``fe.attach(pipe.unet)``, the batch
layout set by hand and the step set by a ``callback_on_step_end``, bit for bit, for 2 prompts x 2 images x CFG.
"""
import copy

import pytest
import torch

import fusion_engine as fe
from fusion_engine.runtime.layers import DynamicLoRALayer

PROMPTS = ["a sbu dog in szn style", "a red car"]
STEPS = 3


def _image(seed, size=32, channels=3):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _ip_adapter(pipe):
    """A tiny CLIP image encoder and random IP-Adapter weights (diffusers' own loader puts them in the UNet)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=4))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    unet, cross = pipe.unet, pipe.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(4)
    image_proj = {"proj.weight": torch.randn(4 * cross, 32, generator=generator) * 0.1,
                  "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        ip_layers[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
        ip_layers[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
        key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}])
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    return pipe


def make_pipeline(kind, tiny_pipe):
    """(pipeline, extra call arguments, loop steps) for one pipeline type, sharing the tiny SD parts."""
    import diffusers

    parts = dict(tiny_pipe.components)
    if kind == "txt2img":
        return tiny_pipe, {}, STEPS
    if kind == "img2img":
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**parts)
        return pipe, {"image": _image(1), "strength": 0.7, "num_inference_steps": 4}, 2  # int(4 * 0.7) steps
    if kind == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline(**parts)
        mask = (_image(2, channels=1) > 0.5).float()
        return pipe, {"image": _image(1), "mask_image": mask, "strength": 1.0}, STEPS
    if kind == "controlnet":
        torch.manual_seed(5)
        controlnet = diffusers.ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(8, 16))
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
        return pipe, {"image": _image(1)}, STEPS
    if kind == "ip_adapter":
        return _ip_adapter(tiny_pipe), {"ip_adapter_image": _image(6)}, STEPS
    raise ValueError(kind)


def _call(pipe, extra, **kwargs):
    options = dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=4.0, num_inference_steps=STEPS,
                   output_type="pt", generator=torch.Generator().manual_seed(0))
    return pipe(**{**options, **extra, **kwargs})


def hand_set(pipe, loras, extra, loop_steps, policy, **options):
    """The reference: the fused UNet attached by hand, layout and step set as a careful user would."""
    with fe.attach(pipe.unet, *loras, policy=policy, **options) as fusion:
        fusion.set_batch_layout(images=len(PROMPTS) * 2, copies=2)
        fusion.set_step(0, loop_steps)

        def next_step(pipeline, step, timestep, callback_kwargs):
            if step + 1 < loop_steps:
                fusion.set_step(step + 1, loop_steps)
            return {}

        images = _call(pipe, extra, callback_on_step_end=next_step).images
        return images, fusion.trace.gather()


def _assert_untouched(pipe, cls, state):
    assert type(pipe) is cls
    assert not any(isinstance(m, DynamicLoRALayer) for m in pipe.unet.modules())
    now = pipe.unet.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


@pytest.mark.parametrize("kind, policy", [
    ("txt2img", "fls"), ("txt2img", "switch"), ("img2img", "fls"), ("inpaint", "fls"), ("controlnet", "fls"),
    ("ip_adapter", "fls"),
])
def test_attach_on_pipe_equals_hand_set_layout_and_fusion_pipeline(tiny_pipe, loras, kind, policy):
    pipe, extra, loop_steps = make_pipeline(kind, tiny_pipe)
    options = {"tau": 1} if policy == "switch" else {}
    cls, state = type(pipe), {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _call(pipe, extra).images

    expected, expected_records = hand_set(pipe, loras, extra, loop_steps, policy, **options)
    with fe.attach(pipe, *loras, policy=policy, **options) as fusion:
        assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls)
        got = _call(pipe, extra).images
        records = fusion.trace.gather()
        again = _call(pipe, extra).images if kind == "txt2img" else got  # the step and layout are reset per call
    _assert_untouched(pipe, cls, state)
    wrapped = fe.FusionPipeline(pipe, *loras, policy=policy, **options)(**{
        "prompt": PROMPTS, "num_images_per_prompt": 2, "guidance_scale": 4.0, "num_inference_steps": STEPS,
        "output_type": "pt", "generator": torch.Generator().manual_seed(0), **extra})

    assert not torch.equal(expected, plain), "the LoRAs must change the images"
    assert torch.equal(got, expected) and torch.equal(again, expected) and torch.equal(wrapped.images, expected)
    assert [r.step for r in records] == [r.step for r in expected_records]
    assert sorted({r.step for r in records}) == list(range(loop_steps))
    assert all(r.choice.numel() == 4 for r in records if policy == "fls")  # one decision per image
    assert all(torch.equal(a.choice, b.choice) for a, b in zip(records, expected_records))
    assert wrapped.trace.steps == list(range(loop_steps))
    _assert_untouched(pipe, cls, state)
    if kind == "txt2img":  # the mechanics of restoration are the same for every kind
        assert torch.equal(_call(pipe, extra).images, plain)


def test_sdxl_attach_on_pipe_equals_hand_set(sdxl_pipe):
    from fusion_engine.worlds.random import attention_targets, random_lora

    pipe = copy.deepcopy(sdxl_pipe)
    targets = attention_targets(pipe.unet)
    loras = (random_lora(pipe.unet, targets, rank=4, alpha=4.0, strength=3.0, seed=1),
             random_lora(pipe.unet, targets, rank=8, alpha=4.0, strength=3.0, seed=2))
    expected, _ = hand_set(pipe, loras, {"height": 32, "width": 32}, STEPS, "fls")
    with fe.attach(pipe, *loras):
        got = _call(pipe, {"height": 32, "width": 32}).images
    wrapped = fe.FusionPipeline(pipe, *loras)(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=4.0, height=32,
                                              width=32, num_inference_steps=STEPS, output_type="pt",
                                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected) and torch.equal(wrapped.images, expected)


@pytest.fixture(scope="module")
def sdxl_pipe():
    from test_sdxl import sdxl_pipe as build

    return build.__wrapped__()
