"""Triton kernels (csrc_triton) against a float64 run of the reference, under the Triton interpreter.

The interpreter is switched on here, before triton is imported. It gets bf16 wrong, so these tests
cover fp32 and fp16; bf16 is checked on a GPU by bench/gpu_table.py.

Tolerance (FlashAttention's rule): the kernel's max error against the float64 reference must be at
most twice the error of the same computation done eagerly by torch in the input dtype (F.linear
for the base and for each LoRA factor, rounded to the dtype as eager code does), plus a small atol.
A group whose two float64 scores are closer than the score tolerance may legitimately flip: for
those groups either decision is accepted, and the output rows are then checked against the
decision the kernel reported. Every other group must match the reference decision.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
csrc_triton = pytest.importorskip("csrc_triton")
if not csrc_triton.INTERPRET:  # pragma: no cover - another module imported it first
    pytest.skip("csrc_triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from csrc_triton import utils as kernel_utils  # noqa: E402
from fusion_engine import ops  # noqa: E402
from fusion_engine.ops import reference as R  # noqa: E402
from fusion_engine.ops import triton_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (M, K, N, r_c, r_s, rows per group): odd/prime sizes beside aligned ones, uneven groups
SHAPES = {
    "odd": (41, 61, 77, 3, 5, (10, 20, 11)),
    "aligned": (64, 32, 64, 4, 8, (8, 40, 16)),
}
# which LoRAs are present: both, subject absent, style absent
PRESENCE = {"both": (True, True), "no_subject": (False, True), "no_style": (True, False)}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}  # added to 2x the eager error (relative to scale)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-fill every buffer the launchers allocate, so unwritten elements fail the comparisons."""
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def _make(shape, dtype, presence, bias, seed, interleave=False):
    M, K, N, rc, rs, sizes = SHAPES[shape]
    rc, rs = (rc if presence[0] else 0), (rs if presence[1] else 0)
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(dtype)

    row_group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    if interleave:  # rows of a group scattered across tiles: the per-row atomic path
        row_group = row_group[torch.randperm(M, generator=g)]
    return dict(
        x=rnd(M, K), weight=rnd(N, K, std=K ** -0.5), bias=rnd(N) if bias else None,
        subject_a=rnd(rc, K, std=K ** -0.5), subject_b=rnd(N, rc, std=0.5), subject_scale=0.8,
        style_a=rnd(rs, K, std=K ** -0.5), style_b=rnd(N, rs, std=0.5), style_scale=1.25,
        row_group=row_group, num_groups=len(sizes),
    )


def _f64(args):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}


def _eager_branches(a):
    """Same-dtype eager torch: base and each LoRA via F.linear, every intermediate in the dtype."""
    y0 = F.linear(a["x"], a["weight"], a["bias"])

    def branch(a_, b_, s):
        return y0 if a_.shape[0] == 0 else y0 + F.linear(F.linear(a["x"], a_), b_) * s

    return y0, branch(a["subject_a"], a["subject_b"], a["subject_scale"]), branch(a["style_a"], a["style_b"], a["style_scale"])


def _max_err(got, ref):
    return (got.double() - ref.double()).abs().max().item()


