"""Pooled static-weight LoRA linear: every sample of the batch adds its own LoRAs from a pool (a slot table),
out[b] = y0[b] + sum_l w[b, l] * s[slot(b, l)] * (x_b A_slot^T) B_slot^T.

Segments (SGMV-style): the rows are ``B`` samples of ``T`` rows each (``x`` is a ``(B, T, K)`` activation
flattened), and a sample's rows all use the same slots, so one program owns a BLOCK_M x BLOCK_N tile *inside one
sample*: its slots are scalars, read from the slot table on the device, and the tile's LoRA products are plain
dots. The grid is ``B * cdiv(T, BLOCK_M) * cdiv(N, BLOCK_N)``: shapes only, never the slot table, so a step with a
fixed batch shape can be captured in a CUDA graph and the assignment changed between replays.

Algorithm:
0. the shrink, once per row and position (``lora_shrink.pooled_lora_shrink``, its own launch, as punica's / vLLM's
   shrink): x_b A_slot^T in fp32, rounded to x's dtype (as eager LoRA does), each slot at its own padded rank;
then one program per output tile:
1. the base tile y0 in fp32: the tile's own GEMM (``base="fused"``), or loaded from ``F.linear(x, W, b)`` that the
   launcher ran first (``base="cublas"``, the split variant of ``fls_linear``: cuBLAS's GEMM plus this epilogue;
   the kernel then adds into that buffer in place, each tile read before it is written by the same program);
2. for each of the ``NUM_POSITIONS`` positions (a constexpr: the widest image's LoRA count): read the slot;
   a slot < 0 (the image names fewer LoRAs) adds nothing. Else the expand of the slot's shrink block against
   B_slot's tile (at the slot's width), scaled by ``weights[b, l] * scales[slot]`` and added in fp32;
3. one rounding to x's dtype on the store.
Precision of ``base="cublas"``: y0 is rounded to x's dtype once more than the fused variant (as the merged layer
rounds it; see csrc_triton/fls_linear.py), within the same per-dtype tolerance.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import _slot_expand, _slot_rank, check_slot_ranks, pooled_lora_shrink
from .utils import (
    BASE_CODES,
    MAX_RANK,
    SUPPORTED_DTYPES,
    _base_tile,
    base_mode,
    cublas_linear,
    dot_pad,
    dot_precision,
    gemm_config,
    keep_plan,
    launch,
    launch_context,
    may_plan,
    new_empty,
    plan_key,
    require,
)


@triton.jit
def _pooled_mix_linear_kernel(
    x_ptr,  # (B * T, K), unit stride along K; read only when BASE == _BASE_COMPUTED
    w_ptr,  # (N, K) contiguous; read only when BASE == _BASE_COMPUTED
    bias_ptr,  # (N,); read only when HAS_BIAS and BASE == _BASE_COMPUTED
    y0_ptr,  # (B * T, N) x's dtype: F.linear(x, W, b); read only when BASE == _BASE_LOADED (it is out_ptr then)
    xa_ptr,  # (B * T, NUM_POSITIONS * RANK_PAD): the pooled shrink's buffer
    b_ptr,  # (S, N, R) contiguous: every slot's B, zero-padded to the rank R
    ranks_ptr,  # (S,) int32/int64: each slot's own rank
    scales_ptr,  # (S,) float32: alpha / rank times the LoRA's scale
    slots_ptr,  # (B, NUM_POSITIONS) int64: each sample's slots, -1 = none
    weights_ptr,  # (B, NUM_POSITIONS) float32: the policy's weight of each position
    out_ptr,  # (B * T, N) out, x's dtype
    T, N, K, R, num_pid_t, num_pid_n, stride_xm, stride_wn, stride_y0m, stride_xam, stride_om,
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_POSITIONS: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // (num_pid_t * num_pid_n)
    pid_t = (pid // num_pid_n) % num_pid_t
    pid_n = pid % num_pid_n
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    offs_m = sample * T + tl.minimum(offs_t, T - 1)  # clamped into the sample: loads need no row mask

    acc = _base_tile(x_ptr, w_ptr, bias_ptr, y0_ptr, offs_m, offs_n, mask_n, K, stride_xm, stride_wn, stride_y0m,
                     BASE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    for position in tl.static_range(NUM_POSITIONS):
        slot = tl.load(slots_ptr + sample * NUM_POSITIONS + position)
        if slot >= 0:
            coef = tl.load(weights_ptr + sample * NUM_POSITIONS + position) * tl.load(scales_ptr + slot)
            acc += coef * _slot_expand(xa_ptr, b_ptr + slot * N * R, offs_m, offs_n, mask_n,
                                       _slot_rank(ranks_ptr, slot, R), R, stride_xam, position * RANK_PAD, RANK_PAD,
                                       BLOCK_M, BLOCK_N, DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


def check_pool_inputs(op: str, x, weight, bias, a_stack, b_stack, scales, sample_slots) -> None:
    """The launch contract shared by the pooled launchers; a ValueError names the tensor at fault.

    x (M, K) in a supported dtype, M = B * T; weight (N, K); bias (N,) or None; a_stack (S, R, K) and b_stack
    (S, N, R) with R <= MAX_RANK; scales (S,); sample_slots (B, L) int64 with B dividing M and L >= 1; every
    tensor on x's device. Slot values are not checked (that would read the table on the host): the pool writes
    them in [-1, S).
    """
    require(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
            lambda: f"{op}: x (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    require(x.dtype in SUPPORTED_DTYPES, lambda: f"{op}: x dtype {x.dtype} not in {SUPPORTED_DTYPES}")
    M, K = x.shape
    N = weight.shape[0]
    require(bias is None or tuple(bias.shape) == (N,),
            lambda: f"{op}: bias must be (N={N},), got {None if bias is None else tuple(bias.shape)}")
    require(a_stack.dim() == 3 and a_stack.shape[2] == K and tuple(b_stack.shape) == (a_stack.shape[0], N,
                                                                                     a_stack.shape[1]),
            lambda: f"{op}: a_stack (S, R, K={K}) and b_stack (S, N={N}, R), got {tuple(a_stack.shape)} and "
            f"{tuple(b_stack.shape)}")
    S, R = a_stack.shape[:2]
    require(R <= MAX_RANK, lambda: f"{op}: the stacks' rank {R} exceeds the kernels' limit of {MAX_RANK}")
    require(tuple(scales.shape) == (S,), lambda: f"{op}: scales must be (S={S},), got {tuple(scales.shape)}")
    require(sample_slots.dim() == 2 and sample_slots.dtype == torch.int64 and sample_slots.shape[0] > 0
            and sample_slots.shape[1] > 0 and M % sample_slots.shape[0] == 0,
            lambda: f"{op}: sample_slots must be (B, L) int64 with B dividing M={M} and L >= 1, got "
            f"{tuple(sample_slots.shape)} {sample_slots.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("a_stack", a_stack), ("b_stack", b_stack),
                    ("scales", scales), ("sample_slots", sample_slots)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def pool_operands(x, weight, bias, a_stack, b_stack):
    """The pooled launchers' operands: x with unit stride along K, the base linear and the stacks contiguous in
    x's dtype (no-ops in the usual case)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight, a_stack, b_stack = (t.to(x.dtype).contiguous() for t in (weight, a_stack, b_stack))
    return x, weight, None if bias is None else bias.to(x.dtype).contiguous(), a_stack, b_stack


