"""FusionPipeline on FLUX and SD3 (tiny random pipelines from configs); diffusers' own pipelines are the oracle."""
import copy

import pytest
import torch

import fusion_engine as fe
from fusion_engine.refine import Refiner
from fusion_engine.runtime.fusion import attached_fusion
from fusion_engine.runtime.trace import STYLE, SUBJECT
from fusion_engine.worlds.dit import SD3_TARGETS, build_tiny_flux, build_tiny_sd3, dit_loras

STEPS = 3
PROMPT, NEGATIVE = "a sbu dog in szn style", "blurry, low quality"


@pytest.fixture(scope="module")
def _masters():
    return {"flux": build_tiny_flux(0), "sd3": build_tiny_sd3(0)}


@pytest.fixture
def flux(_masters):
    return copy.deepcopy(_masters["flux"])


@pytest.fixture
def sd3(_masters):
    return copy.deepcopy(_masters["sd3"])


def _loras(pipe):
    suffixes = SD3_TARGETS if type(pipe).__name__.startswith("StableDiffusion3") else None
    return dit_loras(pipe.transformer, 0, *([suffixes] if suffixes else []))


def _merged(pipe, lora):
    """The oracle: a copy of ``pipe`` whose transformer weights hold W + scale * B @ A (no fusion_engine code)."""
    oracle = copy.deepcopy(pipe)
    with torch.no_grad():
        for name, layer in lora.layers.items():
            module = oracle.transformer.get_submodule(name)
            module.weight += lora.layer_scale(name) * (layer.lora_b @ layer.lora_a)
    return oracle


def _call(pipe, **kw):
    options = dict(num_inference_steps=STEPS, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(3))
    return pipe(PROMPT, **{**options, **kw})


def _tiny_refiner(m=0.0):
    from fusion_engine.scoring.encoders import tiny_dino, tiny_openclip

    return Refiner(tiny_openclip(0), tiny_dino(1), m=m, compile=False)


def _references():
    generator = torch.Generator().manual_seed(9)
    return torch.rand(1, 3, 32, 32, generator=generator), torch.rand(1, 3, 32, 32, generator=generator)


