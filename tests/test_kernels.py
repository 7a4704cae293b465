"""Triton kernels (fusion_engine.kernels, source folder csrc_triton/) against a float64 run of the reference, under the
Triton interpreter.

The interpreter is switched on here, before triton is imported. Its tl.dot gets bf16 wrong, so the
full matrices cover fp32 and fp16, and the bf16 tests (fused FLS, mix and the split variant) run with the
interpreter's dot patched (fusion_engine.kernels.testing.interpreter_bf16_dot); bf16 at real shapes is checked on a
GPU by bench/gpu_table.py.

Tolerance (FlashAttention's rule): the kernel's max error against the float64 reference must be at
most twice the error of the same computation done eagerly by torch in the input dtype (F.linear
for the base and for each LoRA factor, rounded to the dtype as eager code does), plus a small atol.
A group whose two float64 scores are closer than the score tolerance may legitimately flip: for
those groups either decision is accepted, and the output rows are then checked against the
decision the kernel reported. Every other group must match the reference decision.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
kernels = pytest.importorskip("fusion_engine.kernels")
if not kernels.INTERPRET:  # pragma: no cover - another module imported it first
    pytest.skip("fusion_engine.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from fusion_engine import ops  # noqa: E402
from fusion_engine.kernels import testing as kt  # noqa: E402
from fusion_engine.ops import reference as R  # noqa: E402
from fusion_engine.ops import triton_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (M, K, N, r_subject, r_style, rows per group): odd/prime sizes beside aligned ones, uneven groups
SHAPES = {
    "odd": (41, 61, 77, 3, 5, (10, 20, 11)),
    "aligned": (64, 32, 64, 4, 8, (8, 40, 16)),
}
# which LoRAs are present: both, subject absent, style absent
PRESENCE = {"both": (True, True), "no_subject": (False, True), "no_style": (True, False)}


@pytest.fixture(autouse=True)
def _poison():
    """NaN-fill every buffer the launchers allocate, so unwritten elements fail the comparisons."""
    with kt.poisoned_outputs():
        yield


def _make(shape, dtype, presence, bias, seed, interleave=False):
    M, K, N, rc, rs, sizes = SHAPES[shape]
    return kt.make_fls_inputs(M, K, N, rc if presence[0] else 0, rs if presence[1] else 0, sizes, dtype, seed,
                              bias=bias, interleave=interleave)


def _check_fls(a, divergence, dtype, prev_choice=None):
    result = triton_ops.fls_linear(**a, divergence=divergence, prev_choice=prev_choice)
    assert result[0].dtype == dtype
    kt.check_fls_linear(result, a, divergence, R).assert_ok()
    return result


@pytest.mark.parametrize("divergence", ["kl", "cosine", "dot"])
@pytest.mark.parametrize("presence", list(PRESENCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fls_linear_matches_float64_reference(shape, dtype, presence, divergence):
    bias = presence == "both" or divergence == "kl"  # both bias layouts for the absent-LoRA cases
    a = _make(shape, dtype, PRESENCE[presence], bias=bias, seed=len(shape) * 7 + len(divergence))
    _check_fls(a, divergence, dtype)


@pytest.mark.parametrize("divergence", ["kl", "cosine", "dot"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fls_and_mix_linear_bf16_match_float64_reference(shape, divergence):
    """bf16 inputs (the dtype FLUX and SD3 run in), with the interpreter's bf16 dot patched."""
    a = _make(shape, torch.bfloat16, (True, True), bias=divergence != "cosine", seed=len(shape) * 5 + len(divergence))
    with kt.interpreter_bf16_dot():
        _check_fls(a, divergence, torch.bfloat16)
        inputs = kt.mix_inputs(a, torch.tensor([0.7, -1.3]))
        kt.check_mix_linear(triton_ops.mix_linear(**inputs), inputs, R).assert_ok()


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
    ch = triton_ops.fls_linear(**a, divergence=divergence)[3]
    guesses = [ch, ~ch, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool),
               torch.tensor([True, False, True])]
    kt.check_speculation(triton_ops.fls_linear, a, divergence, guesses).assert_ok()


