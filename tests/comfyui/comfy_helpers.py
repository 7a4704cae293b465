"""Shared pieces of the ComfyUI node tests (which take ComfyUI's modules from here, after the skip below): a tiny
SD1.5-architecture model built inside ComfyUI (no checkpoint),
LoRA files in kohya and diffusers layouts written to a registered loras folder, and sampling helpers."""
import os
import sys

import pytest
import torch

# Before any `import comfy`: ComfyUI's argument parser reads these when first imported. (This lives here, not in a
# conftest.py of this folder: tests/ is no package, so a second conftest.py would take the module name `conftest`
# from tests/conftest.py, whose helpers the main suite imports by that name.)
os.environ.setdefault("COMFYUI_CPU", "true")
os.environ.setdefault("COMFYUI_DISABLE_KNOWN_MODELS", "true")
for flag in ("--cpu", "--disable-known-models"):
    if flag not in sys.argv:
        sys.argv.append(flag)

HOW_TO = ("ComfyUI cannot be imported ({}): these tests need it. pip install ComfyUI from its git repository (e.g. the "
          "pip-installable fork: pip install git+https://github.com/hiddenswitch/ComfyUI), or run .ci/comfyui, which "
          "unpacks the vendored copy into a venv of its own; see docs/COMFYUI.md")
try:
    import comfy.model_management  # noqa: F401
except ImportError as error:
    if os.environ.get("COMFYUI_REQUIRED"):  # .ci/comfyui just installed ComfyUI: a skip there would hide 27 tests
        raise
    pytest.skip(HOW_TO.format(error), allow_module_level=True)

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension as pe  # noqa: E402, F401 (for the test modules)
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import safetensors.torch  # noqa: E402
from comfy.nodes.base_nodes import LoraLoader, LoraLoaderModelOnly  # noqa: E402, F401 (for the test modules)

from fusion_engine.comfyui.fuse import folder_paths_module  # noqa: E402

torch.set_num_threads(1)

TINY_UNET_CONFIG = {  # comfy.model_detection's SD15 key set, scaled down (vendor tiny_comfy.py)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CTX_DIM = 32

# kohya module names (diffusers paths with _) and their in/out sizes in the tiny UNet
ATTN = {"down_blocks_0_attentions_0_transformer_blocks_0": 32, "down_blocks_1_attentions_0_transformer_blocks_0": 64,
        "mid_block_attentions_0_transformer_blocks_0": 64, "up_blocks_0_attentions_0_transformer_blocks_0": 64,
        "up_blocks_1_attentions_1_transformer_blocks_0": 32}


def build_tiny_patcher(seed=0):
    model_config = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def lora_modules(kinds=("attn1", "attn2", "ff", "proj")):
    """(kohya module name, in, out, conv) of the layers a test LoRA targets."""
    out = []
    for block, dim in ATTN.items():
        if "attn1" in kinds:
            out += [(f"lora_unet_{block}_attn1_{p}", dim, dim, False) for p in ("to_q", "to_k", "to_v", "to_out_0")]
        if "attn2" in kinds:
            out += [(f"lora_unet_{block}_attn2_to_q", dim, dim, False),
                    (f"lora_unet_{block}_attn2_to_k", CTX_DIM, dim, False),
                    (f"lora_unet_{block}_attn2_to_v", CTX_DIM, dim, False)]
        if "ff" in kinds:
            out += [(f"lora_unet_{block}_ff_net_2", dim * 4, dim, False)]
        if "proj" in kinds:
            attn = block[: -len("_transformer_blocks_0")]
            out += [(f"lora_unet_{attn}_proj_in", dim, dim, True), (f"lora_unet_{attn}_proj_out", dim, dim, True)]
    return out


def make_lora_state(seed, layout="kohya", rank=4, scale=0.25, kinds=("attn1", "attn2", "ff", "proj")):
    """A LoRA state dict for the tiny UNet: ``kohya`` (lora_unet_..., lora_up/lora_down, alpha) or ``diffusers``
    (no alpha; attention layers as diffusers' attention processors, ``unet.<...>.processor.to_q_lora.up.weight``,
    the rest as PEFT keys, ``unet.<path>.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, fan_in, fan_out, conv in lora_modules(kinds):
        down = torch.randn(rank, fan_in, generator=g) * scale
        up = torch.randn(fan_out, rank, generator=g) * scale
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if layout == "kohya":
            state[name + ".lora_down.weight"] = down
            state[name + ".lora_up.weight"] = up
            state[name + ".alpha"] = torch.tensor(float(rank) / 2)
        elif ".attn" in diffusers_path(name):  # diffusers' attention-processor keys, the form ComfyUI maps
            path = "unet." + diffusers_path(name).replace(".to_", ".processor.to_").replace(".to_out.0", ".to_out")
            state[path + "_lora.down.weight"] = down
            state[path + "_lora.up.weight"] = up
        else:  # PEFT keys
            path = "unet." + diffusers_path(name)
            state[path + ".lora_A.weight"] = down
            state[path + ".lora_B.weight"] = up
    return state


def diffusers_path(kohya_name: str) -> str:
    """lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q -> down_blocks.0.attentions.0...to_q"""
    table = kohya_to_diffusers()
    return table[kohya_name]


_TABLE = {}


def kohya_to_diffusers():
    if not _TABLE:
        for diffusers_key in comfy.utils.unet_to_diffusers(TINY_UNET_CONFIG):
            path = diffusers_key[: -len(".weight")] if diffusers_key.endswith(".weight") else None
            if path:
                _TABLE["lora_unet_" + path.replace(".", "_")] = path
    return _TABLE


def write_lora(folder, filename, state):
    path = os.path.join(folder, filename)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def register_loras(folder):
    folder_paths = folder_paths_module()
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder_paths


def make_conds(seed=1, tokens=7, batch=1):
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(batch, tokens, CTX_DIM, generator=g), {}]]
    neg = [[torch.randn(batch, tokens, CTX_DIM, generator=g), {}]]
    return pos, neg


def sample(patcher, pos, neg, steps=3, seed=42, cfg=4.0, sampler="euler", latent=None, noise=None, unload=True):
    if latent is None:
        latent = torch.zeros(1, 4, 8, 8)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, "normal", pos, neg, latent, denoise=1.0,
                              disable_pbar=True, seed=seed)
    if unload:
        mm.unload_all_models()
    return out


def assert_fp32_close(actual, expected, rtol=1e-4):
    """Equal up to float32 rounding accumulated through a few denoising steps: relative to the output's scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(autouse=True)
def unload_after_each_test():
    """The fork's clones keep their own load bookkeeping: unload after every test so no test samples another's
    patched model (vendor NOTES.md). Autouse in every test module that imports it."""
    yield
    mm.unload_all_models()
