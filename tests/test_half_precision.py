"""Half precision end to end on the reference path (issue 22, item 2): fp16 and bf16 linear, conv (LoCon) and DoRA
layers, single pair and pool, odd shapes beside SDXL ones, against the float64 oracle under the kernels' rule
(FlashAttention's, DESIGN.md; csrc_triton/testing.py holds the kernels to it):

* scores and output: error against float64 at most 2x that of the same layer computed eagerly by torch in the
  dtype (``F.linear`` / ``F.conv2d`` per factor, every intermediate rounded to the dtype), plus ``ATOL[dtype]`` times
  the scale;
* decisions: equal to float64's except in near ties (the float64 winner within twice the score tolerance of another
  candidate), which are counted, and there must be few of them; the output is checked against float64 with the
  decisions the layer took;
* every GEMM and convolution of the fused forward runs in the model's dtype (recorded at the dispatcher: the old
  reference path upcast them all to float32).

The float64 side is the engine itself on a float64 copy of the model (the project's oracle), cross-checked against
this file's own float64 eager computation.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusion_engine as fe
from fusion_engine.ops.reference import group_mean, pixel_rows, row_divergence

ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}  # csrc_triton/testing.py's (that module imports triton)
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "conv2d"}
# Near-tie groups (where a flip is allowed: bf16's tolerance makes up to ~27% of these cases' groups near ties) at most
# this share of the groups, and decisions unlike float64's at most MAX_FLIP_SHARE of them (measured: 0 or 1 a case).
MAX_NEAR_TIE_SHARE = 1 / 3
MAX_FLIP_SHARE = 0.05

# name: (layer kind, geometry, rows per sample (linear tokens) or (H, W), samples, granularity)
SHAPES = {
    "linear-odd": ("linear", dict(k=61, n=77), 41, 3, "token"),
    "linear-sdxl-self": ("linear", dict(k=640, n=640), 256, 2, "sample"),  # 16x16 latent tokens
    "linear-sdxl-cross": ("linear", dict(k=2048, n=640), 77, 2, "token"),
    "conv-odd": ("conv", dict(c=7, n=11, kernel=3, stride=1, padding=1), (9, 7), 3, "token"),
    "conv-odd-stride2": ("conv", dict(c=5, n=13, kernel=3, stride=2, padding=0), (11, 8), 2, "token"),
    "conv-sdxl-resnet": ("conv", dict(c=320, n=320, kernel=3, stride=1, padding=1), (6, 6), 2, "token"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class GemmDtypes(TorchDispatchMode):
    """Records the floating dtypes of every GEMM / convolution dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMM_OPS:
            self.seen.append((name, {a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()}))
        return func(*args, **(kwargs or {}))


def base_layer(kind: str, geometry: dict, generator) -> nn.Module:
    layer = (nn.Linear(geometry["k"], geometry["n"]) if kind == "linear" else
             nn.Conv2d(geometry["c"], geometry["n"], geometry["kernel"], geometry["stride"], geometry["padding"]))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * layer.weight[0].numel() ** -0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5)
    return layer


def random_lora(base: nn.Module, rank: int, alpha: float, generator, dtype, dora: bool = False) -> fe.LoRA:
    """One layer ("0") of factors already rounded to ``dtype`` (so the float64 oracle sees the same numbers), with a
    delta about as large as the base output; DoRA magnitudes near the base rows' norms, perturbed."""
    weight = base.weight.detach()
    lora_a = torch.randn(rank, *weight.shape[1:], generator=generator) * weight[0].numel() ** -0.5
    lora_b = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=generator)
    lora_b = lora_b * (0.8 / rank ** 0.5) * (rank / alpha)
    magnitude = None
    if dora:
        magnitude = weight.flatten(1).norm(dim=1) * (0.5 + torch.rand(weight.shape[0], generator=generator))
    rounded = [None if t is None else t.to(dtype).float() for t in (lora_a, lora_b, magnitude)]
    return fe.LoRA({"0": fe.LoRALayer(rounded[0], rounded[1], alpha, magnitude=rounded[2])}, layout="peft")


def conv_or_linear(layer: nn.Module):
    """The base layer's own operation (a conv keeps its stride and padding) with another weight."""
    return layer._conv_forward if isinstance(layer, nn.Conv2d) else F.linear


