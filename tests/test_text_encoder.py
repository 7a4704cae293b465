"""Text-encoder parts of LoRA files: applied like diffusers applies them, never dropped without a word."""
import copy
import warnings

import numpy as np
import pytest
import torch
from test_sdxl import sdxl_pipe  # noqa: F401  (fixture)

import fusion_engine as fe
from fusion_engine.cli import main
from fusion_engine.lora import lora_to_state_dict
from fusion_engine.worlds.random import attention_targets, random_lora

pytest.importorskip("peft")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROMPTS = ["a sbu dog in szn style", "a szn cat"]


def text_targets(text_encoder):
    return [n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TEXT_TARGETS)]


def lora_with_text_parts(pipe, seed=3, alphas=(2.0, 3.0)):
    """A DreamBooth-style file: UNet attention (rank 4, alpha 2) and every text-encoder linear (rank 4, alpha 3)."""
    unet = random_lora(pipe.unet, attention_targets(pipe.unet), rank=4, alpha=alphas[0], strength=3.0, seed=seed)
    others = {}
    for i, component in enumerate(("text_encoder", "text_encoder_2")):
        model = getattr(pipe, component, None)
        if model is not None:
            others[component] = random_lora(model, text_targets(model), rank=4, alpha=alphas[1], strength=2.0,
                                            seed=seed + 10 + i).layers
    return fe.LoRA(unet.layers, other_components=others)


def images(pipe, seed=0):
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def attach_every_part(pipe, lora):
    """One attach per component, as fe.attach(pipe, ...) does."""
    return [fe.attach(getattr(pipe, component), lora.for_component(component), granularity="sample")
            for component in lora.components]


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_with_text_parts_matches_load_lora_weights(tmp_path, tiny_pipe, sdxl_pipe, family, layout):  # noqa: F811
    pipe = tiny_pipe if family == "sd15" else copy.deepcopy(sdxl_pipe)
    alphas = (4.0, 4.0) if layout == "diffusers" else (2.0, 3.0)  # the old diffusers layout has no alpha
    lora = lora_with_text_parts(pipe, alphas=alphas)
    path = fe.save_lora(lora, tmp_path / f"dreambooth_{layout}.safetensors", layout=layout)
    lora = fe.load_lora(path)
    assert set(lora.components) == {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())

    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name="subject")
    expected = images(reference)

    fusions = attach_every_part(pipe, lora)
    got = images(pipe)
    for fusion in fusions:
        fusion.detach()
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)

    with fe.attach(pipe.unet, lora.for_component("unet"), granularity="sample"):  # the UNet part alone
        unet_only = images(pipe)
    assert np.abs(unet_only - expected).max() > 1e-3, "the text-encoder parts must matter, or this test proves nothing"


def test_attaching_a_whole_lora_to_the_unet_warns_about_its_text_parts(tiny_pipe):
    lora = lora_with_text_parts(tiny_pipe)
    with pytest.warns(UserWarning, match=r"applies its unet part only; its text_encoder \(12 layers\) part is not"):
        fe.attach(tiny_pipe.unet, lora).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit forms are silent
        fe.attach(tiny_pipe.unet, lora.for_component("unet")).detach()
        fe.attach(tiny_pipe.unet, fe.load_lora(lora_to_state_dict(lora, "kohya"), text_encoder=False)).detach()


def test_text_encoder_defaults_and_refusals(tiny_pipe):
    lora = lora_with_text_parts(tiny_pipe).for_component("text_encoder")
    with fe.attach(tiny_pipe.text_encoder, lora) as fusion:
        assert fusion.policy.name == "direct" and fusion.context.granularity == "sample"
    for policy in ("klora", "switch", "composite", "blora"):
        with pytest.raises(fe.errors.OptionError, match=f"policy '{policy}' cannot run on a text encoder"):
            fe.attach(tiny_pipe.text_encoder, lora, policy=policy)
    with pytest.raises(fe.AttachError, match="different components"):
        fe.attach(tiny_pipe.text_encoder, lora, lora_with_text_parts(tiny_pipe).for_component("unet"))
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.text_encoder) is None


def test_text_encoder_fls_decides_once_per_prompt(tiny_pipe):
    """Two prompts in one batch: each prompt's embedding equals the one it gets alone (its own decision)."""
    subject = lora_with_text_parts(tiny_pipe, seed=3).for_component("text_encoder")
    style = lora_with_text_parts(tiny_pipe, seed=7).for_component("text_encoder")
    tokens = tiny_pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad(), fe.attach(tiny_pipe.text_encoder, subject, style, policy="fls") as fusion:
        both = tiny_pipe.text_encoder(tokens)[0]
        alone = torch.cat([tiny_pipe.text_encoder(tokens[i:i + 1])[0] for i in range(len(PROMPTS))])
        choices = [record.choice for record in fusion.trace.gather()]
    torch.testing.assert_close(both, alone, atol=1e-6, rtol=0)
    assert {c.numel() for c in choices} == {1, 2}  # one decision per prompt: 2 in the pair's call, 1 alone


def test_text_model_level_is_resolved_both_ways(tiny_pipe):
    """kohya names CLIP layers under text_model.; transformers 5's CLIPTextModel has no such level, 4.x's has."""
    lora = fe.load_lora(lora_to_state_dict(lora_with_text_parts(tiny_pipe), "kohya")).for_component("text_encoder")
    assert all(name.startswith("text_model.") for name in lora.layers)
    tokens = torch.randint(0, 1000, (2, 9))
    older = torch.nn.Module()
    older.text_model = copy.deepcopy(tiny_pipe.text_encoder)  # the 4.x nesting
    with torch.no_grad():
        with fe.attach(tiny_pipe.text_encoder, lora):
            flat = tiny_pipe.text_encoder(tokens)[0]
        with fe.attach(older, lora):
            nested = older.text_model(tokens)[0]
        base = tiny_pipe.text_encoder(tokens)[0]
    assert torch.equal(flat, nested) and (flat - base).abs().max() > 1e-2


def test_inspect_lists_each_component(tmp_path, tiny_pipe, capsys):
    path = fe.save_lora(lora_with_text_parts(tiny_pipe), tmp_path / "db.safetensors", layout="kohya")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unet: 32 layers" in out and "text_encoder: 12 layers" in out
    assert "text_model.encoder.layers.1.mlp.fc2" in out
