"""The pooled Triton kernel (csrc_triton/pooled_mix_linear.py) against a float64 run of the pooled reference
(fusion_engine/ops/pooled.py), under the Triton interpreter: 4 pool slots of ranks 3, 5, 8 and a freed one,
samples naming 1, 2 and 3 LoRAs, odd shapes beside aligned ones, fp32 and fp16. Tolerance: 2x the error of the
same computation done eagerly by torch in the input dtype, plus ``ATOL`` (tests/test_kernels.py's rule)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
kernels = pytest.importorskip("fusion_engine.kernels")
if not kernels.INTERPRET:  # pragma: no cover - another module imported it first
    pytest.skip("fusion_engine.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from fusion_engine.kernels import testing as kt  # noqa: E402
from fusion_engine.kernels.pooled_fls_linear import pooled_fls_linear_fwd  # noqa: E402
from fusion_engine.kernels.pooled_mix_linear import pooled_mix_linear_fwd  # noqa: E402
from fusion_engine.ops.pooled import pooled_mix_linear  # noqa: E402

# (samples B, rows per sample T, K, N)
SHAPES = {"odd": (5, 7, 37, 45), "aligned": (2, 32, 32, 64)}
RANKS = (3, 5, 8, 0)  # slot 3 is a freed slot (zeros, scale 0)
SLOTS = [[2, -1, -1], [0, 1, -1], [1, 0, 2], [2, 1, -1], [0, -1, -1]]  # samples name 1, 2 and 3 LoRAs


def _inputs(shape, dtype, seed, ranks=RANKS):
    batch, rows, K, N = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, std=1.0):
        return torch.randn(*size, generator=g) * std

    R = max(ranks)
    a_stack, b_stack = torch.zeros(len(ranks), R, K), torch.zeros(len(ranks), N, R)
    for slot, rank in enumerate(ranks):  # zero-padded as the pool stores them
        a_stack[slot, :rank], b_stack[slot, :, :rank] = rnd(rank, K, std=K ** -0.5), rnd(N, rank, std=0.5)
    slots = torch.tensor(SLOTS[:batch], dtype=torch.int64)
    return dict(x=rnd(batch * rows, K).to(dtype), weight=rnd(N, K, std=K ** -0.5).to(dtype), bias=rnd(N).to(dtype),
                a_stack=a_stack.to(dtype), b_stack=b_stack.to(dtype), scales=torch.tensor([0.5, 1.25, 0.8, 0.0]),
                sample_slots=slots, sample_weights=(rnd(*slots.shape) + 1.0) * (slots >= 0))


def _eager(inputs):
    """Same-dtype eager torch, one sample at a time: every intermediate rounded to the dtype."""
    x, slots = inputs["x"], inputs["sample_slots"]
    y = F.linear(x, inputs["weight"], inputs["bias"]).reshape(slots.shape[0], -1, inputs["weight"].shape[0])
    xs = x.reshape(slots.shape[0], -1, x.shape[1])
    outs = []
    for sample, row in enumerate(slots.tolist()):
        out = y[sample]
        for position, slot in enumerate(row):
            if slot >= 0:
                coef = (inputs["sample_weights"][sample, position] * inputs["scales"][slot]).to(x.dtype)
                out = out + F.linear(F.linear(xs[sample], inputs["a_stack"][slot]), inputs["b_stack"][slot]) * coef
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_pooled_mix_kernel_matches_float64_reference(shape, dtype, bias):
    inputs = _inputs(shape, dtype, seed=len(shape) + 3 * bias)
    if not bias:
        inputs["bias"] = None
    with kt.poisoned_outputs():
        out = pooled_mix_linear_fwd(**inputs)
    ref = pooled_mix_linear(**kt.to_float64(inputs))
    tol = 2 * kt.max_error(_eager(inputs), ref) + kt.ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert kt.max_error(out, ref) <= tol, (kt.max_error(out, ref), tol)
    # the LoRAs matter: without them the output is far from the reference
    no_lora = pooled_mix_linear(**{**kt.to_float64(inputs), "sample_weights": inputs["sample_weights"] * 0})
    assert kt.max_error(no_lora, ref) > 10 * tol


@pytest.mark.parametrize("dtype, base, given_ranks", [
    (torch.float32, "cublas", False), (torch.bfloat16, "fused", True), (torch.bfloat16, "cublas", False),
    (torch.float16, "cublas", True)], ids=["fp32-cublas", "bf16-fused-given", "bf16-cublas", "fp16-cublas-given"])
def test_pooled_mix_kernel_variants_with_mixed_slot_ranks(dtype, base, given_ranks):
    """Both base variants, slot ranks 3, 20, 40 and a freed slot (padded widths 16, 32, 64, skipped), read from the
    stacks or given: the float64 reference within the per-dtype rule (bf16 with the interpreter's dot patched)."""
    ranks = (3, 20, 40, 0)
    inputs = _inputs("odd", dtype, seed=21, ranks=ranks)
    if given_ranks:
        inputs["slot_ranks"] = torch.tensor(ranks, dtype=torch.int32)
    with kt.poisoned_outputs(), kt.interpreter_bf16_dot():
        out = pooled_mix_linear_fwd(**inputs, base=base)
    inputs.pop("slot_ranks", None)
    ref = pooled_mix_linear(**kt.to_float64(inputs))
    tol = 2 * kt.max_error(_eager(inputs), ref) + kt.ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert out.dtype == dtype and kt.max_error(out, ref) <= tol, (kt.max_error(out, ref), tol)


def test_pooled_mix_kernel_reads_each_slot_only_up_to_its_given_rank():
    """A slot given a smaller rank computes exactly that truncated LoRA: the per-slot rank is the kernels' bound."""
    ranks, cut = (3, 20, 40, 0), (3, 11, 33, 0)
    inputs = _inputs("odd", torch.float32, seed=22, ranks=ranks)
    out = pooled_mix_linear_fwd(**inputs, slot_ranks=torch.tensor(cut))
    truncated = {**inputs, "a_stack": inputs["a_stack"].clone()}
    for slot, rank in enumerate(cut):
        truncated["a_stack"][slot, rank:] = 0.0
    ref, full = (pooled_mix_linear(**kt.to_float64(case)) for case in (truncated, inputs))
    assert kt.max_error(out, ref) <= 1e-4 * max(1.0, ref.abs().max().item())
    assert kt.max_error(full, ref) > 1e-2  # the cut mattered


def test_stack_ranks_follow_in_place_writes_of_the_stacks(monkeypatch):
    """Without ``slot_ranks`` the launchers read each slot's rank from the stacks: the last non-zero row of its A,
    recomputed after an in-place write (as a pool's add/remove make) and kept otherwise, never reused while a CUDA
    graph is captured (a replay after a pool change must recompute)."""
    import importlib

    # the package exports a function of that name
    shrink_module = importlib.import_module("fusion_engine.kernels.lora_shrink")
    stack_ranks = shrink_module.stack_ranks

    a_stack = torch.zeros(4, 40, 7)
    a_stack[0, :3], a_stack[1, :20], a_stack[2, 39] = 1.0, 1.0, 1.0
    first = stack_ranks(a_stack)
    assert first.tolist() == [3, 20, 40, 0] and first.dtype == torch.int32
    assert stack_ranks(a_stack) is first  # unchanged stacks: kept
    a_stack[3, :5].fill_(2.0)
    a_stack[0].zero_()
    kept = stack_ranks(a_stack)
    assert kept.tolist() == [0, 20, 40, 5]
    monkeypatch.setattr(shrink_module, "may_plan", lambda: False)  # as during a capture
    assert stack_ranks(a_stack) is not kept


def test_pooled_mix_kernel_follows_a_new_slot_table_without_new_shapes():
    """Same shapes, another assignment: the grid is the same, the output follows the table."""
    inputs = _inputs("odd", torch.float32, seed=9)
    swapped = {**inputs, "sample_slots": inputs["sample_slots"].flip(0)}
    for case in (inputs, swapped):
        ref = pooled_mix_linear(**kt.to_float64(case))
        assert kt.max_error(pooled_mix_linear_fwd(**case), ref) <= 1e-4 * max(1.0, ref.abs().max().item())


def test_pooled_mix_launcher_names_the_bad_input():
    inputs = _inputs("odd", torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"sample_slots must be \(B, L\) int64 with B dividing M=35"):
        pooled_mix_linear_fwd(**{**inputs, "sample_slots": inputs["sample_slots"][:2]})
    with pytest.raises(ValueError, match=r"b_stack \(S, N=45, R\)"):
        pooled_mix_linear_fwd(**{**inputs, "b_stack": inputs["b_stack"][:, :-1]})
    with pytest.raises(ValueError, match=r"slot_ranks must be \(S=4,\) int32/int64"):
        pooled_mix_linear_fwd(**inputs, slot_ranks=torch.ones(4))
    with pytest.raises(ValueError, match=r"base must be one of \('fused', 'cublas'\)"):
        pooled_mix_linear_fwd(**inputs, base="cutlass")


def _small_pool_model(**capacity):
    """(a two-Linear model, a pool (of ``capacity``) of LoRAs of ranks 3, 5, 8 (the last on the first layer only),
    its input of 3 images x 2 CFG copies)."""
    import fusion_engine as fe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 24))
    pool = fe.LoRAPool(**capacity)
    g = torch.Generator().manual_seed(1)
    for index, rank in enumerate((3, 5, 8)):
        layers = {name: fe.LoRALayer(torch.randn(rank, k, generator=g) * 0.3, torch.randn(n, rank, generator=g), 2.0)
                  for name, k, n in (("0", 24, 40), ("2", 40, 24)) if index != 2 or name == "0"}
        pool.add(f"lora{index}", fe.LoRA(layers))
    x = torch.randn(3, 2, 9, 24, generator=g)  # (copies x images, rows, features): 3 images x CFG
    return model, pool, x.reshape(6, 9, 24)


