"""Fused stand-ins for LoRA-targeted layers. Each keeps the original module untouched inside it."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops.reference import accumulation_dtype, fls_select
from .trace import choice_code


def _factors(lora, name: str, base: nn.Module):
    """(down, up, scale) of ``lora`` at ``name`` cast to the base weight, or rank-0 factors if absent."""
    weight = base.weight
    if lora is None or name not in lora.layers:
        down = weight.new_zeros(0, *weight.shape[1:])
        up = weight.new_zeros(weight.shape[0], 0, *([1, 1] if weight.ndim == 4 else []))
        return down, up, 0.0
    layer = lora.layers[name]
    down = layer.down.to(device=weight.device, dtype=weight.dtype)
    up = layer.up.to(device=weight.device, dtype=weight.dtype)
    if weight.ndim == 2 and down.ndim == 4:  # kohya stores some Linear LoRAs as 1x1 convs
        down, up = down.flatten(1), up.flatten(1)
    return down, up, lora.layer_scale(name)


class FusedLayer(nn.Module):
    """Common part: the base module, both LoRA factor pairs (rank 0 = absent) and the shared context."""

    def __init__(self, base: nn.Module, name: str, index: int, subject, style, context):
        super().__init__()
        self.base = base
        self.name, self.index = name, index
        down_c, up_c, self.scale_c = _factors(subject, name, base)
        down_s, up_s, self.scale_s = _factors(style, name, base)
        # Non-persistent: an attached model's state_dict stays the base model's plus "base." paths.
        self.register_buffer("down_c", down_c, persistent=False)
        self.register_buffer("up_c", up_c, persistent=False)
        self.register_buffer("down_s", down_s, persistent=False)
        self.register_buffer("up_s", up_s, persistent=False)
        self.context = context
        self._coef_cache: dict[tuple, torch.Tensor] = {}
        self._last_choice: dict[tuple, torch.Tensor] = {}

    @property
    def rank_c(self) -> int:
        return self.down_c.shape[0]

    @property
    def rank_s(self) -> int:
        return self.down_s.shape[0]

    @property
    def has_subject(self) -> bool:
        return self.rank_c > 0

    @property
    def has_style(self) -> bool:
        return self.rank_s > 0

    def delta_weight(self, branch: str) -> torch.Tensor:
        """Unscaled B @ A of one branch, shaped like the base weight (float32)."""
        down, up = (self.down_c, self.up_c) if branch == "subject" else (self.down_s, self.up_s)
        return (up.flatten(1).float() @ down.flatten(1).float()).reshape(self.base.weight.shape)

    def static_coefficients(self, device) -> torch.Tensor:
        """Policy weights times LoRA scales as a (2,) float32 device tensor; cached per value."""
        context = self.context
        weights = context.policy.weights(self, context)
        context.record(self.index, choice_code(weights[0] * self.has_subject, weights[1] * self.has_style))
        key = (weights, str(device))
        if key not in self._coef_cache:
            values = [weights[0] * self.scale_c, weights[1] * self.scale_s]
            self._coef_cache[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._coef_cache[key]

    def extra_repr(self) -> str:
        return f"{self.name}, rank_subject={self.rank_c}, rank_style={self.rank_s}"


class FusedLoRALinear(FusedLayer):
    def _speculation_buffer(self, groups: int, device) -> torch.Tensor:
        """This layer's decisions at its previous call with this many groups (subject at first).

        Decisions barely change between denoising steps, so the kernel writes the guessed branch
        and only recomputes tiles whose group decided otherwise. A persistent buffer updated in
        place keeps CUDA-graph replays valid.
        """
        key = (groups, str(device))
        if key not in self._last_choice:
            self._last_choice[key] = torch.ones(groups, dtype=torch.bool, device=device)
        return self._last_choice[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, base = self.context, self.base
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        backend = ops.resolve_backend(context.backend, x.device)
        if context.policy.uses_divergence:
            row_group, groups = context.row_groups(x.shape[0], rows.shape[0] // max(x.shape[0], 1), x.device)
            guess = self._speculation_buffer(groups, x.device) if backend == "triton" else None
            out, score_c, score_s, choose_c = ops.fls_linear(
                rows, base.weight, base.bias, self.down_c, self.up_c, self.scale_c, self.down_s, self.up_s,
                self.scale_s, row_group, groups, context.policy.divergence, backend=backend, prev_choose=guess,
            )
            if guess is not None:
                guess.copy_(choose_c)
            context.record(self.index, choose_c, score_c, score_s)
        else:
            coef = self.static_coefficients(x.device)
            out = ops.mix_linear(
                rows, base.weight, base.bias, self.down_c, self.up_c, self.down_s, self.up_s, coef, backend=backend
            )
        return out.reshape(*lead, out.shape[-1])


class FusedLoRAConv2d(FusedLayer):
    """LoCon layers: the same rule with the channel dimension per pixel (reference path only)."""

    def _conv(self, x, weight, bias=None):
        """The base layer's convolution (stride, padding and padding mode) with another weight."""
        return self.base._conv_forward(x, weight, bias)

    def _raw_delta(self, x, y0, down, up):
        """Unscaled B * (A * x) at y0's precision; zeros for an absent LoRA."""
        if down.shape[0] == 0:
            return torch.zeros_like(y0)
        return F.conv2d(self._conv(x, down.to(x.dtype)), up.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Everything at accumulation precision (as the linear ops): fp16 deltas cannot overflow here.
        context, base, dtype = self.context, self.base, x.dtype
        x = x.to(accumulation_dtype(dtype))
        y0 = self._conv(x, base.weight.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
        raw_c = self._raw_delta(x, y0, self.down_c, self.up_c)
        raw_s = self._raw_delta(x, y0, self.down_s, self.up_s)
        if not context.policy.uses_divergence:
            coef = self.static_coefficients(x.device)
            coef = coef.to(y0.dtype)
            return (y0 + coef[0] * raw_c + coef[1] * raw_s).to(dtype)
        batch, channels, height, width = y0.shape

        def to_rows(t):
            return t.permute(0, 2, 3, 1).reshape(-1, channels)

        row_group, groups = context.row_groups(batch, height * width, x.device)
        out, score_c, score_s, choose_c = fls_select(
            to_rows(y0), to_rows(self.scale_c * raw_c), to_rows(self.scale_s * raw_s), row_group, groups,
            context.policy.divergence, self.has_subject, self.has_style,
        )
        context.record(self.index, choose_c, score_c, score_s)
        return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(dtype)
