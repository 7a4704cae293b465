"""Every feature of a pair on a pool too (issue 21 phase two): each pool image is its single-pair attach.

Float64 on a tiny conv + attention net (its blocks named as SDXL's B-LoRA blocks), so outputs agree to 1e-10 and
FLS decisions exactly: all six policies with a mixed assignment, DoRA LoRAs (linear and conv layers, a LoRA scale
per call), granularity ``"batch"`` with a uniform one, and input gradients through the pool (what LLR needs).
"""
import pytest
import torch
from test_frozen_pair import CHANNELS, TinyNet, make_lora

import fusion_engine as fe
from fusion_engine.runtime.trace import ALL, BASE, BOTH, STYLE, SUBJECT

IMAGES, COPIES = 2, 2
PAIR_TO_POSITION = {SUBJECT: 0, STYLE: 1, BOTH: ALL, BASE: -1}
MIXED = [("s0", "t0"), ("s1", "t1")]
POLICIES = [("fls", {"divergence": "kl"}), ("fls", {"divergence": "cosine"}), ("direct", {}), ("klora", {}),
            ("blora", {}), ("switch", {"tau": 1}), ("composite", {})]


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    net = TinyNet().double()
    loras = {"s0": make_lora(net, 1, 2), "t0": make_lora(net, 2, 3, skip=("up_blocks.0.attentions.0.to_v",)),
             "s1": make_lora(net, 5, 2, skip=("conv_out",)), "t1": make_lora(net, 6, 4)}
    pool = fe.LoRAPool(dtype=torch.float64)
    for name, lora in loras.items():
        pool.add(name, lora)
    x = torch.randn(IMAGES * COPIES, CHANNELS, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return net, loras, pool, x


def drive(fusion, policy, step, images):
    fusion.set_batch_layout(images, COPIES)
    fusion.set_step(step, 4)
    if policy == "composite":
        fusion.set_branch("style" if step else "subject")


def rows_of(image, images=IMAGES):
    return [image + copy * images for copy in range(COPIES)]


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("policy,options", POLICIES, ids=[f"{p}-{'-'.join(map(str, o.values()))}" for p, o in POLICIES])
def test_each_pool_image_is_its_single_pair_for_every_policy(world, policy, options, step):
    net, loras, pool, x = world
    with fe.attach(net, pool=pool, policy=policy, backend="reference", **options) as fusion:
        fusion.set_loras(MIXED)
        drive(fusion, policy, step, IMAGES)
        with torch.no_grad():
            got = net(x)
        records = {fusion.layer_names[r.layer]: r for r in fusion.trace.gather()}
    for image, names in enumerate(MIXED):
        rows = rows_of(image)
        with fe.attach(net, *[loras[n] for n in names], policy=policy, backend="reference", **options) as single:
            drive(single, policy, step, 1)
            with torch.no_grad():
                expected = net(x[rows])
            single_records = single.trace.gather()
        torch.testing.assert_close(got[rows], expected, rtol=1e-10, atol=1e-10)
        assert single_records and len(records) == len(fusion.layer_names)  # static policies record too
        for record in single_records:  # the pair's view: subject = position 0, style = 1, both = ALL, base = -1
            pooled = records[single.layer_names[record.layer]]
            assert int(pooled.choice[image]) == PAIR_TO_POSITION[int(record.choice[0])]


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("policy,options", [("fls", {"divergence": "kl"}), ("direct", {"weights": (0.5, 2.0)}),
                                            ("switch", {"tau": 1})])
def test_a_pool_with_dora_is_each_images_dora_pair(world, policy, options, scale):
    net, _, _, x = world
    loras = {"d0": make_lora(net, 7, 2, dora=True), "p0": make_lora(net, 8, 3),
             "d1": make_lora(net, 9, 3, dora=True, skip=("conv_in",)), "d2": make_lora(net, 10, 2, dora=True)}
    pool = fe.LoRAPool(dtype=torch.float64)
    for name, lora in loras.items():
        pool.add(name, lora)
    assignment = [("d0", "p0"), ("d1", "d2")]
    kwargs = {"cross_attention_kwargs": {"scale": scale}}
    with fe.attach(net, pool=pool, policy=policy, backend="reference", **options) as fusion:
        fusion.set_loras(assignment)
        drive(fusion, policy, 1, IMAGES)
        with torch.no_grad():
            got = net(x, **kwargs)
    for image, names in enumerate(assignment):
        rows = rows_of(image)
        with fe.attach(net, *[loras[n] for n in names], policy=policy, backend="reference", **options) as single:
            drive(single, policy, 1, 1)
            with torch.no_grad():
                expected = net(x[rows], **kwargs)
        torch.testing.assert_close(got[rows], expected, rtol=1e-10, atol=1e-10)


def test_batch_granularity_on_a_uniform_pool_is_the_pair(world):
    net, loras, pool, x = world
    with fe.attach(net, pool=pool, granularity="batch", backend="reference") as fusion:
        fusion.set_loras([("s0", "t0")] * IMAGES)
        drive(fusion, "fls", 0, IMAGES)
        with torch.no_grad():
            got = net(x)
        records = fusion.trace.gather()
    with fe.attach(net, loras["s0"], loras["t0"], granularity="batch", backend="reference") as single:
        drive(single, "fls", 0, IMAGES)
        with torch.no_grad():
            expected = net(x)
        single_records = single.trace.gather()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert [r.choice.tolist() for r in records] == [[0 if int(r.choice[0]) == 1 else 1] for r in single_records]


def test_input_gradients_through_a_pool_are_the_pairs(world):
    """LLR differentiates the fused model with respect to its input: a pool image's gradient is its pair's."""
    net, loras, pool, x = world
    inputs = x.clone().requires_grad_(True)
    with fe.attach(net, pool=pool, backend="reference") as fusion:
        fusion.set_loras(MIXED)
        drive(fusion, "fls", 0, IMAGES)
        net(inputs).square().sum().backward()
    for image, names in enumerate(MIXED):
        rows = rows_of(image)
        single_inputs = x[rows].clone().requires_grad_(True)
        with fe.attach(net, *[loras[n] for n in names], backend="reference") as single:
            drive(single, "fls", 0, 1)
            net(single_inputs).square().sum().backward()
        torch.testing.assert_close(inputs.grad[rows], single_inputs.grad, rtol=1e-10, atol=1e-10)


def test_a_pool_with_text_encoder_parts_is_each_images_pair_with_them(tiny_pipe):
    """The LoRAs' text-encoder parts go into the pool's part for the text encoder; ``pipe(prompts, loras=...)`` then
    fuses each prompt's parts, as ``fe.attach(pipe, subject, style)`` with those files fuses the pair's."""
    from test_text_encoder import lora_with_text_parts

    loras = {"a": lora_with_text_parts(tiny_pipe, seed=3), "b": lora_with_text_parts(tiny_pipe, seed=9),
             "c": lora_with_text_parts(tiny_pipe, seed=21, alphas=(4.0, 2.0))}
    pool = fe.LoRAPool()
    for name, lora in loras.items():
        pool.add(name, lora)
    assert set(pool.parts) == {"text_encoder"} and pool.parts["text_encoder"].names == ["a", "b", "c"]
    prompts, assignment, seeds = ["a sbu dog", "a szn cat"], [("a", "b"), ("c", "a")], [5, 6]
    options = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    with fe.attach(tiny_pipe, pool=pool) as attached:
        assert set(attached.components) == {"text_encoder"}
        got = tiny_pipe(prompts, loras=assignment, generator=[torch.Generator().manual_seed(s) for s in seeds],
                        **options).images
    with fe.attach(tiny_pipe, pool=pool) as attached:
        attached.components["text_encoder"].detach()  # the same call without the text-encoder parts differs
        without = tiny_pipe(prompts, loras=assignment, generator=[torch.Generator().manual_seed(s) for s in seeds],
                            **options).images
    for image, (prompt, names, seed) in enumerate(zip(prompts, assignment, seeds)):
        with fe.attach(tiny_pipe, *[loras[n] for n in names]):
            expected = tiny_pipe([prompt], generator=[torch.Generator().manual_seed(seed)], **options).images
        torch.testing.assert_close(got[image:image + 1], expected, atol=2e-5, rtol=1e-4)
        assert (without[image:image + 1] - expected).abs().max() > 1e-3
    pool.remove("a")
    assert pool.parts["text_encoder"].names == ["b", "c"]


PROMPTS, SEEDS = ["a sbu dog in szn style", "a szn cat"], [3, 4]


def two_pairs(pipe):
    """A pool of two default pairs on ``pipe``'s UNet (named as ``MIXED``), and the LoRAs by name."""
    from fusion_engine.worlds.random import default_loras

    s0, t0 = default_loras(pipe.unet, seed=0)
    s1, t1 = default_loras(pipe.unet, seed=10)
    loras = {"s0": s0, "t0": t0, "s1": s1, "t1": t1}
    pool = fe.LoRAPool()
    for name, lora in loras.items():
        pool.add(name, lora)
    return pool, loras


def test_llr_on_a_pool_is_each_images_llr_pair(tiny_pipe):
    """LLR (refine=) on a pool FusionPipeline: each image's references are its first and its second LoRA alone, and
    its guided steps differentiate through the pooled reference ops, so each image is its pair's LLR image."""
    from fusion_engine.refine import Refiner
    from fusion_engine.scoring.encoders import tiny_dino, tiny_openclip

    refiner = Refiner(tiny_openclip(seed=0), tiny_dino(seed=1), m=50.0)
    pool, loras = two_pairs(tiny_pipe)
    options = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt", subject_prompt="a photo of sbu dog",
                   style_prompt="a painting in szn style", progress=False)
    pooled = fe.FusionPipeline(tiny_pipe, pool=pool, refine=refiner, backend="reference")
    got = pooled(PROMPTS, loras=MIXED, generator=[torch.Generator().manual_seed(s) for s in SEEDS], **options)
    unguided = fe.FusionPipeline(tiny_pipe, pool=pool, backend="reference")(
        PROMPTS, loras=MIXED, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        **{k: v for k, v in options.items() if not k.endswith("_prompt")})
    for image, (prompt, names, seed) in enumerate(zip(PROMPTS, MIXED, SEEDS)):
        single = fe.FusionPipeline(tiny_pipe, *[loras[n] for n in names], refine=refiner, backend="reference")
        expected = single([prompt], generator=[torch.Generator().manual_seed(seed)], **options)
        for mine, theirs in zip(got.references, expected.references):
            torch.testing.assert_close(mine[image:image + 1], theirs, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.images[image:image + 1], expected.images, atol=1e-4, rtol=1e-3)
        assert (unguided.images[image:image + 1] - expected.images).abs().max() > 1e-3  # LLR moved the image


def test_composite_in_the_lean_loop_on_a_pool_is_each_images_pair(tiny_pipe):
    pool, loras = two_pairs(tiny_pipe)
    options = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt", progress=False)
    got = fe.FusionPipeline(tiny_pipe, pool=pool, policy="composite")(
        PROMPTS, loras=MIXED, generator=[torch.Generator().manual_seed(s) for s in SEEDS], **options).images
    for image, (prompt, names, seed) in enumerate(zip(PROMPTS, MIXED, SEEDS)):
        single = fe.FusionPipeline(tiny_pipe, *[loras[n] for n in names], policy="composite")
        expected = single([prompt], generator=[torch.Generator().manual_seed(seed)], **options).images
        torch.testing.assert_close(got[image:image + 1], expected, atol=2e-5, rtol=1e-4)