def _run_pool(model, pool, x, backend, **options):
    """(output, trace records) of one forward with the pool attached; launcher buffers poisoned."""
    import fusion_engine as fe

    with fe.attach(model, pool=pool, backend=backend, **options) as fusion:
        fusion.set_batch_layout(3, 2)
        fusion.set_loras([("lora0", "lora1"), "lora2", ("lora2", "lora0", "lora1")])
        fusion.set_step(1, 4)
        with torch.no_grad(), kt.poisoned_outputs():
            out = model(x)
        return out, fusion.trace.gather()


@pytest.mark.parametrize("policy, options", [("direct", {"weights": (0.7, 1.3, 0.5)}), ("switch", {"tau": 1})])
def test_pool_attach_runs_the_kernel_for_static_policies(policy, options, monkeypatch):
    """``fe.attach(model, pool=, backend="triton")``: the same images as the reference backend."""
    launches = []
    monkeypatch.setattr(kernels, "pooled_mix_linear_fwd",
                        lambda *args: launches.append(1) or pooled_mix_linear_fwd(*args))
    model, pool, x = _small_pool_model()
    outputs = {backend: _run_pool(model, pool, x, backend, policy=policy, **options)[0]
               for backend in ("reference", "triton")}
    torch.testing.assert_close(outputs["triton"], outputs["reference"], atol=1e-4, rtol=1e-4)
    assert len(launches) == 2  # one per fused layer, triton backend only


