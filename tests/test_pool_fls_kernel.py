"""The pooled N-way FLS kernel (csrc_triton/pooled_fls_linear.py) against a float64 run of the pooled reference op
(fusion_engine/ops/pooled.py), under the Triton interpreter.

The pool of one layer holds 6 slots of ranks 2, 5, 8, 5, 3, 4 (zero-padded stacks): slot 3 is an exact copy of
slot 1 (a tie), slot 4 has a zero B (its delta is zero: never live), slot 5 is not present at the layer, and slot 2
is aligned with the base weight (its delta points along y0, so under ``dot`` it scores below a zero delta: the
liveness rule decides). Images name 1, 2 and 3 LoRAs, with one or two CFG copies (then a group spans two samples).
Shapes are odd (T=9 rows per sample: a partial row tile; K=37, N=45: two column tiles) and aligned; groups per image
and per token. fp32, fp16 and bf16 (bf16 with the interpreter's dot patched:
fusion_engine.kernels.testing.interpreter_bf16_dot).
Tolerance (tests/test_kernels.py's rule): 2x the error of the same computation done eagerly by torch in the input
dtype, plus ``ATOL``; choices identical to the float64 reference's."""
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
from fusion_engine.ops import pooled  # noqa: E402
from fusion_engine.ops.reference import group_mean, row_divergence  # noqa: E402

RANKS = (2, 5, 8, 5, 3, 4)
TIE, ZERO, ABSENT, ALIGNED = 3, 4, 5, 2  # slot roles (see the module docstring)
SCALES = (0.5, 1.25, 1.0, 1.25, 0.9, 1.1)
# each image's slots (L = 3, -1 = none) and the reason it is there
IMAGES = [
    [2, -1, -1],  # one LoRA
    [0, 1, -1],  # a pair
    [1, 0, 2],  # three
    [1, TIE, -1],  # equal deltas: the earlier position wins
    [ABSENT, 0, -1],  # the first is absent at the layer: position 1 is the only candidate
    [ABSENT, -1, -1],  # no candidate: the base output, choice -1
    [ZERO, ALIGNED, -1],  # a zero delta is never live (under dot it would score highest)
    [ZERO, -1, -1],  # no live candidate: the first candidate (a no-op)
]
# (rows per sample T, K, N): T=9 is one partial row tile of the interpreter's BLOCK_M=16, N two column tiles
SHAPES = {"odd": (9, 37, 45), "aligned": (16, 32, 64)}


@pytest.fixture(autouse=True)
def _poison():
    """NaN-fill every buffer the launcher allocates, so unwritten elements fail the comparisons."""
    with kt.poisoned_outputs():
        yield


def make_inputs(shape, dtype, seed, images=IMAGES, bias=True, granularity="image", copies=1, ranks=RANKS):
    """Keyword arguments of the pooled FLS op (fresh random, never zeros but slot ZERO's B); ``copies`` CFG copies
    of every image (copy-major, as diffusers batches them: an image's group spans ``copies`` samples)."""
    T, K, N = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, std=1.0):
        return torch.randn(*size, generator=g) * std

    weight = rnd(N, K, std=K ** -0.5)
    R = max(ranks)
    a_stack, b_stack = torch.zeros(len(ranks), R, K), torch.zeros(len(ranks), N, R)
    for slot, rank in enumerate(ranks):  # zero-padded to the largest rank, as the pool stores them
        a_stack[slot, :rank], b_stack[slot, :, :rank] = rnd(rank, K, std=K ** -0.5), rnd(N, rank, std=0.5)
    a_stack[TIE], b_stack[TIE] = a_stack[1], b_stack[1]
    b_stack[ZERO] = 0.0
    rank = ranks[ALIGNED]  # delta_j = s * y0_j (+ noise) for the first `rank` channels: d . y0 > 0
    a_stack[ALIGNED, :rank] = weight[:rank]
    b_stack[ALIGNED, :rank, :rank] = torch.eye(rank) + rnd(rank, rank, std=0.05)
    present = torch.ones(len(ranks), dtype=torch.bool)
    present[ABSENT] = False
    slots = torch.tensor(images * copies, dtype=torch.int64)
    batch = slots.shape[0]
    if granularity == "image":
        row_group, groups = (torch.arange(batch) % len(images)).repeat_interleave(T), len(images)
    else:  # token: a group per row (the kernel's per-row atomics)
        row_group, groups = torch.arange(batch * T), batch * T
    return dict(x=rnd(batch * T, K).to(dtype), weight=weight.to(dtype), bias=rnd(N).to(dtype) if bias else None,
                a_stack=a_stack.to(dtype), b_stack=b_stack.to(dtype), scales=torch.tensor(SCALES),
                present=present, sample_slots=slots, row_group=row_group, num_groups=groups)


