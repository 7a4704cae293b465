"""FLUX.1 and SD3 files: the family is recognised from keys and metadata, kohya's fused projections split as the
fused layer computes them, and what diffusers cannot convert (or a LoRA of another family) is refused by name."""
import copy

import pytest
import torch
from dit_models import kohya_flux_state_dict, linear_names, peft_state_dict, random_factors, tiny_flux_pipeline
from safetensors.torch import save_file

import fusion_engine as fe
from fusion_engine.cli import main
from fusion_engine.errors import LoRALayoutError, ModelMismatchError, OptionError
from fusion_engine.integration.attach import attached_pipeline
from fusion_engine.lora.families import detect_family

KEYS = {
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": "flux",  # kohya/BFL
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": "flux",  # ComfyUI
    "double_blocks.0.processor.qkv_lora1.down.weight": "flux",  # XLabs
    "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": "flux",  # diffusers/ai-toolkit
    "single_transformer_blocks.0.proj_mlp.lora_A.weight": "flux",  # PEFT without the prefix
    "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": "sd3",  # SD3.5's second attention
    "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": "sd3",  # SAI/kohya SD3
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": "dit",  # fits FLUX.1 and SD3 alike
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": "sd-unet",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight": "sd-unet",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": "sd-unet",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": "sd-unet",  # no metadata: SD loader
}


@pytest.mark.parametrize("key", list(KEYS))
def test_family_from_keys(key):
    assert detect_family([key]) == KEYS[key]


@pytest.mark.parametrize(("value", "family"), [("flux1", "flux"), ("sd3", "sd3"), ("sdxl_base_v1-0", "dit")])
def test_metadata_decides_what_keys_leave_open(value, family):
    """kohya's ss_base_model_version names a transformer's family; it never overrides keys of another family."""
    keys = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert detect_family(keys, {"ss_base_model_version": value}) == family
    assert detect_family(keys, {"modelspec.architecture": "flux-1-dev/lora"}) == "flux"


def test_keys_of_two_families_are_refused():
    with pytest.raises(LoRALayoutError, match=r"more than one model family: .*lora_unet_down_blocks.*double_blocks"):
        detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                       "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], source="mixed.safetensors")


