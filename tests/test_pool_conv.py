"""Conv (LoCon) layers in the LoRA pool: each image of a multi-pair CFG batch equals its own single-pair attach
(float64, 1e-10, decisions identical) with LoRAs on the resnets' 3x3 conv1/conv2 and 1x1 proj_in convs beside the
attention linears (mixed ranks); a 3-LoRA image on a conv layer against an independent float64 computation;
``pool.nbytes`` with conv factors; conv LoRAs of another kernel size refused naming the layer and the shapes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import unet_inputs
from test_fls_oracle import oracle_score
from test_pool_equivalence import COPIES, image_rows, run_pool, run_single

import fusion_engine as fe
from fusion_engine.runtime.layers import DynamicLoRAConv2d
from fusion_engine.worlds.random import attention_targets, random_lora

IMAGES = 4
ASSIGNMENT = [("s", "t"), ("t", "s"), ("s", "t", "u"), ("u",)]
THREE_WAY_LAYER = "up_blocks.1.resnets.0.conv2"  # all of s, t and u adapt it


def conv_targets(unet, kinds=("conv1", "conv2"), skip=()):
    return [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Conv2d)
            and ".resnets." in name and name.endswith(kinds) and not name.startswith(skip)]


def proj_in_targets(unet, skip=()):
    return [name for name, _ in unet.named_modules() if name.endswith("proj_in") and not name.startswith(skip)]


def with_conv_layers(lora, unet, targets, rank, alpha, strength, seed):
    """``lora`` plus random conv factors on ``targets``: A (r, C_in, kh, kw), B (N, r, 1, 1), non-zero."""
    generator = torch.Generator().manual_seed(seed)
    layers = dict(lora.layers)
    for name in targets:
        weight = unet.get_submodule(name).weight
        out_channels, fan_in = weight.shape[0], weight[0].numel()
        lora_a = torch.randn(rank, *weight.shape[1:], generator=generator) / fan_in**0.5
        lora_b = torch.randn(out_channels, rank, 1, 1, generator=generator) * (strength * weight.std().item()
                                                                               / rank**0.5)
        layers[name] = fe.LoRALayer(lora_a=lora_a, lora_b=lora_b * (rank / alpha), alpha=alpha)
    return fe.LoRA(layers=layers, source="<random conv>", layout="peft")


def conv_loras(unet) -> dict:
    """s: rank 4 everywhere; t: rank 8 (alpha 4), skipping the mid block's attention and the down blocks' convs;
    u: rank 2 (alpha 1), convs of the up blocks only. Scales are powers of two (exact in float32)."""
    s = with_conv_layers(random_lora(unet, attention_targets(unet), rank=4, alpha=4.0, strength=3.0, seed=1),
                         unet, conv_targets(unet) + proj_in_targets(unet), rank=4, alpha=4.0, strength=3.0, seed=2)
    t = with_conv_layers(random_lora(unet, attention_targets(unet, skip=("mid_block",)), rank=8, alpha=4.0,
                                     strength=3.0, seed=3),
                         unet, conv_targets(unet, skip=("down_blocks",)) + proj_in_targets(unet, skip=("mid_block",)),
                         rank=8, alpha=4.0, strength=3.0, seed=4)
    u = with_conv_layers(fe.LoRA(layers={}, source="<random conv>", layout="peft"), unet,
                         conv_targets(unet, skip=("down_blocks", "mid_block")), rank=2, alpha=1.0, strength=3.0, seed=5)
    return {"s": s, "t": t, "u": u}


def float64_setup(tiny_pipe, seed):
    unet = tiny_pipe.unet.double()
    loras = conv_loras(unet)
    pool = fe.LoRAPool(dtype=torch.float64)
    for name, lora in loras.items():
        pool.add(name, lora)
    sample, t, context = unet_inputs(unet, IMAGES * COPIES, seed=seed)
    return unet, pool, loras, (sample.double(), t, context.double())


@pytest.mark.parametrize("divergence", ["kl", "cosine"])
def test_conv_layers_each_image_equals_its_single_pair_attach_fls(tiny_pipe, divergence):
    unet, pool, loras, inputs = float64_setup(tiny_pipe, seed=3)
    got, pool_names, pool_records = run_pool(unet, pool, inputs, ASSIGNMENT, divergence=divergence)
    assert any(name.endswith("conv1") for name in pool_names) and any(n.endswith("proj_in") for n in pool_names)
    by_layer = {pool_names[r.layer]: r for r in pool_records}
    conv_choices = set()
    for image, names in enumerate(ASSIGNMENT):
        if len(names) > 2:
            continue
        expected, names_single, records = run_single(unet, loras, inputs, image, names, divergence=divergence)
        torch.testing.assert_close(got[image_rows(image)], expected, atol=1e-10, rtol=1e-10)
        for record in records:
            layer = names_single[record.layer]
            pooled = int(by_layer[layer].choice[image])
            expected_position = (0 if int(record.choice[0]) == 1 else 1) if len(names) == 2 else 0
            assert pooled == expected_position, layer
            if ".resnets." in layer and len(names) == 2:
                conv_choices.add(pooled)
                pair_scores = torch.stack([record.score_subject[0], record.score_style[0]]).float()
                torch.testing.assert_close(by_layer[layer].scores[image, :2], pair_scores)
    assert conv_choices == {0, 1}, "the test needs both LoRAs chosen on some conv layer"


@pytest.mark.parametrize("policy", ["direct", "klora"])
def test_conv_layers_static_policies_per_image_equal_single_pair(tiny_pipe, policy):
    unet, pool, loras, inputs = float64_setup(tiny_pipe, seed=4)
    assignment = [("s", "t"), ("t", "s"), ("u", "t"), ("s",)]
    for step in (0, 3):
        got, _, _ = run_pool(unet, pool, inputs, assignment, policy=policy, step=step)
        for image, names in enumerate(assignment):
            expected, _, _ = run_single(unet, loras, inputs, image, names, policy=policy, step=step)
            torch.testing.assert_close(got[image_rows(image)], expected, atol=1e-10, rtol=1e-10)


def test_klora_conv_layers_keep_the_single_pair_choice(tiny_pipe):
    unet, pool, loras, _ = float64_setup(tiny_pipe, seed=4)
    with fe.attach(copy.deepcopy(unet), loras["s"], loras["t"], policy="klora") as single, \
            fe.attach(copy.deepcopy(unet), pool=pool, policy="klora") as pooled:
        kept = set()
        for step in (0, 3):
            single.set_step(step, 4)
            pooled.set_step(step, 4)
            for layer in single.layers:
                if ".resnets." not in layer.name:
                    continue
                weights = single.policy.weights(layer, single.context)
                position = pooled.policy.layer_choice(layer.name, ("s", "t"), pooled.context)
                assert position == (0 if weights == (1.0, 0.0) else 1), (layer.name, step)
                kept.add(position)
    assert kept == {0, 1}


def conv_oracle(module, x, loras, names, divergence):
    """N-way FLS of one image on a conv layer from the definitions: F.conv2d per LoRA, float64, no pool."""
    y0 = F.conv2d(x, module.weight, module.bias, module.stride, module.padding)
    base = y0.permute(0, 2, 3, 1).reshape(-1, y0.shape[1])
    best, best_score, best_delta = -1, None, None
    for position, name in enumerate(names):
        layer = loras[name].layers.get(THREE_WAY_LAYER)
        if layer is None:
            continue
        hidden = F.conv2d(x, layer.lora_a.double(), None, module.stride, module.padding)
        delta = layer.alpha / layer.rank * F.conv2d(hidden, layer.lora_b.double())
        delta = delta.permute(0, 2, 3, 1).reshape(-1, y0.shape[1])
        score = oracle_score(base + delta, base, divergence).mean()
        if best < 0 or score > best_score:  # strictly larger: ties keep the earlier name
            best, best_score, best_delta = position, score, delta
    out = base + best_delta
    return out.reshape(y0.shape[0], *y0.shape[2:], -1).permute(0, 3, 1, 2), best


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_three_loras_on_a_conv_layer_match_a_float64_computation(tiny_pipe, divergence):
    unet, pool, loras, _ = float64_setup(tiny_pipe, seed=0)
    original = copy.deepcopy(unet.get_submodule(THREE_WAY_LAYER))
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(IMAGES * COPIES, original.in_channels, 6, 6, generator=generator, dtype=torch.float64)
    orders = [("s", "t", "u"), ("u", "s"), ("s", "u"), ("u", "t", "s")]
    with fe.attach(unet, pool=pool, divergence=divergence) as fusion:
        fusion.set_batch_layout(IMAGES, COPIES)
        fusion.set_loras(orders)
        fusion.set_step(0, 4)
        layer = unet.get_submodule(THREE_WAY_LAYER)
        assert isinstance(layer, DynamicLoRAConv2d)
        with torch.no_grad():
            got = layer(x)
        record = fusion.trace.gather()[-1]
    positions = set()
    for image, names in enumerate(orders):
        rows = image_rows(image, IMAGES)
        expected, position = conv_oracle(original, x[rows], loras, names, divergence)
        torch.testing.assert_close(got[rows], expected, atol=1e-10, rtol=1e-10)
        assert int(record.choice[image]) == position, (image, names)
        positions.add(names[position])
    assert len(positions) >= 2, f"the images should keep different LoRAs: {positions}"


def test_nbytes_counts_conv_factors(tiny_pipe):
    unet = tiny_pipe.unet
    loras = conv_loras(unet)
    pool = fe.LoRAPool().add("s", loras["s"]).add("u", loras["u"])

    def layer_bytes(name, slots, rank):  # float32 A (S, R, C_in, kh, kw) and B (S, N, R), float32 scales, bools
        weight = unet.get_submodule(name).weight
        rows = slots + 1  # the zero slot
        return rows * rank * (weight[0].numel() + weight.shape[0]) * 4 + rows * (4 + 1)

    conv = THREE_WAY_LAYER
    assert pool.layers[conv].a.shape == (3, 4, *unet.get_submodule(conv).weight.shape[1:])
    assert pool.layers[conv].b.shape == (3, unet.get_submodule(conv).weight.shape[0], 4)
    assert pool.nbytes == sum(layer_bytes(name, 2, 4) for name in loras["s"].layers)
    assert pool.factors("u", conv)[0].shape == (2, *unet.get_submodule(conv).weight.shape[1:])
    limited = fe.LoRAPool(budget_bytes=pool.nbytes - 1).add("s", loras["s"])
    with pytest.raises(fe.PoolBudgetError, match=r"add\('u'\)"):
        limited.add("u", loras["u"])
    assert limited.names == ["s"]


def test_conv_lora_of_another_kernel_size_is_refused_naming_layer_and_shapes(tiny_pipe):
    unet = tiny_pipe.unet
    loras = conv_loras(unet)
    name = "down_blocks.1.resnets.0.conv1"  # Conv2d 32 -> 64, 3x3
    five = fe.LoRA({name: fe.LoRALayer(torch.randn(2, 32, 5, 5), torch.randn(64, 2, 1, 1), 2.0)})
    one = fe.LoRA({name: fe.LoRALayer(torch.randn(2, 32, 1, 1), torch.randn(64, 2, 1, 1), 2.0)})
    pool = fe.LoRAPool().add("s", loras["s"])
    with pytest.raises(fe.LoRAShapeError, match=rf"{name} has A \(2, 32, 5, 5\) / B \(64, 2\) \(weight "
                                                 r"\(64, 32, 5, 5\)\).*have weight \(64, 32, 3, 3\)"):
        pool.add("five", five)
    assert pool.names == ["s"]
    modules, state = [id(m) for m in unet.modules()], {k: v.clone() for k, v in unet.state_dict().items()}
    for lora, kernel in ((five, "5x5"), (one, "1x1")):
        with pytest.raises(fe.ModelMismatchError, match=rf"{name}: the pool's LoRAs need weight .*, the model's "
                                                        rf"Conv2d is \(64, 32, 3, 3\) \(a LoRA kernel of {kernel}"):
            fe.attach(unet, pool=fe.LoRAPool().add("k", lora))
        assert [id(m) for m in unet.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    with fe.attach(unet, pool=pool) as fusion:
        before = (pool.nbytes, pool.names, pool.version, len(fusion.layers))
        upsampler = "up_blocks.0.upsamplers.0.conv"  # 64 -> 64, 3x3; no pool LoRA adapts it yet
        stray = fe.LoRA({"down_blocks.1.resnets.0.conv_shortcut": one.layers[name],  # 32 -> 64, 1x1: fits
                         upsampler: fe.LoRALayer(torch.randn(2, 64, 1, 1), torch.randn(64, 2, 1, 1), 2.0)})
        with pytest.raises(fe.ModelMismatchError, match=rf"(?s)cannot add pool LoRA 'stray'.*{upsampler}: .*need "
                                                        r"weight \(64, 64\).*kernel of 1x1 .*, the conv's is 3x3"):
            pool.add("stray", stray)
        assert (pool.nbytes, pool.names, pool.version, len(fusion.layers)) == before


def test_kohya_conv_files_in_a_pool_equal_single_pair_pipeline_calls(tiny_pipe, tmp_path):
    """LoCon files in kohya's layout through the normal loader: a pool call per image equals its pair's call."""
    loras = conv_loras(tiny_pipe.unet)
    pool = fe.LoRAPool()
    for name in ("s", "t"):
        fe.save_lora(loras[name], tmp_path / f"{name}.safetensors", layout="kohya")
        pool.add(name, tmp_path / f"{name}.safetensors")
    assert pool.layers[THREE_WAY_LAYER].is_conv
    torch.testing.assert_close(pool.factors("t", THREE_WAY_LAYER)[0], loras["t"].layers[THREE_WAY_LAYER].lora_a)
    prompts, pairs, seeds = ["a sbu dog in szn style", "a red car"], [("s", "t"), ("t", "s")], [11, 12]
    options = dict(guidance_scale=4.0, num_inference_steps=2, output_type="pt")
    with fe.attach(tiny_pipe, pool=pool) as fusion:
        got = tiny_pipe(prompts, loras=pairs, generator=[torch.Generator().manual_seed(s) for s in seeds],
                        **options).images
        assert any(isinstance(layer, DynamicLoRAConv2d) for layer in fusion.fusion.layers)
    for image, (prompt, pair, seed) in enumerate(zip(prompts, pairs, seeds)):
        with fe.attach(tiny_pipe, *[fe.load_lora(tmp_path / f"{n}.safetensors") for n in pair]):
            expected = tiny_pipe([prompt], generator=[torch.Generator().manual_seed(seed)], **options).images
        torch.testing.assert_close(got[image:image + 1], expected, atol=2e-5, rtol=1e-4)
