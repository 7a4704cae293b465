"""Baseline policies do what docs/METHOD.md says, computed independently here."""
import pytest
import torch
from conftest import unet_inputs, unet_out

import fusion_engine as fe
from fusion_engine.runtime.trace import BASE, BOTH, STYLE, SUBJECT


def _choices(fusion):
    return {fusion.layer_names[r.layer]: int(r.choice[0]) for r in fusion.trace.gather()}


def test_klora_scores_gamma_and_schedule(tiny_pipe, loras):
    subject, style = loras
    unet = tiny_pipe.unet
    fusion = fe.attach(unet, subject, style, policy="klora", pattern="s")
    policy = fusion.policy
    shared = [n for n in subject.layers if n in style.layers]
    ratios, expected_scores = [], {}
    for name in shared:
        subject_layer, style_layer = subject.layers[name], style.layers[name]
        subject_delta = subject.layer_scale(name) * (subject_layer.lora_b.double() @ subject_layer.lora_a.double())
        style_delta = style.layer_scale(name) * (style_layer.lora_b.double() @ style_layer.lora_a.double())
        k = subject.layers[name].rank * style.layers[name].rank
        expected_scores[name] = (subject_delta.abs().flatten().topk(k).values.sum(),
                                 style_delta.abs().flatten().topk(k).values.sum())
        ratios.append(float(subject_delta.abs().sum() / style_delta.abs().sum()))
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    assert policy.gamma == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    for name in shared:
        assert policy.scores[name] == pytest.approx(tuple(float(v) for v in expected_scores[name]), rel=1e-5)

    inputs = unet_inputs(unet, batch=1)
    for step in (0, 7):
        fusion.trace.clear()
        fusion.set_step(step, 10)
        unet_out(unet, inputs)
        scale = 1.5 * step / 10 + 0.5
        for name, choice in _choices(fusion).items():
            if name not in style.layers:
                assert choice == SUBJECT
                continue
            sc, ss = expected_scores[name]
            assert choice == (SUBJECT if float(sc) / policy.gamma > float(ss) * scale else STYLE), (step, name)
    fusion.detach()
    assert fe.make_policy("klora").time_scale(0.5) == pytest.approx((1.5 * 0.5 + 1.275) % 1.5)


def test_switch_alternates_every_tau_steps(tiny_pipe, loras):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    with fe.attach(unet, *loras, policy="switch", tau=2) as fusion:
        for step in range(6):
            fusion.trace.clear()
            fusion.set_step(step, 6)
            unet_out(unet, inputs)
            choices = _choices(fusion)
            want = SUBJECT if (step // 2) % 2 == 0 else STYLE
            shared = [n for n in choices if not n.startswith("mid_block")]
            assert {choices[n] for n in shared} == {want}
            assert {choices[n] for n in choices if n.startswith("mid_block")} == {SUBJECT if want == SUBJECT else BASE}


def test_blora_block_map_and_override(tiny_pipe, loras):
    unet = tiny_pipe.unet
    inputs = unet_inputs(unet, batch=1)
    with fe.attach(unet, *loras, policy="blora") as fusion:
        unet_out(unet, inputs)
        for name, choice in _choices(fusion).items():
            want = (SUBJECT if name.startswith("up_blocks.0.attentions.0.") else
                    STYLE if name.startswith("up_blocks.0.attentions.1.") else BASE)
            assert choice == want, name
    blocks = {"subject": ["mid_block"], "style": ["down_blocks.1"]}
    with fe.attach(unet, *loras, policy="blora", blocks=blocks) as fusion:
        unet_out(unet, inputs)
        choices = _choices(fusion)
        assert {choices[n] for n in choices if n.startswith("mid_block")} == {SUBJECT}
        assert {choices[n] for n in choices if n.startswith("down_blocks.1")} == {STYLE}
    with pytest.raises(fe.AttachError, match="no fused layer lies in"):
        fe.attach(unet, *loras, policy="blora", blocks={"subject": ["nowhere"]})


def test_direct_trace_says_both(tiny_pipe, loras):
    unet = tiny_pipe.unet
    with fe.attach(unet, *loras, policy="direct") as fusion:
        unet_out(unet, unet_inputs(unet, batch=1))
        assert set(_choices(fusion).values()) == {BOTH, SUBJECT}  # mid block: subject only


def test_composite_averages_the_two_single_lora_predictions(tiny_pipe, loras):
    subject, style = loras
    pipe_kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="latent", progress=False)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    got = fe.FusionPipeline(tiny_pipe, subject, style, policy="composite")("a dog", latents=latents, **pipe_kwargs)

    # Independent loop: a single-LoRA direct attach per pass, averaged, then CFG, then Euler.
    pipe, unet, scheduler = tiny_pipe, tiny_pipe.unet, tiny_pipe.scheduler
    cond, uncond = pipe.encode_prompt("a dog", "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    scheduler.set_timesteps(3)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        passes = []
        for lora_pair in ((subject, None), (None, style)):
            with fe.attach(unet, *lora_pair, policy="direct"), torch.no_grad():
                passes.append(unet(model_in, t, encoder_hidden_states=embeds).sample)
        uncond_eps, cond_eps = ((passes[0] + passes[1]) / 2).chunk(2)
        x = scheduler.step(uncond_eps + 4.0 * (cond_eps - uncond_eps), t, x).prev_sample
    torch.testing.assert_close(got.images, x, atol=1e-5, rtol=1e-5)