CASES = {  # family, extra call arguments
    "flux": ("flux", {}),
    "flux-true-cfg": ("flux", {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}),
    "sd3-cfg": ("sd3", {"guidance_scale": 5.0, "negative_prompt": NEGATIVE}),
    "sd3-no-cfg": ("sd3", {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("loop", ["own", "lean"])
@pytest.mark.parametrize("fusion", ["direct-one-lora", "fls-style-at-zero"])
def test_one_lora_equals_diffusers_own_pipeline_with_it_merged(_masters, case, loop, fusion):
    """The pipeline's own call (fused by attach) and the lean loop (forced by an m=0 Refiner) both reproduce
    diffusers' FluxPipeline / StableDiffusion3Pipeline with the subject LoRA merged into the weights."""
    family, extra = CASES[case]
    pipe = copy.deepcopy(_masters[family])
    subject, style = _loras(pipe)
    expected = _call(_merged(pipe, subject), **extra).images
    if fusion == "direct-one-lora":
        loras, options = (subject, None), {"policy": "direct"}
    else:  # FLS with the style's delta exactly zero: the subject is chosen at every layer, step and image
        loras, options = (subject, style.with_scale(0.0)), {"policy": "fls"}
    refine = {"refine": _tiny_refiner(0.0)} if loop == "lean" else {}
    fused = fe.FusionPipeline.from_pipe(pipe, *loras, **options, **refine)
    got = _call(fused, progress=False, **extra, **({"reference_images": _references()} if refine else {}))
    assert got.images.shape == expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got.images, expected, atol=2e-5, rtol=1e-4)
    records = got.trace.gather()
    layers = len(subject.layers)
    assert len(records) == STEPS * layers  # one denoiser call per step: CFG/true CFG halves in one batch
    assert attached_fusion(pipe.transformer) is None


def test_other_branch_at_zero_is_not_trivially_equal(_masters):
    """The oracle comparison above has teeth: the style LoRA at full strength changes the image."""
    pipe = copy.deepcopy(_masters["flux"])
    subject, style = _loras(pipe)
    alone = _call(fe.FusionPipeline(pipe, subject, None, policy="direct"), progress=False).images
    both = _call(fe.FusionPipeline(pipe, subject, style, policy="fls"), progress=False).images
    assert (alone - both).abs().max() > 1e-3


def test_flux_true_cfg_pools_both_passes_into_one_decision_per_image(flux):
    """FLUX true CFG: the uncond and cond passes of an image take ONE decision per layer and step. The trace
    of granularity "image" has one choice per record (two images: two), and each equals the decision FLS takes
    on the pooled rows; granularity "sample" (each pass alone) disagrees with it somewhere, so a sampler that
    let the two transformer calls decide independently would fail this test."""
    subject, style = _loras(flux)
    style = style.with_scale(1.2)  # a strength at which the two passes of a layer disagree at 4 of 42 records
    calls = []
    flux.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                               with_kwargs=True)
    kw = dict(negative_prompt=[NEGATIVE] * 2, true_cfg_scale=4.0, output_type="latent")
    prompts = [PROMPT, "a photo of sbu dog"]
    pooled = fe.FusionPipeline(flux, subject, style, policy="fls")(
            prompts, num_inference_steps=STEPS, height=32, width=32, generator=torch.Generator().manual_seed(3),
            progress=False, **kw)
    assert calls == [4] * STEPS  # [uncond x2, cond x2] in one transformer call per step
    apart = fe.FusionPipeline(flux, subject, style, policy="fls", granularity="sample")(
        prompts, num_inference_steps=STEPS, height=32, width=32, generator=torch.Generator().manual_seed(3),
        progress=False, **kw)
    pooled_records, apart_records = pooled.trace.gather(), apart.trace.gather()
    assert all(r.choice.numel() == 2 for r in pooled_records)  # one decision per image
    assert all(r.choice.numel() == 4 for r in apart_records)  # rows [uncond0, uncond1, cond0, cond1]
    # at step 0 the inputs agree, so the first layer's per-row scores can be pooled by hand: the pooled choice is
    # the one whose mean divergence over the image's uncond and cond rows is larger
    first_pooled, first_apart = pooled_records[0], apart_records[0]
    for image in range(2):
        rows = [image, image + 2]
        # KL is averaged over the rows of a group, and both passes have the same token count
        subject_score = first_apart.score_subject[rows].mean()
        style_score = first_apart.score_style[rows].mean()
        torch.testing.assert_close(first_pooled.score_subject[image], subject_score, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(first_pooled.score_style[image], style_score, atol=1e-6, rtol=1e-5)
    split = [r for r in apart_records if not torch.equal(r.choice[:2], r.choice[2:])]
    assert split, "the two passes never disagreed: this test could not tell pooled from independent decisions"


def test_attach_refuses_true_cfg_it_cannot_pool(flux):
    subject, style = _loras(flux)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent", negative_prompt=NEGATIVE,
              true_cfg_scale=4.0)
    with fe.attach(flux, subject, style, policy="fls"), pytest.raises(fe.BatchLayoutError, match="two transformer"):
        flux(PROMPT, **kw)
    with fe.attach(flux, subject, style, policy="fls", granularity="sample") as fusion:
        flux(PROMPT, **kw)  # each call deciding alone is what "sample" asks for
        assert len(fusion.trace.gather()) == 2 * 2 * len(subject.layers)  # two calls per step
    assert attached_fusion(flux.transformer) is None


def test_attach_refuses_sd3_skip_layer_guidance_at_image_granularity(sd3):
    subject, style = _loras(sd3)
    kw = dict(num_inference_steps=1, height=32, width=32, output_type="latent", guidance_scale=5.0,
              num_images_per_prompt=2, skip_guidance_layers=[0])
    with fe.attach(sd3, subject, style, policy="fls"), pytest.raises(fe.BatchLayoutError, match="cond rows alone"):
        sd3(PROMPT, **kw)
    with fe.attach(sd3, subject, style, policy="fls", granularity="sample"):
        assert sd3(PROMPT, **kw).images.shape == (2, 4, 16, 16)


def test_lean_loop_refuses_arguments_it_does_not_implement(flux):
    subject, style = _loras(flux)
    pipe = fe.FusionPipeline(flux, subject, style)
    with pytest.raises(fe.OptionError, match="max_sequence_length.*granularity='sample'"):
        pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, max_sequence_length=64, num_inference_steps=1)