def pooled_mix_linear_fwd(x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks=None,
                          base=None):
    """Launch the pooled mix linear. Same contract as ``fusion_engine.ops.pooled.pooled_mix_linear``.

    Args:
        x: (M, K) activations, M = B * T sample-major (fp16, bf16 or fp32); the output has its dtype.
        weight, bias: the base linear, (N, K) and (N,) or None.
        a_stack, b_stack: (S, R, K) and (S, N, R), the pool's stacks of one layer (cast to x's dtype).
        scales: (S,) each slot's LoRA scale.
        sample_slots: (B, L) int64 slots per sample, -1 = none; B must divide M.
        sample_weights: (B, L) the policy's weight of each position.
        slot_ranks: optional (S,) int32/int64 device tensor, each slot's own rank (the pool knows them); None: read
            from the stacks on the device (``lora_shrink.stack_ranks``, kept while the stacks are unchanged).
        base: where y0 comes from: "fused" (the kernel's own GEMM), "cublas" (``F.linear`` first, the kernel adds
            the LoRAs), or None for the size-class default of ``fusion_engine.kernels.utils.fls_base_config``.

    Returns:
        (M, N) tensor in x.dtype.
    """
    stream, fast = launch_context()
    if fast:
        key = plan_key((x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks), base,
                       stream)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(stream, x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks)
    check_pool_inputs("pooled_mix_linear", x, weight, bias, a_stack, b_stack, scales, sample_slots)
    require(sample_weights.shape == sample_slots.shape and sample_weights.device == x.device,
            lambda: f"pooled_mix_linear: sample_weights must be like sample_slots {tuple(sample_slots.shape)} on "
            f"{x.device}, got {tuple(sample_weights.shape)} on {sample_weights.device}")
    (M, K), N, R = x.shape, weight.shape[0], a_stack.shape[1]
    base = base_mode(base, M, N, K, "pooled_mix_linear")
    ranks = check_slot_ranks("pooled_mix_linear", slot_ranks, a_stack)
    batch, positions = sample_slots.shape
    T = M // batch
    if M == 0:
        return new_empty((M, N), x.dtype, x.device)
    inputs = (x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights)
    x, weight, bias, a_stack, b_stack = pool_operands(x, weight, bias, a_stack, b_stack)
    scales, sample_weights = (t.to(torch.float32).contiguous() for t in (scales, sample_weights))
    sample_slots = sample_slots.contiguous()
    operands = (x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights)
    # a plan replays with the caller's tensors, so only when no operand was converted
    planned = fast and all(a is b for a, b in zip(operands, inputs)) and may_plan()

    launches = [] if planned else None
    xa = pooled_lora_shrink(x, a_stack, ranks, sample_slots, launches)
    # split: y0 by cuBLAS into the output buffer, which the kernel then adds into (each tile read, then written)
    out = cublas_linear(x, weight, bias) if base == "cublas" else new_empty((M, N), x.dtype, x.device)
    cfg = gemm_config(T, N, K, "mix")
    num_pid_t, num_pid_n = triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    grid = (batch * num_pid_t * num_pid_n,)
    launch(
        _pooled_mix_linear_kernel, grid, launches, _MIX_VARYING,
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, y0_ptr=out, xa_ptr=xa, b_ptr=b_stack,
        ranks_ptr=ranks, scales_ptr=scales, slots_ptr=sample_slots, weights_ptr=sample_weights, out_ptr=out,
        T=T, N=N, K=K, R=R, num_pid_t=num_pid_t, num_pid_n=num_pid_n,
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_y0m=out.stride(0), stride_xam=xa.stride(0),
        stride_om=out.stride(0), BASE=BASE_CODES[base], HAS_BIAS=bias is not None, NUM_POSITIONS=positions,
        RANK_PAD=dot_pad(R), EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    if planned and all(launches):
        keep_plan(_PLANS, key, _PooledMixPlan(launches, out.shape, x.dtype, x.device, base == "cublas"))
    return out


# the arguments a replay passes per call (utils.KernelLaunch); the rest (the shrink buffer, sizes, flags) is the plan's
_MIX_VARYING = ("x_ptr", "w_ptr", "bias_ptr", "y0_ptr", "b_ptr", "ranks_ptr", "scales_ptr", "slots_ptr", "weights_ptr",
                "out_ptr")
_PLANS: dict = {}


class _PooledMixPlan:
    """The launches of one planned ``pooled_mix_linear_fwd`` key: the shrink into the plan's buffer, then the main
    kernel into a fresh output (cuBLAS's y0 for the split variant)."""

    def __init__(self, launches, out_shape, dtype, device, split):
        (self.shrink, self.main), self.out_shape, self.dtype, self.device = launches, out_shape, dtype, device
        self.split = split

    def __call__(self, stream, x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights, slot_ranks):
        ranks = check_slot_ranks("pooled_mix_linear", slot_ranks, a_stack)
        out = cublas_linear(x, weight, bias) if self.split else new_empty(self.out_shape, self.dtype, self.device)
        self.shrink(stream, x, a_stack, ranks, sample_slots)
        self.main(stream, x, weight, x if bias is None else bias, out, b_stack, ranks, scales, sample_slots,
                  sample_weights, out)
        return out
