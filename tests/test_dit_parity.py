"""FLUX.1 and SD3: diffusers is the oracle. A LoRA file in each layout real trainers write, loaded by diffusers'
``load_lora_weights`` and by ``fe.load_lora`` + ``fe.attach(pipe, ...)``, gives the same full pipeline call."""
import copy

import pytest
import torch
from dit_models import (
    kohya_flux_state_dict,
    linear_names,
    peft_state_dict,
    random_factors,
    run,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    xlabs_flux_state_dict,
)
from safetensors.torch import save_file

import fusion_engine as fe

pytest.importorskip("peft")
ATOL = 2e-5  # float32; both sides compute x W^T + s (x A^T) B^T, only the rounding order differs
POLICIES = ("fls", "direct", "klora")


@pytest.fixture(scope="module")
def flux_master():
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3_master():
    return tiny_sd3_pipeline(seed=0)


def _flux_file(tmp_path, pipe, layout):
    """(path, how diffusers loads it, the transformer modules it adapts) for one FLUX layout."""
    transformer = pipe.transformer
    every = linear_names(transformer)
    if layout == "kohya":
        state = kohya_flux_state_dict(blocks=1, single_blocks=1, width=32, mlp=128, rank=4, seed=1)
    elif layout == "comfyui":
        state = kohya_flux_state_dict(blocks=1, single_blocks=1, width=32, mlp=128, rank=4, seed=9, comfyui=True)
    elif layout == "kohya-sparse-qkv":
        state = kohya_flux_state_dict(blocks=1, single_blocks=1, width=32, mlp=128, rank=6, seed=2, sparse_qkv=True)
    elif layout == "xlabs":
        state = xlabs_flux_state_dict(rank=4, width=32, seed=3)
    elif layout == "peft-alpha":  # TheLastBen-style: PEFT keys with .alpha
        # not the top-level proj_out: PEFT's alpha_pattern "proj_out" also matches single blocks' proj_out, so
        # diffusers gives that layer the top-level layer's alpha (a diffusers/PEFT quirk; here each layer keeps its own)
        factors = random_factors(transformer, [n for n in every if n != "proj_out"], rank=4, seed=4)
        state = peft_state_dict(factors, alphas={name: 2.0 + i % 3 for i, name in enumerate(factors)})
    elif layout == "ai-toolkit":  # every Linear of every block, norms' linears included, alpha == rank
        factors = random_factors(transformer, [n for n in every if "blocks" in n], rank=4, seed=5)
        state = peft_state_dict(factors)
    elif layout == "peft-no-prefix":  # PEFT saved from the bare transformer: diffusers needs prefix=None
        factors = random_factors(transformer, [n for n in every if "attn" in n or "proj" in n], rank=4, seed=6)
        state = peft_state_dict(factors, prefix="")
    path = tmp_path / f"flux_{layout}.safetensors"
    save_file(state, str(path))
    return path


def _diffusers_loaded(pipe, path, no_prefix: bool, name: str = "lora"):
    reference = copy.deepcopy(pipe)
    if no_prefix:
        reference.transformer.load_lora_adapter(str(path), prefix=None, adapter_name=name)
    else:
        reference.load_lora_weights(str(path), adapter_name=name)
    return reference


def _check_one_lora(pipe, path, expected, role, family):
    lora = fe.load_lora(path)
    assert lora.family == family and lora.component == "transformer"
    for policy in POLICIES:
        with fe.attach(pipe, **{role: lora}, policy=policy) as fusion:
            got = run(pipe)
        assert len(fusion.layers) == len(lora.layers)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{path.name} {role} {policy}")


FLUX_LAYOUTS = ["kohya", "comfyui", "kohya-sparse-qkv", "xlabs", "peft-alpha", "ai-toolkit", "peft-no-prefix"]


@pytest.mark.parametrize("layout", FLUX_LAYOUTS)
def test_flux_one_lora_matches_load_lora_weights(tmp_path, flux_master, layout):
    pipe = copy.deepcopy(flux_master)
    path = _flux_file(tmp_path, pipe, layout)
    expected = run(_diffusers_loaded(pipe, path, no_prefix=layout == "peft-no-prefix"))
    assert (expected - run(pipe)).abs().max() > 1e-2, "the LoRA must change the output, or this test proves nothing"
    _check_one_lora(pipe, path, expected, "subject" if layout != "xlabs" else "style", "flux")


