"""The pool's contract: each image of a multi-pair batch is the image a single-pair attach of its own pair makes.

UNet level in float64 (decisions identical, outputs to 1e-10) for every divergence and the static policies,
with LoRAs of ranks 4, 8 and 16 and images naming 1, 2 and 3 LoRAs; N >= 3 against an independent float64
N-way oracle written here with forward hooks. Pipeline level (SD1.x and SDXL, float32, per-image generators):
``pipe(prompts, loras=[...])`` against one ``fe.attach(pipe, subject, style)`` call per image.
"""
import copy

import pytest
import torch
from conftest import unet_inputs
from test_fls_oracle import oracle_score

import fusion_engine as fe
from fusion_engine.worlds.random import attention_targets, default_loras, random_lora

IMAGES, COPIES = 4, 2
ASSIGNMENT = [("s0", "t0"), ("s1", "t1"), ("s0", "t1", "r16"), ("t0",)]


def make_pool(unet, dtype):
    """Two default pairs (ranks 4 and 8, the style skipping the mid block) and a rank-16 LoRA on the down blocks."""
    s0, t0 = default_loras(unet, seed=0)
    s1, t1 = default_loras(unet, seed=10)
    r16 = random_lora(unet, attention_targets(unet, skip=("up_blocks", "mid_block")), rank=16, alpha=8.0,
                      strength=3.0, seed=7)
    loras = {"s0": s0, "t0": t0, "s1": s1, "t1": t1, "r16": r16}
    pool = fe.LoRAPool(dtype=dtype)
    for name, lora in loras.items():
        pool.add(name, lora)
    return pool, loras


def float64_setup(tiny_pipe, seed):
    """(float64 UNet, its pool, the LoRAs by name, float64 UNet inputs for IMAGES x COPIES rows)."""
    unet = tiny_pipe.unet.double()
    pool, loras = make_pool(unet, torch.float64)
    sample, t, context = unet_inputs(unet, IMAGES * COPIES, seed=seed)
    return unet, pool, loras, (sample.double(), t, context.double())


def run_pool(unet, pool, inputs, assignment, step=0, **options):
    with fe.attach(unet, pool=pool, **options) as fusion:
        fusion.set_batch_layout(len(assignment), COPIES)
        fusion.set_loras(assignment)
        fusion.set_step(step, 4)
        with torch.no_grad():
            sample, t, context = inputs
            out = unet(sample, t, encoder_hidden_states=context).sample
        return out, fusion.layer_names, fusion.trace.gather()


def image_rows(image, images=IMAGES):
    return [image + copy_index * images for copy_index in range(COPIES)]


def run_single(unet, loras, inputs, image, names, step=0, **options):
    """The image alone (its CFG rows), attached as a single pair (or a single LoRA)."""
    sample, t, context = inputs
    rows = image_rows(image)
    with fe.attach(copy.deepcopy(unet), *[loras[n] for n in names], backend="reference", **options) as fusion:
        fusion.set_batch_layout(1, COPIES)
        fusion.set_step(step, 4)
        with torch.no_grad():
            out = fusion.model(sample[rows], t, encoder_hidden_states=context[rows]).sample
        return out, fusion.layer_names, fusion.trace.gather()


@pytest.mark.parametrize("divergence", ["kl", "js", "cosine", "dot"])
def test_each_image_equals_its_single_pair_attach_fls(tiny_pipe, divergence):
    unet, pool, loras, inputs = float64_setup(tiny_pipe, seed=3)
    got, pool_names, pool_records = run_pool(unet, pool, inputs, ASSIGNMENT, divergence=divergence)
    by_layer = {pool_names[r.layer]: r for r in pool_records}
    chosen_positions = set()
    for image, names in enumerate(ASSIGNMENT):
        if len(names) > 2:
            continue  # N >= 3: the oracle test below
        expected, names_single, records = run_single(unet, loras, inputs, image, names, divergence=divergence)
        torch.testing.assert_close(got[image_rows(image)], expected, atol=1e-10, rtol=1e-10)
        for record in records:
            pooled = int(by_layer[names_single[record.layer]].choice[image])
            # the pair's trace: 1 = subject (first named, position 0), 0 = style (position 1)
            assert pooled == (0 if int(record.choice[0]) == 1 else 1), names_single[record.layer]
            chosen_positions.add(pooled)
            if record.score_subject is not None:
                scores = by_layer[names_single[record.layer]].scores[image, :2]
                pair_scores = torch.stack([record.score_subject[0], record.score_style[0]]).float()
                torch.testing.assert_close(scores, pair_scores)
    assert chosen_positions == {0, 1} or divergence == "dot", "the test needs both LoRAs chosen somewhere"


