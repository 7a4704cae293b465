"""``fe.FusionPipeline(pipe, pool=pool)`` with ``loras=[...]`` per call: each image (and its CFG copy) follows its own
pair, and equals the image a single-pair FusionPipeline of that pair makes with the same seed (decisions identical,
output to fp32 rounding). Both ways a FusionPipeline runs: the pipeline's own call (tiny SD UNet, tiny FLUX) and the
lean loop (FLUX true CFG, uncond and cond as one batch). Plus the call's refusals, all before any sampling.
"""

import pytest
import torch
from test_pool_equivalence import PAIRS, PROMPTS, make_pool

import fusion_engine as fe
from fusion_engine.worlds.dit import dit_loras

SEEDS = [11, 12, 13]


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _positions(pooled_records, pooled_names, image):
    return {(r.step, pooled_names[r.layer]): int(r.choice[image]) for r in pooled_records}


def check_each_image_equals_its_single_pair(pipe, pool, loras, prompts, pairs, *, policy="fls", atol=2e-5,
                                            **call):
    """The pooled FusionPipeline call against one single-pair FusionPipeline call per image (same seed)."""
    pooled = fe.FusionPipeline(pipe, pool=pool, policy=policy)
    out = pooled(prompts, loras=pairs, generator=_generators(SEEDS[:len(prompts)]), **call)
    assert out.loras == [tuple([p] if isinstance(p, str) else p) for p in pairs]
    records, names = out.trace.gather(), out.trace.layer_names
    for image, (prompt, pair, seed) in enumerate(zip(prompts, pairs, SEEDS)):
        single = fe.FusionPipeline(pipe, *[loras[n] for n in pair], policy=policy)
        expected = single([prompt], generator=_generators([seed]), **call)
        torch.testing.assert_close(out.images[image:image + 1], expected.images, atol=atol, rtol=1e-4)
        if policy != "fls":
            continue
        pooled_positions = _positions(records, names, image)
        single_records = expected.trace.gather()
        assert single_records, "the single-pair trace recorded nothing"
        for record in single_records:  # the pair's trace: 1 = subject (position 0), 0 = style (position 1)
            key = (record.step, expected.trace.layer_names[record.layer])
            assert pooled_positions[key] == (0 if int(record.choice[0]) == 1 else 1), key
        summary = out.trace.image_summary(image, out.loras[image])
        assert sum(summary.values()) == len(records)
    return out


@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_sd_fusion_pipeline_pairs_equal_single_pair_pipelines(tiny_pipe, policy):
    pool, loras = make_pool(tiny_pipe.unet, torch.float32)
    check_each_image_equals_its_single_pair(tiny_pipe, pool, loras, PROMPTS, PAIRS, policy=policy,
                                            guidance_scale=4.0, num_inference_steps=3, output_type="pt")


@pytest.fixture
def flux(tiny_flux):
    return tiny_flux


def flux_pool(pipe):
    """Two FLUX pairs (ranks 4 and 8, the style skipping the single block's proj_out) in one float32 pool."""
    (s0, t0), (s1, t1) = dit_loras(pipe.transformer, 0), dit_loras(pipe.transformer, 10)
    loras = {"s0": s0, "t0": t0, "s1": s1, "t1": t1}
    pool = fe.LoRAPool()
    for name, lora in loras.items():
        pool.add(name, lora)
    return pool, loras


FLUX_CALL = dict(num_inference_steps=2, height=32, width=32, output_type="pt")


@pytest.mark.parametrize("true_cfg", [False, True], ids=["own-loop", "true-cfg-lean-loop"])
def test_flux_fusion_pipeline_pairs_equal_single_pair_pipelines(flux, true_cfg):
    pool, loras = flux_pool(flux)
    extra = {"negative_prompt": "blurry", "true_cfg_scale": 3.0} if true_cfg else {}
    check_each_image_equals_its_single_pair(flux, pool, loras, PROMPTS[:2], [("s0", "t0"), ("s1", "t1")],
                                            **FLUX_CALL, **extra)


def _count_denoiser_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_pool_call_refusals_come_before_any_sampling(tiny_pipe):
    pool, loras = make_pool(tiny_pipe.unet, torch.float32)
    calls = _count_denoiser_calls(tiny_pipe.unet)
    pipe = fe.FusionPipeline(tiny_pipe, pool=pool)
    call = dict(num_inference_steps=1, output_type="pt")
    with pytest.raises(fe.BatchLayoutError, match=r"loras has 2 entries for 3 prompt\(s\) x 1 image"):
        pipe(PROMPTS, loras=PAIRS[:2], **call)
    with pytest.raises(fe.UnknownLoRAError, match="image 1 names LoRA 'nope'"):
        pipe(PROMPTS[:2], loras=["s0", ("s1", "nope")], **call)
    with pytest.raises(fe.OptionError, match="pass loras="):
        pipe(PROMPTS[:2], **call)
    with pytest.raises(fe.OptionError, match="loras= names LoRAs per image from a pool"):
        fe.FusionPipeline(tiny_pipe, loras["s0"], loras["t0"])(PROMPTS[:1], loras=["s0"], **call)
    assert calls == [] and not any(isinstance(m, fe.runtime.layers.DynamicLoRALayer) for m in tiny_pipe.unet.modules())


def test_pool_fusion_pipeline_construction_refusals(tiny_pipe):
    pool, loras = make_pool(tiny_pipe.unet, torch.float32)
    with pytest.raises(fe.AttachError, match="a subject/style pair or a pool=, not both"):
        fe.FusionPipeline(tiny_pipe, loras["s0"], pool=pool)
    with pytest.raises(fe.OptionError, match="unknown policy 'nope'"):
        fe.FusionPipeline(tiny_pipe, pool=pool, policy="nope")
    with pytest.raises(fe.AttachError, match="pool must be a fe.LoRAPool"):
        fe.FusionPipeline(tiny_pipe, pool={"s0": loras["s0"]})


def test_per_prompt_pairs_expand_over_images_per_prompt(tiny_pipe):
    pool, _ = make_pool(tiny_pipe.unet, torch.float32)
    pipe = fe.FusionPipeline(tiny_pipe, pool=pool)
    call = dict(num_inference_steps=1, output_type="pt", num_images_per_prompt=2)
    per_prompt = pipe(PROMPTS[:2], loras=PAIRS[:2], generator=torch.Generator().manual_seed(0), **call)
    per_image = pipe(PROMPTS[:2], loras=[PAIRS[0], PAIRS[0], PAIRS[1], PAIRS[1]],
                     generator=torch.Generator().manual_seed(0), **call)
    assert per_prompt.loras == per_image.loras and len(per_prompt.loras) == 4
    assert torch.equal(per_prompt.images, per_image.images)


def test_an_image_naming_one_lora_runs_the_base_where_it_has_no_layer(tiny_pipe):
    pool, _ = make_pool(tiny_pipe.unet, torch.float32)  # r16 adapts the down blocks only
    out = fe.FusionPipeline(tiny_pipe, pool=pool)(PROMPTS[:1], loras=["r16"], num_inference_steps=1,
                                                   output_type="pt")
    summary = out.trace.image_summary(0, out.loras[0])
    assert summary["r16"] > 0 and summary["base"] > 0
