"""Triton kernels and their launchers (no nn.Module, no diffusers). One op per file:

* ``fls_linear``  fused FLS linear: base GEMM + both LoRA deltas + kl/cosine/dot statistics +
  per-group decision + y0 + d_chosen, device-side, shape-only grids (CUDA-graph capturable).
* ``mix_linear``  y0 + coef[0] d_c + coef[1] d_s with coef a device tensor (direct / schedules).
* ``lora_shrink`` x [A_c; A_s]^T for both adapters in one pass, shared by the two ops.

Set TRITON_INTERPRET=1 *before* importing this package to run the kernels on CPU tensors.
"""
from .fls_linear import fls_linear_fwd
from .lora_shrink import lora_shrink
from .mix_linear import mix_linear_fwd
from .utils import INTERPRET, MAX_RANK

__all__ = ["INTERPRET", "MAX_RANK", "fls_linear_fwd", "lora_shrink", "mix_linear_fwd"]
