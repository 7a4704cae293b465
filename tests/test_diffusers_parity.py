"""diffusers is the outside oracle: the same files through its own LoRA loading give the same UNet output."""
import copy

import pytest
import torch
from conftest import unet_inputs, unet_out

import fusion_engine as fe

pytest.importorskip("peft")
ATOL = 2e-5  # float32; both sides compute x W^T + s (x A^T) B^T, only the rounding order differs


def _files(tmp_path, loras, layout):
    subject, style = loras
    if layout == "diffusers":  # the old layout has no alpha: give the style alpha == rank
        style = fe.LoRA({n: fe.LoRALayer(layer.lora_a, layer.lora_b * 0.5, float(layer.rank))
                          for n, layer in style.layers.items()})
    return (fe.save_lora(subject, tmp_path / f"subject_{layout}.safetensors", layout=layout),
            fe.save_lora(style, tmp_path / f"style_{layout}.safetensors", layout=layout))


@pytest.mark.parametrize("layout", ["peft", "kohya", "diffusers"])
@pytest.mark.parametrize("role", ["subject", "style"])
def test_one_lora_matches_load_lora_weights(tmp_path, tiny_pipe, loras, layout, role):
    subject_path, style_path = _files(tmp_path, loras, layout)
    path = subject_path if role == "subject" else style_path
    inputs = unet_inputs(tiny_pipe.unet, batch=2)
    reference = copy.deepcopy(tiny_pipe)
    reference.load_lora_weights(str(path), adapter_name=role)
    expected = unet_out(reference.unet, inputs)
    base = unet_out(tiny_pipe.unet, inputs)
    assert (expected - base).abs().max() > 1e-2, "the LoRA must change the output, or this test proves nothing"

    for policy in ("fls", "klora", "direct"):
        with fe.attach(tiny_pipe.unet, **{role: fe.load_lora(path)}, policy=policy) as fusion:
            fusion.set_step(0, 1)
            got = unet_out(tiny_pipe.unet, inputs)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{layout} {role} {policy}")


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3)])
def test_direct_matches_set_adapters(tmp_path, tiny_pipe, loras, layout, weights):
    subject_path, style_path = _files(tmp_path, loras, layout)
    inputs = unet_inputs(tiny_pipe.unet, batch=2, seed=1)
    reference = copy.deepcopy(tiny_pipe)
    reference.load_lora_weights(str(subject_path), adapter_name="subject")
    reference.load_lora_weights(str(style_path), adapter_name="style")
    reference.set_adapters(["subject", "style"], list(weights))
    expected = unet_out(reference.unet, inputs)

    subject, style = fe.load_lora(subject_path), fe.load_lora(style_path)
    with fe.attach(tiny_pipe.unet, subject, style, policy="direct", weights=weights):
        got = unet_out(tiny_pipe.unet, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_conv_locon_direct_matches_diffusers(tmp_path, tiny_pipe, loras):
    """kohya LoCon: conv layers adapted beside the attention projections."""
    subject, _ = loras
    generator = torch.Generator().manual_seed(5)
    layers = dict(subject.layers)
    for name in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2"):
        conv = tiny_pipe.unet.get_submodule(name)
        out_c, in_c, kh, kw = conv.weight.shape
        layers[name] = fe.LoRALayer(torch.randn(3, in_c, kh, kw, generator=generator) * 0.1,
                                    torch.randn(out_c, 3, 1, 1, generator=generator) * 0.1, alpha=3.0)
    path = fe.save_lora(fe.LoRA(layers), tmp_path / "locon.safetensors", layout="kohya")
    inputs = unet_inputs(tiny_pipe.unet, batch=1, seed=2)
    reference = copy.deepcopy(tiny_pipe)
    reference.load_lora_weights(str(path), adapter_name="locon")
    expected = unet_out(reference.unet, inputs)
    with fe.attach(tiny_pipe.unet, fe.load_lora(path), policy="direct", weights=(1.0, 0.0)):
        got = unet_out(tiny_pipe.unet, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