def _check_fls(a, divergence, dtype, prev_choose=None):
    out, sc, ss, ch = triton_ops.fls_linear(**a, divergence=divergence, prev_choose=prev_choose)
    a64 = _f64(a)
    _, rsc, rss, rch = R.fls_linear(**a64, divergence=divergence)
    assert out.dtype == dtype and sc.dtype == ss.dtype == torch.float32 and ch.dtype == torch.bool
    assert set(ch.view(torch.uint8).tolist()) <= {0, 1}, "decision buffer not (fully) written"
    assert torch.isfinite(sc).all() and torch.isfinite(ss).all() and torch.isfinite(out).all()

    # scores: 2x the eager same-dtype error (stats in float32 from the rounded branch outputs)
    y0e, yce, yse = _eager_branches(a)
    G, rg = a["num_groups"], a["row_group"]
    esc = R.group_mean(R.row_divergence(yce.float(), y0e.float(), divergence), rg, G)
    ess = R.group_mean(R.row_divergence(yse.float(), y0e.float(), divergence), rg, G)
    scale = max(1.0, rsc.abs().max().item(), rss.abs().max().item())
    tol = 2 * max(_max_err(esc, rsc), _max_err(ess, rss)) + ATOL[dtype] * scale
    assert _max_err(sc, rsc) <= tol, (_max_err(sc, rsc), tol)
    assert _max_err(ss, rss) <= tol, (_max_err(ss, rss), tol)

    # decisions: exact except where the float64 scores are within the tolerance of each other
    has_subject, has_style = a["subject_a"].shape[0] > 0, a["style_b"].shape[1] > 0
    if not (has_subject and has_style):
        assert torch.equal(ch, R.decide(sc, ss, has_subject, has_style)), "absent LoRA must never win"
    close = (rsc - rss).abs() <= 2 * tol
    assert torch.equal(ch[~close], rch[~close]), (sc, ss, rsc, rss)

    # output: against float64 with the decision the kernel reported
    y0 = R.base_linear(a64["x"], a64["weight"], a64["bias"])
    subject_delta = a["subject_scale"] * R.lora_delta(a64["x"], a64["subject_a"], a64["subject_b"]).double()
    style_delta = a["style_scale"] * R.lora_delta(a64["x"], a64["style_a"], a64["style_b"]).double()
    ref_out = R.select_rows(y0, subject_delta, style_delta, ch, rg)
    eager_out = torch.where(ch[rg.long()].unsqueeze(-1), yce, yse)
    out_tol = 2 * _max_err(eager_out, ref_out) + ATOL[dtype] * max(1.0, ref_out.abs().max().item())
    assert _max_err(out, ref_out) <= out_tol, (_max_err(out, ref_out), out_tol)
    return out, sc, ss, ch


