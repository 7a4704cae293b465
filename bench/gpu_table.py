"""GPU benchmark table of the fused FLS linear: one command, torch + triton only, a few minutes on an H100.

    python bench/gpu_table.py                 # full run on the visible GPU; prints markdown
    python bench/gpu_table.py --out bench/RESULTS.md   # ... and appends the tables there
    python bench/gpu_table.py --smoke         # CPU, Triton interpreter, tiny shapes: checks the
                                              # script's logic only, its timings mean nothing

1. Verification, before any timing: at every benchmarked shape, rank and dtype, the Triton ops are
   checked against a float64 run of the reference (fusion_engine.ops.reference) by the checks
   tests/test_kernels.py uses (csrc_triton/testing.py): output and per-group scores within 2x the
   error of the same computation done eagerly in the input dtype (FlashAttention's rule) + a small
   atol; decisions equal except where the two float64 scores are closer than that tolerance; a
   wrong speculation guess gives the same output bit for bit; the mix op likewise.
2. SDXL layer table (M=8192,K=N=640; M=2048,K=N=1280; M=154,K=2048,N=1280), ranks 16 and 64,
   bf16 and fp16, `triton.testing.do_bench(..., quantiles=[0.5, 0.2, 0.8])` medians of:
   merged-weight linear (the floor), naive eager FLS (three branch outputs, F.kl_div, `.item()`),
   K-LoRA with its scores cached at attach (one chosen delta, unmerged), a diffusers/peft-style
   two-adapter unmerged forward, the fused FLS op with a correct guess (decisions stable from the
   last step) and with a wrong guess (every tile fixed up: the worst case), the same two for the
   split variant of the op (``base="cublas"``: the base GEMM in cuBLAS, the Triton kernels read y0
   from memory; verified like the fused variant, decisions compared with it), and the mix op
   (direct merge). Each as a ratio to the floor. Two timings per method: the eager call (Python
   launch overhead included) and the same call replayed from a CUDA graph (the kernels alone).
3. FLUX table (bf16, ranks 16, 64, 128, M=4608 tokens = 4096 image + 512 text at 1024x1024): the
   distinct LoRA-targeted linears of a double block (attention q/k/v/out K=N=3072, feed-forward
   up 3072->12288 and down 12288->3072; the image and text streams' linears together modelled as
   one M=4608 linear) and of a single block (q/k/v 3072->3072, proj_mlp 3072->12288, proj_out
   15360->3072), the same methods and ratios as table 2; then each block's set of linears summed
   with its multiplicities, as a ratio to the merged-weight sum; then issue 9's target line (fused
   and split FLS at the attention shape, <= 1.3x merged at rank 64).
4. Step table: NOT the diffusers UNet (no diffusers here). A self-contained approximation of the
   attention part of one SDXL UNet step at 1024x1024 with CFG (batch 2, one image, so one
   decision group): the 70 SDXL transformer blocks (down 2x2 @64x64/640ch, down 2x10 @32x32/1280,
   mid 10, up 3x10 @32x32, up 3x2 @64x64), each with self-attention (q, k, v, out) and
   cross-attention (q; k, v from a (2, 77, 2048) context; out) = 560 LoRA linears at the real
   shapes, with scaled_dot_product_attention between them and residual adds; random weights. The
   convs, feed-forwards and norms of the real UNet are left out, so the ratios here OVERSTATE the
   overhead of a full UNet step. Modes: merged weights, fused FLS (speculation state kept per
   layer on the device), the reference FLS path (pure torch, capturable), naive eager FLS (host
   syncs: not capturable); eager and CUDA-graph-captured (torch.cuda.CUDAGraph).
5. Pool table (bf16, rank 64, 8 images x 4096 tokens, K=N=640 and 1280): 8 distinct pairs (16 pool slots) in one
   pooled call per variant (pooled FLS with the fused and the cuBLAS base, with half the slots at rank 16, pooled mix
   fused and cuBLAS) against 8 single-pair fls_linear calls of one image each and the merged-weight linear of the
   batch (the floor); a uniform assignment (every image on one pair): the pair kernel's batch call against the
   pooled one. Eager calls, correct guesses; every variant's choices checked against float64 first.
6. Pool step table (issue 13's GPU target; bf16, rank 64): table 4's attention-only step (same blocks, shapes and
   attention) for P = 8 images with CFG, batch 2P copy-major as diffusers batches it (rows 0..P-1 uncond, P..2P-1
   cond), each image with its own random (subject, style) pair at every linear (2P pool slots per layer; an image's
   decision group is its two CFG copies, as the library's pool). Modes: (a) pooled, one batch-2P step through
   pooled_fls_linear at every linear (speculation state kept per layer on the device); (b) per request, P steps of
   batch 2, each image's own pair through the single-pair fused fls_linear (correct guesses) - sampling only: the
   attach/detach a real service pays per request is NOT modelled, so (b) is a lower bound on its cost; (c) merged
   weights, one batch-2P step with one pair merged for all (the floor of a batch that size). Reported: ms per step
   and images/s per denoising step (P images per step for a and c, P steps for b), eager and CUDA-graph replay, and
   issue 13's targets: (a)/(b) images/s >= 4x, (a)/(c) cost per image <= 1.3x. Verified first: every pooled linear,
   on the input the pooled reference step gives it, each image's rows checked against float64 by table 4's
   single-pair check (near-tie decisions that differ from float64's are counted); then, for information, how many
   (layer, image) decisions of the last pooled step equal the last per-request steps'. Smoke: one block per
   resolution, P = 2, rank 8, fp32.
7. Inductor table (issue 22: the fused op must beat the Inductor-compiled reference at every shape, or that one is
   the default there; bf16, rank 64, a short list of SDXL and FLUX shapes in order of value, each compiled for its own
   shape, so the table has a time budget of its own, ``--inductor-budget-s``, and starts no shape past it): the
   reference FLS op (fusion_engine.ops.reference.fls_linear, what backend="reference" runs) eager and under
   ``torch.compile`` (Inductor, static shapes), beside the merged-weight linear and the fused and split FLS ops, eager
   calls then CUDA-graph replays (a compiled function that cannot be captured reads n/a). The compiled reference's
   output is compared with the eager one first. Smoke: one tiny shape compiled with ``backend="aot_eager"`` (no C++
   compile on the CPU), for the logic only.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from fls_baselines import naive_fls

REPO = Path(__file__).resolve().parents[1]

SDXL_SHAPES = [(8192, 640, 640), (2048, 1280, 1280), (154, 2048, 1280)]
SDXL_RANKS = [16, 64]
FLUX_TOKENS = 4608
FLUX_SHAPES = {  # distinct LoRA-targeted linears: name -> (M, K, N)
    "attn q/k/v/out": (FLUX_TOKENS, 3072, 3072),
    "ff up / proj_mlp": (FLUX_TOKENS, 3072, 12288),
    "ff down": (FLUX_TOKENS, 12288, 3072),
    "single proj_out": (FLUX_TOKENS, 15360, 3072),
}
FLUX_BLOCKS = {  # block -> {linear: how many per block}
    "double block": {"attn q/k/v/out": 4, "ff up / proj_mlp": 1, "ff down": 1},
    "single block": {"attn q/k/v/out": 3, "ff up / proj_mlp": 1, "single proj_out": 1},
}
FLUX_RANKS = [16, 64, 128]
LAYER_METHODS = [("merged", "merged (floor)"), ("naive", "naive eager FLS"), ("klora", "K-LoRA cached"),
                 ("two_adapter", "2-adapter unmerged"), ("fused", "fused FLS, stable"),
                 ("fused_flip", "fused FLS, guess wrong"), ("split", "split FLS (cuBLAS base), stable"),
                 ("split_flip", "split FLS, guess wrong"), ("mix", "mix (direct)")]
FLS_BASES = {"fused": "fused", "split": "cublas"}  # table name -> the op's base= override

# filled by setup(): the run's mode and the modules loaded for it
RUN = types.SimpleNamespace(smoke=False, device="cuda", triton=None, reference=None, ops=None, checks=None,
                            lines=[], failures=[])


def import_ops():
    """(fusion_engine.ops.reference, fusion_engine.ops.triton_ops, fusion_engine.kernels.testing) with torch
    and triton only: fusion_engine/__init__.py (which pulls diffusers) is bypassed by registering a
    bare package module for ``fusion_engine`` first, so only its ``ops`` subpackage (torch,
    triton, fusion_engine/errors.py) is imported. A full import made earlier is used as it is."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if "fusion_engine" not in sys.modules:
        package = types.ModuleType("fusion_engine")
        package.__path__ = [str(REPO / "fusion_engine")]
        sys.modules["fusion_engine"] = package
    from fusion_engine.kernels import testing
    from fusion_engine.ops import reference, triton_ops

    return reference, triton_ops, testing


