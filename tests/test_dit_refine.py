"""LLR on FLUX (flow matching): the guided step's gradient against float64 finite differences of R written out
here from the equations, and m=0 reproducing the unguided sampler bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fusion_engine as fe
import fusion_engine.refine.refiner as refiner_module
from fusion_engine.refine import Refiner
from fusion_engine.scoring.encoders import tiny_dino, tiny_openclip
from fusion_engine.worlds.dit import build_tiny_sd3, dit_loras

PROMPT, SUBJECT_PROMPT, STYLE_PROMPT = "a sbu dog in szn style", "a photo of sbu dog", "a painting in szn style"
SIZE = dict(height=32, width=32)


@pytest.fixture
def flux(tiny_flux):
    return tiny_flux


@pytest.fixture(scope="module")
def encoders():
    return tiny_openclip(seed=0), tiny_dino(seed=1)


def _references():
    generator = torch.Generator().manual_seed(11)
    return torch.rand(1, 3, 32, 32, generator=generator), torch.rand(1, 3, 32, 32, generator=generator)


def _embed64(encoder, images):
    """The encoder's embedding in float64 (its preprocessing is mean/std only: the images are its size)."""
    backbone = copy.deepcopy(encoder.backbone).double()
    return backbone((images - encoder.mean.double()) / encoder.std.double())


def _objective64(pipe, loras, encoders, x, t, sigma, through_model: bool, constant_v=None):
    """R(x_t) in float64: v from the fused transformer (FLUX's guidance embedding, no CFG batch),
    x0 = x_t - sigma * v, unpack, decode, R = 1 - (S1 + S2 + S3) / 3."""
    transformer, vae = pipe["transformer"], pipe["vae"]
    inputs = pipe["inputs"]
    if through_model:
        with fe.attach(transformer, *loras, policy="fls", backend="reference") as fusion:
            fusion.set_batch_layout(1, 1)
            fusion.set_step(0, 1)
            v = transformer(hidden_states=x, timestep=(t / 1000).expand(1).double(), **inputs,
                            return_dict=False)[0]
    else:
        v = constant_v
    x0 = x - sigma * v
    latents = pipe["unpack"](x0)
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    clip, dino = encoders
    subject_ref, style_ref = (r.double() for r in _references())
    clip_image = _embed64(clip, image)
    s1 = F.cosine_similarity(clip_image, _embed64(clip, subject_ref), dim=-1)
    s2 = F.cosine_similarity(clip_image, _embed64(clip, style_ref), dim=-1)
    s3 = F.cosine_similarity(_embed64(dino, image), _embed64(dino, style_ref), dim=-1)
    return (1 - (s1 + s2 + s3) / 3).sum()


