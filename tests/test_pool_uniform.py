"""A pool batch whose images all name the same LoRAs runs the pair arithmetic (issue 21), and a pipeline attach
resolves every component before it changes any.

Uniform pool batches: float32 on the reference backend, on the tiny conv + attention net of ``test_frozen_pair`` (its
blocks named as SDXL's B-LoRA blocks, a 3x3 and a 1x1 conv), against ``fe.attach`` of the same LoRAs as a pair:
outputs, decisions and scores bitwise equal for each policy, plain and DoRA, while the pool holds a third, wider LoRA
(its stacks padded past both ranks). Which ops ran is counted, so a pass cannot come from the pooled ops agreeing.
"""
import pytest
import torch
from test_frozen_pair import CHANNELS, TinyNet, make_lora

import fusion_engine as fe
import fusion_engine.integration.attach as pipeline_attach
import fusion_engine.runtime.fusion as runtime_fusion
import fusion_engine.runtime.layers as runtime_layers
from fusion_engine import ops
from fusion_engine.errors import ModelMismatchError
from fusion_engine.lora import LoRALayer
from fusion_engine.runtime.trace import CODE_TO_POSITION

IMAGES, COPIES, STEPS = 2, 2, 4
POLICIES = [("fls", {"divergence": "kl"}), ("fls", {"divergence": "dot"}), ("direct", {"weights": (0.7, 1.3)}),
            ("klora", {}), ("blora", {}), ("switch", {"tau": 1}), ("composite", {})]
OPS = {"fls_linear": ops, "mix_linear": ops, "pooled_fls_linear": ops, "pooled_mix_linear": ops,
       "fls_select": runtime_layers, "pooled_fls_conv2d": runtime_layers, "pooled_mix_conv2d": runtime_layers}


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    net = TinyNet().float()
    skip = ("up_blocks.0.attentions.0.to_v", "conv_out")
    loras = {"s": make_lora(net, 1, 2), "t": make_lora(net, 2, 3, skip=skip), "wide": make_lora(net, 5, 6),
             "ds": make_lora(net, 3, 2, dora=True), "dt": make_lora(net, 4, 3, skip=skip[1:], dora=True)}
    pool = fe.LoRAPool()
    for name, lora in loras.items():
        pool.add(name, lora)
    x = torch.randn(IMAGES * COPIES, CHANNELS, 3, 3, generator=torch.Generator().manual_seed(11))
    return net, loras, pool, x


@pytest.fixture
def calls(monkeypatch):
    """How often each pair and pooled op ran."""
    counts = dict.fromkeys(OPS, 0)

    def counting(name, op):
        def counted(*args, **kwargs):
            counts[name] += 1
            return op(*args, **kwargs)
        return counted

    for name, module in OPS.items():
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts


def run(fusion, net, x, policy, granularity, loras=None, scale=1.0):
    """Two steps on an image layout of 2 x 2 copies: (outputs, trace records by layer name per step)."""
    if loras is not None:
        fusion.set_loras(loras)
    fusion.set_batch_layout(IMAGES, COPIES)
    outs = []
    for step in (0, 3):
        fusion.set_step(step, STEPS)
        if policy == "composite":
            fusion.set_branch("subject" if step == 0 else "style")
        with torch.no_grad():
            outs.append(net(x, cross_attention_kwargs={"scale": scale}))
    records = {(r.step, fusion.layer_names[r.layer]): r for r in fusion.trace.gather()}
    return outs, records


