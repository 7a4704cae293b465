"""DoRA as PEFT/diffusers apply it (diffusers is the oracle), FLS with a DoRA branch against a float64
oracle written with forward hooks, and LyCORIS kinds refused by name."""
import copy

import pytest
import torch
from conftest import unet_inputs, unet_out
from safetensors.torch import save_file

import fusion_engine as fe
from fusion_engine.errors import LoRALayoutError, OptionError
from fusion_engine.lora import lora_to_state_dict

pytest.importorskip("peft")
ATOL = 2e-5


def with_magnitudes(lora, model, seed):
    """``lora`` as DoRA: magnitudes near the row norms of the base weight (as DoRA starts), perturbed."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, layer in lora.layers.items():
        norms = model.get_submodule(name).weight.detach().flatten(1).norm(dim=1)
        magnitude = norms * (0.5 + torch.rand(norms.shape, generator=generator))
        layers[name] = fe.LoRALayer(layer.lora_a, layer.lora_b, layer.alpha, magnitude=magnitude)
    return fe.LoRA(layers, layout="peft")


def diffusers_written_dora(pipe, path):
    """What diffusers' DoRA training writes: PEFT adapters with use_dora, saved by save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_dora=True))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.mul_(1 + 0.5 * torch.rand(parameter.shape, generator=generator)).add_(
                    0.2 * torch.randn(parameter.shape, generator=generator))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(str(path), unet_lora_layers=state)
    return path / "pytorch_lora_weights.safetensors"


def diffusers_unet_out(pipe, source, inputs):
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(source, adapter_name="dora")
    return unet_out(reference.unet, inputs)


def test_diffusers_written_dora_file_matches_load_lora_weights(tmp_path, tiny_pipe):
    path = diffusers_written_dora(tiny_pipe, tmp_path)
    lora = fe.load_lora(path)
    assert lora.is_dora and all(layer.is_dora for layer in lora.layers.values())
    inputs = unet_inputs(tiny_pipe.unet, batch=2)
    expected = diffusers_unet_out(tiny_pipe, str(path), inputs)
    assert (expected - unet_out(tiny_pipe.unet, inputs)).abs().max() > 1e-2
    for policy in ("fls", "direct"):
        with fe.attach(tiny_pipe.unet, lora, policy=policy, granularity="sample"):
            got = unet_out(tiny_pipe.unet, inputs)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=policy)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_peft_and_kohya_dora_files_match_diffusers(tmp_path, tiny_pipe, loras, scale):
    """alpha != rank and a user scale: both enter the norm, as PEFT's set_adapters weight does. diffusers'
    SD loader drops kohya ``dora_scale`` (with a warning), so the kohya file is checked against diffusers
    on the PEFT file holding the same numbers."""
    _, style = loras  # rank 8, alpha 4
    dora = with_magnitudes(style, tiny_pipe.unet, seed=1)
    peft_path = fe.save_lora(dora, tmp_path / "dora_peft.safetensors", layout="peft")
    kohya_path = fe.save_lora(dora, tmp_path / "dora_kohya.safetensors", layout="kohya")
    inputs = unet_inputs(tiny_pipe.unet, batch=2, seed=3)
    reference = copy.deepcopy(tiny_pipe)
    reference.load_lora_weights(str(peft_path), adapter_name="dora")
    reference.set_adapters(["dora"], [scale])
    expected = unet_out(reference.unet, inputs)
    for path in (peft_path, kohya_path):
        lora = fe.load_lora(path, scale=scale)
        assert all(layer.is_dora for layer in lora.layers.values()), path
        with fe.attach(tiny_pipe.unet, style=lora, policy="fls", granularity="sample"):
            got = unet_out(tiny_pipe.unet, inputs)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=str(path))


