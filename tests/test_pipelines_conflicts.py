"""No silent conflicts with diffusers features: LoRA scale, disable/enable_lora, fused QKV, saving while
attached, copies of attached models, attribute access, calls diffusers would run wrong, unknown layouts."""
import copy
import warnings

import pytest
import torch
from conftest import unet_inputs, unet_out

import fusion_engine as fe
from fusion_engine import errors
from fusion_engine.runtime.layers import DynamicLoRALayer

CALL = dict(prompt="a sbu dog in szn style", num_inference_steps=2, guidance_scale=4.0, output_type="latent")


def _forward(unet, inputs, **kwargs):
    sample, t, context = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context, **kwargs).sample


def test_cross_attention_scale_scales_both_loras(tiny_pipe, loras):
    unet, (subject, style) = tiny_pipe.unet, loras
    inputs = unet_inputs(unet, batch=1)
    with fe.attach(unet, subject.with_scale(0.5), style.with_scale(0.5), policy="direct"):
        expected = _forward(unet, inputs)
    with fe.attach(unet, subject, style, policy="direct"):
        full = _forward(unet, inputs)
        got = _forward(unet, inputs, cross_attention_kwargs={"scale": 0.5})
        assert torch.equal(_forward(unet, inputs), full), "the scale holds for one forward only"
        zero = _forward(unet, inputs, cross_attention_kwargs={"scale": 0.0})
        with pytest.raises(errors.OptionError, match=r"cross_attention_kwargs\['scale'\].*nan"):
            _forward(unet, inputs, cross_attention_kwargs={"scale": float("nan")})
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(zero, unet_out(unet, inputs), atol=1e-6, rtol=1e-6)


def test_disable_and_enable_lora_act_on_the_fusion(tiny_pipe, loras):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    base = unet_out(unet, inputs)
    with fe.attach(tiny_pipe, *loras):
        fused = unet_out(unet, inputs)
        tiny_pipe.disable_lora()
        assert torch.equal(unet_out(unet, inputs), base)
        tiny_pipe.enable_lora()
        assert torch.equal(unet_out(unet, inputs), fused)
    assert "disable_lora" not in vars(unet) and not torch.equal(fused, base)


def test_fused_qkv_projections_are_refused_with_the_way_out(tiny_pipe, loras):
    unet = tiny_pipe.unet
    unet.fuse_qkv_projections()
    with pytest.raises(errors.AttachError, match=r"fused q/k/v projections.*unfuse_qkv_projections\(\)"):
        fe.attach(unet, *loras)
    assert not any(isinstance(m, DynamicLoRALayer) for m in unet.modules())
    unet.unfuse_qkv_projections()
    with fe.attach(unet, *loras), pytest.raises(errors.AttachError,
                                                match="fuse_qkv_projections.*drop the LoRAs of 32 fused layers"):
        tiny_pipe.fuse_qkv_projections()


def test_state_dict_and_save_pretrained_while_attached_are_the_base_models(tmp_path, tiny_pipe, loras):
    from diffusers import UNet2DConditionModel

    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    base_state, base_out = {k: v.clone() for k, v in unet.state_dict().items()}, unet_out(unet, inputs)
    with fe.attach(unet, *loras):
        state = unet.state_dict()
        unet.save_pretrained(tmp_path / "unet")
        unet.load_state_dict(base_state)  # base-model keys load into the fused layers' base layers
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(unet_out(reloaded, inputs), base_out)


def test_detach_all_strips_a_copy_of_an_attached_model_and_pipeline(tiny_pipe, loras):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    base_out = unet_out(unet, inputs)
    with fe.attach(tiny_pipe, *loras):
        unet_copy, pipe_copy = copy.deepcopy(unet), copy.deepcopy(tiny_pipe)
    assert any(isinstance(m, DynamicLoRALayer) for m in unet_copy.modules())
    with pytest.raises(errors.AlreadyAttachedError):
        fe.attach(unet_copy, *loras)
    for model in (fe.detach_all(unet_copy), fe.detach_all(pipe_copy.unet)):
        assert not any(isinstance(m, DynamicLoRALayer) for m in model.modules())
        assert not model._forward_pre_hooks and not model._forward_hooks and "disable_lora" not in vars(model)
        assert torch.equal(unet_out(model, inputs), base_out)
        fe.attach(model, *loras).detach()  # attachable again


