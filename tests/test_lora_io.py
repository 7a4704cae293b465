"""LoRA files in every layout load to the same factors, alphas and scales; bad files name the fault."""
import pytest
import torch
from safetensors.torch import save_file

import fusion_engine as fe
from fusion_engine.lora import LoRA, LoRALayer, lora_to_state_dict


def _assert_same_lora(loaded: LoRA, original: LoRA):
    assert set(loaded.layers) == set(original.layers)
    for name, layer in original.layers.items():
        got = loaded.layers[name]
        assert torch.equal(got.lora_a, layer.lora_a) and torch.equal(got.lora_b, layer.lora_b), name
        assert got.alpha == layer.alpha and loaded.layer_scale(name) == pytest.approx(layer.alpha / layer.rank)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_roundtrip_keeps_factors_and_alpha(tmp_path, loras, layout):
    _, style = loras  # rank 8, alpha 4: a scale of 0.5 that a careless loader would lose
    path = fe.save_lora(style, tmp_path / f"style_{layout}.safetensors", layout=layout)
    loaded = fe.load_lora(path)
    assert loaded.layout == layout
    _assert_same_lora(loaded, style)
    assert {loaded.layer_scale(n) for n in loaded.layers} == {0.5}


def test_old_diffusers_layout_has_scale_one(tmp_path, loras):
    subject, _ = loras
    loaded = fe.load_lora(fe.save_lora(subject, tmp_path / "subject_old.safetensors", layout="diffusers"))
    assert loaded.layout == "diffusers"
    _assert_same_lora(loaded, subject)


def test_user_scale_multiplies_alpha_over_rank(tmp_path, loras):
    _, style = loras
    loaded = fe.load_lora(fe.save_lora(style, tmp_path / "s.safetensors", layout="kohya"), scale=0.8)
    name = next(iter(loaded.layers))
    assert loaded.layer_scale(name) == pytest.approx(4 / 8 * 0.8)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_user_scale_is_saved_as_the_effect_it_has(tmp_path, loras, layout):
    _, style = loras  # alpha 4, rank 8: every layer 0.5, times the user's 0.3 -> 0.15 after a round trip
    scaled = fe.load_lora(style, scale=0.3)
    loaded = fe.load_lora(fe.save_lora(scaled, tmp_path / f"scaled_{layout}.safetensors", layout=layout))
    for name in style.layers:
        assert loaded.layer_scale(name) == pytest.approx(scaled.layer_scale(name)) == pytest.approx(0.15)
        assert torch.equal(loaded.layers[name].lora_a, style.layers[name].lora_a)


def test_old_diffusers_layout_refuses_a_scale_it_cannot_store(tmp_path, loras):
    subject, _ = loras  # alpha == rank: storable at scale 1 (above), not at 0.5
    with pytest.raises(fe.OptionError, match="scale 0.5"):
        fe.save_lora(fe.load_lora(subject, scale=0.5), tmp_path / "old.safetensors", layout="diffusers")
    assert not (tmp_path / "old.safetensors").exists()


def test_text_encoder_keys_load_as_a_component_or_are_listed_when_left_out(tmp_path, loras):
    subject, _ = loras
    state = lora_to_state_dict(subject, "kohya")
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora_a, lora_b = torch.randn(4, 32), torch.randn(32, 4)
    state[f"{te}.lora_down.weight"], state[f"{te}.lora_up.weight"] = lora_a, lora_b
    state[f"{te}.alpha"] = torch.tensor(2.0)
    save_file(state, tmp_path / "with_te.safetensors")
    loaded = fe.load_lora(tmp_path / "with_te.safetensors")
    assert len(loaded.layers) == len(subject.layers) and not loaded.ignored
    text = loaded.for_component("text_encoder")
    assert list(text.layers) == ["text_model.encoder.layers.0.self_attn.q_proj"] and text.component == "text_encoder"
    layer = text.layers["text_model.encoder.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_a, lora_a) and torch.equal(layer.lora_b, lora_b) and layer.alpha == 2.0
    assert loaded.for_component("text_encoder_2") is None and loaded.for_component("unet").layers == loaded.layers

    left_out = fe.load_lora(tmp_path / "with_te.safetensors", text_encoder=False)
    assert set(left_out.components) == {"unet"}
    assert left_out.ignored and all(k.startswith("text_encoder.") for k in left_out.ignored)


def test_state_dict_input_and_different_ranks_per_layer(loras):
    subject, style = loras
    mixed = dict(lora_to_state_dict(subject, "kohya"))
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    key = "lora_unet_" + name.replace(".", "_")
    mixed[f"{key}.lora_down.weight"] = style.layers[name].lora_a
    mixed[f"{key}.lora_up.weight"] = style.layers[name].lora_b
    loaded = fe.load_lora(mixed)
    assert loaded.layers[name].rank == 8 and loaded.ranks() == [4, 8]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(fe.LoRAFormatError, match="nope.safetensors"):
        fe.load_lora(tmp_path / "nope.safetensors")


def test_not_safetensors_names_the_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a safetensors header" * 4)
    with pytest.raises(fe.LoRAFormatError, match="garbage.safetensors"):
        fe.load_lora(bad)


def test_rank_disagreement_names_layer_and_shapes():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"unet.{name}.lora_A.weight": torch.randn(4, 64), f"unet.{name}.lora_B.weight": torch.randn(64, 3)}
    with pytest.raises(fe.LoRAFormatError, match=r"to_q.*ranks disagree.*\(4, 64\).*\(64, 3\)"):
        fe.load_lora(state)


def test_nan_weights_are_refused():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    up = torch.randn(64, 4)
    up[3, 1] = float("nan")
    with pytest.raises(fe.LoRAFormatError, match="to_q.*NaN"):
        fe.load_lora({f"unet.{name}.lora_A.weight": torch.randn(4, 64), f"unet.{name}.lora_B.weight": up})


def test_conv_lora_loads_as_conv(tmp_path):
    name = "down_blocks.0.resnets.0.conv1"
    layer = LoRALayer(lora_a=torch.randn(2, 32, 3, 3), lora_b=torch.randn(32, 2, 1, 1), alpha=1.0)
    path = fe.save_lora(LoRA({name: layer}), tmp_path / "locon.safetensors", layout="kohya")
    loaded = fe.load_lora(path)
    assert loaded.layers[name].is_conv and loaded.layer_scale(name) == pytest.approx(0.5)
