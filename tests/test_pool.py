"""The LoRA pool's mechanics: memory accounting and budget, add/remove while attached, errors that name the fault,
a failed attach or add that changes nothing, and the N-way decision rule on hand-made scores."""
import copy
import threading

import pytest
import torch
from conftest import unet_inputs, unet_out

import fusion_engine as fe
from fusion_engine.ops.pooled import decide_n
from fusion_engine.runtime.layers import DynamicLoRALayer
from fusion_engine.worlds.random import attention_targets, default_loras, random_lora


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, modules, state):
    assert not any(isinstance(m, DynamicLoRALayer) for m in model.modules())
    assert [id(m) for m in model.modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_nbytes_counts_padded_stacks_and_budget_refuses_without_change(tiny_pipe):
    unet = tiny_pipe.unet
    subject, style = default_loras(unet, seed=0)  # ranks 4 and 8; the style skips the mid block
    def layer_bytes(name, slots, rank):  # float32 factors (S, R, K) and (S, N, R), float32 scales, bool flags
        module = unet.get_submodule(name)
        rows = slots + 1  # the zero slot
        return rows * rank * (module.in_features + module.out_features) * 4 + rows * (4 + 1)

    pool = fe.LoRAPool()
    pool.add("s", subject)
    assert pool.nbytes == sum(layer_bytes(name, 1, 4) for name in subject.layers)
    pool.add("t", style)  # two slots everywhere, padded to rank 8 where the style is, rank 4 in the mid block
    assert pool.nbytes == sum(layer_bytes(name, 2, 8 if name in style.layers else 4) for name in subject.layers)
    fixed = fe.LoRAPool(max_loras=3, max_rank=16).add("s", subject)  # every layer at full capacity from the start
    assert fixed.nbytes == sum(layer_bytes(name, 3, 16) for name in subject.layers)
    limited = fe.LoRAPool(budget_bytes=pool.nbytes - 1)
    limited.add("s", subject)
    before = (limited.nbytes, limited.names, limited.version)
    with pytest.raises(fe.PoolBudgetError, match=r"add\('t'\).*over its budget of \d+"):
        limited.add("t", style)
    assert (limited.nbytes, limited.names, limited.version) == before
    assert fe.LoRAPool(budget_bytes=pool.nbytes).add("s", subject).add("t", style).nbytes == pool.nbytes


def test_remove_frees_and_add_reuses_the_slot_in_place(tiny_pipe):
    subject, style = default_loras(tiny_pipe.unet, seed=0)
    other, _ = default_loras(tiny_pipe.unet, seed=5)
    pool = fe.LoRAPool().add("s", subject).add("t", style).add("u", other)
    name = next(name for name in subject.layers if name not in style.layers)  # a mid-block layer: rank 4 only
    wide = next(iter(style.layers))
    stack = pool.layers[name].a
    pool.remove("t")
    assert pool.names == ["s", "u"] and "t" not in pool
    assert pool.layers[wide].rank == 4 and pool.layers[name].a is stack  # the rank-8 padding left with the style
    pool.add("v", other)  # same rank as the slot's neighbours: written in place
    assert pool.slot("v") == 1 and pool.layers[name].a is stack
    assert torch.equal(pool.layers[name].a[1, :4], other.layers[name].lora_a)
    pool.remove("u").remove("v")  # no layer narrows: the stacks stay, free slots and all
    assert pool.capacity == 1 and pool.layers[name].a is stack and stack.shape[0] == 4
    pool.remove("s")
    assert pool.nbytes == 0 and not pool.layers


def test_fixed_capacity_stacks_never_reallocate_and_refuse_what_does_not_fit(tiny_pipe):
    subject, style = default_loras(tiny_pipe.unet, seed=0)  # ranks 4 and 8; the style skips the mid block
    other, _ = default_loras(tiny_pipe.unet, seed=5)
    mid = next(name for name in subject.layers if name not in style.layers)
    with pytest.raises(fe.OptionError, match="needs both max_loras and max_rank"):
        fe.LoRAPool(max_loras=2)
    with pytest.raises(fe.OptionError, match="max_rank must be a whole number >= 1"):
        fe.LoRAPool(max_loras=2, max_rank=0)
    pool = fe.LoRAPool(max_loras=2, max_rank=8).add("s", subject)
    stacks = {name: (layer.a, layer.b, layer.scales, layer.present) for name, layer in pool.layers.items()}
    nbytes = pool.nbytes
    assert all(layer.a.shape[:2] == (3, 8) for layer in pool.layers.values())  # 2 slots + the zero slot, rank 8
    before = (pool.nbytes, pool.names, pool.version)
    with pytest.raises(fe.PoolBudgetError, match="rank 9, over the pool's max_rank=8"):
        pool.add("wide", fe.LoRA({mid: fe.LoRALayer(torch.randn(9, subject.layers[mid].lora_a.shape[1]),
                                                    torch.randn(subject.layers[mid].lora_b.shape[0], 9), 9.0)}))
    pool.add("t", style)
    with pytest.raises(fe.PoolBudgetError, match="holds max_loras=2 LoRAs already"):
        pool.add("u", other)
    assert pool.names == ["s", "t"]
    for _ in range(3):  # every layer's last LoRA leaves and comes back: the same stacks, the same bytes
        pool.remove("s").remove("t")
        assert not pool.layers and pool.nbytes == nbytes and (pool.nbytes, pool.names) == (before[0], [])
        with pytest.raises(fe.LoRAShapeError, match="another base model"):  # the idle stacks still fix the shape
            pool.add("misfit", fe.LoRA({mid: fe.LoRALayer(torch.randn(4, 7), torch.randn(9, 4), 4.0)}))
        pool.add("t", style).add("u", other)
        assert pool.slot("t") == 0 and pool.slot("u") == 1
        pool.remove("u").add("s", subject)
    for name, held in stacks.items():
        layer = pool.layers[name]
        assert all(new is old for new, old in zip((layer.a, layer.b, layer.scales, layer.present), held)), name
        assert not layer.a[-1].any() and not layer.b[-1].any() and not layer.present[-1]  # the zero slot
    assert torch.equal(pool.factors("s", mid)[0], subject.layers[mid].lora_a) and pool.nbytes == nbytes


def test_add_and_name_errors(tiny_pipe):
    subject, _ = default_loras(tiny_pipe.unet, seed=0)
    pool = fe.LoRAPool().add("s", subject)
    with pytest.raises(fe.OptionError, match="'s' is in the pool already"):
        pool.add("s", subject)
    with pytest.raises(fe.UnknownLoRAError, match=r"no LoRA named 'nope' in the pool \(it holds s\)"):
        pool.remove("nope")
    wide = fe.LoRA({next(iter(subject.layers)): fe.LoRALayer(torch.randn(4, 7), torch.randn(9, 4), 4.0)})
    with pytest.raises(fe.LoRAShapeError, match=r"layer .*to_q has A \(4, 7\) / B \(9, 4\).*another base model"):
        pool.add("wide", wide)
    conv = fe.LoRA({"conv_in": fe.LoRALayer(torch.randn(2, 4, 3, 3), torch.randn(8, 2, 3, 3), 2.0)})
    with pytest.raises(fe.LoRAShapeError, match=r"conv_in: B \(8, 2, 3, 3\) is not a 1x1 conv"):
        pool.add("conv", conv)  # conv (LoCon) layers are pooled (tests/test_pool_conv.py), with a 1x1 B
    assert pool.names == ["s"]  # DoRA layers are pooled too (tests/test_pool_features.py)


def test_assignment_errors_name_the_image_and_the_lora(tiny_pipe):
    unet = tiny_pipe.unet
    subject, style = default_loras(unet, seed=0)
    pool = fe.LoRAPool().add("s", subject).add("t", style)
    inputs = unet_inputs(unet, batch=4)
    with fe.attach(unet, pool=pool) as fusion:
        with pytest.raises(fe.UnknownLoRAError, match=r"image 1 names LoRA 'dog', which is not in the pool"):
            fusion.set_loras([("s", "t"), ("dog", "t")])
        with pytest.raises(fe.OptionError, match="entry 0 names a LoRA twice"):
            fusion.set_loras([("s", "s")])
        with pytest.raises(fe.OptionError, match="entry 1 must be a LoRA name or a non-empty tuple"):
            fusion.set_loras(["s", ()])
        with pytest.raises(fe.StepContextError, match="set_loras"):
            unet_out(unet, inputs)
        fusion.set_batch_layout(2, 2)
        fusion.set_loras(["s", "t", "s"])
        with pytest.raises(fe.BatchLayoutError, match=r"LoRAs for 3 image\(s\), but the batch layout says 2"):
            unet_out(unet, inputs)
        fusion.set_loras([("s", "t"), "t"])
        pool.remove("t")
        with pytest.raises(fe.UnknownLoRAError, match="image 0: no LoRA named 't'.*removed since"):
            unet_out(unet, inputs)
        fusion.set_loras(["s", "s"])  # the fusion still works after the error
        assert unet_out(unet, inputs).isfinite().all()


def test_add_while_attached_covers_new_layers_without_reattach(tiny_pipe):
    unet = tiny_pipe.unet
    down_only = random_lora(unet, attention_targets(unet, skip=("up_blocks", "mid_block")), rank=4, alpha=4.0,
                            strength=3.0, seed=1)
    subject, style = default_loras(unet, seed=3)
    pool = fe.LoRAPool().add("down", down_only)
    inputs = unet_inputs(unet, batch=4, seed=2)
    with fe.attach(unet, pool=pool) as fusion:
        covered = len(fusion.layers)
        fusion.set_batch_layout(2, 2)
        fusion.set_loras(["down", "down"])
        unet_out(unet, inputs)
        pool.add("s", subject).add("t", style)  # new layers: swapped in now
        assert len(fusion.layers) > covered and set(fusion.layer_names) == set(subject.layers)
        fusion.set_loras([("s", "t"), "down"])
        got = unet_out(unet, inputs)
        assert len(fusion.trace.layer_names) == len(fusion.layers)
    with fe.attach(unet, subject, style) as single:
        single.set_batch_layout(1, 2)
        expected = unet_out(unet, tuple(t[[0, 2]] if t.ndim else t for t in inputs))
    torch.testing.assert_close(got[[0, 2]], expected, atol=1e-5, rtol=1e-5)


def test_add_that_does_not_fit_the_attached_model_changes_nothing(tiny_pipe):
    unet = tiny_pipe.unet
    subject, _ = default_loras(unet, seed=0)
    pool = fe.LoRAPool().add("s", subject)
    stray = fe.LoRA({"down_blocks.0.resnets.0.conv1": fe.LoRALayer(torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    with fe.attach(unet, pool=pool) as fusion:
        layers, before = len(fusion.layers), (pool.nbytes, pool.names, pool.version)
        with pytest.raises(fe.ModelMismatchError, match=r"(?s)cannot add pool LoRA 'stray'.*conv1: the pool's "
                                                        r"LoRAs need weight \(8, 8\), the model's Conv2d is"):
            pool.add("stray", stray)
        assert (pool.nbytes, pool.names, pool.version) == before and len(fusion.layers) == layers


def test_failed_attach_leaves_the_model_exactly_as_it_was(tiny_pipe):
    unet = tiny_pipe.unet
    modules, state = [id(m) for m in unet.modules()], _state(unet)
    subject, _ = default_loras(unet, seed=0)
    missing = fe.LoRA({"no.such.layer": fe.LoRALayer(torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    with pytest.raises(fe.ModelMismatchError, match="no.such.layer"):
        fe.attach(unet, pool=fe.LoRAPool().add("s", subject).add("m", missing))
    with pytest.raises(fe.ModelMismatchError, match="pool is torch.float16 on cpu"):
        fe.attach(unet, pool=fe.LoRAPool(dtype=torch.float16).add("s", subject))
    with pytest.raises(fe.BatchLayoutError, match="unknown granularity .rows."):
        fe.attach(unet, pool=fe.LoRAPool().add("s", subject), granularity="rows")
    name, layer = next(iter(subject.layers.items()))
    too_wide = fe.LoRA({name: fe.LoRALayer(torch.randn(129, layer.lora_a.shape[1]),
                                           torch.randn(layer.lora_b.shape[0], 129), 1.0)})
    with pytest.raises(fe.AttachError, match="use backend='reference'"):  # rank 129: over the kernels' limit
        fe.attach(unet, pool=fe.LoRAPool().add("s", subject).add("w", too_wide), backend="triton")
    with pytest.raises(fe.OptionError, match="unknown policy 'nope'"):
        fe.attach(unet, pool=fe.LoRAPool().add("s", subject), policy="nope")
    with pytest.raises(fe.AttachError, match="not both"):
        fe.attach(unet, subject, pool=fe.LoRAPool())
    _assert_untouched(unet, modules, state)
    with fe.attach(unet, pool=fe.LoRAPool().add("s", subject)) as fusion:
        fusion.set_loras(["s"])
        unet_out(unet, unet_inputs(unet, batch=1))
    _assert_untouched(unet, modules, state)


def test_pairs_per_prompt_or_per_image_and_a_clear_error_otherwise(tiny_pipe):
    subject, style = default_loras(tiny_pipe.unet, seed=0)
    pool = fe.LoRAPool().add("s", subject).add("t", style)
    call = dict(num_inference_steps=1, output_type="pt", guidance_scale=4.0)
    with fe.attach(tiny_pipe, pool=pool) as fusion:
        per_prompt = tiny_pipe(["a", "b"], loras=[("s", "t"), "t"], num_images_per_prompt=2,
                               generator=torch.Generator().manual_seed(0), **call).images
        assert fusion.fusion.loras is None  # loras= holds for its call only
        per_image = tiny_pipe(["a", "b"], loras=[("s", "t"), ("s", "t"), "t", "t"], num_images_per_prompt=2,
                              generator=torch.Generator().manual_seed(0), **call).images
        assert torch.equal(per_prompt, per_image) and per_prompt.shape[0] == 4
        with pytest.raises(fe.BatchLayoutError, match=r"loras has 3 entries for 2 prompt\(s\) x 2 image"):
            tiny_pipe(["a", "b"], loras=["s", "t", "s"], num_images_per_prompt=2, **call)
        with pytest.raises(fe.UnknownLoRAError, match="image 1 names LoRA 'x'"):
            tiny_pipe(["a", "b"], loras=["s", "x"], **call)


def test_decide_n_ties_absent_and_zero_deltas():
    scores = torch.tensor([[1.0, 1.0, 0.5], [0.2, 0.9, 0.9], [5.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    candidate = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    live = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], dtype=torch.bool)
    # tie -> earlier; tie between 1 and 2 -> 1; position 0 not a candidate; no live candidate -> first; none -> -1
    assert decide_n(scores, candidate, live).tolist() == [0, 1, 2, 0, -1]


def test_a_deep_copy_of_a_pool_attached_model_is_stripped_by_detach_all(tiny_pipe):
    unet = tiny_pipe.unet
    modules, state = [id(m) for m in unet.modules()], _state(unet)
    subject, _ = default_loras(unet, seed=0)
    with fe.attach(unet, pool=fe.LoRAPool().add("s", subject)):
        clone = fe.detach_all(copy.deepcopy(unet))
    assert not any(isinstance(m, DynamicLoRALayer) for m in clone.modules())
    _assert_untouched(unet, modules, state)


def test_another_thread_cannot_change_the_assignment_or_the_pool_during_a_call(tiny_pipe):
    subject, style = default_loras(tiny_pipe.unet, seed=0)
    pool = fe.LoRAPool().add("s", subject)
    inside, release = threading.Event(), threading.Event()

    def hold_at_step(pipe, step, timestep, callback_kwargs):
        inside.set()
        release.wait(60)
        return {}

    with fe.attach(tiny_pipe, pool=pool) as fusion:
        worker = threading.Thread(target=lambda: tiny_pipe(["a"], loras=["s"], num_inference_steps=1, output_type="pt",
                                                           callback_on_step_end=hold_at_step))
        worker.start()
        try:
            assert inside.wait(60)
            with pytest.raises(fe.ConcurrentUseError, match="set_loras"):
                fusion.set_loras(["s"])
            with pytest.raises(fe.ConcurrentUseError, match=r"LoRAPool.add\('t'\)"):
                pool.add("t", style)
            with pytest.raises(fe.ConcurrentUseError, match=r"LoRAPool.remove\('s'\)"):
                pool.remove("s")
        finally:
            release.set()
            worker.join()
        assert pool.names == ["s"]
        pool.add("t", style)  # between calls: fine