class NWayOracle:
    """Float64 N-way FLS from the definitions, per image, with forward hooks on the original layers."""

    def __init__(self, unet, loras, assignment, divergence):
        self.decisions, self.handles = {}, []
        targets = sorted(set().union(*(lora.layers for lora in loras.values())))
        for name in targets:
            module = unet.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name, loras, assignment, divergence)))

    def _hook(self, name, loras, assignment, divergence):
        def hook(module, inputs, y0):
            x, images = inputs[0], len(assignment)
            out, choices = y0.clone(), []
            for image, names in enumerate(assignment):
                rows = image_rows(image, images)
                base = y0[rows].reshape(-1, y0.shape[-1])
                best, best_score, best_delta = -1, None, None
                for position, lora_name in enumerate(names):
                    layer = loras[lora_name].layers.get(name)
                    if layer is None:
                        continue
                    delta = layer.alpha / layer.rank * (x[rows] @ layer.lora_a.double().T @ layer.lora_b.double().T)
                    delta = delta.reshape(-1, y0.shape[-1])
                    score = oracle_score(base + delta, base, divergence).mean()
                    if best < 0 or score > best_score:  # strictly larger: ties keep the earlier name
                        best, best_score, best_delta = position, score, delta
                choices.append(best)
                if best >= 0:
                    out[rows] = (base + best_delta).reshape(out[rows].shape)
            self.decisions[name] = torch.tensor(choices)
            return out

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("divergence", ["kl", "cosine"])
def test_n_way_fls_matches_a_float64_oracle(tiny_pipe, divergence):
    unet, pool, loras, inputs = float64_setup(tiny_pipe, seed=5)
    got, names, records = run_pool(unet, pool, inputs, ASSIGNMENT, divergence=divergence)
    oracle_unet = copy.deepcopy(unet)
    oracle = NWayOracle(oracle_unet, loras, ASSIGNMENT, divergence)
    with torch.no_grad():
        expected = oracle_unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    oracle.remove()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    three = [int(r.choice[2]) for r in records]
    for record in records:
        assert torch.equal(record.choice, oracle.decisions[names[record.layer]]), names[record.layer]
    assert {0, 1, 2} <= set(three), f"the 3-LoRA image should keep each of its LoRAs somewhere: {sorted(set(three))}"
    assert -1 in [int(r.choice[3]) for r in records], "image 3's style skips the mid block: base there"


@pytest.mark.parametrize("policy, options", [("direct", {}), ("switch", {"tau": 1}), ("klora", {}),
                                             ("klora", {"pattern": "s"})])
def test_static_policies_per_image_equal_single_pair(tiny_pipe, policy, options):
    unet, pool, loras, inputs = float64_setup(tiny_pipe, seed=4)
    assignment = ASSIGNMENT[:2] + [("t1", "s0"), ("s1", "t0")]
    kept = set()
    for step in (0, 1, 3):
        got, _, _ = run_pool(unet, pool, inputs, assignment, policy=policy, step=step, **options)
        for image, names in enumerate(assignment):
            expected, _, _ = run_single(unet, loras, inputs, image, names, policy=policy, step=step, **options)
            torch.testing.assert_close(got[image_rows(image)], expected, atol=1e-10, rtol=1e-10)
            if policy == "klora":
                kept |= klora_decisions_match(unet, pool, loras, names, step, options)
    assert policy != "klora" or kept == {0, 1}, "the test needs both LoRAs kept somewhere"


def klora_decisions_match(unet, pool, loras, names, step, options) -> set:
    """Every layer's pooled K-LoRA position equals the single-pair policy's choice; returns the positions kept."""
    with fe.attach(copy.deepcopy(unet), *[loras[n] for n in names], policy="klora", **options) as single, \
            fe.attach(copy.deepcopy(unet), pool=pool, policy="klora", **options) as pooled:
        single.set_step(step, 4)
        pooled.set_step(step, 4)
        kept = set()
        for layer in single.layers:
            weights = single.policy.weights(layer, single.context)
            position = pooled.policy.layer_choice(layer.name, names, pooled.context)
            assert position == (0 if weights == (1.0, 0.0) else 1), (layer.name, step)
            kept.add(position)
        return kept