# The split variant (base="cublas": y0 from F.linear, read by the kernels), forced by the override
# (tiny shapes pick the fused path by default). K = N odd, M not a multiple of the block, three groups.
# case -> (dtype, divergence, presence, bias, interleaved groups)
SPLIT_CASES = {
    "fp32-kl": (torch.float32, "kl", "both", True, False),
    "bf16-kl": (torch.bfloat16, "kl", "both", True, False),
    "fp32-cosine-no-bias-interleaved": (torch.float32, "cosine", "both", False, True),
    "bf16-dot-no-style": (torch.bfloat16, "dot", "no_style", True, False),
}


def _split_inputs(dtype, presence, bias, interleave, seed):
    rc, rs = (r if present else 0 for r, present in zip((3, 5), PRESENCE[presence]))
    return kt.make_fls_inputs(41, 61, 61, rc, rs, (10, 20, 11), dtype, seed, bias=bias, interleave=interleave)


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_variant_matches_float64_reference_and_the_fused_decisions(case):
    """Same per-dtype tolerance against float64 as the fused variant; the same decisions as it."""
    dtype, divergence, presence, bias, interleave = SPLIT_CASES[case]
    a = _split_inputs(dtype, presence, bias, interleave, seed=31 + len(case))
    with kt.interpreter_bf16_dot():
        split = triton_ops.fls_linear(**a, divergence=divergence, base="cublas")
        fused = triton_ops.fls_linear(**a, divergence=divergence, base="fused")
    assert split[0].dtype == dtype
    kt.check_fls_linear(split, a, divergence, R).assert_ok()
    kt.check_fls_linear(fused, a, divergence, R).assert_ok()
    assert torch.equal(split[3], fused[3]), (split[3], fused[3])


def test_split_variant_speculation_is_exact():
    """Split variant: a right, a wrong and a mixed guess give bitwise the same output and decisions."""
    a = _split_inputs(torch.float16, "both", True, False, seed=31)
    a["style_b"] = a["style_b"] * torch.tensor(0.5, dtype=torch.float16)  # groups disagree: guesses partly wrong
    split = functools.partial(triton_ops.fls_linear, base="cublas")
    ch = split(**a, divergence="kl")[3]
    assert not (ch.all() or (~ch).all()), "the test needs groups that decide differently"
    kt.check_speculation(split, a, "kl", [ch, ~ch, torch.ones(3, dtype=torch.bool)]).assert_ok()


def test_base_mode_is_picked_by_size_class():
    """FLUX-sized GEMMs take the base from cuBLAS; SDXL's and cross-attention's keep the fused kernel."""
    from fusion_engine.kernels.utils import fls_base_config

    assert fls_base_config(4608, 3072, 3072) == "cublas"
    assert fls_base_config(4608, 12288, 3072) == "cublas"
    assert fls_base_config(8192, 640, 640) == "fused"
    assert fls_base_config(154, 2048, 1280) == "fused"