def assert_pair_arithmetic(net, x, pool, pair, names, policy, options, granularity="image", scale=1.0):
    """The pool with every image naming ``names`` against ``fe.attach(net, *pair)``: bitwise outputs and scores, each
    pair decision the pool's position for every group (a static policy: for every image)."""
    common = dict(policy=policy, granularity=granularity, backend="reference", **options)
    with fe.attach(net, pool=pool, **common) as fusion:
        got, pooled = run(fusion, net, x, policy, granularity, [names] * IMAGES, scale)
    with fe.attach(net, *pair, **common) as single:
        expected, records = run(single, net, x, policy, granularity, scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert records and set(records) <= set(pooled)
    for key, record in records.items():
        mine = pooled[key]
        positions = torch.tensor([CODE_TO_POSITION[int(code)] for code in record.choice])
        assert torch.equal(mine.choice, positions.expand_as(mine.choice)), key
        if record.scores is not None:
            assert torch.equal(mine.scores, record.scores[:, : len(names)]), key
    return pooled, records


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("policy,options", POLICIES, ids=[f"{p}-{'-'.join(map(str, o.values()))}" for p, o in POLICIES])
def test_a_uniform_pool_batch_is_the_pair_bitwise(world, calls, policy, options, dora):
    net, loras, pool, x = world
    names = ("ds", "dt") if dora else ("s", "t")
    assert_pair_arithmetic(net, x, pool, [loras[n] for n in names], names, policy, options, scale=0.6 if dora else 1.0)
    assert calls["pooled_fls_linear"] == calls["pooled_mix_linear"] == calls["pooled_fls_conv2d"] == 0
    assert calls["pooled_mix_conv2d"] == 0
    pair_ops = calls["fls_linear"] + calls["mix_linear"] + calls["fls_select"]
    assert pair_ops > 0 or (dora and policy != "fls")  # DoRA's static path adds the deltas in the layer itself


@pytest.mark.parametrize("granularity", ["sample", "token", "batch"])
def test_a_uniform_pool_batch_is_the_pair_at_every_granularity(world, granularity):
    net, loras, pool, x = world
    assert_pair_arithmetic(net, x, pool, [loras["s"], loras["t"]], ("s", "t"), "fls", {}, granularity)


@pytest.mark.parametrize("policy,options", [("fls", {"divergence": "kl"}), ("direct", {"weights": (0.7,)})])
def test_a_pool_batch_naming_one_lora_is_the_pair_with_the_other_absent(world, calls, policy, options):
    net, loras, pool, x = world
    pair_options = {"weights": (0.7, 1.0)} if policy == "direct" else options
    common = dict(policy=policy, backend="reference")
    with fe.attach(net, pool=pool, **common, **options) as fusion:
        got, pooled = run(fusion, net, x, policy, "image", [("t",)] * IMAGES)
    with fe.attach(net, loras["t"], **common, **pair_options) as single:
        expected, records = run(single, net, x, policy, "image")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for key, record in records.items():
        assert torch.equal(pooled[key].choice, torch.zeros_like(pooled[key].choice))  # position 0 throughout
        if record.scores is not None:
            assert torch.equal(pooled[key].scores, record.scores[:, :1])
    left_out = [key for key in pooled if key not in records]  # layers "t" leaves out: the base layer there
    assert {layer for _, layer in left_out} == {"up_blocks.0.attentions.0.to_v", "conv_out"}
    assert all(bool((pooled[key].choice == -1).all()) for key in left_out)
    assert calls["pooled_fls_linear"] == calls["pooled_mix_linear"] == calls["pooled_fls_conv2d"] == 0


@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_a_uniform_pool_batch_runs_the_pair_kernel_on_triton(calls, monkeypatch, policy):
    """backend="triton" (interpreted on CPU): a uniform batch launches the pair kernel, as the pair attach does, with
    the same outputs and choices."""
    pytest.importorskip("triton")
    backends = []
    for name in ("fls_linear", "mix_linear"):
        counted = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=counted, **kwargs: backends.append(kwargs["backend"]) or _op(
            *args, **kwargs))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24))
    subject, style = make_lora(net, 1, 4), make_lora(net, 2, 8)
    pool = fe.LoRAPool().add("s", subject).add("t", style).add("u", make_lora(net, 3, 16))
    x = torch.randn(4, 9, 24, generator=torch.Generator().manual_seed(1))
    results = []
    for bank in ({"pool": pool}, {"subject": subject, "style": style}):
        with fe.attach(net, **bank, policy=policy, backend="triton") as fusion, torch.no_grad():
            fusion.set_batch_layout(2, 2)
            if "pool" in bank:
                fusion.set_loras([("s", "t")] * 2)
            results.append((net(x), [r.choice for r in fusion.trace.gather()]))
    assert backends == ["triton"] * 4 and calls["pooled_fls_linear"] == calls["pooled_mix_linear"] == 0
    (out, choices), (expected, pair_choices) = results
    assert torch.equal(out, expected)
    for mine, pair in zip(choices, pair_choices):
        positions = torch.tensor([CODE_TO_POSITION[int(code)] for code in pair])
        assert torch.equal(mine, positions.expand_as(mine))