@pytest.mark.parametrize("through_model", [True, False], ids=["through-transformer", "velocity-constant"])
def test_guided_step_gradient_matches_float64_finite_differences(flux, encoders, monkeypatch, through_model):
    subject, style = dit_loras(flux.transformer, 0)
    captured = {}
    shape = refiner_module.shape_gradient

    def keep(grad, *args):
        captured["grad"] = grad.detach().clone()
        return shape(grad, *args)

    monkeypatch.setattr(refiner_module, "shape_gradient", keep)
    inputs_seen = []
    flux.transformer.register_forward_pre_hook(lambda m, a, k: inputs_seen.append(k), with_kwargs=True)
    refiner = Refiner(*encoders, m=1.0, through_unet=through_model, compile=False, step_window=(0.5, 1.0))
    fe.FusionPipeline(flux, subject, style, policy="fls", refine=refiner)(
        PROMPT, num_inference_steps=2, guidance_scale=3.5, output_type="latent", reference_images=_references(),
        generator=torch.Generator().manual_seed(2), progress=False, **SIZE)
    grad = captured["grad"].double()
    assert grad.abs().max() > 0
    # the guided call is the second step's: its inputs, the scheduler's sigma there
    guided = inputs_seen[-1]
    x = guided["hidden_states"].detach().double()
    t = flux.scheduler.timesteps[1].double()
    sigma = flux.scheduler.sigmas[1].double()
    assert 0 < sigma < 1
    pipe64 = {
        "transformer": copy.deepcopy(flux.transformer).double(), "vae": copy.deepcopy(flux.vae).double(),
        "unpack": lambda latents: flux._unpack_latents(latents, 32, 32, flux.vae_scale_factor),
        "inputs": {k: (v.detach().double() if torch.is_tensor(v) else v) for k, v in guided.items()
                   if k in ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids", "guidance")},
    }
    constant_v = None
    if not through_model:
        with fe.attach(pipe64["transformer"], subject, style, policy="fls", backend="reference") as fusion:
            fusion.set_batch_layout(1, 1)
            fusion.set_step(0, 1)
            constant_v = pipe64["transformer"](hidden_states=x, timestep=(t / 1000).expand(1), **pipe64["inputs"],
                                               return_dict=False)[0].detach()
    generator = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            plus = _objective64(pipe64, (subject, style), encoders, x + eps * direction, t, sigma, through_model,
                                constant_v)
            minus = _objective64(pipe64, (subject, style), encoders, x - eps * direction, t, sigma, through_model,
                                 constant_v)
        finite_difference = (plus - minus) / (2 * eps)
        analytic = (grad * direction).sum()
        torch.testing.assert_close(analytic, finite_difference, rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize("extra", [{}, {"negative_prompt": "blurry", "true_cfg_scale": 4.0}],
                         ids=["guidance-embedding", "true-cfg"])
def test_m_zero_is_the_unguided_flux_sampler_bit_for_bit(flux, encoders, extra):
    subject, style = dit_loras(flux.transformer, 0)
    kw = dict(num_inference_steps=3, guidance_scale=3.5, output_type="latent", progress=False, **SIZE, **extra)
    refined = fe.FusionPipeline(flux, subject, style, refine=Refiner(*encoders, m=0.0, compile=False))
    out = refined(PROMPT, subject_prompt=SUBJECT_PROMPT, style_prompt=STYLE_PROMPT,
                  generator=torch.Generator().manual_seed(6), **kw)
    plain = fe.FusionPipeline(flux, subject, style)(PROMPT, generator=torch.Generator().manual_seed(6), **kw)
    assert out.images.numpy().tobytes() == plain.images.numpy().tobytes()
    assert out.trace.to_dict() == plain.trace.to_dict()
    # the references came from the same sampler: each LoRA alone, same seed, FusionPipeline's own path
    alone = fe.FusionPipeline(flux, subject, None, policy="direct")(
        SUBJECT_PROMPT, generator=torch.Generator().manual_seed(6), **{**kw, "output_type": "pt"}).images
    assert torch.equal(out.references[0], alone)


def test_refinement_moves_the_flux_latent_and_sd3_runs(flux, encoders):
    subject, style = dit_loras(flux.transformer, 0)
    kw = dict(num_inference_steps=2, output_type="latent", progress=False, reference_images=_references(), **SIZE)
    guided = fe.FusionPipeline(flux, subject, style, refine=Refiner(*encoders, m=100.0, compile=False))(
        PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
    plain = fe.FusionPipeline(flux, subject, style)(PROMPT, generator=torch.Generator().manual_seed(1),
                                                    **{k: v for k, v in kw.items() if k != "reference_images"}).images
    assert not torch.equal(guided, plain)
    sd3 = build_tiny_sd3(0)
    from fusion_engine.worlds.dit import SD3_TARGETS

    subject, style = dit_loras(sd3.transformer, 0, SD3_TARGETS)
    out = fe.FusionPipeline(sd3, subject, style, refine=Refiner(*encoders, m=10.0, compile=False))(
        PROMPT, generator=torch.Generator().manual_seed(1), guidance_scale=4.0, **kw)
    assert out.images.shape == (1, 4, 16, 16) and torch.isfinite(out.images).all()