def setup(smoke: bool) -> None:
    """Switch the interpreter on for a smoke run (before triton is imported) and load the ops."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    RUN.smoke, RUN.device, RUN.triton = smoke, "cpu" if smoke else "cuda", triton
    RUN.reference, RUN.ops, RUN.checks = import_ops()


def emit(line: str = "") -> None:
    print(line, flush=True)
    RUN.lines.append(line)


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- timing

def bench(fn) -> float:
    """Median milliseconds (do_bench on GPU; a plain timer in smoke mode)."""
    if RUN.smoke:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return RUN.triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def capture(fn):
    """CUDA graph of fn (warmed up on a side stream first, as torch.cuda.graph's docs ask)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


# ----------------------------------------------------------------------------- one layer

LORA_B_STD = (0.2, 0.25)  # (subject, style) B factors' std times sqrt(rank): deltas ~20% of y0, style a bit larger


class Layer:
    """One LoRA-targeted linear: base W (N, K), optional bias, two LoRAs, its merged weight."""

    def __init__(self, M, K, N, r, dtype, bias=True, seed=0, with_x=True):
        # deltas about 20% of y0, the style one a little larger (so decisions are not all equal); on
        # the device: the step has ~1e9 weights
        self.inputs = RUN.checks.make_fls_inputs(
            M, K, N, r, r, (M,), dtype, seed, bias=bias, device=RUN.device, bias_std=0.5,
            b_std=tuple(std * r ** -0.5 for std in LORA_B_STD), scales=(1.0, 1.0), with_x=with_x)  # alpha = rank
        self.M, self.K, self.N, self.r, self.dtype = M, K, N, r, dtype
        a = self.inputs
        self.w_merged = (a["weight"].float() + a["subject_scale"] * a["subject_b"].float() @ a["subject_a"].float()
                         ).to(dtype)
        self.coef = torch.tensor([a["subject_scale"], a["style_scale"]], device=RUN.device)
        self.prev = torch.ones(1, dtype=torch.bool, device=RUN.device)  # speculation state

    def inputs_for(self, x=None) -> dict:
        return self.inputs if x is None else {**self.inputs, "x": x}

    # --- the methods of the table
    def merged(self, x=None):
        a = self.inputs_for(x)
        return F.linear(a["x"], self.w_merged, a["bias"])

    def klora(self, x=None):  # K-LoRA with its choice cached at attach: one unmerged delta
        a = self.inputs_for(x)
        return F.linear(a["x"], a["weight"], a["bias"]) + F.linear(F.linear(a["x"], a["subject_a"]),
                                                                   a["subject_b"]) * a["subject_scale"]

    def two_adapter(self, x=None):  # peft's Linear.forward with two active adapters
        a = self.inputs_for(x)
        out = self.klora(x)
        return out + F.linear(F.linear(a["x"], a["style_a"]), a["style_b"]) * a["style_scale"]

    def naive(self, x=None):
        a = self.inputs_for(x)
        return naive_fls(*(a[k] for k in ("x", "weight", "bias", "subject_a", "subject_b", "subject_scale",
                                           "style_a", "style_b", "style_scale")))

    def fused(self, x=None, prev=None, base="fused"):  # base="cublas": the split variant
        guess = self.prev if prev is None else prev
        return RUN.ops.fls_linear(**self.inputs_for(x), divergence="kl", prev_choice=guess, base=base)[0]

    def fused_step(self, x):  # with the per-layer speculation state updated on the device
        out, _, _, choice = RUN.ops.fls_linear(**self.inputs_for(x), divergence="kl", prev_choice=self.prev)
        self.prev.copy_(choice)
        return out

    def reference(self, x=None):
        return RUN.reference.fls_linear(**self.inputs_for(x), divergence="kl")[0]

    def checked(self, x, problems: list):  # the fused op checked on this input, the reference's output passed on
        inputs = self.inputs_for(x)
        check = RUN.checks.check_fls_linear(RUN.ops.fls_linear(**inputs, divergence="kl"), inputs, "kl", RUN.reference)
        problems.extend(check.problems)
        return self.reference(x)

    def mix(self, x=None):
        return RUN.ops.mix_linear(**RUN.checks.mix_inputs(self.inputs_for(x), self.coef))


VERIFY_HEADER = ["| layer | FLS variant | out err / tol | score err / tol | decision | speculation | mix err / tol | |",
                 "|---|---|---|---|---|---|---|---|"]


def verify_layer(L: Layer, tag: str) -> str:
    """The shared kernel checks at this layer's shape, for the fused and the split variant of the FLS
    op (the mix op on the first row); returns the table rows (failures recorded)."""
    checks, reference, ops = RUN.checks, RUN.reference, RUN.ops
    mix_inputs = checks.mix_inputs(L.inputs, L.coef)
    mix = checks.check_mix_linear(ops.mix_linear(**mix_inputs), mix_inputs, reference)
    rows, fused_choice = [], None
    for name, base in FLS_BASES.items():
        fls_linear = functools.partial(ops.fls_linear, base=base)
        result = fls_linear(**L.inputs, divergence="kl")
        fls = checks.check_fls_linear(result, L.inputs, "kl", reference)
        speculation = checks.check_speculation(fls_linear, L.inputs, "kl", [~result[3]])
        problems = fls.problems + speculation.problems + ([f"mix: {p}" for p in mix.problems] if not rows else [])
        if problems:
            RUN.failures.append(f"{tag} ({name})")
        fused_choice = result[3] if fused_choice is None else fused_choice
        same = "" if not rows else (", = fused" if torch.equal(result[3], fused_choice) else ", DIFFERS from fused")
        status = "ok" if not problems else "FAIL " + "; ".join(problems)
        mix_cell = f"{mix.out_error:.2e} / {mix.out_tol:.2e}" if not rows else ""
        rows.append(f"| {tag if not rows else ''} | {name} | {fls.out_error:.2e} / {fls.out_tol:.2e} "
                    f"| {fls.score_error:.2e} / {fls.score_tol:.2e} "
                    f"| {int(result[3].sum())}/{L.inputs['num_groups']} subject{same} "
                    f"| wrong guess {'bitwise' if speculation.ok else 'DIFFERS'} | {mix_cell} | {status} |")
    return "\n".join(rows)


def time_layer(L: Layer) -> dict:
    """{mode: {method: median ms or None}} for the eager call and (on a GPU) the CUDA-graph replay."""
    with torch.no_grad():
        choice = RUN.ops.fls_linear(**L.inputs, divergence="kl")[3]
        fns = {"merged": L.merged, "naive": L.naive, "klora": L.klora, "two_adapter": L.two_adapter, "mix": L.mix}
        for name, base in FLS_BASES.items():
            fns[name] = lambda base=base: L.fused(prev=choice, base=base)
            fns[f"{name}_flip"] = lambda base=base: L.fused(prev=~choice, base=base)
        times = {"eager call": {key: bench(fns[key]) for key, _ in LAYER_METHODS}}
        if not RUN.smoke:
            graph_times = {}
            for key, _ in LAYER_METHODS:
                if key == "naive":
                    graph_times[key] = None  # host sync inside: cannot be captured
                    continue
                g = capture(fns[key])
                graph_times[key] = bench(g.replay)
                del g
            times["CUDA-graph replay"] = graph_times
    return times


def ratio_row(tag: str, times: dict) -> str:
    floor = times["merged"]
    cells = [f"{floor * 1e3:.1f} us"] + [
        "n/a" if times[k] is None else f"{times[k] / floor:.2f}x" for k, _ in LAYER_METHODS[1:]]
    return f"| {tag} | " + " | ".join(cells) + " |"


def layer_section(title: str, layers) -> dict:
    """Verify then time each (tag, make_layer) one at a time (so large layers never coexist), then
    print the verification table and one ratio table per timing mode. Returns {tag: times}."""
    verify_rows, all_times = [], {}
    for tag, make_layer in layers:
        L = make_layer()
        verify_rows.append(verify_layer(L, tag))
        all_times[tag] = time_layer(L)
        del L
    emit(f"## {title}: verification against the float64 reference (kl)")
    emit()
    for line in VERIFY_HEADER + verify_rows:
        emit(line)
    emit()
    for mode in next(iter(all_times.values())):
        emit(f"## {title}: layer times ({mode}; median of do_bench, x = ratio to the merged-weight linear)")
        emit()
        emit("| layer | " + " | ".join(name for _, name in LAYER_METHODS) + " |")
        emit("|---|" + "---|" * len(LAYER_METHODS))
        for tag, times in all_times.items():
            emit(ratio_row(tag, times[mode]))
        emit()
    return all_times


def sdxl_tables():
    shapes, ranks = ([(64, 32, 64), (40, 48, 32)], [4, 8]) if RUN.smoke else (SDXL_SHAPES, SDXL_RANKS)
    dtypes = [torch.float32, torch.float16] if RUN.smoke else [torch.bfloat16, torch.float16]
    layers = [(f"M={M} K={K} N={N} r={r} {dtype_name(dt)}",
               lambda M=M, K=K, N=N, r=r, dt=dt: Layer(M, K, N, r, dt, seed=M + K + N + r))
              for dt in dtypes for (M, K, N) in shapes for r in ranks]
    layer_section("SDXL", layers)


def flux_tables():
    # smoke: the same structure at 1/96 of the width (the interpreter cannot run the real shapes)
    shapes = {name: ((48, K // 96, N // 96) if RUN.smoke else (M, K, N)) for name, (M, K, N) in FLUX_SHAPES.items()}
    ranks, dtype = ([4, 8] if RUN.smoke else FLUX_RANKS), (torch.float16 if RUN.smoke else torch.bfloat16)
    layers = [(f"{name} M={M} K={K} N={N} r={r} {dtype_name(dtype)}",
               lambda M=M, K=K, N=N, r=r: Layer(M, K, N, r, dtype, seed=M + K + N + r))
              for r in ranks for name, (M, K, N) in shapes.items()]
    all_times = layer_section("FLUX", layers)
    for mode in next(iter(all_times.values())):
        emit(f"## FLUX block sets ({mode}; each block's linears summed with their multiplicities, "
             "x = ratio to the merged-weight sum)")
        emit()
        emit("| block, rank | " + " | ".join(name for _, name in LAYER_METHODS) + " |")
        emit("|---|" + "---|" * len(LAYER_METHODS))
        for r in ranks:
            for block, counts in FLUX_BLOCKS.items():
                total = {}
                for key, _ in LAYER_METHODS:
                    parts = [(n, all_times[f"{name} M={shapes[name][0]} K={shapes[name][1]} N={shapes[name][2]} "
                                              f"r={r} {dtype_name(dtype)}"][mode][key]) for name, n in counts.items()]
                    total[key] = None if any(t is None for _, t in parts) else sum(n * t for n, t in parts)
                emit(ratio_row(f"{block} ({sum(counts.values())} linears) r={r}", total))
        emit()
    name = "attn q/k/v/out"
    M, K, N = shapes[name]
    for mode in next(iter(all_times.values())):
        for r in ranks:
            times = all_times[f"{name} M={M} K={K} N={N} r={r} {dtype_name(dtype)}"][mode]
            emit(f"issue 9 target (<= 1.3x merged at r=64): {name} r={r} ({mode}): fused FLS "
                 f"{times['fused'] / times['merged']:.2f}x, split FLS {times['split'] / times['merged']:.2f}x")
    emit()


# ----------------------------------------------------------------------------- step table

def time_step(name: str, fn, capturable: bool = True) -> tuple:
    """(eager ms, CUDA-graph replay ms or None) of one step function ``fn``; no graph in smoke mode. A failed
    capture is reported and recorded, and the run goes on (capture success is one of the targets)."""
    eager, graph = bench(fn), None
    if capturable and not RUN.smoke:
        try:
            g = capture(fn)
            graph = bench(g.replay)
            del g
        except Exception as exc:
            emit(f"capture of {name} FAILED: {exc!r}")
            RUN.failures.append(f"capture {name}")
    return eager, graph


def sdxl_blocks(smoke: bool):
    """(resolution key, channels) of the 70 SDXL transformer blocks in UNet order."""
    if smoke:
        return [("hi", 32)] * 2 + [("lo", 64)] * 3 + [("hi", 32)] * 1
    return [("hi", 640)] * 4 + [("lo", 1280)] * 20 + [("lo", 1280)] * 10 + [("lo", 1280)] * 30 + [("hi", 640)] * 6


class AttentionStack:
    """The attention linears of one SDXL UNet step (see the module docstring)."""

    def __init__(self, rank, dtype, smoke, blocks=slice(None)):
        """``blocks``: which of sdxl_blocks' blocks to build (a slice, for a shorter smoke run; default all)."""
        self.tokens = tokens = {"hi": 64, "lo": 16} if smoke else {"hi": 4096, "lo": 1024}
        self.ctx_dim, self.ctx_len, self.batch = (48, 7, 2) if smoke else (2048, 77, 2)
        self.head_dim = 16 if smoke else 64
        self.channels, self.dtype = {res: C for res, C in sdxl_blocks(smoke)}, dtype
        self.h, self.ctx = self.random_inputs(self.batch)
        self.blocks = []
        seed = 0
        for res, C in sdxl_blocks(smoke)[blocks]:
            T = self.batch * tokens[res]
            Tc = self.batch * self.ctx_len
            specs = [(T, C, C, False), (T, C, C, False), (T, C, C, False), (T, C, C, True),  # self q k v out
                     (T, C, C, False), (Tc, self.ctx_dim, C, False), (Tc, self.ctx_dim, C, False), (T, C, C, True)]
            layers = []
            for M, K, N, bias in specs:
                seed += 1
                layers.append(Layer(M, K, N, rank, dtype, bias=bias, seed=seed, with_x=False))
            self.blocks.append((res, C, layers))
        self.num_linears = sum(len(b[2]) for b in self.blocks)

    def random_inputs(self, batch: int, seed: int = 0):
        """({res: (batch, tokens, C)} activations, (batch, ctx_len, ctx_dim) text context), standard normal."""
        g = torch.Generator(device=RUN.device).manual_seed(seed)
        h = {res: torch.randn(batch, t, self.channels[res], generator=g, device=RUN.device).to(self.dtype)
             for res, t in self.tokens.items()}
        return h, torch.randn(batch, self.ctx_len, self.ctx_dim, generator=g, device=RUN.device).to(self.dtype)

    def _attn(self, q, k, v, C):
        B = q.shape[0]
        heads = C // self.head_dim
        q, k, v = (t.reshape(B, -1, heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)

    def step(self, mode: str, **options):
        """One step of this stack's Layers in ``mode`` (a Layer method) on the stack's batch-2 inputs."""
        return self.run(self.blocks, lambda L, x: getattr(L, mode)(x, **options), self.h, self.ctx)

    def run(self, blocks, linear, h: dict, ctx):
        """One step over ``blocks`` ((res, C, 8 layers) in UNet order) on activations ``h`` ({res: (B, T, C)}) and
        context ``ctx`` (B, Tc, D), any batch B; ``linear(layer, x)`` maps the (B * T, K) rows of one linear."""
        h = dict(h)
        B = ctx.shape[0]
        ctx2 = ctx.reshape(-1, self.ctx_dim)
        for res, C, (q, k, v, o, q2, k2, v2, o2) in blocks:
            x = h[res]
            x2 = x.reshape(-1, C)
            lin = lambda L, inp: linear(L, inp).unflatten(0, (B, -1))  # noqa: E731
            a = self._attn(lin(q, x2), lin(k, x2), lin(v, x2), C)
            x = x + lin(o, a.reshape(-1, C))
            x2 = x.reshape(-1, C)
            a = self._attn(lin(q2, x2), lin(k2, ctx2), lin(v2, ctx2), C)
            h[res] = x + lin(o2, a.reshape(-1, C))
        return h

    def decisions(self):
        return torch.cat([L.prev for _, _, layers in self.blocks for L in layers])


def step_table(rank: int, dtype):
    torch.manual_seed(0)
    S = AttentionStack(rank, dtype, RUN.smoke)
    emit(f"## Step: {S.num_linears} attention linears, SDXL shapes, rank {rank}, {dtype_name(dtype)} "
         "(attention-only approximation; see the script docstring)")
    emit()
    err = RUN.checks.max_error
    with torch.no_grad():
        # The check: every linear of the step, on the input the reference step gives it, passes the layer
        # tables' checks (float64 oracle; decisions exact outside near-ties). Comparing the two chains' ends
        # is no check: 560 argmax decisions in a row turn bf16 rounding into flipped near-ties, and a flip
        # moves everything after it by a whole LoRA delta (the H200 run of f6f6ac0 saw 0.96 that way).
        problems = []
        S.step("checked", problems=problems)
        ref = S.step("reference")
        fused = S.step("fused_step")  # also fills each layer's speculation state
        fused2 = S.step("fused_step")  # second step: guesses from the first
        rel = max(err(fused[k], ref[k]) / max(ref[k].abs().max().item(), 1e-6) for k in ref)
        same = all(torch.equal(fused[k], fused2[k]) for k in ref)
        emit(f"each linear vs float64 on the reference step's input: "
             f"{'ok' if not problems else 'FAIL: ' + '; '.join(problems[:3])}; "
             f"speculated second step {'bitwise equal' if same else 'differs (atomics order)'}; "
             f"{int(S.decisions().sum())}/{S.num_linears} layers chose the subject; whole-step relative "
             f"difference to the reference-op step {rel:.2e} (information: decisions compound)")
        if problems:
            RUN.failures.append(f"step r={rank} {dtype_name(dtype)}")
        emit()
        emit("| mode | eager (ms) | x merged | CUDA graph (ms) | x merged |")
        emit("|---|---|---|---|---|")
        rows = {}
        for mode, label in (("merged", "merged weights (floor)"), ("fused_step", "fused FLS"),
                            ("reference", "reference FLS (torch)"), ("naive", "naive eager FLS")):
            rows[mode] = (label, *time_step(mode, lambda mode=mode: S.step(mode), capturable=mode != "naive"))
        fe, fg = rows["merged"][1], rows["merged"][2]
        for label, eager, graph in rows.values():
            gcell = "n/a | -" if graph is None or fg is None else f"{graph:.2f} | {graph / fg:.2f}x"
            emit(f"| {label} | {eager:.2f} | {eager / fe:.2f}x | {gcell} |")
        emit()


# ----------------------------------------------------------------------------- pool table

POOL_SHAPES = [(8, 4096, 640, 640), (8, 4096, 1280, 1280)]  # (images, tokens, K, N): SDXL self-attention at 64x64
POOL_RANK = 64


def pool_row(images: int, tokens: int, K: int, N: int, rank: int, dtype) -> str:
    """One row of the pool table: verify every pooled variant against float64, then time them side by side with the
    pair kernel and the merged-weight linear."""
    from fusion_engine.ops import pooled

    g = torch.Generator(device=RUN.device).manual_seed(images + tokens + K)

    def rnd(*size, std=1.0):
        return (torch.randn(*size, generator=g, device=RUN.device) * std).to(dtype)

    slots = 2 * images  # image i fuses slots 2i (subject) and 2i + 1 (style)
    x, weight = rnd(images * tokens, K), rnd(N, K, std=K ** -0.5)
    a_stack, b_stack = rnd(slots, rank, K, std=K ** -0.5), rnd(slots, N, rank, std=0.5)
    # mixed ranks: every other slot a quarter of the stacks' rank (zero rows past it, as a pool pads them)
    mixed_a, mixed_b = a_stack.clone(), b_stack.clone()
    mixed_a[1::2, max(rank // 4, 1):] = 0
    mixed_b[1::2, :, max(rank // 4, 1):] = 0
    scales = torch.full((slots,), 0.8, device=RUN.device)
    present = torch.ones(slots, dtype=torch.bool, device=RUN.device)
    sample_slots = torch.arange(slots, device=RUN.device).reshape(images, 2)
    uniform_slots = torch.zeros_like(sample_slots) + torch.arange(2, device=RUN.device)  # every image on pair 0
    row_group = torch.arange(images, device=RUN.device).repeat_interleave(tokens)
    weights = torch.ones(images, 2, device=RUN.device)
    args = (x, weight, None, a_stack, b_stack, scales, present, sample_slots, row_group, images)
    mixed = (x, weight, None, mixed_a, mixed_b, scales, present, sample_slots, row_group, images)
    uniform = (x, weight, None, a_stack, b_stack, scales, present, uniform_slots, row_group, images)
    rows = [slice(i * tokens, (i + 1) * tokens) for i in range(images)]
    one_group = torch.zeros(tokens, dtype=torch.int32, device=RUN.device)
    pair_a = (a_stack[0], b_stack[0], 0.8, a_stack[1], b_stack[1], 0.8)

    def pair_call(i, guess=None):
        return RUN.ops.fls_linear(x[rows[i]], weight, None, a_stack[2 * i], b_stack[2 * i], 0.8, a_stack[2 * i + 1],
                                  b_stack[2 * i + 1], 0.8, one_group, 1, "kl", prev_choice=guess)

    def pooled_call(call_args, guess, base):
        return RUN.ops.pooled_fls_linear(*call_args, "kl", prev_choice=guess, base=base)

    problems = []
    with torch.no_grad():
        errors, choices = [], {}
        for name, call_args in (("pool", args), ("mixed", mixed), ("uniform", uniform)):
            ref_out, _, ref_choice = pooled.pooled_fls_linear(
                *(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in call_args), "kl")
            for base in ("fused", "cublas"):
                out, _, choice = pooled_call(call_args, None, base)
                choices[name, base] = choice
                if not torch.equal(choice, ref_choice):
                    problems.append(f"{name} {base}: choices differ from float64")
                errors.append((out.double() - ref_out).abs().max().item())
            mix_ref = pooled.pooled_mix_linear(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                                 for t in (x, weight, None, call_args[3], call_args[4], scales,
                                                           call_args[7], weights)))
            for base in ("fused", "cublas"):
                mix_out = RUN.ops.pooled_mix_linear(x, weight, None, call_args[3], call_args[4], scales, call_args[7],
                                                    weights, base=base)
                errors.append((mix_out.double() - mix_ref).abs().max().item())
        RUN.failures.extend(f"pool {images}x{tokens} K={K}: {p}" for p in problems)
        guesses = [pair_call(i)[3] for i in range(images)]
        uniform_guess = RUN.ops.fls_linear(x, weight, None, *pair_a, row_group, images, "kl")[3]
        floor = bench(lambda: F.linear(x, weight))
        times = {
            "pair x N": bench(lambda: [pair_call(i, guesses[i]) for i in range(images)]),
            "pooled fused": bench(lambda: pooled_call(args, choices["pool", "fused"], "fused")),
            "pooled cublas": bench(lambda: pooled_call(args, choices["pool", "cublas"], "cublas")),
            "pooled mixed ranks": bench(lambda: pooled_call(mixed, choices["mixed", "fused"], "fused")),
            "pooled mix fused": bench(lambda: RUN.ops.pooled_mix_linear(x, weight, None, a_stack, b_stack, scales,
                                                                        sample_slots, weights, base="fused")),
            "pooled mix cublas": bench(lambda: RUN.ops.pooled_mix_linear(x, weight, None, a_stack, b_stack, scales,
                                                                         sample_slots, weights, base="cublas")),
            "uniform: pair": bench(lambda: RUN.ops.fls_linear(x, weight, None, *pair_a, row_group, images, "kl",
                                                              prev_choice=uniform_guess)),
            "uniform: pooled": bench(lambda: pooled_call(uniform, choices["uniform", "fused"], None)),
        }
    cells = " | ".join(f"{t / floor:.2f}x" for t in times.values())
    return (f"| {images} x {tokens}, {K} | {'yes' if not problems else 'NO'} | {max(errors):.2e} | "
            f"{floor * 1e3:.1f} us | {cells} |")


POOL_COLUMNS = ("pair fls_linear x N images", "pooled FLS fused", "pooled FLS cuBLAS base",
                "pooled FLS, half the slots at rank/4", "pooled mix fused", "pooled mix cuBLAS base",
                "uniform pair: fls_linear (batch)", "uniform pair: pooled FLS (default base)")


def pool_table():
    """The LoRA pool: ``images`` images, each with its own pair (2 * images pool slots), in one pooled call per
    variant (hoisted shrink; fused or cuBLAS base; half the slots at a quarter of the rank, which the kernels pad per
    slot; the mix kernel) against one single-pair fls_linear call per image and the merged-weight linear of the whole
    batch (the floor); and a uniform assignment (every image on one pair), the pair kernel's batch call against the
    pooled one (the pair kernel stays the default for uniform assignments until this column says otherwise).
    Correct guesses. Verified first: every variant's choices equal to a float64 run of the pooled reference, the
    largest output error over all variants reported."""
    shapes, rank = ([(4, 16, 32, 32)], 8) if RUN.smoke else (POOL_SHAPES, POOL_RANK)
    dtype = torch.float32 if RUN.smoke else torch.bfloat16
    emit(f"## LoRA pool: one pooled call (kl) for N images with N distinct pairs, rank {rank}, "
         f"{dtype_name(dtype)}; eager calls (x = ratio to the merged-weight linear of the batch)")
    emit()
    emit("| images x tokens, K=N | choices = float64 | out max error | merged (floor) | "
         + " | ".join(POOL_COLUMNS) + " |")
    emit("|---|---|---|---|" + "---|" * len(POOL_COLUMNS))
    for images, tokens, K, N in shapes:
        emit(pool_row(images, tokens, K, N, rank, dtype))
    emit()


# ----------------------------------------------------------------------------- pool step table

POOL_STEP_IMAGES = 8  # issue 13: 8 distinct pairs at SDXL 1024px


class PoolLayout:
    """The batch of P images with CFG, copy-major as diffusers batches it: rows 0..P-1 are the images' uncond
    copies, P..2P-1 their cond copies, so batch row b is image b % P. Image i fuses pool slots 2i (subject) and
    2i + 1 (style) and is one decision group, both its CFG copies (runtime/pool_context.py's row groups)."""

    def __init__(self, images: int):
        self.images = images
        image = torch.arange(2 * images, device=RUN.device) % images
        self.sample_slots = torch.stack([2 * image, 2 * image + 1], -1)  # (2P, 2) int64
        self._row_groups = {}

    def row_group(self, rows_per_sample: int) -> torch.Tensor:
        """(2P * rows_per_sample,) int32 decision group of each row (built once per shape)."""
        if rows_per_sample not in self._row_groups:
            image = torch.arange(2 * self.images, device=RUN.device, dtype=torch.int32) % self.images
            self._row_groups[rows_per_sample] = image.repeat_interleave(rows_per_sample)
        return self._row_groups[rows_per_sample]

    def image_samples(self, t: torch.Tensor, image: int) -> torch.Tensor:
        """One image's (uncond, cond) samples (2, ...) of a batch-2P tensor (2P, ...)."""
        return t[[image, self.images + image]]

    def image_rows(self, rows: torch.Tensor, image: int) -> torch.Tensor:
        """One image's (2 * T, F) rows of the batch-2P rows (2P * T, F), sample-major."""
        samples = rows.reshape(2 * self.images, -1, rows.shape[-1])
        return self.image_samples(samples, image).reshape(-1, rows.shape[-1])


class PoolLayer:
    """One linear of the pool step: a step Layer's base weight and bias, and each image's own (subject, style) pair
    of the Layer's rank, stacked as the pool's slots (a_stack (2P, r, K), b_stack (2P, N, r); see
    fusion_engine/ops/pooled.py), drawn like the Layer's own pair. Keeps each mode's speculation state on the
    device: (P,) int64 choices for the pooled op, one (1,) bool per image for the single-pair op."""

    def __init__(self, layer: Layer, layout: PoolLayout, index: int):
        self.layer, self.layout, self.index = layer, layout, index
        (N, K), r, P, dev = layer.inputs["weight"].shape, layer.r, layout.images, RUN.device
        g = torch.Generator(device=dev).manual_seed(10_000 + index)
        b_std = torch.tensor(LORA_B_STD, device=dev).repeat(P).reshape(-1, 1, 1) * r ** -0.5
        self.a_stack = (torch.randn(2 * P, r, K, generator=g, device=dev) * K ** -0.5).to(layer.dtype)
        self.b_stack = (torch.randn(2 * P, N, r, generator=g, device=dev) * b_std).to(layer.dtype)
        self.scales = layer.coef.repeat(P)  # the Layer's (subject, style) scales for every image
        self.present = torch.ones(2 * P, dtype=torch.bool, device=dev)
        self.pairs = [{"subject_a": self.a_stack[2 * i], "subject_b": self.b_stack[2 * i],
                       "style_a": self.a_stack[2 * i + 1], "style_b": self.b_stack[2 * i + 1]} for i in range(P)]
        self.prev_choice = torch.zeros(P, dtype=torch.int64, device=dev)
        self.prev_pair = [torch.ones(1, dtype=torch.bool, device=dev) for _ in range(P)]

    def pool_args(self, x) -> tuple:
        """Positional arguments of pooled_fls_linear (up to num_groups) for the batch-2P rows x."""
        a, layout = self.layer.inputs, self.layout
        return (x, a["weight"], a["bias"], self.a_stack, self.b_stack, self.scales, self.present, layout.sample_slots,
                layout.row_group(x.shape[0] // (2 * layout.images)), layout.images)

    def pair_inputs(self, x, image: int) -> dict:
        """fls_linear's keyword arguments for one image's pair on its batch-2 rows x (one decision group)."""
        return {**self.layer.inputs_for(x), **self.pairs[image]}

    def pooled(self, x):  # (a): every image's pair in one call, speculation state updated on the device
        out, _, choice = RUN.ops.pooled_fls_linear(*self.pool_args(x), "kl", prev_choice=self.prev_choice)
        self.prev_choice.copy_(choice)
        return out

    def pair(self, x, image: int):  # (b): one image's pair, the single-pair fused op
        out, _, _, choice = RUN.ops.fls_linear(**self.pair_inputs(x, image), divergence="kl",
                                               prev_choice=self.prev_pair[image])
        self.prev_pair[image].copy_(choice)
        return out

    def checked(self, x, checks: list):
        """The pooled op on x, each image's rows checked against float64 by the layer tables' single-pair check
        (with two positions the pool's N-way rule is the pair's); appends (index, image, KernelCheck) to checks and
        passes on the pooled reference op's output, as Layer.checked does."""
        from fusion_engine.ops import pooled

        args = self.pool_args(x)
        out, scores, choice = RUN.ops.pooled_fls_linear(*args, "kl")
        for image in range(self.layout.images):
            result = (self.layout.image_rows(out, image), scores[image:image + 1, 0], scores[image:image + 1, 1],
                      choice[image:image + 1] == 0)
            inputs = self.pair_inputs(self.layout.image_rows(x, image), image)
            checks.append((self.index, image, RUN.checks.check_fls_linear(result, inputs, "kl", RUN.reference)))
        return pooled.pooled_fls_linear(*args, "kl")[0]


class PoolStack:
    """AttentionStack's step for P images with CFG (batch 2P), each image with its own pair at every linear; the
    three modes of the pool step table (module docstring, 6)."""

    def __init__(self, stack: AttentionStack, images: int):
        self.stack, self.layout = stack, PoolLayout(images)
        self.h, self.ctx = stack.random_inputs(2 * images, seed=1)
        self.blocks, index = [], 0
        for res, C, layers in stack.blocks:
            self.blocks.append((res, C, [PoolLayer(L, self.layout, index + i) for i, L in enumerate(layers)]))
            index += len(layers)
        self.requests = [({res: self.layout.image_samples(h, i) for res, h in self.h.items()},
                          self.layout.image_samples(self.ctx, i)) for i in range(images)]

    def pooled(self):
        return self.stack.run(self.blocks, PoolLayer.pooled, self.h, self.ctx)

    def per_request(self):
        return [self.stack.run(self.blocks, lambda L, x, i=i: L.pair(x, i), h, ctx)
                for i, (h, ctx) in enumerate(self.requests)]

    def merged(self):  # one pair merged for the whole batch: the cost floor
        return self.stack.run(self.stack.blocks, Layer.merged, self.h, self.ctx)

    def checked(self) -> list:
        checks = []
        self.stack.run(self.blocks, lambda L, x: L.checked(x, checks), self.h, self.ctx)
        return checks

    def layers(self):
        return [L for _, _, layers in self.blocks for L in layers]

    def decisions_agree(self) -> int:
        """Decisions (layer x image) where the pooled mode's last step chose as the image's own last step did."""
        return sum(int(((L.prev_choice == 0) == torch.cat(L.prev_pair)).sum()) for L in self.layers())


POOL_STEP_MODES = (("pooled", "(a) pooled FLS: one batch-2P step", 1),  # (method, label, steps per P images)
                   ("per_request", "(b) per request: P single-pair fused steps of batch 2", None),
                   ("merged", "(c) merged weights: one batch-2P step (floor)", 1))


def verify_pool_step(S: PoolStack) -> None:
    """Every pooled linear on the input the reference pool step gives it, each image against float64; reported."""
    checks = S.checked()
    problems = [f"linear {i} image {image}: {p}" for i, image, c in checks for p in c.problems]
    flips = sum(c.near_tie_flips for _, _, c in checks)
    emit(f"each pooled linear, each image vs float64 on the reference pool step's input ({len(checks)} checks): "
         f"{'ok' if not problems else 'FAIL: ' + '; '.join(problems[:3])}; {flips} near-tie decision(s) unlike "
         "float64's (allowed: the float64 scores are within the tolerance)")
    if problems:
        RUN.failures.append(f"pool step P={S.layout.images}")


def pool_step_table(images: int, rank: int, dtype):
    """Issue 13's GPU target (module docstring, 6): the pool step against per-request steps and the merged floor."""
    torch.manual_seed(0)
    # smoke: one block per resolution (the pooled kernel is slow under the interpreter)
    S = PoolStack(AttentionStack(rank, dtype, RUN.smoke, blocks=slice(1, 3) if RUN.smoke else slice(None)), images)
    emit(f"## Pool step: {S.stack.num_linears} attention linears, SDXL shapes, {images} images with CFG (batch "
         f"{2 * images}), each with its own pair, rank {rank}, {dtype_name(dtype)} (attention-only approximation; "
         "per request = sampling only, the service's attach/detach per request not modelled)")
    emit()
    with torch.no_grad():
        verify_pool_step(S)
        times = {method: time_step(method, getattr(S, method)) for method, _, _ in POOL_STEP_MODES}
        agree = S.decisions_agree()  # the speculation states hold the last timed step's choices
    emit(f"pooled vs per-request decisions on their last steps: {agree}/{len(S.layers()) * images} equal "
         "(information: the two chains differ by rounding, and a near-tie flip moves everything after it)")
    emit()
    emit_pool_step_times(times, images)
    del S
    if not RUN.smoke:
        torch.cuda.empty_cache()


def emit_pool_step_times(times: dict, images: int) -> None:
    """The pool step table (ms per step, images/s per denoising step) and issue 13's two target ratios."""
    emit("| mode | eager ms / step | eager images/s | CUDA graph ms / step | CUDA graph images/s |")
    emit("|---|---|---|---|---|")
    for method, label, steps in POOL_STEP_MODES:
        cells = []
        for ms in times[method]:
            per_step = None if ms is None else ms / (steps or images)
            cells += ["n/a", "n/a"] if ms is None else [f"{per_step:.2f}", f"{images * 1e3 / ms:.1f}"]
        emit(f"| {label} | " + " | ".join(cells) + " |")
    emit()
    for column, mode in enumerate(("eager", "CUDA graph")):
        pooled, request, merged = (times[method][column] for method, _, _ in POOL_STEP_MODES)
        if None in (pooled, request, merged):
            emit(f"issue 13 targets ({mode}): n/a")
            continue
        emit(f"issue 13 targets, P={images} ({mode}): pooled / per-request images/s {request / pooled:.2f}x "
             f"(target >= 4x); pooled / merged cost per image {pooled / merged:.2f}x (target <= 1.3x)")
    emit()


# ----------------------------------------------------------------------------- Inductor table

INDUCTOR_SHAPES = [("SDXL", 8192, 640, 640), ("SDXL", 2048, 1280, 1280), ("FLUX attn", FLUX_TOKENS, 3072, 3072),
                   ("FLUX ff up", FLUX_TOKENS, 3072, 12288)]  # in order of value: rows stop at the budget
INDUCTOR_RANK = 64
INDUCTOR_METHODS = [("merged", "merged (floor)"), ("reference", "reference eager"),
                    ("compiled", "reference, Inductor"), ("fused", "fused FLS"), ("split", "split FLS")]


def inductor_times(fns: dict, mode: str, tag: str) -> dict:
    """{method: median ms or None}: eager calls, or CUDA-graph replays (None where a method cannot be captured)."""
    times = {}
    for key, _ in INDUCTOR_METHODS:
        if mode == "eager":
            times[key] = bench(fns[key])
            continue
        try:
            graph = capture(fns[key])
        except Exception as error:  # a graph break or a host sync in the compiled function
            print(f"{tag} {key}: no CUDA graph ({type(error).__name__}: {error})", file=sys.stderr)
            times[key] = None
            continue
        times[key] = bench(graph.replay)
        del graph
    return times


def inductor_row(tag: str, L: Layer, modes) -> str:
    """One shape: the compiled reference compared with the eager one, then each method's times per mode."""
    compiled = torch.compile(L.reference, backend="aot_eager" if RUN.smoke else "inductor", dynamic=False)
    fns = {"merged": L.merged, "reference": L.reference, "compiled": compiled,
           "fused": lambda: L.fused(base="fused"), "split": lambda: L.fused(base="cublas")}
    with torch.no_grad():
        error = (compiled().float() - L.reference().float()).abs().max().item()
        cells = []
        for mode in modes:
            times = inductor_times(fns, mode, tag)
            floor = times["merged"]
            cells += [f"{floor * 1e3:.1f} us"] + ["n/a" if times[k] is None else f"{times[k] / floor:.2f}x"
                                                  for k, _ in INDUCTOR_METHODS[1:]]
    return f"| {tag} | {error:.1e} | " + " | ".join(cells) + " |"


def inductor_table(budget_s: float) -> None:
    shapes = [("tiny", 48, 32, 64)] if RUN.smoke else INDUCTOR_SHAPES
    rank, dtype = (4, torch.float32) if RUN.smoke else (INDUCTOR_RANK, torch.bfloat16)
    modes = ["eager"] if RUN.smoke else ["eager", "graph"]
    emit(f"## The reference FLS op under torch.compile (Inductor) beside the fused kernels: rank {rank}, "
         f"{dtype_name(dtype)}, kl; x = ratio to the merged-weight linear, eager calls"
         + ("" if RUN.smoke else ", then CUDA-graph replays"))
    emit()
    emit("| shape | compiled - eager reference (max abs) | "
         + " | ".join(f"{name}, {mode}" for mode in modes for _, name in INDUCTOR_METHODS) + " |")
    emit("|---|---|" + "---|" * (len(INDUCTOR_METHODS) * len(modes)))
    start = time.time()
    for name, M, K, N in shapes:
        tag = f"{name} M={M} K={K} N={N} r={rank}"
        if time.time() - start > budget_s:
            emit(f"| {tag} | not started: the table's budget of {budget_s:.0f} s is spent |")
            continue
        L = Layer(M, K, N, rank, dtype, seed=M + K + N)
        emit(inductor_row(tag, L, modes))
        del L
        torch._dynamo.reset()  # this shape's compiled graphs go with it
    emit()


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (logic check only)")
    p.add_argument("--out", type=Path, help="append the markdown tables to this file")
    p.add_argument("--tables", nargs="+", choices=["sdxl", "flux", "step", "pool", "pool_step", "inductor"],
                   default=["sdxl", "flux", "step", "pool", "pool_step", "inductor"],
                   help="which tables to run (default: all)")
    p.add_argument("--inductor-budget-s", type=float, default=40.0,
                   help="the Inductor table starts no shape past this many seconds (each shape compiles anew)")
    p.add_argument("--step-ranks", type=int, nargs="+", default=[64], help="LoRA ranks of the step table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --smoke for a CPU logic check")
    setup(args.smoke)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    gpu = "CPU (smoke, Triton interpreter)" if args.smoke else torch.cuda.get_device_name()
    emit(f"# FLS kernel benchmark: {gpu}")
    emit()
    emit(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
         f"torch {torch.__version__}, triton {RUN.triton.__version__}")
    emit()
    t0 = time.time()
    if "sdxl" in args.tables:
        sdxl_tables()
    if "flux" in args.tables:
        flux_tables()
    if "step" in args.tables:
        for rank in args.step_ranks:
            step_table(rank if not args.smoke else min(rank, 8), torch.float32 if args.smoke else torch.bfloat16)
    if "pool" in args.tables:
        pool_table()
    if "pool_step" in args.tables:
        pool_step_table(2 if args.smoke else POOL_STEP_IMAGES, 8 if args.smoke else POOL_RANK,
                        torch.float32 if args.smoke else torch.bfloat16)
    if "inductor" in args.tables:
        inductor_table(args.inductor_budget_s)
    emit(f"total {time.time() - t0:.0f} s; verification failures: {RUN.failures or 'none'}")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(RUN.lines) + "\n")
    return 1 if RUN.failures else 0


if __name__ == "__main__":
    sys.exit(main())
