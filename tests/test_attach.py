"""attach/detach: exact restoration, refusal without side effects, errors that name the layer."""
import pytest
import torch
from conftest import unet_inputs, unet_out

import fusion_engine as fe
from fusion_engine.runtime.layers import DynamicLoRALayer


def _snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}, {n: m for n, m in unet.named_modules()}


def _assert_untouched(unet, snapshot, inputs, expected):
    state, modules = snapshot
    now = unet.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(m is modules[n] for n, m in unet.named_modules())
    assert not any(isinstance(m, DynamicLoRALayer) for m in unet.modules())
    assert torch.equal(unet_out(unet, inputs), expected)


@pytest.mark.parametrize("policy", ["fls", "direct", "klora", "blora", "switch"])
def test_detach_restores_model_bit_for_bit(tiny_pipe, loras, policy):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=2)
    expected, snapshot = unet_out(unet, inputs), _snapshot(unet)
    fusion = fe.attach(unet, *loras, policy=policy)
    fusion.set_step(0, 10)
    assert sum(isinstance(m, DynamicLoRALayer) for m in unet.modules()) == 32
    assert not torch.equal(unet_out(unet, inputs), expected)
    fusion.detach()
    _assert_untouched(unet, snapshot, inputs, expected)


def test_context_manager_detaches_on_error(tiny_pipe, loras):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    expected, snapshot = unet_out(unet, inputs), _snapshot(unet)
    with pytest.raises(KeyboardInterrupt), fe.attach(unet, *loras):
        raise KeyboardInterrupt
    _assert_untouched(unet, snapshot, inputs, expected)


def test_unknown_target_is_refused_and_model_untouched(tiny_pipe, loras):
    unet = tiny_pipe.unet
    subject, style = loras
    layers = dict(style.layers)
    layers["up_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q"] = next(iter(style.layers.values()))
    inputs = unet_inputs(unet, batch=1)
    expected, snapshot = unet_out(unet, inputs), _snapshot(unet)
    with pytest.raises(fe.AttachError, match=r"attn9\.to_q: no such module"):
        fe.attach(unet, subject, fe.LoRA(layers))
    _assert_untouched(unet, snapshot, inputs, expected)


def test_shape_mismatch_names_layer_and_shapes(tiny_pipe, loras):
    unet = tiny_pipe.unet
    subject, _ = loras
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_k"
    wrong = fe.LoRA({name: fe.LoRALayer(torch.randn(4, 48), torch.randn(64, 4), 4.0)}, source="wrong.safetensors")
    inputs = unet_inputs(unet, batch=1)
    expected, snapshot = unet_out(unet, inputs), _snapshot(unet)
    with pytest.raises(fe.AttachError, match=r"attn1\.to_k: style LoRA \(wrong\.safetensors\).*\(4, 48\).*\(4, 64\)"):
        fe.attach(unet, subject, wrong)
    _assert_untouched(unet, snapshot, inputs, expected)


def test_attaching_twice_is_refused(tiny_pipe, loras):
    unet = tiny_pipe.unet
    fusion = fe.attach(unet, *loras)
    with pytest.raises(fe.AttachError, match="already has a fusion attached"):
        fe.attach(unet, *loras)
    fusion.detach()
    fe.attach(unet, *loras).detach()  # and works again once detached


def test_unknown_options_are_refused(tiny_pipe, loras):
    with pytest.raises(ValueError, match="unknown granularity"):
        fe.attach(tiny_pipe.unet, *loras, granularity="pixel")
    with pytest.raises(ValueError, match="unknown divergence"):
        fe.attach(tiny_pipe.unet, *loras, divergence="wasserstein")
    with pytest.raises(ValueError, match="unknown policy"):
        fe.attach(tiny_pipe.unet, *loras, policy="ziplora")
    with pytest.raises(TypeError, match="'switch' does not take options"):
        fe.attach(tiny_pipe.unet, *loras, policy="switch", pattern="s")
    assert not any(isinstance(m, DynamicLoRALayer) for m in tiny_pipe.unet.modules())


def test_step_policies_need_the_step(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras, policy="klora"), pytest.raises(fe.StepContextError, match="set_step"):
        unet_out(unet, unet_inputs(unet, batch=1))


def test_image_granularity_checks_the_batch_layout(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras) as fusion:
        fusion.set_batch_layout(images=2, copies=2)
        with pytest.raises(fe.StepContextError, match="batch of 3"):
            unet_out(unet, unet_inputs(unet, batch=3))
