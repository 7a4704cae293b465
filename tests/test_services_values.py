"""Issue 11, numbers that were accepted without a word: every one is now a library error naming the value and
where it came from (the argument, the file and key, or the layer after the cast to the model's dtype)."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from timeouts import time_limit  # noqa: F401  (autouse: every test here fails instead of hanging)

import fusion_engine as fe
from fusion_engine import errors
from fusion_engine.policies import make_policy
from fusion_engine.runtime.layers import DynamicLoRALayer

TIME_LIMIT_S = 60
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + LAYER.replace(".", "_")
NON_FINITE = [float("nan"), float("inf"), -float("inf"), 1e39]  # 1e39: finite in Python, Inf in float32


def _kohya(alpha: torch.Tensor):
    return {f"{KOHYA}.lora_down.weight": torch.randn(4, 64), f"{KOHYA}.lora_up.weight": torch.randn(64, 4),
            f"{KOHYA}.alpha": alpha}


@pytest.mark.parametrize("scale", NON_FINITE + ["1", None, True])
def test_load_lora_scale_must_be_a_finite_number(loras, scale):
    state = _kohya(torch.tensor(4.0))
    with pytest.raises(errors.OptionError, match=rf"load_lora\(<state_dict>\): scale={re.escape(repr(scale))}"):
        fe.load_lora(state, scale=scale)
    with pytest.raises(errors.OptionError, match=rf"with_scale: scale={re.escape(repr(scale))}"):
        loras[0].with_scale(scale)


def test_float64_alpha_that_is_inf_in_float32_names_the_key(tmp_path):
    with pytest.raises(errors.LoRAValueError, match=rf"key '{KOHYA}\.alpha' \(\) float64: alpha 1e\+300 is Inf in "
                                                    "float32"):
        fe.load_lora(_kohya(torch.tensor(1e300, dtype=torch.float64)))
    path = tmp_path / "peft.safetensors"  # the same alpha from a PEFT adapter config in the metadata
    save_file({f"unet.{LAYER}.lora_A.weight": torch.randn(4, 64), f"unet.{LAYER}.lora_B.weight": torch.randn(64, 4)},
              str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1e300})})
    with pytest.raises(errors.LoRAValueError, match=rf"peft\.safetensors: layer {LAYER}: alpha 1e\+300 is Inf in "
                                                    "float32"):
        fe.load_lora(path)


def _state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _unchanged(unet, before):
    after = unet.state_dict()
    return (not any(isinstance(m, DynamicLoRALayer) for m in unet.modules()) and before.keys() == after.keys()
            and all(torch.equal(before[k], after[k]) for k in before))


def test_factor_that_overflows_in_the_float16_model_is_refused_at_attach(tiny_pipe, loras):
    """Finite in the file (A = 7e4, B = 1e-6: the product is 0.28), Inf once cast to float16."""
    unet = tiny_pipe.unet.half()
    subject, style = loras
    name = sorted(subject.layers)[3]
    layer = subject.layers[name]
    layers = dict(subject.layers)
    layers[name] = fe.LoRALayer(torch.full_like(layer.lora_a, 7e4), torch.full_like(layer.lora_b, 1e-6), layer.alpha)
    big = fe.LoRA(layers, source="big.safetensors")
    before = _state(unet)
    with pytest.raises(errors.LoRAValueError, match=rf"big\.safetensors: layer {name}: lora_a \(4, \d+\) float32 "
                                                    r"overflows to Inf when cast to the model's float16 \(largest "
                                                    r"\|value\| 70000"):
        fe.attach(unet, big, style)
    assert _unchanged(unet, before)
    fe.attach(tiny_pipe.unet.float(), big, style).detach()  # the same LoRA fits a float32 model


def test_effective_scale_that_overflows_float32_is_refused_at_attach(tiny_pipe, loras):
    subject, style = loras
    name = sorted(subject.layers)[0]
    layer = subject.layers[name]
    huge = fe.LoRA({name: fe.LoRALayer(layer.lora_a, layer.lora_b, 3e38)}, source="huge.safetensors", scale=10.0)
    before = _state(tiny_pipe.unet)
    with pytest.raises(errors.LoRAValueError, match=rf"huge\.safetensors: layer {name}: effective scale alpha / rank "
                                                    r"\* scale = 7\.5e\+38 is not finite in float32"):
        fe.attach(tiny_pipe.unet, huge, style)
    assert _unchanged(tiny_pipe.unet, before)


@pytest.mark.parametrize("policy, options, message", [
    ("direct", {"weights": (float("nan"), 1.0)}, r"direct: weights=\(nan, 1\.0\): the subject weight nan"),
    ("direct", {"weights": (1.0, float("inf"))}, r"the style weight inf is not finite"),
    ("direct", {"weights": (1.0, 1e39)}, r"the style weight 1e\+39 is not finite in float32"),
    ("direct", {"weights": (1.0,)}, r"direct: weights must be two numbers .*got \(1\.0,\)"),
    ("direct", {"weights": "ab"}, r"direct: weights must be two numbers .*got 'ab'"),
    ("switch", {"tau": 0}, r"switch: tau must be a whole number of steps >= 1, got 0"),
    ("switch", {"tau": -3}, r"got -3"),
    ("switch", {"tau": 2.5}, r"got 2\.5"),
    ("switch", {"tau": float("nan")}, r"got nan"),
    ("switch", {"tau": float("inf")}, r"got inf"),
    ("switch", {"tau": True}, r"got True"),
    ("klora", {"pattern": "z"}, r"klora: unknown pattern 'z'"),
    ("fls", {"divergence": "l2"}, r"unknown divergence 'l2'"),
    ("blora", {"blocks": "up_blocks.0"}, r"blora: blocks must be a dict"),
    ("blora", {"blocks": {"subject": "up_blocks.0"}}, r"blora: blocks\['subject'\] must be a list"),
    ("blora", {"blocks": {"content": ["up_blocks.0"]}}, r"block map keys must be 'subject' and 'style'"),
    ("nope", {}, r"unknown policy 'nope'"),
])
def test_bad_policy_options_are_option_errors(tiny_pipe, loras, policy, options, message):
    with pytest.raises(errors.OptionError, match=message):
        make_policy(policy, **options)
    before = _state(tiny_pipe.unet)
    with pytest.raises(errors.OptionError, match=message):
        fe.attach(tiny_pipe.unet, *loras, policy=policy, **options)
    assert _unchanged(tiny_pipe.unet, before)


def test_good_policy_options_still_work():
    assert make_policy("direct", weights=[0.5, 2]).weights(None, None) == (0.5, 2.0)
    assert make_policy("direct", weights=(torch.tensor(0.5), 1)).subject_weight == 0.5
    assert make_policy("switch", tau=3.0).tau == 3
