"""SDXL architecture (linear proj_in/out, ADM conditioning, B-LoRA's preset blocks) in ComfyUI's real code."""
import comfy_helpers as ch
import pytest
import torch
from comfy_helpers import unload_after_each_test  # noqa: F401 (autouse: unload ComfyUI's models after each test)

from fusion_engine.comfyui.fuse import diffusers_names, fusion_state
from fusion_engine.comfyui.nodes import FuseSubjectStyleLoRA
from fusion_engine.runtime.trace import BASE, STYLE, SUBJECT

POOLED = 32
TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": ch.CTX_DIM, "adm_in_channels": POOLED + 6 * 256,
    "num_classes": "sequential",
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def build_tiny_sdxl(seed=0):
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_SDXL))
    config.unet_config["num_head_channels"] = 16
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name and name.endswith("weight")
                    else torch.randn(p.shape, generator=g) * (0.02 if name.endswith("bias") else 0.08))
    return ch.comfy.model_patcher.ModelPatcher(model, load_device=ch.mm.get_torch_device(),
                                               offload_device=ch.mm.unet_offload_device())


def sgm_lora(patcher, seed, keep=lambda diffusers_name: True, rank=4, scale=0.25):
    """kohya LoRA in SGM key names (lora_unet_output_blocks_0_1_...), as SDXL trainers write them, on every attention
    projection whose diffusers name ``keep`` accepts."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    modules = dict(patcher.model.named_modules())
    for path, name in sorted(diffusers_names(patcher).items()):
        module = modules.get(path)
        if not (isinstance(module, torch.nn.Linear) and ".attn" in name):
            continue
        key = "lora_unet_" + path[len("diffusion_model."):].replace(".", "_")
        down = torch.randn(rank, module.in_features, generator=g) * scale  # drawn for every layer: a cut file
        up = torch.randn(module.out_features, rank, generator=g) * scale  # holds the same factors as the whole one
        if keep(name):
            state.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                          key + ".alpha": torch.tensor(float(rank))})
    return state


def conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, 7, ch.CTX_DIM, generator=g), {"pooled_output": torch.randn(1, POOLED, generator=g)}]],
            [[torch.randn(1, 7, ch.CTX_DIM, generator=g), {"pooled_output": torch.randn(1, POOLED, generator=g)}]])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras_sdxl")
    patcher = build_tiny_sdxl()
    block = {"subject": "up_blocks.0.attentions.0.", "style": "up_blocks.0.attentions.1."}
    ch.write_lora(folder, "xl_subject.safetensors", sgm_lora(patcher, 1))
    ch.write_lora(folder, "xl_style.safetensors", sgm_lora(patcher, 2))
    for seed, role in ((1, "subject"), (2, "style")):
        cut = sgm_lora(patcher, seed, lambda name, role=role: name.startswith(block[role]))
        ch.write_lora(folder, f"xl_{role}_block.safetensors", cut)
    ch.register_loras(folder)
    return patcher


def fuse(model, policy):
    fused, _ = FuseSubjectStyleLoRA().fuse(model, "xl_subject.safetensors", 1.0, "xl_style.safetensors", 1.0, policy,
                                           "kl", "image")
    return fused


def lora_loader_twice(model, first, second):
    (once,) = ch.LoraLoaderModelOnly().load_lora_model_only(model, first, 1.0)
    return ch.LoraLoaderModelOnly().load_lora_model_only(once, second, 1.0)[0]


def test_sdxl_direct_equals_lora_loader_twice(sdxl):
    pos, neg = conds()
    ours = ch.sample(fuse(sdxl, "direct"), pos, neg)
    ch.assert_fp32_close(ours, ch.sample(lora_loader_twice(sdxl, "xl_subject.safetensors", "xl_style.safetensors"),
                                         pos, neg))
    assert (ours - ch.sample(sdxl, pos, neg)).abs().max() > 1e-2


def test_sdxl_blora_preset_takes_its_blocks_by_their_diffusers_names(sdxl):
    """B-LoRA's SDXL preset names diffusers blocks; ComfyUI's SGM modules are renamed by ComfyUI's table, so the
    preset finds them: the result equals LoraLoader with each LoRA cut to its block."""
    pos, neg = conds(seed=2)
    fused = fuse(sdxl, "blora")
    ours = ch.sample(fused, pos, neg)
    theirs = ch.sample(lora_loader_twice(sdxl, "xl_subject_block.safetensors", "xl_style_block.safetensors"), pos, neg)
    ch.assert_fp32_close(ours, theirs)
    trace = fusion_state(fused).trace
    codes = {trace.layer_names[r.layer]: int(r.choice[0]) for r in trace.gather()}
    assert {codes[n] for n in codes if n.startswith("up_blocks.0.attentions.0.")} == {SUBJECT}
    assert {codes[n] for n in codes if n.startswith("up_blocks.0.attentions.1.")} == {STYLE}
    assert {codes[n] for n in codes if not n.startswith("up_blocks.0.attentions.")} == {BASE}


def test_sdxl_fls_samples_and_both_loras_win_somewhere(sdxl):
    pos, neg = conds(seed=3)
    fused = fuse(sdxl, "fls")
    ch.sample(fused, pos, neg)
    chosen = torch.cat([r.choice for r in fusion_state(fused).trace.gather()])
    assert set(chosen.tolist()) == {SUBJECT, STYLE}