class DoRAOracle:
    """FLS (KL, one group per sample) from the definitions, float64, with forward hooks on the base layers."""

    def __init__(self, model, subject, style):
        self.decisions = {}
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(name, subject, style))
                        for name in sorted(set(subject.layers) | set(style.layers))]

    @staticmethod
    def branch(lora, name, module, x, y0):
        """The branch's output minus the base output: the DoRA layer per the DoRA paper (norm per output row)."""
        if lora is None or name not in lora.layers:
            return None
        layer = lora.layers[name]
        s = layer.alpha / layer.rank * lora.scale
        merged = module.weight + s * layer.lora_b.double() @ layer.lora_a.double()
        if layer.magnitude is None:
            return x @ (merged - module.weight).T
        adapted = layer.magnitude.double()[:, None] * merged / merged.norm(dim=1, keepdim=True)
        bias = 0 if module.bias is None else module.bias
        return x @ adapted.T + bias - y0

    def _hook(self, name, subject, style):
        def hook(module, inputs, y0):
            x = inputs[0]
            d_subject, d_style = self.branch(subject, name, module, x, y0), self.branch(style, name, module, x, y0)
            if d_subject is None or d_style is None:
                return y0 + (d_subject if d_style is None else d_style)

            def kl(d):
                p1, p0 = torch.softmax(y0 + d, -1), torch.softmax(y0, -1)
                return (p1 * (p1.log() - p0.log())).sum(-1).flatten(1).mean(1)  # mean over each sample's tokens

            take_subject = kl(d_subject) >= kl(d_style)
            self.decisions[name] = take_subject
            shape = (-1,) + (1,) * (y0.ndim - 1)
            return y0 + torch.where(take_subject.reshape(shape), d_subject, d_style)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_fls_with_a_dora_branch_matches_float64_oracle(tiny_pipe, loras):
    subject, style = loras
    subject = with_magnitudes(subject, tiny_pipe.unet, seed=2)  # DoRA subject against a plain LoRA style
    unet = copy.deepcopy(tiny_pipe.unet).double()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in unet_inputs(unet, batch=3, seed=4))
    oracle = DoRAOracle(unet, subject, style)
    expected = unet_out(unet, inputs)
    oracle.remove()
    with fe.attach(unet, subject, style, policy="fls", granularity="sample") as fusion:
        got = unet_out(unet, inputs)
        records = fusion.trace.gather()
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    decided = {fusion.layer_names[r.layer]: r.choice.bool() for r in records}
    assert set(oracle.decisions) <= set(decided)
    assert all(torch.equal(decided[name], oracle.decisions[name]) for name in oracle.decisions)
    assert all(decided[name].all() for name in set(decided) - set(oracle.decisions))  # subject only: it is taken
    both = torch.cat(list(oracle.decisions.values()))
    assert both.any() and not both.all(), "both branches must win somewhere, or the selection is untested"


def test_triton_backend_refuses_dora_at_attach(tiny_pipe, loras):
    subject = with_magnitudes(loras[0], tiny_pipe.unet, seed=2)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    with pytest.raises(OptionError, match=r"backend 'triton' does not run DoRA layers \(32 here"):
        fe.attach(tiny_pipe.unet, subject, loras[1], backend="triton")
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.unet) is None
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())


def test_kohya_dora_scale_per_input_column_is_refused_by_name(loras):
    _, style = loras
    state = lora_to_state_dict(style, "kohya")
    key = next(k for k in state if k.endswith(".lora_down.weight"))
    state[key.replace(".lora_down.weight", ".dora_scale")] = torch.rand(1, state[key].shape[1]) + 0.5
    with pytest.raises(LoRALayoutError, match=r"dora_scale' \(1, 64\) is a DoRA magnitude per input column"):
        fe.load_lora(state)


@pytest.mark.parametrize("kind, keys", [
    ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    ("LoKr", ("lokr_w1", "lokr_w2_a", "lokr_w2_b")),
])
def test_lycoris_kinds_are_refused_by_name(tmp_path, kind, keys):
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{prefix}.{key}": torch.randn(4, 4) for key in keys}
    state[f"{prefix}.alpha"] = torch.tensor(4.0)
    save_file(state, tmp_path / f"{kind}.safetensors")
    with pytest.raises(LoRALayoutError, match=f"{kind}.safetensors: a LyCORIS {kind} file .* {kind} is not supported") \
            as error:
        fe.load_lora(tmp_path / f"{kind}.safetensors")
    assert "renamed" not in str(error.value)  # not diffusers' key dump


def test_a_magnitude_that_does_not_fit_the_model_fails_at_attach(tiny_pipe, loras):
    subject = with_magnitudes(loras[0], tiny_pipe.unet, seed=2)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = subject.layers[name]
    subject.layers[name] = fe.LoRALayer(layer.lora_a, layer.lora_b, layer.alpha, magnitude=layer.magnitude[:-3])
    misshaped = f"{name}: subject LoRA .* DoRA magnitude of shape \\(61,\\)"
    with pytest.raises(fe.errors.ModelMismatchError, match=misshaped):
        fe.attach(tiny_pipe.unet, subject)
    assert fe.runtime.fusion.attached_fusion(tiny_pipe.unet) is None
