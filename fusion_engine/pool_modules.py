"""The fused stand-ins of Linear and Conv2d layers under a pool fusion: every image fuses the LoRAs it names."""
from __future__ import annotations

import torch

from . import ops
from .modules import DynamicLoRALayer
from .ops.pooled import pooled_fls_conv2d, pooled_fls_linear, pooled_mix_conv2d


class PooledLoRALinear(DynamicLoRALayer):
    """A Linear layer whose LoRAs come from the context's pool, per image (``PoolContext.sample_slots``).

    N-way FLS runs the pooled reference op on every device; the static policies run the pooled Triton kernel
    (``csrc_triton/pooled_mix_linear.py``) where the backend resolves to triton. Seen from outside it is the base
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
        if context.policy.uses_divergence:
            row_group, groups = context.row_groups(batch, rows.shape[0] // batch, x.device)
            out, scores, choice = pooled_fls_linear(
                rows, base.weight, base.bias, held.a, held.b, held.scales * context.lora_scale, held.present, slots,
                row_group, groups, context.policy.divergence,
            )
            self.keep_decisions(choice, scores)
        else:
            out = ops.pooled_mix_linear(rows, base.weight, base.bias, held.a, held.b, held.scales, slots,
                                        context.sample_weights(batch, x.device, self.name),
                                        backend=ops.resolve_backend(context.backend, x.device))
        return out.reshape(*lead, out.shape[-1])

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