def _sd3_file(tmp_path, pipe, layout):
    transformer = pipe.transformer
    factors = random_factors(transformer, linear_names(transformer, skip=("time_text_embed",)), rank=4, seed=7)
    if layout == "peft-metadata":  # diffusers' save_lora_weights: alphas (!= rank) in the PEFT config
        names = sorted(factors)
        lora = fe.LoRA({n: fe.LoRALayer(*factors[n], alpha=2.0 if i % 2 else 8.0) for i, n in enumerate(names)},
                       component="transformer")
        return fe.save_lora(lora, tmp_path / "sd3_peft.safetensors", layout="peft")
    path = tmp_path / f"sd3_{layout}.safetensors"
    save_file(peft_state_dict(factors, prefix="" if layout == "peft-no-prefix" else "transformer."), str(path))
    return path


@pytest.mark.parametrize("layout", ["peft-metadata", "peft", "peft-no-prefix"])
def test_sd3_one_lora_matches_load_lora_weights(tmp_path, sd3_master, layout):
    pipe = copy.deepcopy(sd3_master)
    path = _sd3_file(tmp_path, pipe, layout)
    expected = run(_diffusers_loaded(pipe, path, no_prefix=layout == "peft-no-prefix"))
    assert (expected - run(pipe)).abs().max() > 1e-2, "the LoRA must change the output, or this test proves nothing"
    family = "dit"  # SD3 PEFT keys name no SD3-only module unless the file adapts attn2 or pos_embed
    if any("attn2" in name for name in fe.load_lora(path).layers):
        family = "sd3"
    _check_one_lora(pipe, path, expected, "subject", family)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_direct_matches_set_adapters(tmp_path, flux_master, sd3_master, model):
    pipe = copy.deepcopy(flux_master if model == "flux" else sd3_master)
    if model == "flux":
        subject_path, style_path = _flux_file(tmp_path, pipe, "kohya"), _flux_file(tmp_path, pipe, "peft-alpha")
    else:
        subject_path = _sd3_file(tmp_path, pipe, "peft-metadata")
        style_path = tmp_path / "sd3_style.safetensors"
        factors = random_factors(pipe.transformer, linear_names(pipe.transformer, skip=("time_text_embed",)), 2, 8)
        save_file(peft_state_dict(factors), str(style_path))
    reference = _diffusers_loaded(pipe, subject_path, False, "subject")
    reference.load_lora_weights(str(style_path), adapter_name="style")
    reference.set_adapters(["subject", "style"], [1.0, 1.0])
    expected = run(reference, seed=3)
    with fe.attach(pipe, fe.load_lora(subject_path), fe.load_lora(style_path), policy="direct"):
        got = run(pipe, seed=3)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_flux_kohya_file_with_clip_parts_matches_load_lora_weights(tmp_path, flux_master, tiny_pipe):
    """kohya FLUX files carry CLIP-L layers as lora_te1_*: diffusers loads them into pipe.text_encoder (alpha / rank
    folded in), and fe.attach(pipe, ...) fuses that component too."""
    clip = tiny_pipe.text_encoder
    pipe = copy.deepcopy(flux_master)
    pipe.register_modules(text_encoder=copy.deepcopy(clip), tokenizer=tiny_pipe.tokenizer)
    state = kohya_flux_state_dict(blocks=1, single_blocks=0, width=32, mlp=128, rank=4, seed=11)
    generator = torch.Generator().manual_seed(12)
    for name, module in clip.named_modules():
        # out_proj included: diffusers recognises the old text-encoder key layout by "to_out_lora" only
        if type(module) is torch.nn.Linear and name.endswith(("q_proj", "v_proj", "out_proj", "fc1")):
            key = "lora_te1_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "flux_with_clip.safetensors"
    save_file(state, str(path))
    tokens = tiny_pipe.tokenizer(["a sbu dog in szn style"], padding="max_length", return_tensors="pt").input_ids

    def outputs(pipe):
        with torch.no_grad():
            return pipe.text_encoder(tokens)[1], run(pipe)

    reference = _diffusers_loaded(pipe, path, no_prefix=False)
    expected_text, expected = outputs(reference)
    base_text, _ = outputs(pipe)
    assert (expected_text - base_text).abs().max() > 1e-2, "the CLIP part must matter, or this test proves nothing"
    lora = fe.load_lora(path)
    assert sorted(lora.components) == ["text_encoder", "transformer"] and lora.family == "flux"
    copies = {k: v.clone() for k, v in state.items()}
    assert fe.load_lora(state).for_component("text_encoder").layers.keys() == lora.components["text_encoder"].keys()
    assert all(torch.equal(state[k], copies[k]) for k in state), "loading must not scale the caller's tensors"
    with fe.attach(pipe, lora):
        got_text, got = outputs(pipe)
    torch.testing.assert_close(got_text, expected_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