def klora_oracle(loras, names, step, num_steps=4):
    """The pool's N-way K-LoRA rule from its docstring, from the LoRA objects (float64, no cache, no pool)."""
    def total(p, layer):
        return float((loras[names[p]].layer_scale(layer) * loras[names[p]].layers[layer].delta_weight()).abs().sum())

    adapted = [set(loras[n].layers) for n in names]
    gamma = [1.0] * len(names)
    for p in (0, *range(2, len(names))):
        ratios = [total(p, layer) / total(1, layer) for layer in adapted[p] & adapted[1]]
        ratios = [r for r in ratios if r > 0]
        mean = sum(ratios) / len(ratios)
        kept = [r for r in ratios if r < 3 * mean]
        gamma[p] = sum(kept) / len(kept)
    progress = step / num_steps
    time_scale = (1.5 * progress + 1.275) % 1.5
    choices = {}
    for layer in set().union(*adapted):
        candidates = [p for p in range(len(names)) if layer in adapted[p]]
        if len(candidates) == 1:
            choices[layer] = candidates[0]
            continue
        ranks = sorted((loras[names[p]].layers[layer].rank for p in candidates), reverse=True)
        values = {}
        for p in candidates:
            delta = (loras[names[p]].layer_scale(layer) * loras[names[p]].layers[layer].delta_weight()).abs()
            score = float(delta.flatten().topk(ranks[0] * ranks[1]).values.sum())
            values[p] = score / gamma[0] if p == 0 else score * time_scale / gamma[p]
        best_style = max((p for p in values if p > 0), key=lambda p: (values[p], -p))
        choices[layer] = 0 if 0 in values and values[0] > values[best_style] else best_style
    return choices


def test_klora_n_way_follows_its_documented_rule(tiny_pipe):
    unet, pool, loras, _ = float64_setup(tiny_pipe, seed=4)
    names = ("s0", "t1", "r16")
    with fe.attach(unet, pool=pool, policy="klora") as fusion:
        seen = set()
        for step in range(4):
            fusion.set_step(step, 4)
            expected = klora_oracle(loras, names, step)
            got = {layer: fusion.policy.layer_choice(layer, names, fusion.context) for layer in expected}
            assert got == expected, step
            seen |= set(got.values())
    assert seen == {0, 1, 2}, f"each of the three LoRAs should win somewhere: {sorted(seen)}"


PROMPTS = ["a sbu dog in szn style", "a red car", "a house"]
PAIRS = [("s0", "t0"), ("s1", "t1"), ("s1", "t0")]


def _pipeline_equivalence(pipe, pool, loras, **call):
    seeds = [11, 12, 13]
    options = dict(guidance_scale=4.0, num_inference_steps=3, output_type="pt", **call)
    with fe.attach(pipe, pool=pool) as fusion:
        got = pipe(PROMPTS, loras=PAIRS, generator=[torch.Generator().manual_seed(s) for s in seeds], **options).images
        records, names = fusion.trace.gather(), fusion.layer_names
    assert sorted({r.step for r in records}) == [0, 1, 2]
    for image, (prompt, pair, seed) in enumerate(zip(PROMPTS, PAIRS, seeds)):
        with fe.attach(pipe, *[loras[n] for n in pair]) as single:
            expected = pipe([prompt], generator=[torch.Generator().manual_seed(seed)], **options).images
            single_records = single.trace.gather()
        torch.testing.assert_close(got[image:image + 1], expected, atol=2e-5, rtol=1e-4)
        pooled = {(r.step, names[r.layer]): int(r.choice[image]) for r in records}
        for record in single_records:
            key = (record.step, single.layer_names[record.layer])
            assert pooled[key] == (0 if int(record.choice[0]) == 1 else 1), key


def test_sd_pipeline_pairs_equal_single_pair_calls(tiny_pipe):
    pool, loras = make_pool(tiny_pipe.unet, torch.float32)
    _pipeline_equivalence(tiny_pipe, pool, loras)


def test_sdxl_pipeline_pairs_equal_single_pair_calls(sdxl_pipe):
    pipe = copy.deepcopy(sdxl_pipe)
    pool, loras = make_pool(pipe.unet, torch.float32)
    _pipeline_equivalence(pipe, pool, loras, height=32, width=32)


@pytest.fixture(scope="module")
def sdxl_pipe():
    from test_sdxl import sdxl_pipe as build

    return build.__wrapped__()