def eager_pair(fused, x):
    """(y0, [delta_subject, delta_style]) of a fused pair layer, computed eagerly in x's dtype from its own buffers."""
    base, dtype = fused.base, x.dtype
    op = conv_or_linear(base)
    y0 = op(x, base.weight.to(dtype), base.bias.to(dtype))
    deltas = []
    for branch, scale in zip(("subject", "style"), fused.lora_scales):
        lora_a, lora_b = getattr(fused, f"{branch}_a").to(dtype), getattr(fused, f"{branch}_b").to(dtype)
        raw = F.conv2d(op(x, lora_a, None), lora_b) if y0.ndim == 4 else F.linear(F.linear(x, lora_a), lora_b)
        delta, gain = raw * scale, getattr(fused, f"{branch}_gain")
        if gain.numel():  # DoRA: (g - 1) * (y0 without bias) + g * s * raw, as PEFT
            gain = gain.to(dtype).reshape(-1, *([1, 1] if y0.ndim == 4 else []))
            delta = (gain - 1) * op(x, base.weight.to(dtype), None) + gain * delta
        deltas.append(delta)
    return y0, deltas


def eager_pool(fused, x, slots):
    """(y0, one delta per position) of a pooled layer, eagerly in x's dtype, one sample at a time."""
    base, dtype, held = fused.base, x.dtype, fused.context.pool.layer(fused.name)
    op = conv_or_linear(base)
    y0 = op(x, base.weight.to(dtype), base.bias.to(dtype))
    deltas = []
    for position in range(slots.shape[1]):
        per_sample = []
        for sample, slot in enumerate(slots[:, position].tolist()):
            xs = x[sample:sample + 1]
            if slot < 0 or not held.present[slot]:
                per_sample.append(torch.zeros_like(y0[sample:sample + 1]))
                continue
            lora_a, lora_b = held.a[slot].to(dtype), held.b[slot].to(dtype)
            if y0.ndim == 4:  # A stored (R, C_in) for a 1x1 conv; B (N, R)
                lora_a = lora_a if lora_a.ndim == 4 else lora_a[..., None, None]
                raw = F.conv2d(op(xs, lora_a, None), lora_b[..., None, None])
            else:
                raw = F.linear(F.linear(xs, lora_a), lora_b)
            per_sample.append(raw * held.scales[slot].to(dtype))
        deltas.append(torch.cat(per_sample))
    return y0, deltas


def rows(t: torch.Tensor) -> torch.Tensor:
    return pixel_rows(t) if t.ndim == 4 else t.reshape(-1, t.shape[-1])


def max_error(got, want) -> float:
    return (got.double() - want.double()).abs().max().item()