@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_a_mixed_pool_batch_runs_the_pooled_ops(world, calls, policy):
    net, _, pool, x = world
    with fe.attach(net, pool=pool, policy=policy, backend="reference") as fusion:
        run(fusion, net, x, policy, "image", [("s", "t"), ("t", "s")])
        assert calls["fls_linear"] == calls["mix_linear"] == calls["fls_select"] == 0
        pooled = calls[f"pooled_{'fls' if policy == 'fls' else 'mix'}_linear"]
        assert pooled == 2 * 8  # two steps x eight Linear layers
        run(fusion, net, x, policy, "image", [("s", "t")] * IMAGES)  # then uniform: the pair ops, the same attach
        assert calls[f"pooled_{'fls' if policy == 'fls' else 'mix'}_linear"] == pooled
        assert calls["fls_linear" if policy == "fls" else "mix_linear"] == 2 * 8


def test_a_uniform_batch_follows_the_pool_and_the_layout(world):
    """Entries reload when the pool changes; a uniform batch still checks its image count and its names."""
    net, loras, pool, x = world
    with fe.attach(net, pool=pool, backend="reference") as fusion:
        fusion.set_loras([("s", "t")] * 3)
        fusion.set_batch_layout(IMAGES, COPIES)
        with pytest.raises(fe.BatchLayoutError, match="3 image"), torch.no_grad():
            net(x)
        fusion.set_loras([("s", "t")] * IMAGES)
        pool.remove("t")
        with pytest.raises(fe.UnknownLoRAError, match="removed since"), torch.no_grad():
            net(x)
        pool.add("t", loras["s"])  # another LoRA under the same name: the layers take its factors
        with torch.no_grad():
            got = net(x)
    pool.remove("t").add("t", loras["t"])
    with fe.attach(net, loras["s"], loras["s"], backend="reference") as single:
        single.set_batch_layout(IMAGES, COPIES)
        with torch.no_grad():
            assert torch.equal(got, net(x))


def test_a_uniform_pipeline_call_with_text_encoder_parts_is_the_pairs_bitwise(tiny_pipe, calls):
    """``pipe(prompts, loras=[same pair] * n)`` on a pool: denoiser and text encoder run the pair ops, so its images are
    bitwise those of ``fe.attach(pipe, subject, style)``."""
    from test_text_encoder import lora_with_text_parts

    subject, style = lora_with_text_parts(tiny_pipe, seed=3), lora_with_text_parts(tiny_pipe, seed=9)
    pool = fe.LoRAPool().add("a", subject).add("b", style).add("c", lora_with_text_parts(tiny_pipe, seed=21))
    prompts, options = ["a sbu dog", "a szn cat"], dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    with fe.attach(tiny_pipe, pool=pool, backend="reference") as attached:
        assert set(attached.components) == {"text_encoder"}
        got = tiny_pipe(prompts, loras=[("a", "b")] * 2, generator=torch.Generator().manual_seed(5), **options).images
    assert calls["pooled_fls_linear"] == calls["pooled_mix_linear"] == 0 and calls["mix_linear"] > 0
    with fe.attach(tiny_pipe, subject, style, backend="reference"):
        expected = tiny_pipe(prompts, generator=torch.Generator().manual_seed(5), **options).images
    assert torch.equal(got, expected)