def _eager_branches(inputs):
    """Same-dtype eager torch: y0 and y0 + d_l per position (rows of slot -1: y0), every intermediate rounded."""
    x, slots = inputs["x"], inputs["sample_slots"]
    T = x.shape[0] // slots.shape[0]
    y0 = F.linear(x, inputs["weight"], inputs["bias"])
    branches = []
    for position in range(slots.shape[1]):
        rows = []
        for sample, slot in enumerate(slots[:, position].tolist()):
            xs, ys = x[sample * T:(sample + 1) * T], y0[sample * T:(sample + 1) * T]
            if slot < 0:
                rows.append(ys)
            else:
                scale = inputs["scales"][slot].to(x.dtype)
                rows.append(ys + F.linear(F.linear(xs, inputs["a_stack"][slot]), inputs["b_stack"][slot]) * scale)
        branches.append(torch.cat(rows))
    return y0, branches


def _float64_output(inputs, choice):
    """float64 y0 + d_choice per row, for the choice the kernel reported."""
    a64 = kt.to_float64(inputs)
    slots = a64["sample_slots"]
    y0 = a64["x"] @ a64["weight"].t() + (a64["bias"] if a64["bias"] is not None else 0.0)
    x3 = a64["x"].reshape(slots.shape[0], -1, a64["x"].shape[1])
    row_choice = choice[a64["row_group"]].unsqueeze(-1)
    out = y0.clone()
    for position in range(slots.shape[1]):
        slot = slots[:, position]
        coef = a64["scales"][slot.clamp_min(0)] * (slot >= 0)
        delta = pooled.gathered_delta(x3, a64["a_stack"], a64["b_stack"], slot.clamp_min(0), coef)
        out = torch.where(row_choice == position, y0 + delta, out)
    return out


def check_against_reference(inputs, divergence, result):
    """The kernel's (out, scores, choice) against float64: choices identical, scores and output within tolerance."""
    out, scores, choice = result
    dtype = inputs["x"].dtype
    ref_out, ref_scores, ref_choice = pooled.pooled_fls_linear(**kt.to_float64(inputs), divergence=divergence)
    assert out.dtype == dtype and scores.dtype == torch.float32 and choice.dtype == torch.int64
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert torch.equal(choice, ref_choice), (divergence, choice.tolist(), ref_choice.tolist())

    y0, branches = _eager_branches(inputs)
    row_group, groups = inputs["row_group"], inputs["num_groups"]
    eager_scores = torch.stack([group_mean(row_divergence(b.float(), y0.float(), divergence), row_group, groups)
                                for b in branches], -1)
    score_scale = max(1.0, ref_scores.abs().max().item())
    score_tol = 2 * kt.max_error(eager_scores, ref_scores) + kt.ATOL[dtype] * score_scale
    assert kt.max_error(scores, ref_scores) <= score_tol, (kt.max_error(scores, ref_scores), score_tol)

    row_choice = choice[row_group].unsqueeze(-1)
    eager_out = y0
    for position, branch in enumerate(branches):
        eager_out = torch.where(row_choice == position, branch, eager_out)
    want = _float64_output(inputs, choice)
    out_tol = 2 * kt.max_error(eager_out, want) + kt.ATOL[dtype] * max(1.0, want.abs().max().item())
    assert kt.max_error(out, want) <= out_tol, (kt.max_error(out, want), out_tol)
    return ref_scores, ref_choice


@pytest.mark.parametrize("dtype, divergence", [(torch.float32, "kl"), (torch.float32, "cosine"),
                                               (torch.float32, "dot"), (torch.float16, "kl"), (torch.float16, "dot"),
                                               (torch.bfloat16, "kl"), (torch.bfloat16, "dot")],
                         ids=["fp32-kl", "fp32-cosine", "fp32-dot", "fp16-kl", "fp16-dot", "bf16-kl", "bf16-dot"])
