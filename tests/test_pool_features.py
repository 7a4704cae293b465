"""Every feature of a pair on a pool too (issue 21 phase two): each pool image is its single-pair attach.

Float64 on a tiny conv + attention net (its blocks named as SDXL's B-LoRA blocks), so outputs agree to 1e-10 and
FLS decisions exactly: all six policies with a mixed assignment, DoRA LoRAs (linear and conv layers, a LoRA scale
per call), granularity ``"batch"`` with a uniform one, and input gradients through the pool (what LLR needs).
"""
import pytest
import torch
from test_frozen_pair import CHANNELS, TinyNet, make_lora

import fusion_engine as fe

IMAGES, COPIES = 2, 2
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
        if policy == "fls":
            assert single_records
            for record in single_records:  # the pair's view: 1 = subject (position 0), 0 = style (position 1)
                pooled = records[single.layer_names[record.layer]]
                assert int(pooled.choice[image]) == (0 if int(record.choice[0]) == 1 else 1)


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