@pytest.mark.parametrize("divergence", ["kl", "cosine", "dot"])
@pytest.mark.parametrize("presence", list(PRESENCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fls_linear_matches_float64_reference(shape, dtype, presence, divergence):
    bias = presence == "both" or divergence == "kl"  # both bias layouts for the absent-LoRA cases
    a = _make(shape, dtype, PRESENCE[presence], bias=bias, seed=len(shape) * 7 + len(divergence))
    _check_fls(a, divergence, dtype)


@pytest.mark.parametrize("divergence", ["kl", "cosine"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fls_linear_no_bias_interleaved_groups(shape, divergence):
    """Groups scattered over tiles (per-row atomics) and a linear without bias."""
    a = _make(shape, torch.float32, (True, True), bias=False, seed=11, interleave=True)
    _check_fls(a, divergence, torch.float32)


def test_fls_linear_empty_group_and_both_absent():
    a = _make("odd", torch.float32, (True, True), bias=True, seed=3)
    a["num_groups"] = 4  # group 3 has no rows: score 0 (mean of nothing), tie -> subject
    out, sc, ss, ch = _check_fls(a, "kl", torch.float32)
    assert sc[3] == 0 and ss[3] == 0 and bool(ch[3])
    b = _make("odd", torch.float16, (False, False), bias=True, seed=4)
    out, sc, ss, ch = _check_fls(b, "kl", torch.float16)
    assert ch.all() and (sc == 0).all() and (ss == 0).all()


@pytest.mark.parametrize("divergence", ["dot", "cosine"])
def test_fls_zero_delta_counts_as_absent_per_group(divergence):
    """A branch whose delta is exactly zero on a whole group never wins there (reference contract)."""
    a = _make("odd", torch.float32, (True, True), bias=True, seed=12)
    K = a["x"].shape[1]
    half = K // 2
    a["subject_a"][:, :half] = 0  # A_c reads only the second half of the channels ...
    rows0 = a["row_group"] == 0
    a["x"][rows0, half:] = 0  # ... so group 0's subject delta is exactly zero (its x rows stay non-zero)
    out, sc, ss, ch = _check_fls(a, divergence, torch.float32)
    assert not bool(ch[0]), "an all-zero subject delta must lose group 0 to the live style delta"
    a["style_b"] = torch.zeros_like(a["style_b"])  # style delta zero everywhere: the subject wins wherever it lives
    out, sc, ss, ch = _check_fls(a, divergence, torch.float32)
    assert ch.all(), "group 0: both zero -> subject; others: only the subject is live"


@pytest.mark.parametrize("divergence", ["kl", "dot"])
def test_fls_speculation_is_exact(divergence):
    """Whatever the guess (right, wrong, mixed, none), the output is bitwise the same."""
    a = _make("odd", torch.float16, (True, True), bias=True, seed=5)
    # a larger style delta on some rows makes the groups disagree, so guesses are partly wrong
    a["style_b"] = a["style_b"] * torch.tensor(2.0, dtype=torch.float16)
    base, sc, ss, ch = triton_ops.fls_linear(**a, divergence=divergence)
    G = a["num_groups"]
    guesses = [ch, ~ch, torch.ones(G, dtype=torch.bool), torch.zeros(G, dtype=torch.bool),
               torch.tensor([True, False, True])]
    for guess in guesses:
        out, sc2, ss2, ch2 = triton_ops.fls_linear(**a, divergence=divergence, prev_choose=guess)
        assert torch.equal(out, base) and torch.equal(ch2, ch)
        assert torch.allclose(sc2, sc, rtol=1e-6, atol=1e-6) and torch.allclose(ss2, ss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("presence", list(PRESENCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mix_linear_matches_float64_reference(shape, dtype, presence):
    a = _make(shape, dtype, PRESENCE[presence], bias=presence != "no_style", seed=21)
    coef = torch.tensor([0.7, -1.3])  # the scales folded in, as the policies pass them
    args = (a["x"], a["weight"], a["bias"], a["subject_a"], a["subject_b"], a["style_a"], a["style_b"], coef)
    out = triton_ops.mix_linear(*args)
    ref = R.mix_linear(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in args))
    y0 = F.linear(a["x"], a["weight"], a["bias"])
    eager = y0
    for a_, b_, c in ((a["subject_a"], a["subject_b"], coef[0]), (a["style_a"], a["style_b"], coef[1])):
        if a_.shape[0]:
            eager = eager + F.linear(F.linear(a["x"], a_), b_) * c.to(dtype)
    tol = 2 * _max_err(eager, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert out.dtype == dtype and _max_err(out, ref) <= tol, (_max_err(out, ref), tol)


def test_dispatch_js_and_3d_inputs():
    """backend='triton' dispatch; JS runs the reference path; 3-D inputs are flattened to rows."""
    a = _make("aligned", torch.float32, (True, True), bias=True, seed=8)
    out, sc, ss, ch = ops.fls_linear(**a, divergence="js", backend="triton")
    rout, rsc, rss, rch = R.fls_linear(**a, divergence="js")
    assert torch.equal(out, rout) and torch.equal(ch, rch)
    x3 = a["x"].reshape(2, 32, -1)
    out3 = ops.fls_linear(**{**a, "x": x3}, divergence="kl", backend="triton")[0]
    out2 = ops.fls_linear(**a, divergence="kl", backend="triton")[0]
    assert out3.shape == (2, 32, out2.shape[-1]) and torch.equal(out3.reshape(out2.shape), out2)


def test_torch_compile_fullgraph_traces_the_ops():
    a = _make("odd", torch.float32, (True, True), bias=True, seed=9)
    coef = torch.tensor([1.0, 0.5])

    def f(x):
        out, sc, ss, ch = triton_ops.fls_linear(**{**a, "x": x}, divergence="kl")
        mix = triton_ops.mix_linear(x, a["weight"], a["bias"], a["subject_a"], a["subject_b"], a["style_a"], a["style_b"], coef)
        return out + mix, sc - ss, ch

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(a["x"]), f(a["x"])):
        assert torch.equal(got, want)


def test_backward_flows_to_x_through_the_chosen_branch():
    a = _make("odd", torch.float32, (True, True), bias=True, seed=10)
    x = a["x"].clone().requires_grad_()
    out, _, _, ch = triton_ops.fls_linear(**{**a, "x": x}, divergence="kl")
    (out * out).sum().backward()
    a64 = _f64(a)
    x64 = a64["x"].clone().requires_grad_()
    y0 = R.base_linear(x64, a64["weight"], a64["bias"])
    subject_delta = a["subject_scale"] * R.lora_delta(x64, a64["subject_a"], a64["subject_b"])
    style_delta = a["style_scale"] * R.lora_delta(x64, a64["style_a"], a64["style_b"])
    ref = R.select_rows(y0, subject_delta.double(), style_delta.double(), ch, a["row_group"])
    (ref * ref).sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


def test_cpu_without_interpreter_raises_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = (
        "import torch\n"
        "from fusion_engine import ops\n"
        "x = torch.randn(4, 8); w = torch.randn(6, 8); a = torch.randn(2, 8); b = torch.randn(6, 2)\n"
        "try:\n"
        "    ops.fls_linear(x, w, None, a, b, 1.0, a, b, 1.0, torch.zeros(4, dtype=torch.long), 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr
    assert "backend='reference'" in res.stdout


_AOT_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
import triton.runtime.jit as jit

class _FakeDriver:  # enough of a driver for the JIT to pick sm_90 and compile, never to launch
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True

driver.set_active(_FakeDriver())
_run = jit.JITFunction.run
jit.JITFunction.run = lambda self, *a, grid, warmup, **k: _run(self, *a, grid=grid, warmup=True, **k)

from csrc_triton import fls_linear_fwd, mix_linear_fwd
dt = torch.bfloat16
for (M, K, N), (rc, rs) in (((8192, 640, 640), (64, 64)), ((41, 61, 77), (0, 5))):
    x, w, b = torch.empty(M, K, dtype=dt), torch.empty(N, K, dtype=dt), torch.empty(N, dtype=dt)
    ac, bc, as_, bs = (torch.empty(s, dtype=dt) for s in ((rc, K), (N, rc), (rs, K), (N, rs)))
    rg = torch.zeros(M, dtype=torch.long)
    for div in ("kl", "cosine", "dot"):
        fls_linear_fwd(x, w, b, ac, bc, 1.0, as_, bs, 1.0, rg, 2, div, prev_choose=torch.ones(2, dtype=torch.bool))
    mix_linear_fwd(x, w, None, ac, bc, as_, bs, torch.ones(2))
print("COMPILED")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter skips the compiler; this runs triton's real sm_90 pipeline (ptxas included)
    on the installed triton with a stand-in driver, so type errors the interpreter accepts show up."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert "COMPILED" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def _restricted(lora, prefix):
    import fusion_engine as fe

    return fe.LoRA({n: layer for n, layer in lora.layers.items() if n.startswith(prefix)}, lora.source)


@pytest.mark.parametrize("policy,blocks", [
    ("fls", "up_blocks.0.attentions.1"),  # 8 layers: the interpreter takes ~1 s a launch
    ("direct", "up_blocks.0.attentions.1"),
    pytest.param("fls", "", marks=pytest.mark.slow),  # all 32 layers, minutes under the interpreter
])
def test_tiny_unet_with_triton_backend_matches_reference(tiny_pipe, loras, policy, blocks):
    """End to end: fused layers of a UNet forward on the kernels (interpreted), twice, so the second
    call speculates with the first call's decisions; output and decisions as the reference."""
    from conftest import unet_inputs, unet_out

    import fusion_engine as fe

    unet = tiny_pipe.unet
    subject, style = (_restricted(lora, blocks) for lora in loras)
    inputs = unet_inputs(unet, batch=4, seed=11)
    with fe.attach(unet, subject, style, policy=policy, backend="reference") as fusion:
        fusion.set_batch_layout(images=2, copies=2)
        expected = unet_out(unet, inputs)
        expected_choices = [r.choice for r in fusion.trace.gather()]
    with fe.attach(unet, subject, style, policy=policy, backend="triton") as fusion:
        fusion.set_batch_layout(images=2, copies=2)
        for call in range(2 if policy == "fls" else 1):
            fusion.trace.clear()
            torch.testing.assert_close(unet_out(unet, inputs), expected, atol=1e-4, rtol=1e-4)
            for got, want in zip((r.choice for r in fusion.trace.gather()), expected_choices):
                assert torch.equal(got, want), call
