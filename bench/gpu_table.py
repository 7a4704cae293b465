"""GPU benchmark table of the fused FLS linear: one command, torch + triton only, < 5 min on an H100.

    python bench/gpu_table.py                 # full run on the visible GPU; prints markdown
    python bench/gpu_table.py --out bench/RESULTS.md   # ... and appends the tables there
    python bench/gpu_table.py --smoke         # CPU, Triton interpreter, tiny shapes: checks the
                                              # script's logic only, its timings mean nothing

1. Verification, before any timing: at every benchmarked shape, rank and dtype (bf16 and fp16),
   the Triton op is compared with a float64 run of the reference (fusion_engine.ops.reference):
   output and per-group scores within 2x the error of the same computation done eagerly in the
   input dtype (FlashAttention's rule) + a small atol; decisions equal except where the two
   float64 scores are closer than that tolerance; a wrong speculation guess gives the same output.
2. Layer table, SDXL shapes (M=8192,K=N=640; M=2048,K=N=1280; M=154,K=2048,N=1280), ranks 16
   and 64, bf16 and fp16, `triton.testing.do_bench(..., quantiles=[0.5, 0.2, 0.8])` medians of:
   merged-weight linear (the floor), naive eager FLS (three branch outputs, F.kl_div, `.item()`),
   K-LoRA with its scores cached at attach (one chosen delta, unmerged), a diffusers/peft-style
   two-adapter unmerged forward, the fused FLS op with a correct guess (decisions stable from the
   last step) and with a wrong guess (every tile fixed up: the worst case), and the mix op
   (direct merge). Each as a ratio to the floor. Two timings per method: the eager call (Python
   launch overhead included) and the same call replayed from a CUDA graph (the kernels alone).
3. Step table: NOT the diffusers UNet (no diffusers here). A self-contained approximation of the
   attention part of one SDXL UNet step at 1024x1024 with CFG (batch 2, one image, so one
   decision group): the 70 SDXL transformer blocks (down 2x2 @64x64/640ch, down 2x10 @32x32/1280,
   mid 10, up 3x10 @32x32, up 3x2 @64x64), each with self-attention (q, k, v, out) and
   cross-attention (q; k, v from a (2, 77, 2048) context; out) = 560 LoRA linears at the real
   shapes, with scaled_dot_product_attention between them and residual adds; random weights. The
   convs, feed-forwards and norms of the real UNet are left out, so the ratios here OVERSTATE the
   overhead of a full UNet step. Modes: merged weights, fused FLS (speculation state kept per
   layer on the device), the reference FLS path (pure torch, capturable), naive eager FLS (host
   syncs: not capturable); eager and CUDA-graph-captured (torch.cuda.CUDAGraph).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (logic check only)")
    p.add_argument("--out", type=Path, help="append the markdown tables to this file")
    p.add_argument("--skip-step", action="store_true", help="layer table only")
    p.add_argument("--step-ranks", type=int, nargs="+", default=[64], help="LoRA ranks of the step table")
    return p.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

# import the ops subpackage only: the package __init__ pulls in diffusers, which this script avoids
sys.path.insert(0, str(REPO))
_pkg = types.ModuleType("fusion_engine")
_pkg.__path__ = [str(REPO / "fusion_engine")]
sys.modules.setdefault("fusion_engine", _pkg)
from fusion_engine.ops import reference as R  # noqa: E402
from fusion_engine.ops import triton_ops  # noqa: E402

DEVICE = "cpu" if ARGS.smoke else "cuda"
if ARGS.smoke:
    SHAPES = [(64, 32, 64), (40, 48, 32)]
    RANKS = [4, 8]
    DTYPES = [torch.float32, torch.float16]
else:
    SHAPES = [(8192, 640, 640), (2048, 1280, 1280), (154, 2048, 1280)]
    RANKS = [16, 64]
    DTYPES = [torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # relative to the output scale
LINES: list[str] = []
FAILURES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- timing

def bench(fn) -> float:
    """Median milliseconds (do_bench on GPU; a plain timer in smoke mode)."""
    if ARGS.smoke:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def capture(fn):
    """CUDA graph of fn (warmed up on a side stream first, as torch.cuda.graph's docs ask)."""
    if ARGS.smoke:
        return None
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

class Layer:
    """One LoRA-targeted linear: base W (N, K), optional bias, two LoRAs, its merged weight."""

    def __init__(self, M, K, N, r, dtype, bias=True, seed=0, groups=1, make_x=True):
        g = torch.Generator(device=DEVICE).manual_seed(seed)  # on the device: the step has ~1e9 weights

        def rnd(*s, std=1.0):
            return (torch.randn(*s, generator=g, device=DEVICE) * std).to(dtype)

        self.M, self.K, self.N, self.r, self.dtype = M, K, N, r, dtype
        self.x = rnd(M, K) if make_x else None
        self.w = rnd(N, K, std=K ** -0.5)
        self.b = rnd(N, std=0.5) if bias else None
        # deltas about 20% of y0, the style one a little larger (so decisions are not all equal)
        self.subject_a, self.subject_b = rnd(r, K, std=K ** -0.5), rnd(N, r, std=0.2 * r ** -0.5)
        self.style_a, self.style_b = rnd(r, K, std=K ** -0.5), rnd(N, r, std=0.25 * r ** -0.5)
        self.s_c = self.s_s = 1.0  # alpha = rank
        self.groups = groups
        self.row_group = (torch.arange(M, device=DEVICE) * groups // M).to(torch.int64)
        self.w_merged = (self.w.float() + self.s_c * self.subject_b.float() @ self.subject_a.float()).to(dtype)
        self.coef = torch.tensor([self.s_c, self.s_s], device=DEVICE)
        self.prev = torch.ones(groups, dtype=torch.bool, device=DEVICE)  # speculation state

    def args(self, x=None):
        return (self.x if x is None else x, self.w, self.b, self.subject_a, self.subject_b, self.s_c, self.style_a, self.style_b,
                self.s_s, self.row_group, self.groups)

    # --- the methods of the table
    def merged(self, x=None):
        return F.linear(self.x if x is None else x, self.w_merged, self.b)

    def klora(self, x=None):  # K-LoRA with its choice cached at attach: one unmerged delta
        x = self.x if x is None else x
        return F.linear(x, self.w, self.b) + F.linear(F.linear(x, self.subject_a), self.subject_b) * self.s_c

    def two_adapter(self, x=None):  # peft's Linear.forward with two active adapters
        x = self.x if x is None else x
        out = F.linear(x, self.w, self.b)
        out = out + F.linear(F.linear(x, self.subject_a), self.subject_b) * self.s_c
        return out + F.linear(F.linear(x, self.style_a), self.style_b) * self.s_s

    def naive(self, x=None):
        x = self.x if x is None else x
        y0 = F.linear(x, self.w, self.b)
        y_subject = y0 + F.linear(F.linear(x, self.subject_a), self.subject_b) * self.s_c
        y_style = y0 + F.linear(F.linear(x, self.style_a), self.style_b) * self.s_s
        log_p0 = F.log_softmax(y0.float(), -1)
        subject_delta = F.kl_div(log_p0, F.log_softmax(y_subject.float(), -1), log_target=True, reduction="batchmean")
        style_delta = F.kl_div(log_p0, F.log_softmax(y_style.float(), -1), log_target=True, reduction="batchmean")
        return y_subject if subject_delta.item() >= style_delta.item() else y_style  # host sync: not capturable

    def fused(self, x=None, prev=None):
        out, sc, ss, ch = triton_ops.fls_linear(*self.args(x), "kl", prev_choose=self.prev if prev is None else prev)
        return out

    def fused_step(self, x):  # with the per-layer speculation state updated on the device
        out, sc, ss, ch = triton_ops.fls_linear(*self.args(x), "kl", prev_choose=self.prev)
        self.prev.copy_(ch)
        return out

    def reference(self, x=None):
        return R.fls_linear(*self.args(x), "kl")[0]

    def mix(self, x=None):
        x = self.x if x is None else x
        return triton_ops.mix_linear(x, self.w, self.b, self.subject_a, self.subject_b, self.style_a, self.style_b, self.coef)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def verify_layer(L: Layer, tag: str) -> None:
    """Kernel vs float64 reference, FlashAttention rule; decisions; exact speculation; mix op."""
    out, sc, ss, ch = triton_ops.fls_linear(*L.args(), "kl")
    d = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    a64 = [d(t) for t in L.args()]
    _, rsc, rss, rch = R.fls_linear(*a64, "kl")
    # the same computation eagerly in the input dtype
    y0e = F.linear(L.x, L.w, L.b)
    yce = y0e + F.linear(F.linear(L.x, L.subject_a), L.subject_b) * L.s_c
    yse = y0e + F.linear(F.linear(L.x, L.style_a), L.style_b) * L.s_s
    esc = R.group_mean(R.row_divergence(yce.float(), y0e.float(), "kl"), L.row_group, L.groups)
    ess = R.group_mean(R.row_divergence(yse.float(), y0e.float(), "kl"), L.row_group, L.groups)
    s_tol = 2 * max(_err(esc, rsc), _err(ess, rss)) + ATOL[L.dtype] * max(1.0, rsc.abs().max().item())
    close = (rsc - rss).abs() <= 2 * s_tol
    y0 = R.base_linear(a64[0], a64[1], a64[2])
    ref_out = R.select_rows(y0, L.s_c * R.lora_delta(a64[0], a64[3], a64[4]),
                            L.s_s * R.lora_delta(a64[0], a64[6], a64[7]), ch, L.row_group)
    eager_out = torch.where(ch[L.row_group].unsqueeze(-1), yce, yse)
    o_tol = 2 * _err(eager_out, ref_out) + ATOL[L.dtype] * max(1.0, ref_out.abs().max().item())
    wrong_guess = L.fused(prev=~ch)
    mix = L.mix()
    mix_ref = R.mix_linear(*[d(t) for t in (L.x, L.w, L.b, L.subject_a, L.subject_b, L.style_a, L.style_b)], L.coef)
    mix_eager = L.two_adapter()
    m_tol = 2 * _err(mix_eager, mix_ref) + ATOL[L.dtype] * max(1.0, mix_ref.abs().max().item())
    checks = {
        "out": _err(out, ref_out) <= o_tol,
        "scores": _err(sc, rsc) <= s_tol and _err(ss, rss) <= s_tol,
        "decisions": bool(torch.equal(ch[~close], rch[~close])),
        "wrong guess": _err(wrong_guess, out) <= o_tol,
        "mix": _err(mix, mix_ref) <= m_tol,
    }
    bitwise = "bitwise" if torch.equal(wrong_guess, out) else "not bitwise"
    status = "ok" if all(checks.values()) else "FAIL " + ",".join(k for k, v in checks.items() if not v)
    if not all(checks.values()):
        FAILURES.append(tag)
    emit(f"| {tag} | {_err(out, ref_out):.2e} / {o_tol:.2e} | {max(_err(sc, rsc), _err(ss, rss)):.2e} / {s_tol:.2e} "
         f"| {int(ch.sum())}/{L.groups} subject | wrong guess {bitwise} | {_err(mix, mix_ref):.2e} / {m_tol:.2e} "
         f"| {status} |")


# ----------------------------------------------------------------------------- layer table

LAYER_METHODS = [("merged", "merged (floor)"), ("naive", "naive eager FLS"), ("klora", "K-LoRA cached"),
                 ("two_adapter", "2-adapter unmerged"), ("fused", "fused FLS, stable"),
                 ("fused_flip", "fused FLS, guess wrong"), ("mix", "mix (direct)")]


def layer_tables():
    layers = {}
    emit("## Verification against the float64 reference (kl)")
    emit()
    emit("| layer | out err / tol | score err / tol | decision | speculation | mix err / tol | |")
    emit("|---|---|---|---|---|---|---|")
    for dt in DTYPES:
        for (M, K, N) in SHAPES:
            for r in RANKS:
                tag = f"M={M} K={K} N={N} r={r} {dtype_name(dt)}"
                L = Layer(M, K, N, r, dt, bias=True, seed=M + K + N + r, groups=1)
                verify_layer(L, tag)
                layers[tag] = L
    emit()
    for mode in ("eager call", "CUDA-graph replay"):
        if mode != "eager call" and ARGS.smoke:
            continue
        emit(f"## Layer times ({mode}; median of do_bench, x = ratio to the merged-weight linear)")
        emit()
        emit("| layer | " + " | ".join(name for _, name in LAYER_METHODS) + " |")
        emit("|---|" + "---|" * len(LAYER_METHODS))
        for tag, L in layers.items():
            with torch.no_grad():
                ch = triton_ops.fls_linear(*L.args(), "kl")[3]
                fns = {"merged": L.merged, "naive": L.naive, "klora": L.klora, "two_adapter": L.two_adapter,
                       "fused": lambda L=L, ch=ch: L.fused(prev=ch), "fused_flip": lambda L=L, ch=~ch: L.fused(prev=ch),
                       "mix": L.mix}
                times = {}
                for key, _ in LAYER_METHODS:
                    if mode == "eager call":
                        times[key] = bench(fns[key])
                    elif key == "naive":
                        times[key] = None  # host sync inside: cannot be captured
                    else:
                        g = capture(fns[key])
                        times[key] = bench(g.replay)
                        del g
            floor = times["merged"]
            cells = [f"{floor * 1e3:.1f} us"] + [
                "n/a" if times[k] is None else f"{times[k] / floor:.2f}x" for k, _ in LAYER_METHODS[1:]]
            emit(f"| {tag} | " + " | ".join(cells) + " |")
        emit()
    return layers


# ----------------------------------------------------------------------------- step table

def sdxl_blocks(smoke: bool):
    """(resolution key, channels) of the 70 SDXL transformer blocks in UNet order."""
    if smoke:
        return [("hi", 32)] * 2 + [("lo", 64)] * 3 + [("hi", 32)] * 1
    return [("hi", 640)] * 4 + [("lo", 1280)] * 20 + [("lo", 1280)] * 10 + [("lo", 1280)] * 30 + [("hi", 640)] * 6


class AttentionStack:
    """The attention linears of one SDXL UNet step (see the module docstring)."""

    def __init__(self, rank, dtype, smoke):
        tokens = {"hi": 64, "lo": 16} if smoke else {"hi": 4096, "lo": 1024}
        self.ctx_dim, self.ctx_len, self.batch = (48, 7, 2) if smoke else (2048, 77, 2)
        self.head_dim = 16 if smoke else 64
        channels = {res: C for res, C in sdxl_blocks(smoke)}
        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.h = {res: torch.randn(self.batch, t, channels[res], generator=g, device=DEVICE).to(dtype)
                  for res, t in tokens.items()}
        self.ctx = torch.randn(self.batch, self.ctx_len, self.ctx_dim, generator=g, device=DEVICE).to(dtype)
        self.blocks = []
        seed = 0
        for res, C in sdxl_blocks(smoke):
            T = self.batch * tokens[res]
            Tc = self.batch * self.ctx_len
            specs = [(T, C, C, False), (T, C, C, False), (T, C, C, False), (T, C, C, True),  # self q k v out
                     (T, C, C, False), (Tc, self.ctx_dim, C, False), (Tc, self.ctx_dim, C, False), (T, C, C, True)]
            layers = []
            for M, K, N, bias in specs:
                seed += 1
                layers.append(Layer(M, K, N, rank, dtype, bias=bias, seed=seed, groups=1, make_x=False))
            self.blocks.append((res, C, layers))
        self.num_linears = sum(len(b[2]) for b in self.blocks)

    def _attn(self, q, k, v, C):
        B = self.batch
        heads = C // self.head_dim
        q, k, v = (t.reshape(B, -1, heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)

    def step(self, mode: str):
        h = dict(self.h)
        ctx2 = self.ctx.reshape(-1, self.ctx_dim)
        for res, C, (q, k, v, o, q2, k2, v2, o2) in self.blocks:
            x = h[res]
            x2 = x.reshape(-1, C)
            lin = lambda L, inp: getattr(L, mode)(inp).reshape(self.batch, -1, L.N)  # noqa: E731
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
    S = AttentionStack(rank, dtype, ARGS.smoke)
    emit(f"## Step: {S.num_linears} attention linears, SDXL shapes, rank {rank}, {dtype_name(dtype)} "
         "(attention-only approximation; see the script docstring)")
    emit()
    with torch.no_grad():
        ref = S.step("reference")
        fused = S.step("fused_step")  # also fills each layer's speculation state
        fused2 = S.step("fused_step")  # second step: guesses from the first
        rel = max(_err(fused[k], ref[k]) / max(ref[k].abs().max().item(), 1e-6) for k in ref)
        same = all(torch.equal(fused[k], fused2[k]) for k in ref)
        ok = rel < 5e-2
        emit(f"fused step vs reference-op step: max relative error {rel:.2e} ({'ok' if ok else 'FAIL'}); "
             f"speculated second step {'bitwise equal' if same else 'differs (atomics order)'}; "
             f"{int(S.decisions().sum())}/{S.num_linears} layers chose the subject")
        if not ok:
            FAILURES.append(f"step r={rank} {dtype_name(dtype)}")
        emit()
        emit("| mode | eager (ms) | x merged | CUDA graph (ms) | x merged |")
        emit("|---|---|---|---|---|")
        rows = {}
        for mode, label in (("merged", "merged weights (floor)"), ("fused_step", "fused FLS"),
                            ("reference", "reference FLS (torch)"), ("naive", "naive eager FLS")):
            eager = bench(lambda mode=mode: S.step(mode))
            graph = None
            if mode != "naive" and not ARGS.smoke:
                try:
                    g = capture(lambda mode=mode: S.step(mode))
                    graph = bench(g.replay)
                    del g
                except Exception as exc:  # report, keep going: capture success is one of the targets
                    emit(f"capture of {mode} FAILED: {exc!r}")
                    FAILURES.append(f"capture {mode}")
            rows[mode] = (label, eager, graph)
        fe, fg = rows["merged"][1], rows["merged"][2]
        for label, eager, graph in rows.values():
            gcell = "n/a | -" if graph is None or fg is None else f"{graph:.2f} | {graph / fg:.2f}x"
            emit(f"| {label} | {eager:.2f} | {eager / fe:.2f}x | {gcell} |")
        emit()
    del S


def main():
    if not ARGS.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --smoke for a CPU logic check")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    gpu = "CPU (smoke, Triton interpreter)" if ARGS.smoke else torch.cuda.get_device_name()
    emit(f"# FLS kernel benchmark: {gpu}")
    emit()
    emit(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
         f"torch {torch.__version__}, triton {triton.__version__}")
    emit()
    t0 = time.time()
    layer_tables()
    if not ARGS.skip_step:
        for rank in ARGS.step_ranks:
            step_table(rank if not ARGS.smoke else min(rank, 8), DTYPES[0])
    emit(f"total {time.time() - t0:.0f} s; verification failures: {FAILURES or 'none'}")
    if ARGS.out:
        with open(ARGS.out, "a") as f:
            f.write("\n" + "\n".join(LINES) + "\n")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