# -- a pipeline attach resolves every component before it installs any ---------------------------------------------
def _misfit_text_part(pipe, seed=3):
    """A LoRA with UNet and text-encoder parts whose text-encoder part has one layer of the wrong width."""
    from test_text_encoder import lora_with_text_parts

    lora = lora_with_text_parts(pipe, seed=seed)
    text = dict(lora.other_components["text_encoder"])
    name, layer = next(iter(text.items()))
    text[name] = LoRALayer(lora_a=torch.zeros(layer.rank, layer.lora_a.shape[1] + 1), lora_b=layer.lora_b,
                           alpha=layer.alpha)
    return fe.LoRA(lora.layers, other_components={"text_encoder": text})


@pytest.mark.parametrize("bank", ["pair", "pool"])
def test_a_pipeline_whose_text_encoder_part_misfits_leaves_the_unet_untouched(tiny_pipe, monkeypatch, bank):
    from test_text_encoder import lora_with_text_parts

    installed = []

    def counted(model, spec, _install=runtime_fusion.install):
        installed.append(model)
        return _install(model, spec)

    monkeypatch.setattr(runtime_fusion, "install", counted)  # what attach_model calls
    monkeypatch.setattr(pipeline_attach, "install", counted)
    unet, pipeline_class = tiny_pipe.unet, type(tiny_pipe)
    modules, hooks = dict(unet.named_modules()), (dict(unet._forward_pre_hooks), dict(unet._forward_hooks))
    misfit, fitting = _misfit_text_part(tiny_pipe), lora_with_text_parts(tiny_pipe, seed=9)
    if bank == "pool":
        pool = fe.LoRAPool().add("b", misfit)  # its text-encoder part goes into the pool's part
        attach = lambda: fe.attach(tiny_pipe, pool=pool)  # noqa: E731
    else:
        attach = lambda: fe.attach(tiny_pipe, fitting, misfit)  # noqa: E731
    with pytest.raises(ModelMismatchError, match="do not fit"):
        attach()
    assert installed == []  # nothing was installed, the denoiser included
    assert all(module is modules[name] for name, module in unet.named_modules()) and len(modules) == len(
        dict(unet.named_modules()))
    assert (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)) == hooks and type(tiny_pipe) is pipeline_class
    assert runtime_fusion.attached_fusion(unet) is None
    fe.attach(tiny_pipe, fitting).detach()  # the pipeline attaches as before
    assert [type(model).__name__ for model in installed] == ["UNet2DConditionModel", "CLIPTextModel"]


def test_a_pipeline_attach_coerces_each_lora_once(tiny_pipe, tmp_path, monkeypatch):
    from test_text_encoder import lora_with_text_parts

    paths = [fe.save_lora(lora_with_text_parts(tiny_pipe, seed=seed), tmp_path / f"{seed}.safetensors")
             for seed in (3, 9)]
    coerced = []

    def counted(value, role, _as_lora=runtime_fusion.as_lora):
        coerced.append(role)
        return _as_lora(value, role)

    monkeypatch.setattr(runtime_fusion, "as_lora", counted)
    monkeypatch.setattr(pipeline_attach, "as_lora", counted)
    with fe.attach(tiny_pipe, *paths) as attached:
        assert set(attached.components) == {"text_encoder"}
    assert sorted(coerced) == ["style", "subject"]


def test_a_mixed_batch_after_a_uniform_one_holds_no_copies_of_its_loras(world, calls):
    """The uniform batch's entries (B and DoRA gains are copies) go when the batch turns mixed, and the mixed batch runs
    the pooled ops; back to uniform, the pair entries come back, the same as before."""
    net, _, pool, x = world
    with fe.attach(net, pool=pool, policy="fls", backend="reference") as fusion:
        uniform_out, _ = run(fusion, net, x, "fls", "image", [("s", "t")] * IMAGES)
        assert any(layer.subject_b.numel() for layer in fusion.layers)
        assert calls["pooled_fls_linear"] == 0
        run(fusion, net, x, "fls", "image", [("s", "t"), ("t", "wide")])
        assert calls["pooled_fls_linear"] > 0
        assert all(layer.subject_b.numel() == layer.style_b.numel() == 0 for layer in fusion.layers)
        again, _ = run(fusion, net, x, "fls", "image", [("s", "t")] * IMAGES)
    assert all(torch.equal(a, b) for a, b in zip(uniform_out, again))
