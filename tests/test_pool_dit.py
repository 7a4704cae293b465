"""The pool's contract on diffusion transformers (issue 13 item 4): each image of a multi-pair pooled batch on the
tiny FLUX and SD3 transformers (``dit_models.py``) equals its own single-pair attach, in float64: decisions
identical (FLS), output to 1e-10, with policies fls, direct and klora. FLUX's single blocks see ``[text; image]``
tokens, SD3's joint blocks text and image streams; an image's CFG copies pool into one decision in both.
"""
import copy

import pytest
import torch
from dit_models import linear_names, random_factors, tiny_flux_pipeline, tiny_sd3_pipeline
from test_dit_fusion import forward, transformer_inputs

import fusion_engine as fe

COPIES = 2
ASSIGNMENT = [("s0", "t0"), ("s1", "t1"), ("s1", "t0")]
BATCHED = ("encoder_hidden_states", "pooled_projections", "timestep", "hidden_states")  # per-row inputs


@pytest.fixture(scope="module")
def transformers():
    return {"flux": tiny_flux_pipeline(seed=0).transformer, "sd3": tiny_sd3_pipeline(seed=0).transformer}


def dit_pool(transformer):
    """Four LoRAs of ranks 4, 6, 3 and 8 (s1 skips every ``ff`` layer, so t1 or t0 runs alone there), float64."""
    names = linear_names(transformer)

    def lora(rank, alpha, seed, skip=()):
        targets = [name for name in names if not any(part in name for part in skip)]
        factors = random_factors(transformer, targets, rank, seed)
        return fe.LoRA({name: fe.LoRALayer(*factors[name], alpha=alpha) for name in targets}, component="transformer")

    loras = {"s0": lora(4, 2.0, 1), "t0": lora(6, 9.0, 2), "s1": lora(3, 3.0, 3, skip=("ff",)), "t1": lora(8, 4.0, 4)}
    pool = fe.LoRAPool(dtype=torch.float64)
    for name, value in loras.items():
        pool.add(name, value)
    return pool, loras


def image_inputs(inputs, image, images):
    rows = [image + copy_index * images for copy_index in range(COPIES)]
    return {k: v[rows] if k in BATCHED else v for k, v in inputs.items()}, rows


@pytest.mark.parametrize("policy", ["fls", "direct", "klora"])
@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_each_image_of_a_pooled_dit_batch_equals_its_single_pair_attach(transformers, model, policy):
    transformer = copy.deepcopy(transformers[model]).double()
    pool, loras = dit_pool(transformer)
    images = len(ASSIGNMENT)
    inputs = transformer_inputs(transformer, batch=images * COPIES, seed=5, dtype=torch.float64)
    with fe.attach(transformer, pool=pool, policy=policy) as fusion:
        fusion.set_batch_layout(images, COPIES)
        fusion.set_loras(ASSIGNMENT)
        fusion.set_step(1, 4)  # klora reads it
        got = forward(transformer, inputs)
        pooled = {fusion.layer_names[r.layer]: r for r in fusion.trace.gather()}
    assert fusion.layer_names == linear_names(transformer)
    kept = set()
    for image, names in enumerate(ASSIGNMENT):
        single_inputs, rows = image_inputs(inputs, image, images)
        with fe.attach(copy.deepcopy(transformer), *[loras[n] for n in names], policy=policy,
                       backend="reference") as single:
            single.set_batch_layout(1, COPIES)
            single.set_step(1, 4)
            expected = forward(single.model, single_inputs)
            records = single.trace.gather()
        torch.testing.assert_close(got[rows], expected, atol=1e-10, rtol=1e-10)
        if policy != "fls":
            continue
        assert len(records) == len(single.layer_names)
        for record in records:  # the pair's trace: 1 = subject (position 0), 0 = style (position 1)
            name = single.layer_names[record.layer]
            position = int(pooled[name].choice[image])
            assert position == (0 if int(record.choice[0]) == 1 else 1), name
            kept.add(position)
            if record.score_subject is not None:
                pair_scores = torch.stack([record.score_subject[0], record.score_style[0]]).float()
                torch.testing.assert_close(pooled[name].scores[image, :2], pair_scores)
    assert policy != "fls" or kept == {0, 1}, "the test needs layers keeping each LoRA"
