"""LLR: one guided step against an independent autograd computation, m=0 exactness, R goes down."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusion_engine as fe
from fusion_engine.refine import ReferenceEmbeddings, Refiner, llr_objective
from fusion_engine.refine.compiled import CompiledOrEager
from fusion_engine.refine.gradient import shape_gradient
from fusion_engine.scoring.encoders import tiny_dino, tiny_openclip
from fusion_engine.worlds.random import RANDOM_FUSED_PROMPT, RANDOM_STYLE_PROMPT, RANDOM_SUBJECT_PROMPT

CFG = 5.0


@pytest.fixture(scope="module")
def encoders():
    return tiny_openclip(seed=0), tiny_dino(seed=1)


def _noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _references(seed=0):
    generator = torch.Generator().manual_seed(100 + seed)
    return torch.rand(1, 3, 32, 32, generator=generator), torch.rand(1, 3, 32, 32, generator=generator)


def _set_scheduler(pipe, name, prediction):
    import diffusers

    config = {**pipe.scheduler.config, "prediction_type": prediction}
    pipe.scheduler = getattr(diffusers, name).from_config(config)


def _independent_guided_step(pipe, loras, clip, dino, references, noise, m, prediction, dino_reference="style"):
    """x_{t-1} - m * grad R for a 1-step run, written out here from the equations (docs/METHOD.md, Part 2)."""
    scheduler, unet, vae = pipe.scheduler, pipe.unet, pipe.vae
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    cond, uncond = pipe.encode_prompt(RANDOM_FUSED_PROMPT, "cpu", 1, True)
    subject_image, style_image = references
    x = (noise * scheduler.init_noise_sigma).requires_grad_(True)
    with torch.enable_grad(), fe.attach(unet, *loras, policy="fls", backend="reference") as fusion:
        fusion.set_batch_layout(1, 2)
        fusion.set_step(0, 1)
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
        uncond_out, cond_out = unet(model_input, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        out = uncond_out + CFG * (cond_out - uncond_out)
        if type(scheduler).__name__ == "EulerDiscreteScheduler":
            sigma = scheduler.sigmas[0]
            x0 = {"epsilon": x - sigma * out,
                  "v_prediction": x / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5 * out,
                  "sample": out}[prediction]
        else:  # DDIM: alpha-parameterised
            alpha_bar = scheduler.alphas_cumprod[int(t)]
            x0 = {"epsilon": (x - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5,
                  "v_prediction": alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * out,
                  "sample": out}[prediction]
        image = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        clip_image = clip(image)
        s1 = F.cosine_similarity(clip_image, clip(subject_image), dim=-1)
        s2 = F.cosine_similarity(clip_image, clip(style_image), dim=-1)
        dino_ref = style_image if dino_reference == "style" else subject_image
        s3 = F.cosine_similarity(dino(image), dino(dino_ref), dim=-1)
        objective = 1 - (s1 + s2 + s3) / 3
        (grad,) = torch.autograd.grad(objective.sum(), x)
    previous = scheduler.step(out.detach(), t, x.detach(), return_dict=False)[0]
    return previous - m * grad, grad


@pytest.mark.parametrize("scheduler, prediction", [
    ("EulerDiscreteScheduler", "epsilon"),
    ("EulerDiscreteScheduler", "v_prediction"),
    ("DDIMScheduler", "v_prediction"),
    ("DDIMScheduler", "sample"),
])
def test_one_guided_step_matches_independent_autograd(tiny_pipe, loras, encoders, scheduler, prediction):
    _set_scheduler(tiny_pipe, scheduler, prediction)
    clip, dino = encoders
    references, noise, m = _references(), _noise(), 10.0
    pipe = fe.FusionPipeline(tiny_pipe, *loras, policy="fls", refine=Refiner(clip, dino, m=m))
    got = pipe(RANDOM_FUSED_PROMPT, latents=noise, num_inference_steps=1, guidance_scale=CFG, output_type="latent",
               reference_images=references, progress=False).images
    expected, grad = _independent_guided_step(tiny_pipe, loras, clip, dino, references, noise, m, prediction)
    assert grad.abs().max() > 0, "the objective must depend on x_t"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dino_against_the_subject_option(tiny_pipe, loras, encoders):
    clip, dino = encoders
    references, noise = _references(), _noise()
    refiner = Refiner(clip, dino, m=10.0, dino_reference="subject")
    got = fe.FusionPipeline(tiny_pipe, *loras, refine=refiner)(
        RANDOM_FUSED_PROMPT, latents=noise, num_inference_steps=1, guidance_scale=CFG, output_type="latent",
        reference_images=references, progress=False).images
    expected, _ = _independent_guided_step(tiny_pipe, loras, clip, dino, references, noise, 10.0, "epsilon",
                                           dino_reference="subject")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _run(pipe, seed, steps=3, **kw):
    return pipe(RANDOM_FUSED_PROMPT, num_inference_steps=steps, guidance_scale=CFG, output_type="latent",
                progress=False, generator=torch.Generator().manual_seed(seed), **kw)


def test_m_zero_reproduces_the_unguided_sampler_bit_for_bit(tiny_pipe, loras, encoders):
    refined = fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=0.0))
    out = _run(refined, 3, subject_prompt=RANDOM_SUBJECT_PROMPT, style_prompt=RANDOM_STYLE_PROMPT)
    plain = _run(fe.FusionPipeline(tiny_pipe, *loras), 3)
    assert out.images.numpy().tobytes() == plain.images.numpy().tobytes()
    assert out.trace.to_dict() == plain.trace.to_dict()


def test_references_come_from_each_lora_alone_with_the_same_seed(tiny_pipe, loras, encoders):
    refined = fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=1.0))
    subject_ref, style_ref = _run(refined, 5, subject_prompt=RANDOM_SUBJECT_PROMPT,
                                  style_prompt=RANDOM_STYLE_PROMPT).references
    kw = dict(num_inference_steps=3, guidance_scale=CFG, output_type="pt", progress=False)
    alone_subject = fe.FusionPipeline(tiny_pipe, loras[0], None, policy="direct")(
        RANDOM_SUBJECT_PROMPT, generator=torch.Generator().manual_seed(5), **kw).images
    alone_style = fe.FusionPipeline(tiny_pipe, None, loras[1], policy="direct")(
        RANDOM_STYLE_PROMPT, generator=torch.Generator().manual_seed(5), **kw).images
    assert torch.equal(subject_ref, alone_subject) and torch.equal(style_ref, alone_style)


def test_refinement_lowers_the_objective(tiny_pipe, loras, encoders):
    """Averaged over seeds, the refined result scores a lower R than the unguided one (same seed, same refs).

    The tiny random encoders embed every image almost alike (R ~ 2e-4), so the effect is small in absolute
    terms; m=100 makes it stand well clear of float32 rounding (m=10 also lowers R, by ~1%).
    """
    clip, dino = encoders
    refined = fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(clip, dino, m=100.0))
    plain = fe.FusionPipeline(tiny_pipe, *loras)
    gains = []
    for seed in range(3):
        out = _run(refined, seed, subject_prompt=RANDOM_SUBJECT_PROMPT, style_prompt=RANDOM_STYLE_PROMPT)
        unguided = _run(plain, seed).images
        references = ReferenceEmbeddings.of(clip, dino, *out.references, batch=1)
        with torch.no_grad():
            r_refined = llr_objective(tiny_pipe.vae, clip, dino, out.images, references)[0]
            r_plain = llr_objective(tiny_pipe.vae, clip, dino, unguided, references)[0]
        gains.append((r_plain - r_refined).item() / r_plain.item())
    assert sum(gains) / len(gains) > 0.02, gains


def test_cheap_mode_and_step_window_change_the_run(tiny_pipe, loras, encoders):
    kw = dict(reference_images=_references())
    full = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=100.0)), 0, **kw).images
    cheap = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=100.0, through_unet=False)),
                 0, **kw).images
    assert not torch.equal(full, cheap)
    # a window that excludes every step is the unguided sampler again
    none = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=100.0, step_window=(0.0, 0.0))),
                0, **kw).images
    assert torch.equal(none, _run(fe.FusionPipeline(tiny_pipe, *loras), 0).images)


def test_gradient_shaping_normalises_and_clips_per_image():
    grad = torch.randn(3, 4, 8, 8) * torch.tensor([1e-4, 1.0, 50.0]).view(3, 1, 1, 1)
    unit = shape_gradient(grad, normalize=True)
    torch.testing.assert_close(unit.pow(2).mean(dim=(1, 2, 3)), torch.ones(3))
    clipped = shape_gradient(grad, clip_norm=2.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert torch.equal(clipped[0], grad[0]) and torch.allclose(norms[1:], torch.full((2,), 2.0))
    assert torch.equal(shape_gradient(grad), grad)


def test_gradient_checkpointing_gives_the_same_step_and_trace(tiny_pipe, loras, encoders):
    kw = dict(reference_images=_references())
    plain = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=10.0)), 0, **kw)
    checkpointed = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=10.0,
                                                                          gradient_checkpointing=True)), 0, **kw)
    torch.testing.assert_close(checkpointed.images, plain.images, atol=1e-6, rtol=1e-6)
    assert checkpointed.trace.to_dict() == plain.trace.to_dict()
    assert not tiny_pipe.unet.is_gradient_checkpointing and not tiny_pipe.vae.is_gradient_checkpointing
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())  # frozen only during the guided step


def test_missing_references_is_a_clear_error(tiny_pipe, loras, encoders):
    pipe = fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders))
    with pytest.raises(ValueError, match="subject_prompt"):
        _run(pipe, 0)


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    calls = {"compiled": 0}

    def broken_compile(fn, **_):
        def compiled(*args):
            calls["compiled"] += 1
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fn = CompiledOrEager(lambda x: (x * 2,), enabled=True)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        fn.warm_up(torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn(torch.ones(2))[0], torch.full((2,), 2.0))
    assert calls["compiled"] == 1 and not fn.compiled


@pytest.mark.slow
def test_compiled_score_matches_eager(tiny_pipe, loras, encoders):
    """torch.compile on this CPU takes tens of seconds: slow. Same step, compiled or not."""
    kw = dict(reference_images=_references())
    eager = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=Refiner(*encoders, m=10.0, compile=False)), 0, **kw)
    refiner = Refiner(*encoders, m=10.0, compile=True)
    compiled = _run(fe.FusionPipeline(tiny_pipe, *loras, refine=refiner), 0, **kw)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # 49 s on 2 shared cores (forward alone 23 s): inductor compiling the VAE decode; no CI form fits
def test_compiled_score_and_its_gradient_match_eager_on_the_tiny_models(tiny_pipe, encoders):
    """Stricter than the test above: the score alone (VAE decode + both encoders + R), compiled by inductor
    on this CPU, must stay compiled (no silent fall-back to eager) and give eager's R and dR/dx0."""
    references = ReferenceEmbeddings.of(*encoders, *_references(), 1)
    args = references.clip_subject, references.clip_style, references.dino
    compiled = Refiner(*encoders, m=10.0, compile=True).objective(tiny_pipe.vae, torch.device("cpu"))
    eager = Refiner(*encoders, m=10.0, compile=False).objective(tiny_pipe.vae, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fall-back warns
        compiled.warm_up(_noise(), *args)
    assert compiled.compiled and not eager.compiled
    results = []
    for objective in (compiled, eager):
        x0 = _noise(seed=3).requires_grad_(True)
        score = objective(x0, *args)[0]
        results.append((score.detach(), torch.autograd.grad(score.sum(), x0)[0]))
    assert compiled.compiled
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)