def test_other_transformer_pipelines_are_refused_at_construction(flux):
    subject, style = _loras(flux)

    class PixArtSigmaPipeline:  # a DiT family whose layout this library does not know
        def __init__(self, transformer):
            self.transformer = transformer
            self.components = {"transformer": transformer}

        def __call__(self, prompt=None, callback_on_step_end=None):
            return None

    with pytest.raises(fe.AttachError, match="FLUX and SD3.*not PixArtSigmaPipeline"):
        fe.FusionPipeline.from_pipe(PixArtSigmaPipeline(flux.transformer), subject, style)


@pytest.mark.parametrize("steps", [2, 5])
def test_klora_on_flux_follows_the_real_step(flux, steps):
    """K-LoRA's schedule reads the sampler's step out of the run's length (not 28 steps x 418 layer calls)."""
    subject, style = _loras(flux)
    out = fe.FusionPipeline(flux, subject, style, policy="klora")(
        PROMPT, num_inference_steps=steps, height=32, width=32, output_type="latent", progress=False,
        generator=torch.Generator().manual_seed(0))
    policy = fe.make_policy("klora")
    fusion = fe.attach(flux.transformer, subject, style, policy=policy)
    fusion.detach()
    names = fusion.layer_names
    seen = set()
    for record in out.trace.gather():
        seen.add(record.step)
        name = names[record.layer]
        if name not in policy.scores:
            continue
        subject_score, style_score = policy.scores[name]
        expected = subject_score / policy.gamma > style_score * policy.time_scale(record.step / steps)
        assert bool(record.choice[0] == SUBJECT) == expected, (name, record.step)
    assert seen == set(range(steps))


def test_blora_on_a_transformer_asks_for_blocks(flux, sd3):
    for pipe in (flux, sd3):
        subject, style = _loras(pipe)
        with pytest.raises(fe.AttachError, match="no preset for it; pass blocks="):
            fe.attach(pipe.transformer, subject, style, policy="blora")
    subject, style = _loras(flux)
    blocks = {"subject": ["transformer_blocks.0"], "style": ["single_transformer_blocks.0"]}
    with fe.attach(flux.transformer, subject, style, policy="blora", blocks=blocks) as fusion:
        weights = {layer.name: fusion.policy.weights(layer, fusion.context) for layer in fusion.layers}
    assert weights["transformer_blocks.0.attn.to_q"] == (1.0, 0.0)
    assert weights["single_transformer_blocks.0.attn.to_q"] == (0.0, 1.0)
    assert weights["proj_out"] == (0.0, 0.0)


def test_switch_and_composite_run_on_flux(flux):
    subject, style = _loras(flux)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent", progress=False,
              generator=torch.Generator().manual_seed(0))
    switch = fe.FusionPipeline(flux, subject, style, policy="switch", tau=1)(PROMPT, **kw)
    assert [r.choice[0].item() for r in switch.trace.gather() if r.layer == 0] == [SUBJECT, STYLE]  # tau = 1
    composite = fe.FusionPipeline(flux, subject, style, policy="composite")(PROMPT, **kw)
    assert composite.images.shape == (1, 64, 16)


def test_sizes_follow_the_pipeline(flux, sd3):
    """Image sides are multiples of the pixels per token side: FLUX packs 2x2 latents, SD3 patches them."""
    subject, _ = _loras(flux)
    assert fe.FusionPipeline(flux, subject).size_multiple() == 2 * flux.vae_scale_factor == 4
    assert fe.FusionPipeline(flux, subject).default_size() == flux.default_sample_size * flux.vae_scale_factor
    subject, _ = _loras(sd3)
    assert fe.FusionPipeline(sd3, subject).size_multiple() == sd3.vae_scale_factor * 2
