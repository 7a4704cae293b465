"""The fused stand-ins of Linear and Conv2d layers under a pool fusion: every image fuses the LoRAs it names."""
from __future__ import annotations

import torch

from .. import ops
from ..ops.pooled import pooled_fls_conv2d, pooled_mix_conv2d
from .layers import DynamicLoRALayer


class PooledLoRALinear(DynamicLoRALayer):
    """A Linear layer whose LoRAs come from the context's pool, per image (``PoolContext.sample_slots``).

    Where the backend resolves to triton, N-way FLS runs the pooled FLS kernel (``csrc_triton/pooled_fls_linear.py``,
    speculating on this layer's choices of its previous call) and the static policies the pooled mix kernel
    (``csrc_triton/pooled_mix_linear.py``); elsewhere, and in a forward that carries a gradient to ``x`` (the
    kernels are forward only), the pooled reference ops. Seen from outside it is the base
    layer (attributes, ``state_dict``), as every ``DynamicLoRALayer``. A layer no pool LoRA adapts any more (all
    removed) runs as its base layer.
    """

    def __init__(self, base: torch.nn.Module, name: str, index: int, context):
        super().__init__(base, name, index, None, None, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, base = self.context, self.base
        held = context.pool.layer(self.name)
        if not context.enabled or held is None:
            return base(x)
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        batch = x.shape[0] if x.ndim > 1 else 1
        slots = context.sample_slots(batch, x.device)
        backend = ops.resolve_backend(context.backend, x.device)
        if backend == "triton" and torch.is_grad_enabled() and rows.requires_grad:
            backend = "reference"  # the pooled kernels are forward only: a gradient pass runs the reference (autograd)
        if context.policy.uses_divergence:
            row_group, groups = context.row_groups(batch, rows.shape[0] // batch, x.device)
            guess = self._choice_buffer(groups, x.device) if backend == "triton" else None
            out, scores, choice = ops.pooled_fls_linear(
                rows, base.weight, base.bias, held.a, held.b, held.scales * context.lora_scale, held.present, slots,
                row_group, groups, context.policy.divergence, backend=backend, prev_choice=guess,
            )
            if guess is not None:
                guess.copy_(choice)
            self.keep_decisions(choice, scores)
        else:
            out = ops.pooled_mix_linear(rows, base.weight, base.bias, held.a, held.b, held.scales, slots,
                                        context.sample_weights(batch, x.device, self.name), backend=backend)
        return out.reshape(*lead, out.shape[-1])

    def _choice_buffer(self, groups: int, device) -> torch.Tensor:
        """This layer's choices at its previous call with this many groups (position 0 at first): the pooled
        kernel's speculation guess. A persistent buffer updated in place keeps CUDA-graph replays valid; a new
        assignment only makes the guess wrong for a step (a recompute of the affected tiles, never another result).
        """
        key = (groups, str(device))
        if key not in self._last_choice:
            self._last_choice[key] = torch.zeros(groups, dtype=torch.int64, device=device)
        return self._last_choice[key]

    def extra_repr(self) -> str:
        held = self.context.pool.layer(self.name)
        return f"{self.name}, pool rank={held.rank if held is not None else 0}"


class PooledLoRAConv2d(PooledLoRALinear):
    """A Conv2d layer (conv / LoCon LoRAs) whose LoRAs come from the context's pool, per image.

    Every policy runs the pooled conv reference ops (``ops/pooled.py``: grouped convolutions over the samples, the
    base layer's stride, padding, dilation and padding mode) whatever the backend, as single-pair conv layers do:
    there is no Triton conv kernel. FLS decides per group over output pixels with channels at dim 1, exactly as
    ``DynamicLoRAConv2d`` decides for a pair.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, base = self.context, self.base
        held = context.pool.layer(self.name)
        if not context.enabled or held is None:
            return base(x)
        if x.ndim == 3:  # an unbatched input, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        batch = x.shape[0]
        slots = context.sample_slots(batch, x.device)
        if not context.policy.uses_divergence:
            return pooled_mix_conv2d(x, base, held.a, held.b, held.scales, slots,
                                     context.sample_weights(batch, x.device, self.name))
        out, scores, choice = pooled_fls_conv2d(
            x, base, held.a, held.b, held.scales * context.lora_scale, held.present, slots,
            lambda pixels: context.row_groups(batch, pixels, x.device), context.policy.divergence,
        )
        self.keep_decisions(choice, scores)
        return out
