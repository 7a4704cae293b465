"""Triton kernels and their launchers (no nn.Module, no diffusers). One op per file:

* ``fls_linear``  fused FLS linear: base GEMM + both LoRA deltas + kl/cosine/dot statistics +
  per-group decision + y0 + d_chosen, device-side, shape-only grids (CUDA-graph capturable).
* ``mix_linear``  y0 + coef[0] d_subject + coef[1] d_style with coef a device tensor (direct / schedules).
* ``lora_shrink`` x [subject_a; style_a]^T for both adapters in one pass, shared by the two ops; the pool's shrink,
  x_b A_slot^T once per row and position, each slot at its own padded rank, shared by the two pooled ops.
* ``pooled_mix_linear`` the LoRA pool's static-weight linear: each sample adds its own LoRAs by a slot table.
* ``pooled_fls_linear`` the LoRA pool's N-way FLS linear: fls_linear's speculate + fix-up over each sample's slots.
* ``utils``       limits (MAX_RANK, SUPPORTED_DTYPES), the launch contract, tile configs, tile helpers.
* ``testing``     the accuracy checks shared by tests/test_kernels.py and bench/gpu_table.py.

Set TRITON_INTERPRET=1 *before* importing this package to run the kernels on CPU tensors.
"""
from .fls_linear import DIVERGENCE_CODES, fls_linear_fwd
from .lora_shrink import lora_shrink
from .mix_linear import mix_linear_fwd
from .pooled_fls_linear import pooled_fls_linear_fwd
from .pooled_mix_linear import pooled_mix_linear_fwd
from .utils import INTERPRET, MAX_RANK, SUPPORTED_DTYPES

__all__ = ["DIVERGENCE_CODES", "INTERPRET", "MAX_RANK", "SUPPORTED_DTYPES", "fls_linear_fwd", "lora_shrink",
           "mix_linear_fwd", "pooled_fls_linear_fwd", "pooled_mix_linear_fwd"]
