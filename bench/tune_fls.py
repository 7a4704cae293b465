"""Sweep the block configs of the fused ops on the visible GPU (torch + triton only); the tuned tables
in csrc_triton/utils.py (``gemm_config``, ``shrink_config``) are written from its output.

    python bench/tune_fls.py                  # GPU: a few minutes; prints markdown
    python bench/tune_fls.py --smoke          # CPU, Triton interpreter, tiny shapes: logic check only

For each layer shape of bench/gpu_table.py's SDXL and FLUX tables (bf16, rank 64), in CUDA-graph
replay (the kernels alone; do_bench median):

1. ``lora_shrink`` alone, for each candidate shrink config (a wrong config only costs time: the
   shrink is checked below as part of the op);
2. with the fastest shrink, the whole fused FLS op (stable guess), its split variant (base GEMM in
   cuBLAS, the same tiles for the kernels' epilogue pass) and the mix op for each candidate
   GEMM config, each config first verified against the float64 reference by the checks of
   tests/test_kernels.py (a config that fails is reported and never chosen);
3. a plain Triton GEMM built from the same tile helper (``_linear_tile``) with that config, so the
   cost of the GEMM itself is separated from the FLS epilogue; and torch's merged linear (cuBLAS).

Ratios are to the merged linear measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import gpu_table  # noqa: E402  (bench/ is not a package)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_table import RUN, Layer, bench, capture, emit  # noqa: E402

from fusion_engine.kernels.utils import _linear_tile, dot_precision  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMM_CANDIDATES = [
    (64, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4),
    (64, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (32, 128, 64, 4, 4), (32, 64, 64, 4, 4),
    (64, 64, 128, 4, 3),
]
# (BLOCK_M, BLOCK_K, num_warps, num_stages)
SHRINK_CANDIDATES = [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (16, 64, 4, 4), (16, 128, 4, 3),
                     (16, 256, 4, 2), (32, 256, 4, 2)]
SHAPES = [(8192, 640, 640), (2048, 1280, 1280), (154, 2048, 1280), (4608, 3072, 3072), (4608, 3072, 12288),
          (4608, 12288, 3072)]
SMOKE_SHAPES = [(64, 32, 64), (40, 48, 32)]


@triton.jit
def _plain_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = _linear_tile(x_ptr, w_ptr, x_ptr, offs_m % M, offs_n, mask_n, K, stride_xm, stride_wn, False, BLOCK_M,
                       BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


def plain_gemm(x, w, cfg):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _plain_gemm_kernel[grid](x_ptr=x, w_ptr=w, out_ptr=out, M=M, N=N, K=K, stride_xm=x.stride(0),
                             stride_wn=w.stride(0), stride_om=out.stride(0), EVEN_K=K % cfg["BLOCK_K"] == 0,
                             DOT_PRECISION=dot_precision(x.dtype), **cfg)
    return out


def kernel_time(fn) -> float:
    """ms of fn's kernels alone: CUDA-graph replay on a GPU, a plain timer in smoke mode."""
    if RUN.smoke:
        return bench(fn)
    g = capture(fn)
    t = bench(g.replay)
    del g
    return t


def use(gemm=None, shrink=None):
    """Make the launchers use these configs (module attributes the launchers look up per call)."""
    # by sys.modules: the package re-exports a function named lora_shrink over its module
    fls_module, shrink_module, mix_module = (sys.modules[f"fusion_engine.kernels.{name}"]
                                             for name in ("fls_linear", "lora_shrink", "mix_linear"))

    if gemm is not None:
        fls_module.gemm_config = mix_module.gemm_config = lambda *args: dict(gemm)
    if shrink is not None:
        shrink_module.shrink_config = lambda *args: dict(shrink)


def as_gemm(c):
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=1 if RUN.smoke else c[4])


def as_shrink(c):
    return dict(BLOCK_M=c[0], BLOCK_K=c[1], num_warps=c[2], num_stages=1 if RUN.smoke else c[3])