def test_pooled_fls_kernel_matches_float64_reference(divergence, dtype):
    inputs = make_inputs("odd", dtype, seed=11)
    with kt.interpreter_bf16_dot():  # widens bf16 dot operands only: fp32 and fp16 run as they are
        result = pooled_fls_linear_fwd(**inputs, divergence=divergence)
    ref_scores, ref_choice = check_against_reference(inputs, divergence, result)
    # the cases the images are there for reached the rules they test
    assert ref_choice[3].item() == 0 and ref_choice[4].item() == 1 and ref_choice[5].item() == -1
    assert ref_choice[6].item() == 1 and ref_choice[7].item() == 0
    assert ref_scores[3, 0] == ref_scores[3, 1]  # an exact tie
    if divergence == "dot":  # the zero delta scores highest: only the liveness rule keeps it from winning
        assert ref_scores[6, 0] > ref_scores[6, 1]
    else:  # the third position wins its image: every position and the base occur
        assert ref_choice[2].item() == 2


def test_pooled_fls_kernel_aligned_shape_without_bias():
    inputs = make_inputs("aligned", torch.float32, seed=5, images=IMAGES[:4], bias=False)
    check_against_reference(inputs, "kl", pooled_fls_linear_fwd(**inputs, divergence="kl"))


def test_pooled_fls_kernel_token_groups():
    """A group per row: tiles span many groups, so the kernel adds row by row into the group sums."""
    inputs = make_inputs("odd", torch.float32, seed=7, images=IMAGES[:4], granularity="token")
    check_against_reference(inputs, "cosine", pooled_fls_linear_fwd(**inputs, divergence="cosine"))


@pytest.mark.parametrize("divergence", ["kl"])
def test_pooled_fls_kernel_output_does_not_depend_on_the_guess(divergence):
    """No guess, the right guess and wrong ones (every position and the base): bitwise the same output/choices.
    Two CFG copies per image: a group's rows lie in two samples."""
    inputs = make_inputs("odd", torch.float32, seed=3, images=IMAGES[2:6], copies=2)
    out, scores, choice = result = pooled_fls_linear_fwd(**inputs, divergence=divergence)
    check_against_reference(inputs, divergence, result)
    positions = inputs["sample_slots"].shape[1]
    wrong = (choice + 2) % (positions + 1) - 1  # another value of -1..L-1 for every group (all occur here)
    for guess in (choice.clone(), wrong):
        out2, scores2, choice2 = pooled_fls_linear_fwd(**inputs, divergence=divergence, prev_choice=guess)
        assert torch.equal(out2, out) and torch.equal(choice2, choice), guess.tolist()
        torch.testing.assert_close(scores2, scores, rtol=1e-6, atol=1e-6)


def test_pooled_fls_launcher_names_the_bad_input():
    inputs = make_inputs("odd", torch.float32, seed=1, images=IMAGES[:2])
    with pytest.raises(ValueError, match=r"present must be \(S=6,\) bool"):
        pooled_fls_linear_fwd(**{**inputs, "present": inputs["present"][:-1]})
    with pytest.raises(ValueError, match=r"row_group must be \(M=18,\)"):
        pooled_fls_linear_fwd(**{**inputs, "row_group": inputs["row_group"][:-1]})
    with pytest.raises(ValueError, match=r"prev_choice must be \(G=2,\) int64"):
        pooled_fls_linear_fwd(**inputs, prev_choice=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="supports .*not 'js'"):
        pooled_fls_linear_fwd(**inputs, divergence="js")


@pytest.mark.slow  # every attention Linear of the tiny UNet through the interpreter: minutes on 2 cores
def test_pool_fls_attach_on_the_tiny_unet_matches_the_reference_backend(tiny_pipe):
    """``fe.attach(unet, pool=, policy="fls", backend="triton")`` on tests/test_pool_equivalence.py's tiny UNet and
    pool (float32): the same output and per-layer choices as ``backend="reference"``, images naming 3 and 1 LoRAs."""
    from test_pool_equivalence import make_pool

    _check_pool_fls_attach(tiny_pipe.unet, make_pool(tiny_pipe.unet, torch.float32)[0])


def test_pool_fls_attach_on_one_cross_attention_matches_the_reference_backend(tiny_pipe):
    """The CI form of the slow test above: the same pool with every LoRA cut to the one block where all five
    act, its cross-attention (4 Linears), so the interpreter runs 4 pooled launches."""
    from test_pool_equivalence import make_pool

    import fusion_engine as fe

    block = "down_blocks.1.attentions.0.transformer_blocks.0.attn2."
    pool = fe.LoRAPool(dtype=torch.float32)
    for name, lora in make_pool(tiny_pipe.unet, torch.float32)[1].items():
        pool.add(name, fe.LoRA({n: layer for n, layer in lora.layers.items() if n.startswith(block)}, lora.source))
    _check_pool_fls_attach(tiny_pipe.unet, pool)


