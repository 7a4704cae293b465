"""Pooled static-weight LoRA linear: every sample of the batch adds its own LoRAs from a pool (a slot table),
out[b] = y0[b] + sum_l w[b, l] * s[slot(b, l)] * (x_b A_slot^T) B_slot^T.

Segments (SGMV-style): the rows are ``B`` samples of ``T`` rows each (``x`` is a ``(B, T, K)`` activation
flattened), and a sample's rows all use the same slots, so one program owns a BLOCK_M x BLOCK_N tile *inside one
sample*: its slots are scalars, read from the slot table on the device, and the tile's LoRA products are plain
dots. The grid is ``B * cdiv(T, BLOCK_M) * cdiv(N, BLOCK_N)``: shapes only, never the slot table, so a step with a
fixed batch shape can be captured in a CUDA graph and the assignment changed between replays.

Algorithm (one program per tile):
1. the base tile y0 = x W^T + b in fp32 (``_linear_tile``, rows clamped into the sample);
2. for each of the ``NUM_POSITIONS`` positions (a constexpr: the widest image's LoRA count): read the slot;
   a slot < 0 (the image names fewer LoRAs) adds nothing. Else the shrink x_tile A_slot^T over K in fp32,
   rounded to x's dtype (as eager LoRA does), then the expand against B_slot's tile, scaled by
   ``weights[b, l] * scales[slot]`` and added in fp32;
3. one rounding to x's dtype on the store.
The stacks hold every slot at the layer's largest rank, zero-padded, so different ranks share one RANK_PAD.
This version recomputes the shrink in every N-tile (rank / BLOCK_N extra FLOPs per LoRA); a separate pooled
shrink launch (as ``lora_shrink`` for a pair) is the next step once it is measured on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    MAX_RANK,
    SUPPORTED_DTYPES,
    _linear_tile,
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
def _slot_shrink(x_ptr, a_ptr, offs_m, offs_r, offs_k, R, K, stride_xm, BLOCK_M: tl.constexpr,
                 RANK_PAD: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_M, RANK_PAD) tile of x A^T for one slot's A ``(R, K)`` at ``a_ptr``; padded ranks are zeros."""
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    at_ptrs = a_ptr + offs_r[None, :] * K + offs_k[:, None]  # (BLOCK_K, RANK_PAD) view of A^T
    xa = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
        at = tl.load(at_ptrs, mask=(offs_r[None, :] < R) & in_k[:, None], other=0.0)
        xa = tl.dot(xt, at, xa, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        at_ptrs += BLOCK_K
    return xa


@triton.jit
def _slot_delta(x_ptr, a_ptr, b_ptr, slot, offs_m, offs_n, mask_n, N, K, R, stride_xm, BLOCK_M: tl.constexpr,
                RANK_PAD: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of the unscaled (x A_slot^T) B_slot^T of one valid slot, the shrink rounded to
    x's dtype between the two products (as eager LoRA does). ``a_ptr`` / ``b_ptr`` are the stacks."""
    offs_r = tl.arange(0, RANK_PAD)
    xa = _slot_shrink(x_ptr, a_ptr + slot * R * K, offs_m, offs_r, tl.arange(0, BLOCK_K), R, K, stride_xm, BLOCK_M,
                      RANK_PAD, BLOCK_K, DOT_PRECISION)
    # (RANK_PAD, BLOCK_N) tile of B_slot^T; padded ranks load zeros
    bt = tl.load(b_ptr + slot * N * R + offs_n[None, :] * R + offs_r[:, None],
                 mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
    return tl.dot(xa.to(x_ptr.dtype.element_ty), bt, input_precision=DOT_PRECISION)


@triton.jit
def _pooled_mix_linear_kernel(
    x_ptr,  # (B * T, K), unit stride along K
    w_ptr,  # (N, K) contiguous
    bias_ptr,  # (N,); read only when HAS_BIAS
    a_ptr,  # (S, R, K) contiguous: every slot's A, zero-padded to the rank R
    b_ptr,  # (S, N, R) contiguous: every slot's B
    scales_ptr,  # (S,) float32: alpha / rank times the LoRA's scale
    slots_ptr,  # (B, NUM_POSITIONS) int64: each sample's slots, -1 = none
    weights_ptr,  # (B, NUM_POSITIONS) float32: the policy's weight of each position
    out_ptr,  # (B * T, N) out, x's dtype
    T, N, K, R, num_pid_t, num_pid_n, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, NUM_POSITIONS: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    acc = _linear_tile(x_ptr, w_ptr, bias_ptr, offs_m, offs_n, mask_n, K, stride_xm, stride_wn,
                       HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
    for position in tl.static_range(NUM_POSITIONS):
        slot = tl.load(slots_ptr + sample * NUM_POSITIONS + position)
        if slot >= 0:
            coef = tl.load(weights_ptr + sample * NUM_POSITIONS + position) * tl.load(scales_ptr + slot)
            acc += coef * _slot_delta(x_ptr, a_ptr, b_ptr, slot, offs_m, offs_n, mask_n, N, K, R, stride_xm, BLOCK_M,
                                      RANK_PAD, BLOCK_K, DOT_PRECISION)
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


def pooled_mix_linear_fwd(x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights):
    """Launch the pooled mix linear. Same contract as ``fusion_engine.ops.pooled.pooled_mix_linear``.

    Args:
        x: (M, K) activations, M = B * T sample-major (fp16, bf16 or fp32); the output has its dtype.
        weight, bias: the base linear, (N, K) and (N,) or None.
        a_stack, b_stack: (S, R, K) and (S, N, R), the pool's stacks of one layer (cast to x's dtype).
        scales: (S,) each slot's LoRA scale.
        sample_slots: (B, L) int64 slots per sample, -1 = none; B must divide M.
        sample_weights: (B, L) the policy's weight of each position.

    Returns:
        (M, N) tensor in x.dtype.
    """
    stream, fast = launch_context()
    if fast:
        key = plan_key((x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights), stream)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan(stream, x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights)
    check_pool_inputs("pooled_mix_linear", x, weight, bias, a_stack, b_stack, scales, sample_slots)
    require(sample_weights.shape == sample_slots.shape and sample_weights.device == x.device,
            lambda: f"pooled_mix_linear: sample_weights must be like sample_slots {tuple(sample_slots.shape)} on "
            f"{x.device}, got {tuple(sample_weights.shape)} on {sample_weights.device}")
    (M, K), N, R = x.shape, weight.shape[0], a_stack.shape[1]
    batch, positions = sample_slots.shape
    T = M // batch
    out = new_empty((M, N), x.dtype, x.device)
    if M == 0:
        return out
    inputs = (x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights)
    x, weight, bias, a_stack, b_stack = pool_operands(x, weight, bias, a_stack, b_stack)
    scales, sample_weights = (t.to(torch.float32).contiguous() for t in (scales, sample_weights))
    sample_slots = sample_slots.contiguous()
    operands = (x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights)
    # a plan replays with the caller's tensors, so only when no operand was converted
    planned = fast and all(a is b for a, b in zip(operands, inputs)) and may_plan()

    cfg = gemm_config(T, N, K, "mix")
    num_pid_t, num_pid_n = triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    grid = (batch * num_pid_t * num_pid_n,)
    launches = [] if planned else None
    launch(
        _pooled_mix_linear_kernel, grid, launches, _VARYING,
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, a_ptr=a_stack, b_ptr=b_stack,
        scales_ptr=scales, slots_ptr=sample_slots, weights_ptr=sample_weights, out_ptr=out,
        T=T, N=N, K=K, R=R, num_pid_t=num_pid_t, num_pid_n=num_pid_n,
        stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_om=out.stride(0),
        HAS_BIAS=bias is not None, NUM_POSITIONS=positions, RANK_PAD=dot_pad(R),
        EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    if planned and all(launches):
        keep_plan(_PLANS, key, _PooledMixPlan(launches[0], out.shape, x.dtype, x.device))
    return out


# the arguments a replay passes per call (utils.KernelLaunch); the rest (sizes, flags) is the plan's
_VARYING = ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "scales_ptr", "slots_ptr", "weights_ptr", "out_ptr")
_PLANS: dict = {}


class _PooledMixPlan:
    """The launch of one planned ``pooled_mix_linear_fwd`` key, with a fresh output."""

    def __init__(self, kernel_launch, out_shape, dtype, device):
        self.launch, self.out_shape, self.dtype, self.device = kernel_launch, out_shape, dtype, device

    def __call__(self, stream, x, weight, bias, a_stack, b_stack, scales, sample_slots, sample_weights):
        out = new_empty(self.out_shape, self.dtype, self.device)
        self.launch(stream, x, weight, x if bias is None else bias, a_stack, b_stack, scales, sample_slots,
                    sample_weights, out)
        return out