class Case:
    """One layer (pair or pool) attached in ``dtype`` and in float64, run on the same input."""

    def __init__(self, shape: str, dtype, pool: bool, dora: bool, policy: str, divergence: str, seed: int):
        kind, geometry, size, samples, self.granularity = SHAPES[shape]
        generator = torch.Generator().manual_seed(seed)
        self.dtype, self.pool, self.policy, self.divergence = dtype, pool, policy, divergence
        layer = base_layer(kind, geometry, generator)
        ranks = (3, 5, 8) if pool else (4, 6) if size != 256 else (64, 32)
        loras = [random_lora(layer, rank, rank / 2, generator, dtype, dora) for rank in ranks]
        self.model = nn.Sequential(layer).to(dtype)
        self.loras = dict(zip(("p", "q", "r"), loras))
        images = samples if pool else None
        self.assignment = [("p", "q"), ("r", "p", "q"), ("q",)][:images] if pool else None
        channels = geometry["k"] if kind == "linear" else geometry["c"]
        shape_in = (samples, size, channels) if kind == "linear" else (samples, channels, *size)
        self.x = (torch.randn(shape_in, generator=generator) * 1.5).to(dtype)

    def attach(self, model):
        options = dict(policy=self.policy, granularity=self.granularity, backend="reference", trace=False)
        if self.policy == "fls":
            options["divergence"] = self.divergence
        else:
            options["weights"] = (0.7, 1.3, 0.5) if self.pool else (0.7, 1.3)
        if not self.pool:
            return fe.attach(model, self.loras["p"], self.loras["q"], **options)
        pool = fe.LoRAPool(dtype=model[0].weight.dtype)
        for name, lora in self.loras.items():
            pool.add(name, lora)
        fusion = fe.attach(model, pool=pool, **options)
        fusion.set_batch_layout(len(self.assignment), 1)
        fusion.set_loras(self.assignment)
        return fusion

    def run(self, model, x, record=None):
        """(fused layer, output, scores (G, L) or None, choice (G,) int64 positions or None, eager (y0, deltas),
        static weights (B, L) or None) of one forward; ``record`` (a dispatch mode) around the forward only."""
        fusion, kept = self.attach(model), []
        with fusion:
            fused = fusion.layers[0]
            fused.keep_decisions = lambda choice, *scores: kept.append((choice, scores))
            with torch.no_grad(), record or contextlib.nullcontext():
                out = model(x)
            with torch.no_grad():
                slots = fused.context.sample_slots(x.shape[0], x.device) if self.pool else None
                eager = eager_pool(fused, x, slots) if self.pool else eager_pair(fused, x)
                weights = None
                if self.policy != "fls":
                    weights = (fused.context.sample_weights(x.shape[0], x.device) if self.pool else
                               torch.tensor([fused.context.pair_weights(fused)]).expand(x.shape[0], 2))
        scores = choice = None
        if self.policy == "fls":
            choice, scores = kept[-1]
            # the pool keeps (choice, scores); the pair (choose_subject, subject score, style score): as positions
            choice, scores = (choice, scores[0]) if self.pool else (torch.where(choice, 0, 1), torch.stack(scores, -1))
        return out, scores, choice, eager, weights, slots


def fls_out(eager, choice, row_group):
    """y0 + each group's chosen delta (none for -1), rows, in the eager dtype."""
    y0, deltas = eager
    row_choice = choice[row_group].reshape(-1, 1)
    out = rows(y0)
    for position, delta in enumerate(deltas):
        out = torch.where(row_choice == position, rows(y0 + delta), out)
    return out


def static_out(eager, weights):
    y0, deltas = eager
    shape = (-1,) + (1,) * (y0.ndim - 1)
    for position, delta in enumerate(deltas):
        y0 = y0 + weights[:, position].to(y0.dtype).reshape(shape) * delta
    return rows(y0)


