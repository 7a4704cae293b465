"""The fusion node against ComfyUI's own LoRA loading, and against fe.attach in diffusers."""
import comfy_helpers as ch
import pytest
import torch
from comfy_helpers import unload_after_each_test  # noqa: F401 (autouse: unload ComfyUI's models after each test)

from fusion_engine.comfyui.fuse import call_options, fusion_state
from fusion_engine.comfyui.nodes import FuseSubjectStyleLoRA


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    ch.write_lora(folder, "subject_kohya.safetensors", ch.make_lora_state(11, "kohya"))
    ch.write_lora(folder, "style_diffusers.safetensors", ch.make_lora_state(22, "diffusers"))
    ch.register_loras(folder)
    return folder


@pytest.fixture(scope="module")
def base():
    return ch.build_tiny_patcher()


def fuse(model, subject, style, policy="fls", s1=1.0, s2=1.0, **kw):
    node = FuseSubjectStyleLoRA()
    fused, _ = node.fuse(model, subject or "None", s1, style or "None", s2, policy, kw.pop("divergence", "kl"),
                         kw.pop("granularity", "image"), **kw)
    return fused


def test_direct_equals_lora_loader_twice(base, loras):
    pos, neg = ch.make_conds()
    fused = fuse(base, "subject_kohya.safetensors", "style_diffusers.safetensors", "direct", 0.8, 1.3)
    (once,) = ch.LoraLoaderModelOnly().load_lora_model_only(base, "subject_kohya.safetensors", 0.8)
    (twice,) = ch.LoraLoaderModelOnly().load_lora_model_only(once, "style_diffusers.safetensors", 1.3)
    plain = ch.sample(base, pos, neg)
    ours, theirs = ch.sample(fused, pos, neg), ch.sample(twice, pos, neg)
    assert (ours - plain).abs().max() > 1e-2  # the LoRAs change the image
    ch.assert_fp32_close(ours, theirs)
    assert len(fusion_state(fused).layers) == len(ch.lora_modules())


def test_subject_only_equals_lora_loader(base, loras):
    pos, neg = ch.make_conds(seed=3)
    for policy in ("fls", "direct", "klora"):
        fused = fuse(base, "subject_kohya.safetensors", None, policy, 0.7)
        model, _ = ch.LoraLoader().load_lora(base, None, "subject_kohya.safetensors", 0.7, 0.0)
        ch.assert_fp32_close(ch.sample(fused, pos, neg), ch.sample(model, pos, neg))


def diffusers_twin(patcher):
    """The same tiny weights as a diffusers UNet2DConditionModel, converted by ComfyUI's own key table."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=ch.CTX_DIM,
        attention_head_dim=8, norm_num_groups=32, use_linear_projection=False,
    )
    comfy_state = patcher.model.diffusion_model.state_dict()
    table = ch.comfy.utils.unet_to_diffusers(ch.TINY_UNET_CONFIG)
    converted = {key: comfy_state[comfy_key] for key, comfy_key in table.items() if comfy_key in comfy_state}
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return unet.eval()


@pytest.mark.parametrize("policy,granularity", [("fls", "image"), ("fls", "token"), ("klora", "image")])
def test_decisions_and_output_match_fe_attach_in_diffusers(base, loras, policy, granularity):
    """One denoiser call (cond + uncond batched) in ComfyUI with the node, and the same latent, sigma and conditioning
    through fe.attach in diffusers: every layer decides the same, and the outputs agree to fp32 rounding."""
    pe = ch.pe
    import fusion_engine as fe

    ch.write_lora(loras, "style_kohya.safetensors", ch.make_lora_state(22, "kohya"))
    fused = fuse(base, "subject_kohya.safetensors", "style_kohya.safetensors", policy, 0.9, 1.1,
                 granularity=granularity, backend="reference")
    seen = {}

    def spy(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen.update(x=args[0].clone(), t=args[1].clone(), context=args[2].clone(), out=out.clone(),
                    chunks=list(call_options(args, kwargs)["cond_or_uncond"]))
        return out

    fused.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_spy", spy)
    pos, neg = ch.make_conds(seed=5)
    ch.sample(fused, pos, neg, steps=1)  # euler, one step: one denoiser call
    assert sorted(seen["chunks"]) == [0, 1]  # cond and uncond in one batch
    node_trace = fusion_state(fused).trace

    unet = diffusers_twin(base)
    subject = fe.load_lora(str(loras / "subject_kohya.safetensors"), scale=0.9)
    style = fe.load_lora(str(loras / "style_kohya.safetensors"), scale=1.1)
    with torch.no_grad(), fe.attach(unet, subject, style, policy=policy, granularity=granularity,
                                    backend="reference") as fusion:
        fusion.set_batch_layout(images=1, copies=2)
        fusion.set_step(0, 1)
        out = unet(seen["x"], seen["t"], encoder_hidden_states=seen["context"]).sample
        attach_trace = fusion.trace
        assert sorted(fusion.layer_names) == sorted(node_trace.layer_names)
    ch.assert_fp32_close(seen["out"], out, rtol=1e-5)
    ours = {node_trace.layer_names[r.layer]: r.choice for r in node_trace.gather()}
    theirs = {attach_trace.layer_names[r.layer]: r.choice for r in attach_trace.gather()}
    assert len(ours) == len(ch.lora_modules()) and ours.keys() == theirs.keys()
    differing = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not differing, differing
    if policy == "fls":  # both LoRAs win somewhere: the comparison covers both branches
        chosen = torch.cat([c.flatten() for c in ours.values()])
        assert chosen.min() == 0 and chosen.max() == 1