def tune_shape(M, K, N, rank, dtype, gemm_candidates, shrink_candidates):
    L = Layer(M, K, N, rank, dtype, seed=M + K + N + rank)
    a = L.inputs
    merged = kernel_time(L.merged)
    shrink_times = {}
    for c in shrink_candidates:
        use(shrink=as_shrink(c))
        shrink_times[c] = kernel_time(lambda: RUN.ops_shrink(a["x"], a["subject_a"], a["style_a"]))
    best_shrink = min(shrink_times, key=shrink_times.get)
    use(shrink=as_shrink(best_shrink))
    emit(f"### M={M} K={K} N={N} r={rank} {gpu_table.dtype_name(dtype)}: merged (cuBLAS) {merged * 1e3:.1f} us")
    emit()
    emit("shrink: " + ", ".join(f"{c} {t * 1e3:.1f} us" for c, t in shrink_times.items()) + f"; best {best_shrink}")
    emit()
    emit("| config (BM, BN, BK, warps, stages) | verified | fused FLS (x merged) | split FLS (x merged) "
         "| mix (x merged) | plain Triton GEMM (x merged) |")
    emit("|---|---|---|---|---|---|")
    rows = {}
    with torch.no_grad():
        for c in gemm_candidates:
            use(gemm=as_gemm(c))
            failures_before = len(RUN.failures)
            try:
                gpu_table.verify_layer(L, f"{c}")  # both FLS variants and the mix op
            except Exception as e:  # a config the compiler rejects (shared memory, registers)  # noqa: BLE001
                emit(f"| {c} | compile/launch failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
                del RUN.failures[failures_before:]
                continue
            ok = len(RUN.failures) == failures_before
            del RUN.failures[failures_before:]  # a failing config is reported here and never chosen
            choice = RUN.ops.fls_linear(**a, divergence="kl")[3]
            fused = kernel_time(lambda choice=choice, L=L: L.fused(prev=choice))
            split = kernel_time(lambda choice=choice, L=L: L.fused(prev=choice, base="cublas"))
            mix = kernel_time(L.mix)
            plain = kernel_time(lambda c=c: plain_gemm(a["x"], a["weight"], as_gemm(c)))
            rows[c] = (ok, fused, mix, plain, split)
            emit(f"| {c} | {'ok' if ok else 'FAIL'} | {fused * 1e3:.1f} us ({fused / merged:.2f}x) | "
                 f"{split * 1e3:.1f} us ({split / merged:.2f}x) | "
                 f"{mix * 1e3:.1f} us ({mix / merged:.2f}x) | {plain * 1e3:.1f} us ({plain / merged:.2f}x) |")
    good = {c: r for c, r in rows.items() if r[0]}
    if good:
        best_fused = min(good, key=lambda c: good[c][1])
        best_mix = min(good, key=lambda c: good[c][2])
        best_split = min(good, key=lambda c: good[c][4])
        emit()
        emit(f"best fused FLS: {best_fused} {good[best_fused][1] / merged:.2f}x; best split FLS: {best_split} "
             f"{good[best_split][4] / merged:.2f}x; best mix: {best_mix} {good[best_mix][2] / merged:.2f}x")
    emit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (logic check only)")
    p.add_argument("--out", type=Path, help="append the markdown to this file")
    p.add_argument("--rank", type=int, default=64)
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --smoke for a CPU logic check")
    gpu_table.setup(args.smoke)
    RUN.ops_shrink = sys.modules["fusion_engine.kernels.lora_shrink"].lora_shrink
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    gemm = [c for c in GEMM_CANDIDATES if c[0] <= 64 and c[1] <= 64][:2] if args.smoke else GEMM_CANDIDATES
    shrink = SHRINK_CANDIDATES[:2] if args.smoke else SHRINK_CANDIDATES
    rank = min(args.rank, 8) if args.smoke else args.rank
    dtype = torch.float32 if args.smoke else torch.bfloat16
    gpu = "CPU (smoke, Triton interpreter)" if args.smoke else torch.cuda.get_device_name()
    emit(f"# Block-config sweep of the fused ops: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    emit()
    t0 = time.time()
    for M, K, N in shapes:
        tune_shape(M, K, N, rank, dtype, gemm, shrink)
    emit(f"total {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(RUN.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