def check(case: Case):
    """Run ``case`` in its dtype (GEMMs recorded) and in float64; assert the rules; returns the near-tie flips."""
    model64, x64 = copy.deepcopy(case.model).double(), case.x.double()
    recorder = GemmDtypes()
    out, scores, choice, eager, weights, slots = case.run(case.model, case.x, recorder)
    out64, scores64, choice64, eager64, _, _ = case.run(model64, x64)
    assert out.dtype == case.dtype and torch.isfinite(out).all()
    assert recorder.seen and all(dtypes == {case.dtype} for _, dtypes in recorder.seen), recorder.seen
    samples, got = case.x.shape[0], rows(out)
    per_sample = got.shape[0] // samples
    row_group = (torch.arange(got.shape[0]) // (1 if case.granularity == "token" else per_sample))
    scale = max(1.0, rows(out64).abs().max().item())
    if scores is None:  # static policy: the output only
        want, eager_out = static_out(eager64, weights), static_out(eager, weights)
        assert max_error(want, rows(out64)) <= 1e-6 * scale  # this file's float64 eager is the oracle's (up to
        # the float32 rounding of the static coefficients)
        tolerance = 2 * max_error(eager_out, want) + ATOL[case.dtype] * scale
        assert max_error(got, want) <= tolerance, (max_error(got, want), tolerance)
        assert max_error(rows(eager64[0]), want) > 10 * tolerance  # the LoRAs matter at this tolerance
        return 0
    groups = scores.shape[0]
    y0e = rows(eager[0]).float()
    eager_scores = torch.stack([group_mean(row_divergence(rows(eager[0] + d).float(), y0e, case.divergence), row_group,
                                           groups) for d in eager[1]], -1)
    score_scale = max(1.0, scores64.abs().max().item())
    score_tol = 2 * max_error(eager_scores, scores64) + ATOL[case.dtype] * score_scale
    assert scores.dtype == torch.float32 and max_error(scores, scores64) <= score_tol, (
        max_error(scores, scores64), score_tol)
    # near ties: another candidate's float64 score within 2x the tolerance of the float64 winner's
    group_sample = torch.empty(groups, dtype=torch.long)
    group_sample[row_group] = torch.arange(got.shape[0]) // per_sample
    candidate = slots[group_sample] >= 0 if case.pool else torch.ones_like(scores64, dtype=torch.bool)
    winner = scores64.gather(1, choice64.clamp_min(0).reshape(-1, 1))
    rivals = candidate & ((winner - scores64).abs() <= 2 * score_tol)
    rivals[torch.arange(groups), choice64.clamp_min(0)] = False
    close = rivals.any(-1)
    flips = int((choice != choice64)[close].sum())
    assert torch.equal(choice[~close], choice64[~close]), (choice.tolist(), choice64.tolist(), close.tolist())
    assert close.sum() <= MAX_NEAR_TIE_SHARE * groups, f"{int(close.sum())} of {groups} groups are near ties"
    assert flips <= max(1, MAX_FLIP_SHARE * groups), f"{flips} near-tie flips in {groups} groups"
    if case.granularity == "token":  # per-sample groups of one layer tend to agree; per-token ones must not
        assert len(set(choice64.tolist())) > 1, "the case needs more than one LoRA chosen in float64"
    assert max_error(fls_out(eager64, choice64, row_group), rows(out64)) <= 1e-6 * scale
    want = fls_out(eager64, choice, row_group)  # float64 with the decisions this run took
    tolerance = 2 * max_error(fls_out(eager, choice, row_group), want) + ATOL[case.dtype] * scale
    assert max_error(got, want) <= tolerance, (max_error(got, want), tolerance)
    return flips


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_pair_layer_in_half_precision_matches_float64(shape, dtype, policy):
    flips = check(Case(shape, dtype, pool=False, dora=False, policy=policy, divergence="kl", seed=len(shape)))
    print(f"{shape} {dtype} {policy}: {flips} near-tie flip(s)")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("divergence", ["js", "cosine", "dot"])
@pytest.mark.parametrize("shape", ["linear-odd", "conv-odd"])
def test_pair_layer_other_divergences(shape, divergence, dtype):
    check(Case(shape, dtype, pool=False, dora=False, policy="fls", divergence=divergence, seed=7))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ["linear-odd", "conv-odd", "conv-odd-stride2"])
@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_dora_layer_in_half_precision_matches_float64(shape, dtype, policy):
    check(Case(shape, dtype, pool=False, dora=True, policy=policy, divergence="kl", seed=3))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ["linear-odd", "linear-sdxl-cross", "conv-odd", "conv-odd-stride2"])
@pytest.mark.parametrize("policy", ["fls", "direct"])
def test_pool_layer_in_half_precision_matches_float64(shape, dtype, policy):
    check(Case(shape, dtype, pool=True, dora=False, policy=policy, divergence="kl", seed=11))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ["linear-odd", "conv-odd"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradient_through_a_half_precision_layer_matches_float64(shape, dtype, dora):
    """LLR's guided passes differentiate the reference path: d(out . r)/dx in the dtype, against float64, under the
    same rule (2x the error of eager autograd in the dtype, plus ATOL)."""
    case = Case(shape, dtype, pool=False, dora=dora, policy="direct", divergence="kl", seed=13)
    grads = []
    for model, x, eager in ((case.model, case.x, False), (copy.deepcopy(case.model).double(), case.x.double(), False),
                            (case.model, case.x, True)):
        x = x.clone().requires_grad_()
        with case.attach(model) as fusion:
            fused = fusion.layers[0]
            weights = torch.tensor([fused.context.pair_weights(fused)]).expand(x.shape[0], 2)
            out = static_out(eager_pair(fused, x), weights) if eager else rows(model(x))
            direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            (out.double() * direction).sum().backward()
        grads.append(x.grad)
    got, want, eager_grad = grads
    assert got.dtype == dtype and torch.isfinite(got).all()
    tolerance = 2 * max_error(eager_grad, want) + ATOL[dtype] * max(1.0, want.abs().max().item())
    assert max_error(got, want) <= tolerance, (max_error(got, want), tolerance)
