"""Issue 11, K-LoRA: top-k scores cached across FusionPipeline calls and attaches (bounded, keyed by content),
and a zero-delta LoRA (scale 0, all-zero B) counts as absent instead of dividing by zero."""
import pytest
import torch
from conftest import unet_inputs, unet_out
from timeouts import time_limit  # noqa: F401  (autouse: every test here fails instead of hanging)

import fusion_engine as fe
from fusion_engine.policies import klora

TIME_LIMIT_S = 120
CALL = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", progress=False)


@pytest.fixture
def counted(monkeypatch):
    """Every top-k score computed (one per branch and layer), with an empty cache at the start."""
    klora.clear_score_cache()
    calls = []
    original = klora.topk_abs_sum

    def topk_abs_sum(delta, k):
        calls.append(k)
        return original(delta, k)

    monkeypatch.setattr(klora, "topk_abs_sum", topk_abs_sum)
    yield calls
    klora.clear_score_cache()


def test_second_pipeline_call_does_not_recompute_scores(tiny_pipe, loras, counted):
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="klora")
    first = pipe("a dog", generator=torch.Generator().manual_seed(0), **CALL)
    both = sum(1 for name in loras[0].layers if name in loras[1].layers)
    assert len(counted) == 2 * both
    second = pipe("a dog", generator=torch.Generator().manual_seed(0), **CALL)
    assert len(counted) == 2 * both  # the second call hashed the factors and found every score
    assert torch.equal(first.images, second.images)


def test_cache_is_keyed_by_content_not_by_object(tiny_pipe, loras, counted):
    subject, style = loras
    with fe.attach(tiny_pipe.unet, subject, style, policy="klora") as fusion:
        scores, gamma = dict(fusion.policy.scores), fusion.policy.gamma
    computed = len(counted)
    copy = fe.LoRA({n: fe.LoRALayer(la.lora_a.clone(), la.lora_b.clone(), la.alpha)
                    for n, la in subject.layers.items()})
    with fe.attach(tiny_pipe.unet, copy, style, policy="klora") as fusion:  # equal content, new tensors
        assert fusion.policy.scores == scores and fusion.policy.gamma == gamma
    assert len(counted) == computed
    with fe.attach(tiny_pipe.unet, subject.with_scale(0.5), style, policy="klora") as fusion:
        assert all(fusion.policy.scores[n][0] < scores[n][0] for n in scores)  # another scale: subject recomputed
    assert len(counted) == computed + computed // 2
    klora.clear_score_cache()
    with fe.attach(tiny_pipe.unet, subject, style, policy="klora") as fusion:  # cached == computed afresh
        assert fusion.policy.scores == scores and fusion.policy.gamma == gamma


def test_cache_is_bounded(tiny_pipe, loras, counted, monkeypatch):
    monkeypatch.setattr(klora, "SCORE_CACHE_SIZE", 5)
    for scale in (1.0, 0.5, 0.25):
        fe.attach(tiny_pipe.unet, loras[0].with_scale(scale), loras[1], policy="klora").detach()
        assert len(klora._score_cache) <= 5


@pytest.mark.parametrize("zero", ["scale", "lora_b"])
def test_zero_delta_subject_counts_as_absent(tiny_pipe, loras, zero):
    """The issue's ZeroDivisionError: every layer now takes the style, as a style-only fusion does."""
    subject, style = loras
    if zero == "scale":
        subject = subject.with_scale(0.0)
    else:
        subject = fe.LoRA({n: fe.LoRALayer(la.lora_a, torch.zeros_like(la.lora_b), la.alpha)
                           for n, la in subject.layers.items()})
    unet, inputs = tiny_pipe.unet, unet_inputs(tiny_pipe.unet, batch=2)
    with fe.attach(unet, subject, style, policy="klora") as fusion:
        assert fusion.policy.gamma == 1.0
        for step in range(4):
            fusion.set_step(step, 4)
            out = unet_out(unet, inputs)
            assert torch.isfinite(out).all()
            assert all(fusion.policy.weights(layer, fusion.context) == (0.0, 1.0)
                       for layer in fusion.layers if layer.has_style)
    with fe.attach(unet, None, style, policy="direct", weights=(0.0, 1.0)):
        expected = unet_out(unet, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_zero_delta_style_leaves_the_subject(tiny_pipe, loras):
    subject, style = loras
    with fe.attach(tiny_pipe.unet, subject, style.with_scale(0.0), policy="klora") as fusion:
        fusion.set_step(0, 2)
        assert all(fusion.policy.weights(layer, fusion.context) == (1.0, 0.0) for layer in fusion.layers)