def test_attribute_access_reaches_the_base_layer_or_says_why(tiny_pipe, loras):
    unet = tiny_pipe.unet
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    base = unet.get_submodule(name)
    with fe.attach(unet, *loras):
        layer = unet.get_submodule(name)
        assert isinstance(layer, DynamicLoRALayer)
        assert layer.weight is base.weight and layer.bias is base.bias
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
        with pytest.raises(AttributeError, match=r"attn1\.to_q.*no attribute 'lora_A'.*base layer"):
            _ = layer.lora_A


@pytest.mark.parametrize("options, pattern", [
    ({"guidance_scale": float("nan")}, r"guidance_scale .* got nan"),
    ({"guidance_scale": -3.0}, r"guidance_scale .* got -3\.0"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be a whole number >= 1, got 0"),
    ({"num_inference_steps": -2}, r"num_inference_steps must be a whole number >= 1, got -2"),
])
def test_calls_diffusers_would_run_wrong_are_refused(tiny_pipe, loras, options, pattern):
    with fe.attach(tiny_pipe, *loras), pytest.raises(errors.OptionError, match=pattern):
        tiny_pipe(**{**CALL, **options})
    with pytest.raises(errors.OptionError, match=pattern):
        fe.FusionPipeline(tiny_pipe, *loras)(**{**CALL, **options})
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.unet) is None


def test_unknown_layout_under_image_granularity_warns_once_with_the_way_out(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras):
        with pytest.warns(UserWarning, match=r"no batch layout.*fe\.attach\(pipe.*set_batch_layout"):
            unet_out(unet, unet_inputs(unet, batch=2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            unet_out(unet, unet_inputs(unet, batch=2))  # once per attach
    with fe.attach(unet, *loras, granularity="sample"), warnings.catch_warnings():
        warnings.simplefilter("error")
        unet_out(unet, unet_inputs(unet, batch=2))


def test_attach_on_pipe_outside_a_call_is_the_plain_unet_attach(tiny_pipe, loras):
    """Between pipeline calls no layout or step lingers from the last call."""
    unet = tiny_pipe.unet
    with fe.attach(tiny_pipe, *loras, policy="switch") as fusion:
        tiny_pipe(**CALL)
        assert fusion.context.step is None and fusion.context.images is None
        with pytest.raises(errors.StepContextError, match="set_step"):
            unet_out(unet, unet_inputs(unet, batch=1))


def test_lean_loop_refuses_what_it_does_not_implement(tiny_pipe, loras):
    import diffusers

    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="composite")
    with pytest.raises(errors.OptionError, match=r"guidance_rescale, prompt_embeds: policy 'composite' runs .*own"):
        pipe(**CALL, guidance_rescale=0.7, prompt_embeds=torch.zeros(1, 7, 32))
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    with pytest.raises(errors.OptionError, match="drives StableDiffusionPipeline, StableDiffusionXLPipeline, "
                                                 "FluxPipeline, StableDiffusion3Pipeline only, "
                                                 "not StableDiffusionImg2ImgPipeline"):
        fe.FusionPipeline(img2img, *loras, policy="composite")
    with pytest.raises(errors.OptionError, match="subject_prompt: LLR arguments, but .* no refine"):
        fe.FusionPipeline(tiny_pipe, *loras)(**CALL, subject_prompt="a dog")


def test_fusion_pipeline_uses_the_pipelines_own_defaults_and_arguments(tiny_pipe, loras):
    """guidance_scale defaults to the pipeline's (7.5 for SD 1.x); every argument reaches the pipeline."""
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, pipe.guidance_scale))
        return {}

    out = fe.FusionPipeline(tiny_pipe, *loras)("a dog", num_inference_steps=2, output_type="latent",
                                               callback_on_step_end=callback, progress=False)
    assert seen == [(0, 7.5), (1, 7.5)] and out.trace.steps == [0, 1]
    images, trace = fe.FusionPipeline(tiny_pipe, *loras)("a dog", num_inference_steps=2, output_type="latent",
                                                         return_dict=False)
    assert images.shape == (1, 4, 16, 16) and trace.steps == [0, 1]