@pytest.mark.parametrize("presence", list(PRESENCE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mix_linear_matches_float64_reference(shape, dtype, presence):
    a = _make(shape, dtype, PRESENCE[presence], bias=presence != "no_style", seed=21)
    inputs = kt.mix_inputs(a, torch.tensor([0.7, -1.3]))  # the scales folded in, as the policies pass them
    kt.check_mix_linear(triton_ops.mix_linear(**inputs), inputs, R).assert_ok()


# Scaled-down DiT (FLUX / SD3) linears: hidden width 96 + an odd 5, the MLP projections 4x wider,
# ranks 4..16, tokens of two images in uneven groups. Real sizes run on a GPU (bench/gpu_table.py).
DIT_SHAPES = {  # (M, K, N, r_subject, r_style, rows per group), dtype, divergence
    "attn": ((23, 101, 101, 4, 16, (12, 11)), torch.float32, "kl"),
    "mlp_up": ((19, 101, 404, 16, 8, (9, 10)), torch.float16, "cosine"),
    "mlp_down": ((19, 404, 101, 8, 4, (10, 9)), torch.float16, "dot"),
}


@pytest.mark.parametrize("shape", list(DIT_SHAPES))
def test_dit_shaped_linears_match_float64_reference(shape):
    (M, K, N, rc, rs, sizes), dtype, divergence = DIT_SHAPES[shape]
    a = kt.make_fls_inputs(M, K, N, rc, rs, sizes, dtype, seed=M + K + N, bias=shape != "mlp_down")
    result = triton_ops.fls_linear(**a, divergence=divergence)
    kt.check_fls_linear(result, a, divergence, R).assert_ok()
    inputs = kt.mix_inputs(a, torch.tensor([0.9, 1.1]))
    kt.check_mix_linear(triton_ops.mix_linear(**inputs), inputs, R).assert_ok()


def test_the_shared_checks_catch_wrong_results():
    """The checks themselves can fail: a float64 result rounded to the dtype passes; a nudged
    output, a flipped clear-cut decision, an unwritten (NaN) score or a decision byte of 0x5A does not."""
    a = _make("odd", torch.float32, (True, True), bias=True, seed=6)
    out, sc, ss, ch = R.fls_linear(**kt.to_float64(a), divergence="kl")
    good = (out.float(), sc.float(), ss.float(), ch)
    check = kt.check_fls_linear(good, a, "kl", R)
    check.assert_ok()
    far = (sc - ss).abs() > 2 * check.score_tol
    assert far.any()
    flipped = ch.clone()
    flipped[far.nonzero()[0]] ^= True
    poisoned_choice = ch.clone().view(torch.uint8)
    poisoned_choice[0] = 0x5A
    wrong = {
        "output": (good[0] + 3 * check.out_tol, *good[1:]),
        "decision": (*good[:3], flipped),
        "NaN score": (good[0], torch.full_like(good[1], float("nan")), *good[2:]),
        "decision byte": (*good[:3], poisoned_choice.view(torch.bool)),
    }
    for name, result in wrong.items():
        assert not kt.check_fls_linear(result, a, "kl", R).ok, name
    inputs = kt.mix_inputs(a, torch.tensor([0.5, 0.25]))
    mix64 = R.mix_linear(**kt.to_float64(inputs)).float()
    assert kt.check_mix_linear(mix64, inputs, R).ok
    assert not kt.check_mix_linear(mix64 + 1e-3, inputs, R).ok


def test_launchers_name_the_tensor_that_breaks_the_contract():
    a = _make("odd", torch.float32, (True, True), bias=True, seed=2)
    bad = {
        "subject_b": ({"subject_b": a["subject_b"][:, :2]}, "subject_b must be (N=77, r=3), got shape (77, 2)"),
        "bias": ({"bias": a["bias"][:-1]}, "bias must be (N=77,)"),
        "row_group": ({"row_group": a["row_group"][:-1]}, "row_group must be (M=41,)"),
        "prev_choice": ({"prev_choice": torch.ones(2, dtype=torch.bool)}, "prev_choice must be (G=3,)"),
        "x dtype": ({"x": a["x"].double()}, "x dtype torch.float64"),
        "rank": ({"style_a": torch.randn(129, 61), "style_b": torch.randn(77, 129)}, "style rank 129 exceeds"),
        "base": ({"base": "cuda"}, "base must be one of ('fused', 'cublas') or None, got 'cuda'"),
    }
    for change, message in bad.values():
        with pytest.raises(ValueError, match=re.escape(message)):
            kernels.fls_linear_fwd(**{**a, **change})
    with pytest.raises(ValueError, match=re.escape("coef must be (2,)")):
        kernels.mix_linear_fwd(**kt.mix_inputs(a, torch.ones(3)))


def _with_rank(lora, name, rank, seed=0):
    """``lora`` with the layer ``name`` replaced by a random LoRA of rank ``rank``."""
    import fusion_engine as fe

    layer = lora.layers[name]
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(rank, *layer.lora_a.shape[1:], generator=g)
    lora_b = torch.randn(layer.lora_b.shape[0], rank, *layer.lora_b.shape[2:], generator=g)
    return fe.LoRA({**lora.layers, name: fe.LoRALayer(lora_a=lora_a, lora_b=lora_b, alpha=float(rank))}, lora.source)


def test_attach_refuses_what_the_triton_kernels_decline(tiny_pipe, loras):
    """A rank above the kernels' limit or a dtype they do not take fails at attach (naming the layer,
    the value and the limit) and leaves the model as it was, instead of failing mid-sampling."""
    import fusion_engine as fe
    from fusion_engine.errors import AttachError
    from fusion_engine.runtime.fusion import attached_fusion

    unet = tiny_pipe.unet
    subject, style = loras
    name = next(n for n in subject.layers if isinstance(unet.get_submodule(n), torch.nn.Linear))
    big = _with_rank(subject, name, kernels.MAX_RANK + 1)
    before = dict(unet.named_modules())
    with pytest.raises(AttachError, match=re.escape(f"layer {name!r}: LoRA rank {kernels.MAX_RANK + 1} exceeds "
                                                    f"the Triton kernels' limit of {kernels.MAX_RANK}")):
        fe.attach(unet, big, style, backend="triton")
    assert dict(unet.named_modules()) == before and attached_fusion(unet) is None
    with fe.attach(unet, big, style, backend="reference"):  # the reference takes any rank
        pass
    with fe.attach(unet, big, style, backend="auto"):  # auto picks the reference on CPU
        pass
    unet.double()
    with pytest.raises(AttachError, match=r"layer '.+': dtype float64 is not one the Triton kernels take"):
        fe.attach(unet, subject, style, backend="triton")
    assert dict(unet.named_modules()) == before


def test_check_supported_reads_auto_as_the_backend_it_picks(monkeypatch):
    from fusion_engine.errors import AttachError, OptionError

    limit = kernels.MAX_RANK
    ops.check_supported("triton", "linear", torch.bfloat16, (limit, 0), layer="to_q")  # at the limit: fine
    ops.check_supported("triton", "conv2d", torch.float64, (4 * limit,), layer="conv")  # convs run the reference
    ops.check_supported("auto", "linear", torch.float16, (limit + 1,), device="cuda")  # auto -> reference here
    monkeypatch.setattr(triton_ops, "is_available", lambda: True)  # as on a GPU machine: auto -> triton
    with pytest.raises(AttachError, match=f"layer 'to_q': LoRA rank {limit + 1} exceeds"):
        ops.check_supported("auto", "linear", torch.float16, (4, limit + 1), device="cuda", layer="to_q")
    ops.check_supported("auto", "linear", torch.float16, (limit + 1,), device="cpu")  # CPU tensors: reference
    with pytest.raises(OptionError, match="unknown layer kind 'conv3d'"):
        ops.check_supported("triton", "conv3d", torch.float16, (4,))


def test_gpu_table_imports_with_torch_and_triton_only():
    """bench/gpu_table.py runs where only torch and triton are installed (the GPU machine): with
    diffusers, transformers, open_clip and peft unimportable, it imports (parsing no arguments),
    loads the ops and the shared checks, and verifies one tiny layer in smoke mode."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    code = (
        "import sys\n"
        "for name in ('diffusers', 'transformers', 'open_clip', 'peft'):\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        "sys.argv = ['gpu_table.py', '--bogus-flag']  # parsed only by main()\n"
        "sys.path.insert(0, 'bench')\n"
        "import torch, gpu_table\n"
        "gpu_table.setup(smoke=True)\n"
        "row = gpu_table.verify_layer(gpu_table.Layer(16, 32, 32, 4, torch.float32, seed=1), 'tiny')\n"
        "print(row)\n"
        "print('STUB' if not hasattr(sys.modules['fusion_engine'], 'attach') else 'FULL')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| tiny |" in res.stdout and "| ok |" in res.stdout and "STUB" in res.stdout, res.stdout


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
        mix = triton_ops.mix_linear(**kt.mix_inputs({**a, "x": x}, coef))
        return out + mix, sc - ss, ch

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(a["x"]), f(a["x"])):
        assert torch.equal(got, want)


def test_backward_flows_to_x_through_the_chosen_branch():
    a = _make("odd", torch.float32, (True, True), bias=True, seed=10)
    x = a["x"].clone().requires_grad_()
    out, _, _, ch = triton_ops.fls_linear(**{**a, "x": x}, divergence="kl")
    (out * out).sum().backward()
    a64 = kt.to_float64(a)
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

import importlib, inspect, types
from fusion_engine.kernels import fls_linear_fwd, mix_linear_fwd, pooled_fls_linear_fwd, pooled_mix_linear_fwd

# split variants (base="cublas"): their y0 = F.linear(...) (utils.cublas_linear, every launcher's) would run on the
# CPU here; a stand-in of the right shape
_utils = importlib.import_module("fusion_engine.kernels.utils")
_utils.F = types.SimpleNamespace(linear=lambda x, w, b=None: torch.empty(x.shape[0], w.shape[0], dtype=x.dtype))
E, bf, fp16, fp32 = torch.empty, torch.bfloat16, torch.float16, torch.float32
n = 0


def done(what):
    global n
    n += 1
    print("compiled", what, flush=True)


def base_kw(launcher, base):  # a pooled launcher that gains base= gets both variants below; one without, "fused"
    if "base" in inspect.signature(launcher).parameters:
        return {"base": base}
    return None if base == "cublas" else {}


# Each constexpr value at least once (not their product: every compile runs ptxas): BASE fused/cublas, DIVERGENCE
# kl/cosine/dot, HAS_GUESS, HAS_BIAS, an absent LoRA (rank 0), EVEN_K, fp16/bf16/fp32 (DOT_PRECISION), and the
# size classes' block configs at real SDXL / FLUX shapes.
# (M, K, N), (subject rank, style rank), dtype, [(divergence, base, guess, bias)]
PAIR = [((8192, 640, 640), (64, 64), bf, [("kl", "fused", 1, 1), ("kl", "cublas", 1, 1), ("cosine", "fused", 1, 1),
                                          ("dot", "fused", 1, 1), ("kl", "fused", 0, 0)]),
        ((154, 2048, 1280), (16, 64), bf, [("kl", "fused", 1, 1), ("kl", "cublas", 1, 0)]),
        ((4608, 3072, 12288), (128, 16), bf, [("kl", "fused", 1, 1), ("kl", "cublas", 1, 1)]),
        ((41, 61, 77), (0, 5), fp16, [("kl", "fused", 1, 1), ("cosine", "cublas", 0, 1), ("dot", "fused", 1, 0)]),
        ((41, 61, 77), (7, 0), fp32, [("kl", "fused", 1, 1), ("kl", "cublas", 0, 0)])]
if sys.argv[1:] == ["one"]:  # the CI form: one small variant per launcher family, still through ptxas
    PAIR = [((41, 61, 77), (0, 5), fp16, [("kl", "fused", 1, 1)])]
for (M, K, N), (rc, rs), dt, cases in PAIR:
    x, w, b = E(M, K, dtype=dt), E(N, K, dtype=dt), E(N, dtype=dt)
    ac, bc, as_, bs = (E(s, dtype=dt) for s in ((rc, K), (N, rc), (rs, K), (N, rs)))
    rg = torch.zeros(M, dtype=torch.long)
    for div, base, guess, bias in cases:
        fls_linear_fwd(x, w, b if bias else None, ac, bc, 1.0, as_, bs, 1.0, rg, 2, div,
                       prev_choice=torch.ones(2, dtype=torch.bool) if guess else None, base=base)
        done(f"fls_linear {M}x{K}x{N} r={rc},{rs} {dt} {div} base={base} guess={guess} bias={bias}")
    mix_linear_fwd(x, w, b if M % 2 else None, ac, bc, as_, bs, torch.ones(2))
    done(f"mix_linear {M}x{K}x{N} {dt}")
# the pool: S slots (stacks padded to R; the kernels branch per slot on its own width, 16..dot_pad(R)), L positions
# per sample, an absent slot (-1), the slot ranks read from the stacks or given as int64; (B, T, K, N), S, L, R, dtype,
# [(divergence, base, guess, bias)], mix bases
POOL = [((2, 4096, 640, 640), 16, 2, 64, bf, [("kl", "fused", 1, 1), ("kl", "cublas", 1, 1), ("cosine", "fused", 1, 1),
                                              ("dot", "fused", 0, 0)], ("fused", "cublas")),
        ((4, 1024, 1280, 1280), 8, 3, 128, bf, [("kl", "fused", 1, 1), ("kl", "cublas", 0, 1)], ("fused", "cublas")),
        ((3, 13, 61, 77), 5, 2, 7, fp16, [("kl", "fused", 0, 1), ("dot", "cublas", 1, 0)], ("fused", "cublas")),
        ((3, 13, 61, 77), 5, 3, 7, fp32, [("cosine", "fused", 1, 1), ("cosine", "cublas", 1, 1)], ("fused", "cublas"))]
if sys.argv[1:] == ["one"]:  # one variant per launcher: the pooled fls fused, the pooled mix split (both base codes)
    POOL = [((3, 13, 61, 77), 5, 2, 7, fp16, [("kl", "fused", 0, 1)], ("cublas",))]
for (B, T, K, N), S, L, R, dt, cases, mix_bases in POOL:
    x, w, b = E(B * T, K, dtype=dt), E(N, K, dtype=dt), E(N, dtype=dt)
    a_stack, b_stack, scales = E(S, R, K, dtype=dt), E(S, N, R, dtype=dt), torch.ones(S)
    present = torch.ones(S, dtype=torch.bool)
    slots = torch.arange(B * L).remainder(S).reshape(B, L)
    slots[-1, -1] = -1
    rg = torch.arange(B, dtype=torch.int32).repeat_interleave(T)
    for div, base, guess, bias in cases:
        if (kw := base_kw(pooled_fls_linear_fwd, base)) is not None:
            pooled_fls_linear_fwd(x, w, b if bias else None, a_stack, b_stack, scales, present, slots, rg, B, div,
                                  prev_choice=torch.zeros(B, dtype=torch.long) if guess else None, **kw)
            done(f"pooled_fls_linear {B}x{T}x{K}x{N} L={L} R={R} {dt} {div} base={base} guess={guess} bias={bias}")
    for base in mix_bases:
        if (kw := base_kw(pooled_mix_linear_fwd, base)) is not None:
            pooled_mix_linear_fwd(x, w, b if B % 2 else None, a_stack, b_stack, scales, slots, torch.ones(B, L), **kw)
            done(f"pooled_mix_linear {B}x{T}x{K}x{N} L={L} R={R} {dt} base={base}")
    if sys.argv[1:] != ["one"] and R > 16:  # the ranks given (int64), not read from the stacks
        ranks = torch.full((S,), R, dtype=torch.long)
        pooled_fls_linear_fwd(x, w, b, a_stack, b_stack, scales, present, slots, rg, B, "kl", slot_ranks=ranks)
        done(f"pooled_fls_linear {B}x{T}x{K}x{N} L={L} R={R} {dt} kl slot_ranks=int64")
        pooled_mix_linear_fwd(x, w, b, a_stack, b_stack, scales, slots, torch.ones(B, L), slot_ranks=ranks)
        done(f"pooled_mix_linear {B}x{T}x{K}x{N} L={L} R={R} {dt} slot_ranks=int64")
print("triton", triton.__version__, "sm_90, launches compiled:", n)
print("COMPILED")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter skips the compiler; this runs triton's real sm_90 pipeline (ptxas included)
    on the installed triton with a stand-in driver, so type errors the interpreter accepts show up.
    Every launcher and each constexpr value at least once: fls (fused and split base="cublas", kl/cosine/dot,
    with and without a guess and a bias, an absent LoRA, bf16/fp16/fp32, SDXL and FLUX size classes), mix,
    pooled fls and pooled mix (fused and split base="cublas", 2 and 3 positions, an absent slot, the per-slot width
    branches up to rank 128, slot ranks read from the stacks or given as int64), each with its pooled shrink.
    Verifies the installed triton; for another one (the GPU image's 3.6), run it with that triton's Python."""
    _compile_for_sm90(timeout=1800)


def _compile_for_sm90(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert "COMPILED" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    print(*res.stdout.splitlines()[-3:], sep="\n")  # shown by pytest -rA
    return res.stdout


def test_one_kernel_per_launcher_compiles_for_sm90_without_a_gpu():
    """The CI form of the slow test above: one small fp16 variant of each launcher (fls, mix, pooled fls fused,
    pooled mix split, each pooled one with its shrink) through triton's real sm_90 pipeline and ptxas."""
    out = _compile_for_sm90("one", timeout=600)
    for launcher in ("fls_linear", "mix_linear", "pooled_fls_linear", "pooled_mix_linear"):
        assert f"compiled {launcher} " in out, launcher


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
