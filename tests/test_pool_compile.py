"""A compiled UNet with a LoRA pool whose images name different LoRAs samples a whole loop on at most two graphs and
no graph break, for every policy: the step, the LoRA scale and the branch reach the layers through tables the forward
pre-hook refreshes in place, never as Python constants a graph would be specialised on (issue 22: compile-clean)."""
import pytest
import torch
from conftest import default_loras, unet_inputs

import fusion_engine as fe

POLICIES = [("fls", {}), ("direct", {"weights": (0.7, 1.3)}), ("switch", {"tau": 1}), ("klora", {}), ("blora", {})]


def mixed_pool(unet):
    pool = fe.LoRAPool()
    for seed, (first, second) in enumerate([default_loras(unet, seed=0), default_loras(unet, seed=1)]):
        pool.add(f"s{seed}", first).add(f"t{seed}", second)
    return pool


def test_static_weights_and_positions_follow_the_step_on_a_mixed_pool(tiny_pipe):
    """switch alternates its LoRA per step. In one attach over three steps, each step's output is that of a fresh
    attach run at that step alone (the step-dependent weight tables are refreshed in place before each forward), and
    the positions the trace keeps (built after each forward, cached per step) alternate, at every layer both LoRAs of
    an image adapt."""
    unet = tiny_pipe.unet
    pool = mixed_pool(unet)
    sample, t, context = unet_inputs(unet, batch=4)

    def attach():
        fusion = fe.attach(unet, pool=pool, policy="switch", tau=1, backend="reference")
        fusion.set_loras([("s0", "t0"), ("s1", "t1")])
        fusion.set_batch_layout(images=2, copies=2)
        return fusion

    def forward(fusion, step):
        fusion.set_step(step, 3)
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=context).sample

    with attach() as fusion:
        outputs = [forward(fusion, step) for step in range(3)]
        by_step = {}
        for record in fusion.trace.gather():
            by_step.setdefault(record.layer, {})[record.step] = record.choice.tolist()
    for step in range(3):
        with attach() as alone:
            assert torch.equal(forward(alone, step), outputs[step]), step
    assert not torch.equal(outputs[0], outputs[1])
    both = [steps for steps in by_step.values() if all(set(c) <= {0, 1} for c in steps.values())]
    assert both and all(steps[0] == steps[2] != steps[1] for steps in both)


@pytest.mark.parametrize("policy,options", POLICIES, ids=[p for p, _ in POLICIES])
def test_a_compiled_unet_with_a_mixed_pool_samples_on_at_most_two_graphs(tiny_pipe, policy, options):
    from torch._dynamo.utils import counters

    unet = tiny_pipe.unet
    pool = mixed_pool(unet)
    sample, _, context = unet_inputs(unet, batch=4)
    timesteps = [torch.tensor(900 - 300 * step) for step in range(3)]

    def run(model):
        with fe.attach(unet, pool=pool, policy=policy, backend="reference", **options) as fusion:
            fusion.set_loras([("s0", "t0"), ("s1", "t1")])
            fusion.set_batch_layout(images=2, copies=2)
            outputs = []
            for step, t in enumerate(timesteps):
                fusion.set_step(step, len(timesteps))
                with torch.no_grad():
                    outputs.append(model(sample, t, encoder_hidden_states=context).sample)
            return outputs, [(r.step, r.layer, r.choice.tolist()) for r in fusion.trace.gather()]

    expected, expected_trace = run(unet)
    torch._dynamo.reset()
    counters.clear()
    got, trace = run(torch.compile(unet, backend="eager"))
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert 1 <= graphs <= 2 and breaks == 0, f"{graphs} graphs, {breaks} breaks ({dict(counters['graph_break'])})"
    assert trace == expected_trace
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_new_layout_after_stepped_tables_runs_as_on_a_fresh_attach(tiny_pipe):
    """A call with another layout (here without CFG copies, half the batch) after step-dependent tables were built
    for the first runs as on a fresh attach: its own tables, this step's values."""
    unet = tiny_pipe.unet
    pool = mixed_pool(unet)
    sample, t, context = unet_inputs(unet, batch=4)

    def forward(fusion, step, copies):
        fusion.set_batch_layout(images=2, copies=copies)
        fusion.set_step(step, 3)
        with torch.no_grad():
            return unet(sample[: 2 * copies], t, encoder_hidden_states=context[: 2 * copies]).sample

    with fe.attach(unet, pool=pool, policy="switch", tau=1, backend="reference") as fusion:
        fusion.set_loras([("s0", "t0"), ("s1", "t1")])
        forward(fusion, 0, copies=2)
        got = forward(fusion, 1, copies=1)
    with fe.attach(unet, pool=pool, policy="switch", tau=1, backend="reference") as fresh:
        fresh.set_loras([("s0", "t0"), ("s1", "t1")])
        assert torch.equal(forward(fresh, 1, copies=1), got)


def test_a_step_table_refreshed_when_the_cache_is_full_stays_the_cached_tensor(tiny_pipe, monkeypatch):
    """At the cache's limit the table being refreshed for a new step is written in place and cached again: the
    next lookup is that tensor (a compiled forward keeps reading it), holding the new step's values."""
    unet = tiny_pipe.unet
    with fe.attach(unet, pool=mixed_pool(unet), policy="switch", tau=1, backend="reference") as fusion:
        fusion.set_loras([("s0", "t0"), ("s1", "t1")])
        fusion.set_batch_layout(images=2, copies=2)
        context = fusion.context
        fusion.set_step(0, 3)
        table = context.sample_weights(4, "cpu")
        first = table.clone()
        monkeypatch.setattr(context, "CACHE_LIMIT", len(context._tables))  # full: the refresh clears the cache
        fusion.set_step(1, 3)
        context.refresh_tables()
        assert context.sample_weights(4, "cpu") is table
        assert not torch.equal(table, first)
        fusion.set_step(0, 3)
        context.refresh_tables()
        assert context.sample_weights(4, "cpu") is table and torch.equal(table, first)
