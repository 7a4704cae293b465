"""Shared pieces of the LoRA-linear kernels: limits, launch contract, tile configs, tile helpers.

Every kernel here computes, for one (BLOCK_M x BLOCK_N) output tile,
    y0 = x W^T + b          (fp32 accumulator)
    d  = (x A^T) B^T        (the "shrink" x A^T is precomputed once per op by lora_shrink)
so the helpers are shared and the FLS kernel's two phases produce bit-identical tiles.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# triton picks the interpreter when a @triton.jit function is *defined*, i.e. when this package is
# imported, so the flag that matters is the environment at import time, not at call time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernels' capabilities; fusion_engine.ops.check_supported reads them at attach.
MAX_RANK = 128  # the padded rank of one LoRA is a tl.dot dimension (16..128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_GROUP_DTYPES = (torch.int32, torch.int64)

# ---- constexpr codes shared by the pair and pooled FLS kernels (one compiled variant each)
_DIVERGENCE_KL = tl.constexpr(0)
_DIVERGENCE_COSINE = tl.constexpr(1)
_DIVERGENCE_DOT = tl.constexpr(2)
DIVERGENCE_CODES = {"kl": _DIVERGENCE_KL.value, "cosine": _DIVERGENCE_COSINE.value, "dot": _DIVERGENCE_DOT.value}
# where y0 comes from
_BASE_COMPUTED = tl.constexpr(0)  # the tile's own GEMM (fp32 accumulator)
_BASE_LOADED = tl.constexpr(1)  # read from the y0 buffer cuBLAS wrote (x's dtype)
BASE_CODES = {"fused": _BASE_COMPUTED.value, "cublas": _BASE_LOADED.value}

# Testing hook: when True, every buffer a launcher allocates uninitialised (outputs, scores,
# decisions, partial statistics, the shrink buffer) is filled with NaN / 0x5A first, so an element
# a kernel forgets to write shows up in the tests instead of passing on lucky zeros.
POISON_OUTPUTS = False


def new_empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan") if dtype.is_floating_point else 0x5A)
    return t


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def rank_pad(r: int) -> int:
    """Padded rank used for the shrink buffer and tl.dot (tl.dot needs every dim >= 16)."""
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} exceeds the kernels' limit of {MAX_RANK}")
    return 0 if r == 0 else max(16, next_pow2(r))


def dot_pad(r: int) -> int:
    """The tl.dot width of one LoRA block: its padded rank, 16 for an absent LoRA (never read)."""
    return max(rank_pad(r), 16)


def dot_precision(dtype: torch.dtype):
    """fp32 inputs must not silently drop to tf32 (torch's matmul default is full fp32)."""
    return "ieee" if dtype == torch.float32 else None


def require(ok: bool, message) -> None:
    """A launcher's contract check: raises ValueError(message) (unlike assert, it survives python -O).

    ``message`` is a string or a callable returning one (``lambda: f"..."``): a launcher runs its checks
    on every call, so the message is only formatted when the check fails."""
    if not ok:
        raise ValueError(message() if callable(message) else message)


def check_lora_linear_inputs(op: str, x, weight, bias, subject_a, subject_b, style_a, style_b) -> None:
    """The launch contract shared by the LoRA-linear launchers; a ValueError names the tensor at fault.

    x (M, K) on CUDA (or CPU under the interpreter) in a supported dtype with unit stride along K;
    weight (N, K); bias (N,) or None; each LoRA a (r, K) and b (N, r), r <= MAX_RANK (0 = absent);
    every tensor on x's device (parameters are cast to x.dtype by the launchers).
    """
    require(x.dim() == 2, lambda: f"{op}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    require(x.dtype in SUPPORTED_DTYPES, lambda: f"{op}: x dtype {x.dtype} not in {SUPPORTED_DTYPES}")
    M, K = x.shape
    require(weight.dim() == 2 and weight.shape[1] == K,
             lambda: f"{op}: weight must be (N, K={K}), got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    require(bias is None or tuple(bias.shape) == (N,), lambda: f"{op}: bias must be (N={N},), got shape "
             f"{None if bias is None else tuple(bias.shape)}")
    for role, a, b in (("subject", subject_a, subject_b), ("style", style_a, style_b)):
        if not (a.dim() == 2 and a.shape[1] == K):
            raise ValueError(f"{op}: {role}_a must be (r, K={K}), got shape {tuple(a.shape)}")
        r = a.shape[0]
        if tuple(b.shape) != (N, r):
            raise ValueError(f"{op}: {role}_b must be (N={N}, r={r}), got shape {tuple(b.shape)}")
        if r > MAX_RANK:
            raise ValueError(f"{op}: {role} rank {r} exceeds the kernels' limit of {MAX_RANK}")
    for name, t in (("weight", weight), ("bias", bias), ("subject_a", subject_a), ("subject_b", subject_b),
                    ("style_a", style_a), ("style_b", style_b)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")


# ---- the eager fast path: replaying a launch without Triton's per-call binding and specialisation
# Each launcher keeps plans keyed by everything its checks, its tile configs and Triton's specialisation of
# the kernels' arguments depend on (shapes, strides, dtypes, devices, flags, the stream); a call whose key has a
# plan skips the checks (they passed for that key), reuses the grids, the compiled kernels and the scratch
# buffers, and calls the compiled kernels' launchers directly. Off under the interpreter and while a launch
# hook (a profiler) is installed: those calls take the JIT path. Pointer alignment is part of the key (Triton
# compiles a variant per alignment).
FAST_LAUNCH = not INTERPRET
MAX_PLANS = 512  # per launcher; the oldest is dropped beyond (a UNet has tens of distinct layer shapes)


def launch_context():
    """(stream, True) where a planned launch may run now, (None, False) where the JIT path must."""
    from triton import knobs
    from triton.runtime.driver import driver

    # triton 3.8's hooks are chains, empty unless a profiler adds to them; older tritons use None
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if not FAST_LAUNCH or any(getattr(hook, "calls", hook) for hook in hooks):
        return None, False
    active = driver.active
    return active.get_current_stream(active.get_current_device()), True


def may_plan() -> bool:
    """Whether a launch through the JIT path may be kept as a plan: not while a CUDA graph is being captured (a
    plan's scratch buffers must not come from a graph's private memory pool)."""
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def keep_plan(plans: dict, key, plan) -> None:
    if len(plans) >= MAX_PLANS:
        plans.pop(next(iter(plans)))
    plans[key] = plan


def plan_key(tensors: tuple, *values) -> tuple:
    """What a launch plan depends on: per tensor argument (None for an absent one) its shape, strides, dtype and
    device, and whether its data pointer is 16-byte aligned (Triton compiles a variant per pointer alignment; fresh
    outputs and a plan's scratch need no bit: torch's allocators align far more), then the other ``values`` (flags,
    group counts, the stream). Each tensor is named once, so its layout and its alignment cannot drift apart."""
    key, mask = [], 0
    for t in tensors:
        if t is None:
            key.append(None)
            mask <<= 1
        else:
            key.append((t.shape, t.stride(), t.dtype, t.device))
            mask = mask << 1 | (t.data_ptr() & 15 == 0)
    return (*key, mask, *values)


class KernelLaunch:
    """One launch of a @triton.jit kernel, replayed with other tensors in the same argument slots.

    Made from a launch that went through ``JITFunction.run`` (which compiled or found the kernel for these
    argument dtypes, alignments and integer values): a replay passes the same argument list with the
    per-call tensors and floats (``varying``) substituted, to the same compiled kernel, on the same grid.
    Callers replay only under the same plan key and with 16-byte-aligned pointers, i.e. where the JIT would
    pick this very kernel.
    """

    __slots__ = ("grid", "template", "positions", "run", "function", "packed")

    def __init__(self, fn, grid, kwargs: dict, varying: tuple, compiled):
        names = [p.name for p in fn.params]
        self.template = [kwargs[name] for name in names]
        self.positions = tuple(names.index(name) for name in varying)
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.run, self.function, self.packed = compiled.run, compiled.function, compiled.packed_metadata

    def __call__(self, stream, *values):
        args = self.template.copy()
        for position, value in zip(self.positions, values):
            args[position] = value
        self.run(*self.grid, stream, self.function, self.packed, None, None, None, *args)


def launch(fn, grid, plan: list | None, varying: tuple = (), **kwargs):
    """Launch ``fn`` through the JIT; with ``plan`` (a list), also append its ``KernelLaunch`` for replays, or None
    where the JIT compiled without launching (a warmup, e.g. an ahead-of-time compile check): nothing to replay, and
    the caller keeps no plan (``all(plan)`` is false)."""
    compiled = fn[grid](**kwargs)
    if plan is not None:
        launched = getattr(compiled, "module", None) is not None  # the launcher's handles are loaded
        plan.append(KernelLaunch(fn, grid, kwargs, varying, compiled) if launched else None)


def as_operands(x, weight, bias, subject_a, subject_b, style_a, style_b):
    """The launchers' operands: x with unit stride along K, every parameter contiguous in x's dtype
    (no-ops in the usual case), so the kernels take strides from x, xa and out only."""
    x = x if x.stride(-1) == 1 else x.contiguous()

    def cast(t):
        return None if t is None else t.to(x.dtype).contiguous()

    return (x, *(cast(t) for t in (weight, bias, subject_a, subject_b, style_a, style_b)))


# Tuned on an NVIDIA H200 (torch 2.11, triton 3.6, bf16, rank 64) by bench/tune_fls.py; the sweep and
# the measured times are in bench/RESULTS.md. (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMM_TABLE = {
    # FLS keeps three fp32 tiles (y0, d_subject, d_style) alive in its epilogue
    "fls": {"small_m": (64, 64, 128, 4, 3), "mid": (128, 64, 64, 8, 4), "large": (128, 128, 64, 8, 4)},
    "mix": {"small_m": (64, 64, 128, 4, 3), "mid": (128, 64, 64, 4, 4), "large": (128, 128, 64, 8, 4)},
}
_SHRINK_TABLE = {"small_m": (16, 128, 4, 3), "large": (32, 128, 4, 3)}  # (BLOCK_M, BLOCK_K, num_warps, num_stages)


def _size_class(M: int, N: int, K: int) -> str:
    """small_m: cross-attention k/v (M = batch x 77); large: FLUX-sized GEMMs (>= 4608 x 3072 x 3072
    or a long K), where 128x128 tiles win; mid: the SDXL UNet's self-attention and projections."""
    if M <= 256:
        return "small_m"
    if M * N * K >= 4096 * 3072 * 3072 or K >= 8192:
        return "large"
    return "mid"


def gemm_config(M: int, N: int, K: int, epilogue: str = "fls") -> dict:
    """Fixed block sizes, chosen by shape only (a tuned table, not autotune: autotune does not run
    under the interpreter, and re-running a kernel that accumulates with atomics would need reset
    hooks), so the grid is capturable in a CUDA graph.

    Args:
        M, N, K: the GEMM's shape (x is (M, K), the weight (N, K)).
        epilogue: "fls" (the fused FLS kernels) or "mix" (the mix kernel).
    """
    if INTERPRET:
        # tiny tiles: the interpreter is numpy per program; several tiles per dim exercise masks
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    block_m, block_n, block_k, warps, stages = _GEMM_TABLE[epilogue][_size_class(M, N, K)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


# Where the FLS op's base output y0 comes from, by size class: "fused" = the kernels' own GEMM tile
# (one launch pair, no y0 buffer), "cublas" = torch's F.linear into a y0 buffer that the kernels read
# (the "split" mechanism of csrc_triton/fls_linear.py). Not measured yet: the H200 sweep found
# Triton's GEMM 1.35-2x cuBLAS at FLUX sizes, so "large" splits; the other classes keep the fused
# path until bench/gpu_table.py's side-by-side columns say otherwise.
FLS_BASES = ("fused", "cublas")
_FLS_BASE_TABLE = {"small_m": "fused", "mid": "fused", "large": "cublas"}


def cublas_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The split variants' base output y0 = F.linear(x, W, b) in x's dtype (cuBLAS on a GPU): the merged layer's own
    call. One name for every launcher, so an ahead-of-time compile check can stand it in once."""
    return F.linear(x, weight, bias)


def base_mode(base: str | None, M: int, N: int, K: int, op: str) -> str:
    """``base`` checked ("fused" or "cublas"), or the size-class default of ``fls_base_config`` when None."""
    require(base is None or base in BASE_CODES,
            lambda: f"{op}: base must be one of {tuple(BASE_CODES)} or None, got {base!r}")
    return fls_base_config(M, N, K) if base is None else base


def fls_base_config(M: int, N: int, K: int) -> str:
    """The FLS op's base mode for this shape ("fused" or "cublas", see ``FLS_BASES``), by size class
    only, like ``gemm_config``."""
    return _FLS_BASE_TABLE[_size_class(M, N, K)]


def shrink_config(M: int, K: int) -> dict:
    """Block sizes of lora_shrink, by shape only (a tuned table, as ``gemm_config``). One program
    walks the whole K for its BLOCK_M rows, so small BLOCK_M keeps the GPU busy at small M."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    block_m, block_k, warps, stages = _SHRINK_TABLE["small_m" if M <= 2048 else "large"]
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


@triton.jit
def _linear_tile(
    x_ptr,  # (M, K), unit stride along K
    w_ptr,  # (N, K), unit stride along K
    bias_ptr,  # (N,); read only when HAS_BIAS
    offs_m, offs_n, mask_n, K, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile of x W^T + b. offs_m is already clamped into [0, M) so x loads need no row mask."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k0
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wt = tl.load(w_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _expand_tile(
    xa_ptr,  # (M, >= rank_offset + RANK_PAD): the shrink buffer, padded columns exact zeros
    b_ptr,  # (N, >= rank), row stride stride_bn: one LoRA's B (a pool slot's B is padded to the stacks' rank)
    offs_m, offs_n, mask_n, rank, stride_xam,
    rank_offset,  # first column of this LoRA's block in xa
    stride_bn,  # B's row stride: its rank for a pair's contiguous B, the stacks' rank R for a pool slot
    RANK_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile of (x A^T) B^T from the shrink buffer (pair and pooled kernels alike). Reads RANK_PAD columns of
    xa: the shrink wrote them all (its padded columns are exact zeros)."""
    offs_r = tl.arange(0, RANK_PAD)
    xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + rank_offset + offs_r[None, :])
    # read B as the (RANK_PAD, BLOCK_N) tile of B^T
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None],
                 mask=(offs_r[:, None] < rank) & mask_n[None, :], other=0.0)
    return tl.dot(xa, bt, input_precision=DOT_PRECISION)


@triton.jit
def _base_tile(
    x_ptr, w_ptr, bias_ptr,  # read only when BASE == _BASE_COMPUTED
    y0_ptr,  # (M, N) x's dtype: F.linear(x, W, b) (cuBLAS); read only when BASE == _BASE_LOADED
    offs_am, offs_n, mask_n, K, stride_xm, stride_wn, stride_y0m,
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """fp32 tile of y0, computed (``_linear_tile``) or loaded from cuBLAS's y0 as ``BASE`` says (pair and pooled
    kernels alike). Masked columns are exact zeros either way (the statistics rely on it)."""
    if BASE == _BASE_LOADED:
        y0 = tl.load(y0_ptr + offs_am[:, None] * stride_y0m + offs_n[None, :], mask=mask_n[None, :],
                     other=0.0).to(tl.float32)
    else:
        y0 = _linear_tile(x_ptr, w_ptr, bias_ptr, offs_am, offs_n, mask_n, K, stride_xm, stride_wn,
                          HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    return y0