@pytest.mark.parametrize("sparse", [False, True])
def test_kohya_linear1_splits_into_q_k_v_mlp_at_flux_dev_widths(sparse):
    """Single blocks' fused linear1 (q, k, v and the MLP input in one Linear of FLUX.1-dev's 3072 -> 21504): the
    split layers, stacked, compute the file's alpha / rank * up @ down (a float64 check, no diffusers involved)."""
    rank, width, mlp = 8, 3072, 12288
    dims = (width, width, width, mlp)
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(rank, width, generator=generator, dtype=torch.float64)
    up = torch.randn(sum(dims), rank, generator=generator, dtype=torch.float64)
    if sparse:  # block-diagonal up (four rank-2 LoRAs merged): diffusers splits it into four rank-2 layers
        mask, start = torch.zeros_like(up), 0
        for i, dim in enumerate(dims):
            mask[start:start + dim, 2 * i:2 * i + 2] = 1
            start += dim
        up = up * mask
    key = "lora_unet_single_blocks_0_linear1"
    lora = fe.load_lora({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                         f"{key}.alpha": torch.tensor(3.0, dtype=torch.float64)})
    names = [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert sorted(lora.layers) == sorted(names) and lora.family == "flux"
    assert lora.ranks() == [2 if sparse else rank]
    stacked = torch.cat([lora.layer_scale(n) * lora.layers[n].lora_b.double() @ lora.layers[n].lora_a.double()
                         for n in names])
    torch.testing.assert_close(stacked, 3.0 / rank * up @ down, rtol=1e-12, atol=1e-12)


def test_kohya_linear1_at_other_widths_names_diffusers_converter(tmp_path):
    """diffusers splits linear1 at FLUX.1-dev's fixed widths; on other widths its converter fails: said so."""
    path = tmp_path / "small_flux.safetensors"
    save_file(kohya_flux_state_dict(blocks=0, single_blocks=1, width=32, mlp=128, rank=4, seed=0, linear1=True),
              str(path))
    with pytest.raises(LoRALayoutError, match=r"small_flux.safetensors: diffusers' FLUX.1 converter "
                                              r"\(FluxPipeline.lora_state_dict\) cannot convert"):
        fe.load_lora(path)


def test_sd3_kohya_file_is_refused_by_name(tmp_path):
    path = tmp_path / "sd3_kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(96, 4)}, str(path))
    with pytest.raises(LoRALayoutError, match=r"sd3_kohya.safetensors: an SD3 LoRA in SAI/kohya naming "
                                              r"\(lora_unet_joint_blocks_0_x_block_attn_qkv"):
        fe.load_lora(path)


def test_flux_kohya_dora_is_refused_not_dropped():
    """diffusers' FLUX loader drops dora_scale with a warning; a silent plain LoRA here would be a wrong result."""
    state = kohya_flux_state_dict(blocks=1, single_blocks=0, width=32, mlp=128, rank=4, seed=0)
    state["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.rand(32, 1) + 0.5
    with pytest.raises(LoRALayoutError, match=r"kohya DoRA magnitudes \(lora_unet_double_blocks_0_img_attn_proj"
                                              r".dora_scale\) in a FLUX.1 LoRA"):
        fe.load_lora(state)


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline(seed=0)


def test_unet_lora_on_flux_pipeline_names_both_families(tmp_path, flux_pipe, tiny_pipe, loras):
    """Before: the SD LoRA vanished (no 'transformer' part) or the error blamed SD1.5 vs SDXL."""
    path = fe.save_lora(loras[0], tmp_path / "sd_subject.safetensors", layout="kohya")
    pipe = copy.deepcopy(flux_pipe)
    with pytest.raises(ModelMismatchError, match=r"sd_subject.safetensors\) is made for SD1.x/SDXL UNet \(from "
                                                 r"its keys\), but this model is FLUX.1 \(FluxTransformer2DModel\)"):
        fe.attach(pipe, fe.load_lora(path))
    assert attached_pipeline(pipe) is None and not any("Dynamic" in type(m).__name__
                                                          for m in pipe.transformer.modules())
    flux_file = tmp_path / "flux.safetensors"
    save_file(kohya_flux_state_dict(blocks=1, single_blocks=0, width=32, mlp=128, rank=4, seed=0), str(flux_file))
    with pytest.raises(ModelMismatchError, match=r"is made for FLUX.1 \(from its keys\), but this model is "
                                                 r"SD1.x/SDXL UNet \(UNet2DConditionModel\)"):
        fe.attach(tiny_pipe.unet, fe.load_lora(flux_file))


def test_flux_lora_on_sd3_model_names_both_families_even_where_shapes_fit(tmp_path, flux_pipe):
    from dit_models import tiny_sd3_pipeline

    sd3 = tiny_sd3_pipeline(seed=0).transformer
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q"]
    factors = random_factors(flux_pipe.transformer, names, rank=2, seed=0)
    lora = fe.load_lora(peft_state_dict(factors))
    assert lora.family == "flux"
    before = {name: p.data_ptr() for name, p in sd3.named_parameters()}
    with pytest.raises(ModelMismatchError, match=r"made for FLUX.1 .* this model is SD3/SD3.5"):
        fe.attach(sd3, lora.for_component("transformer"))
    assert {name: p.data_ptr() for name, p in sd3.named_parameters()} == before


def test_size_mismatch_within_a_family_says_so(flux_pipe):
    """FLUX-dev-sized factors on the tiny FLUX: same family, another size."""
    factors = {"transformer_blocks.0.attn.to_q": (torch.randn(2, 3072), torch.randn(3072, 2)),
               "single_transformer_blocks.0.proj_mlp": (torch.randn(2, 3072), torch.randn(12288, 2))}
    lora = fe.load_lora(peft_state_dict(factors))
    with pytest.raises(ModelMismatchError, match=r"another base model: the file is made for FLUX.1 \(from "
                                                 r"its keys\), this model is FLUX.1 \(FluxTransformer2DModel\) "
                                                 r"of another size"):
        fe.attach(copy.deepcopy(flux_pipe.transformer), lora)


def test_inspect_reports_family_and_transformer_layers(tmp_path, capsys):
    path = tmp_path / "flux_kohya.safetensors"
    save_file(kohya_flux_state_dict(blocks=1, single_blocks=1, width=32, mlp=128, rank=4, seed=0), str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:  kohya" in out and "family:  flux (FLUX.1)" in out
    assert "layers:  16 transformer layers (0 conv)" in out
    assert "transformer_blocks.0.attn.add_k_proj  rank=4 alpha=4" in out  # alpha / rank folded, as diffusers does


def test_transformer_lora_round_trips_in_peft_layout_only(tmp_path, flux_pipe):
    names = linear_names(flux_pipe.transformer)[:5]
    lora = fe.load_lora(peft_state_dict(random_factors(flux_pipe.transformer, names, rank=3, seed=1)))
    loaded = fe.load_lora(fe.save_lora(lora, tmp_path / "t.safetensors"))
    assert loaded.component == "transformer" and sorted(loaded.layers) == sorted(names)
    for name in names:
        assert torch.equal(loaded.layers[name].lora_a, lora.layers[name].lora_a)
    with pytest.raises(OptionError, match="'kohya' is written for UNet LoRAs only"):
        fe.save_lora(lora, tmp_path / "k.safetensors", layout="kohya")