def _check_pool_fls_attach(unet, pool):
    from conftest import unet_inputs

    import fusion_engine as fe

    assignment = [("s0", "t1", "r16"), ("t0",)]
    inputs = unet_inputs(unet, 2 * len(assignment), seed=4)
    results = {}
    for backend in ("reference", "triton"):
        with fe.attach(unet, pool=pool, backend=backend) as fusion:
            fusion.set_batch_layout(len(assignment), 2)
            fusion.set_loras(assignment)
            with torch.no_grad():
                sample, t, context = inputs
                out = unet(sample, t, encoder_hidden_states=context).sample
            results[backend] = out, fusion.trace.gather()
    (ref_out, ref_records), (out, records) = results["reference"], results["triton"]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    assert len(records) == len(ref_records) > 0
    for record, ref in zip(records, ref_records):
        assert record.layer == ref.layer and torch.equal(record.choice, ref.choice), (record.layer, record.choice)


# slot ranks spanning every padded width the kernels pick per slot (16, 32, 64: the stacks' rank 40 pads to 64), the
# TIE slot a copy of slot 1 (rank 20), slot ALIGNED (rank 3 here) aligned with the base weight
WIDE_RANKS = (40, 20, 3, 20, 4, 2)


@pytest.mark.parametrize("dtype, base, given_ranks", [
    (torch.float32, "fused", False), (torch.float32, "cublas", True), (torch.bfloat16, "cublas", False),
    (torch.float16, "fused", True)], ids=["fp32-fused", "fp32-cublas-given", "bf16-cublas", "fp16-fused-given"])
def test_pooled_fls_kernel_variants_with_mixed_slot_ranks(dtype, base, given_ranks):
    """Both base variants, the slots' ranks read from the stacks or given, each slot at its own padded width: the
    float64 reference's choices, scores and output within the per-dtype rule."""
    inputs = make_inputs("odd", dtype, seed=13, images=IMAGES[:6], ranks=WIDE_RANKS)
    if given_ranks:
        inputs["slot_ranks"] = torch.tensor(WIDE_RANKS, dtype=torch.int32)
    inputs["sample_slots"][2] = torch.tensor([1, 2, 0])
    with kt.interpreter_bf16_dot():
        result = pooled_fls_linear_fwd(**inputs, divergence="kl", base=base)
    inputs.pop("slot_ranks", None)
    ref_scores, ref_choice = check_against_reference(inputs, "kl", result)  # every position's score, chosen or not
    assert ref_scores[2, 2] > 0 and ref_choice[5].item() == -1  # the rank-40 slot (a 64-wide block) scored


def test_pooled_fls_kernel_reads_each_slot_only_up_to_its_given_rank():
    """``slot_ranks`` is what the kernels pad to: a slot given a smaller rank computes exactly that truncated LoRA
    (the float64 reference of the truncated stacks), so the per-slot rank is really the bound the kernels use."""
    inputs = make_inputs("odd", torch.float32, seed=17, images=IMAGES[:3], ranks=WIDE_RANKS)
    cut = torch.tensor([33, 17, 3, 20, 4, 2], dtype=torch.int64)  # slots 0 and 1 cut inside their width
    result = pooled_fls_linear_fwd(**inputs, divergence="cosine", slot_ranks=cut)
    for slot, rank in enumerate(cut.tolist()):
        inputs["a_stack"][slot, rank:] = 0.0
    check_against_reference(inputs, "cosine", result)
    full = pooled_fls_linear_fwd(**{**inputs, "a_stack": make_inputs("odd", torch.float32, seed=17, images=IMAGES[:3],
                                                                     ranks=WIDE_RANKS)["a_stack"]}, divergence="cosine")
    assert kt.max_error(full[0], result[0]) > 1e-3  # the cut mattered


def test_pooled_fls_cublas_variant_output_does_not_depend_on_the_guess():
    inputs = make_inputs("odd", torch.float32, seed=3, images=IMAGES[2:6], copies=2, ranks=WIDE_RANKS)
    out, scores, choice = pooled_fls_linear_fwd(**inputs, divergence="dot", base="cublas")
    wrong = (choice + 2) % (inputs["sample_slots"].shape[1] + 1) - 1
    out2, _, choice2 = pooled_fls_linear_fwd(**inputs, divergence="dot", base="cublas", prev_choice=wrong)
    assert torch.equal(out2, out) and torch.equal(choice2, choice)