@pytest.mark.parametrize("policy", ["direct", "fls"])
def test_pool_kernels_read_fixed_capacity_stacks_at_max_rank(policy):
    """A fixed-capacity pool's stacks (5 slots with the zero slot, every layer padded to rank 16): the kernels give
    the reference backend's images and choices (unused positions read the zero slot there, slot -1 here)."""
    model, pool, x = _small_pool_model(max_loras=4, max_rank=16)
    assert all(layer.a.shape[:2] == (5, 16) for layer in pool.layers.values())
    (ref_out, ref_records), (out, records) = (_run_pool(model, pool, x, backend, policy=policy)
                                              for backend in ("reference", "triton"))
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    assert [record.choice.tolist() for record in records] == [record.choice.tolist() for record in ref_records]


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_pool_attach_runs_the_fls_kernel(divergence, monkeypatch):
    """N-way FLS with ``backend="triton"``: the pooled FLS kernel (JS: the pooled reference op on the same device),
    the same output and per-layer choices as the reference backend; a second call speculates on the first's
    choices and gives the same again."""
    launches = []
    monkeypatch.setattr(kernels, "pooled_fls_linear_fwd",
                        lambda *args: launches.append(args[11].clone()) or pooled_fls_linear_fwd(*args))
    model, pool, x = _small_pool_model()
    ref_out, ref_records = _run_pool(model, pool, x, "reference", divergence=divergence)
    import fusion_engine as fe

    with fe.attach(model, pool=pool, backend="triton", divergence=divergence) as fusion:
        fusion.set_batch_layout(3, 2)
        fusion.set_loras([("lora0", "lora1"), "lora2", ("lora2", "lora0", "lora1")])
        fusion.set_step(1, 4)
        for _ in range(2):
            with torch.no_grad(), kt.poisoned_outputs():
                out = model(x)
            torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        records = fusion.trace.gather()
    assert len(records) == 2 * len(ref_records) == 4
    for record, ref in zip(records, ref_records + ref_records):
        assert record.layer == ref.layer and torch.equal(record.choice, ref.choice)
        torch.testing.assert_close(record.scores, ref.scores, atol=1e-5, rtol=1e-5)
    if divergence == "js":
        assert not launches
    else:  # one launch per fused layer and call: the first guesses position 0, the second the first's choices
        assert len(launches) == 4 and not launches[0].any() and not launches[1].any()
        assert all(torch.equal(guess, record.choice) for guess, record in zip(launches[2:], records[:2]))


def test_pool_fls_with_a_gradient_runs_the_reference_ops():
    """The pooled kernels are forward only: a forward that carries a gradient (guidance) takes the reference ops."""
    import fusion_engine as fe

    model, pool, x = _small_pool_model()
    grads = {}
    for backend in ("reference", "triton"):
        with fe.attach(model, pool=pool, backend=backend) as fusion:
            fusion.set_batch_layout(3, 2)
            fusion.set_loras([("lora0", "lora1"), "lora2", ("lora2", "lora0", "lora1")])
            leaf = x.clone().requires_grad_(True)
            model(leaf).square().sum().backward()
            grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["reference"])
