"""fusion_engine.runtime.speculation: forcing the Triton kernels' speculation guess wrong (the fix-up rate's upper
bound, bench/gpu_e2e.py) changes which guess the kernel gets, never the result. Runs the kernels under the
interpreter (tests/conftest.py switches it on), at tiny shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")
kernels = pytest.importorskip("fusion_engine.kernels")
if not kernels.INTERPRET:  # pragma: no cover - another module imported triton first
    pytest.skip("fusion_engine.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

import fusion_engine as fe  # noqa: E402
from fusion_engine import ops  # noqa: E402
from fusion_engine.runtime.speculation import force_wrong_guesses, guess_buffers, wrong_guess_  # noqa: E402


def _lora(model, rank, seed, strength):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            layers[name] = fe.LoRALayer(lora_a=torch.randn(rank, m.in_features, generator=g) * 0.5,
                                        lora_b=torch.randn(m.out_features, rank, generator=g) * strength,
                                        alpha=float(rank))
    return fe.LoRA(layers, source="random")


def test_wrong_guess_differs_in_every_group():
    pair = torch.tensor([True, False, True])
    assert torch.equal(wrong_guess_(pair.clone()), ~pair)
    pool = torch.tensor([-1, 0, 1, 2, 0])  # base, and positions 0..2 of a pool group
    assert bool((wrong_guess_(pool.clone()) != pool).all())


def test_forced_wrong_guesses_reach_the_kernel_and_leave_the_output_bitwise_equal(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).eval()
    x = torch.randn(3, 5, 16)  # 3 images, 5 tokens each: 3 decision groups per layer
    calls = []
    real = ops.fls_linear

    def spy(*args, prev_choice=None, **kwargs):
        result = real(*args, prev_choice=prev_choice, **kwargs)
        calls.append((None if prev_choice is None else prev_choice.clone(), result[3].clone()))
        return result

    monkeypatch.setattr(ops, "fls_linear", spy)
    with fe.attach(model, _lora(model, 4, 1, 0.6), _lora(model, 4, 2, 0.8), backend="triton", trace=False) as fusion:
        fusion.set_batch_layout(3, 1)
        with torch.no_grad():
            first = model(x)
            decisions = [choice for _, choice in calls]
            assert any(bool(c.any()) and not bool(c.all()) for c in decisions), "need mixed decisions to test"
            calls.clear()
            assert torch.equal(model(x), first)  # guesses = the last decisions on the same input: right
            assert all(torch.equal(guess, choice) for (guess, _), choice in zip(calls, decisions))
            calls.clear()
            with force_wrong_guesses(model):
                assert torch.equal(model(x), first)  # every group fixed up: the same output, bit for bit
            assert all(torch.equal(guess, ~choice) for (guess, _), choice in zip(calls, decisions))
            assert all(torch.equal(got, choice) for (_, got), choice in zip(calls, decisions))
            calls.clear()
            model(x)  # removed: right guesses again, and the buffers hold the decisions
            assert all(torch.equal(guess, choice) for (guess, _), choice in zip(calls, decisions))
            buffers = [b for layer in fusion.layers for b in guess_buffers(layer)]
            assert len(buffers) == 2 and all(torch.equal(b, c) for b, c in zip(buffers, decisions))


def test_forced_base_overrides_the_size_class_choice_and_drops_the_plans():
    """kernels.testing.forced_base, which the benchmarks' forced-base rows use: inside it every size class takes the
    forced base (what a call with base=None gets) and no plan of the other mode is left to replay; after it, the
    choice and no stale plan."""
    from fusion_engine.kernels import fls_linear, pooled_fls_linear, testing, utils

    shapes = [(8192, 640, 640), (4608, 3072, 3072)]
    before = [utils.base_mode(None, *shape, "test") for shape in shapes]
    assert set(before) == {"fused", "cublas"}  # the size classes choose differently, so the override shows
    for base in ("fused", "cublas"):
        fls_linear._PLANS["stale"] = pooled_fls_linear._PLANS["stale"] = object()
        with testing.forced_base(base):
            assert [utils.base_mode(None, *shape, "test") for shape in shapes] == [base, base]
            assert not fls_linear._PLANS and not pooled_fls_linear._PLANS
            fls_linear._PLANS["made inside"] = object()
        assert [utils.base_mode(None, *shape, "test") for shape in shapes] == before
        assert not fls_linear._PLANS
