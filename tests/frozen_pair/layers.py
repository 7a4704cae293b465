"""Fused stand-ins for LoRA-targeted layers. Each keeps the original module untouched inside it."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion_engine.errors import LayerAttributeError
from fusion_engine.lora.checks import check_cast_factor, check_layer_scale
from fusion_engine.lora.weights import delta_weight

from . import ops
from .reference import accumulation_dtype, base_linear, fls_select, from_pixel_rows, lora_delta, pixel_rows
from .trace import choice_code


def _factors(lora, name: str, base: nn.Module):
    """(lora_a, lora_b, scale, dora_gain) of ``lora`` at ``name`` cast to the base weight; rank-0 factors if absent.

    ``dora_gain`` is empty unless the layer is DoRA (see ``dora_gain``).

    A ``LoRAValueError`` names the layer and factor when the cast overflows (float32 7e4 -> float16 Inf)
    or the effective scale is not finite in float32.
    """
    weight = base.weight
    no_gain = weight.new_zeros(0, dtype=accumulation_dtype(weight.dtype))
    if lora is None or name not in lora.layers:
        lora_a = weight.new_zeros(0, *weight.shape[1:])
        lora_b = weight.new_zeros(weight.shape[0], 0, *([1, 1] if weight.ndim == 4 else []))
        return lora_a, lora_b, 0.0, no_gain
    layer = lora.layers[name]
    lora_a = layer.lora_a.to(device=weight.device, dtype=weight.dtype)
    lora_b = layer.lora_b.to(device=weight.device, dtype=weight.dtype)
    check_cast_factor(lora.source, name, "lora_a", layer.lora_a, lora_a)
    check_cast_factor(lora.source, name, "lora_b", layer.lora_b, lora_b)
    check_layer_scale(lora.source, name, lora.layer_scale(name))
    if weight.ndim == 2 and lora_a.ndim == 4:  # kohya stores some Linear LoRAs as 1x1 convs
        lora_a, lora_b = lora_a.flatten(1), lora_b.flatten(1)
    scale = lora.layer_scale(name)
    gain = no_gain if layer.magnitude is None else dora_gain(weight, layer.lora_a, layer.lora_b, scale, layer.magnitude)
    return lora_a, lora_b, scale, gain


def dora_gain(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output-row factor ``m / ||W + s B A||`` (PEFT's ``mag_norm_scale``), a constant.

    As in PEFT the norm is over each output row of the merged weight (all input dims of a conv),
    with ``s`` the full LoRA scale (alpha / rank times the user's), and detached: it is data, not
    a function of the factors. Computed once at attach, at accumulation precision.
    """
    acc = accumulation_dtype(weight.dtype)
    base = weight.detach().to(acc).flatten(1)
    merged = base + scale * (lora_b.flatten(1).to(base) @ lora_a.flatten(1).to(base))
    return magnitude.detach().to(base).reshape(-1) / torch.linalg.norm(merged, dim=1)


class DynamicLoRALayer(nn.Module):
    """Common part: the base module, both LoRA factor pairs (rank 0 = absent) and the shared context.

    Seen from outside it is the base layer: attributes it lacks (``weight``, ``bias``, ``in_features``,
    ``out_channels``, ...) are the base layer's, and ``state_dict`` / ``load_state_dict`` use the base layer's
    own keys (``to_q.weight``, not ``to_q.base.weight``), so a model saved while attached is the base model.
    """

    def __init__(self, base: nn.Module, name: str, index: int, subject, style, context):
        super().__init__()
        self.base = base
        self.name, self.index = name, index
        subject_a, subject_b, self.subject_scale, subject_gain = _factors(subject, name, base)
        style_a, style_b, self.style_scale, style_gain = _factors(style, name, base)
        # Non-persistent: an attached model's state_dict stays the base model's plus "base." paths.
        self.register_buffer("subject_a", subject_a, persistent=False)
        self.register_buffer("subject_b", subject_b, persistent=False)
        self.register_buffer("style_a", style_a, persistent=False)
        self.register_buffer("style_b", style_b, persistent=False)
        self.register_buffer("subject_gain", subject_gain, persistent=False)  # DoRA: (out,); empty otherwise
        self.register_buffer("style_gain", style_gain, persistent=False)
        self.context = context
        self._last_choice: dict[tuple, torch.Tensor] = {}
        self._register_load_state_dict_pre_hook(_keys_into_base)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__"):
                raise
        try:
            return getattr(base, name)
        except AttributeError:
            raise LayerAttributeError(
                f"{type(self).__name__} at {self.__dict__.get('name')!r} (a fused {type(base).__name__}) has no "
                f"attribute {name!r}, and neither has its base layer (.base)"
            ) from None

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The base layer's own state dict (its keys, its tensors): the fusion adds nothing persistent."""
        return self.base.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @property
    def lora_scales(self) -> tuple[float, float]:
        """(subject, style) scales of this forward: each LoRA's own times ``cross_attention_kwargs["scale"]``."""
        scale = self.context.lora_scale
        return self.subject_scale * scale, self.style_scale * scale

    @property
    def subject_rank(self) -> int:
        return self.subject_a.shape[0]

    @property
    def style_rank(self) -> int:
        return self.style_a.shape[0]

    @property
    def has_subject(self) -> bool:
        return self.subject_rank > 0

    @property
    def has_style(self) -> bool:
        return self.style_rank > 0

    @property
    def has_dora(self) -> bool:
        return self.subject_gain.numel() > 0 or self.style_gain.numel() > 0

    def branch_delta(self, branch: str, base_out: torch.Tensor, raw_delta: torch.Tensor) -> torch.Tensor:
        """What one branch adds to the base output, at ``raw_delta``'s precision.

        LoRA: ``s * raw_delta``. DoRA: the DoRA layer's output minus the base output, i.e. PEFT's
        ``(g - 1) * base_out + g * s * raw_delta`` with ``g = dora_gain(...)`` per output channel and
        ``base_out`` the base output without its bias. FLS scores and selects this delta like any other.
        ``raw_delta`` is the unscaled ``(x A^T) B^T``; channels are the last dim (linear) or dim 1 (conv).
        """
        subject_scale, style_scale = self.lora_scales
        scale, gain = (subject_scale, self.subject_gain) if branch == "subject" else (style_scale, self.style_gain)
        if gain.numel() == 0:
            return scale * raw_delta
        gain = gain.to(raw_delta.dtype).reshape(-1, *([1] * (raw_delta.ndim - 2)))
        return (gain - 1) * base_out + gain * (scale * raw_delta)

    def delta_weight(self, branch: str) -> torch.Tensor:
        """Unscaled B @ A of one branch, shaped like the base weight (float32)."""
        lora_a, lora_b = (self.subject_a, self.subject_b) if branch == "subject" else (self.style_a, self.style_b)
        return delta_weight(lora_a, lora_b)

    def policy_weights(self) -> tuple[float, float]:
        """The static policy's (subject, style) weights for this call (the pre-hook already kept the decision)."""
        return self.context.policy.weights(self, self.context)

    def static_coefficients(self, device) -> torch.Tensor:
        """Policy weights times LoRA scales as a (2,) float32 device tensor: this layer's row of the table the
        model's forward pre-hook fills (``FusionContext.update_coefficients``), so no step reaches a graph.
        A forward that bypassed the attached model's own (a submodule called directly) computes it here."""
        context = self.context
        if context.in_forward:
            return context.coefficients[str(device)][self.index]
        weights = context.policy.weights(self, context)
        self.keep_decisions(choice_code(weights[0] * self.has_subject, weights[1] * self.has_style))
        subject_scale, style_scale = self.lora_scales
        return torch.tensor([weights[0] * subject_scale, weights[1] * style_scale], dtype=torch.float32, device=device)

    def keep_decisions(self, choice, subject_score=None, style_score=None) -> None:
        """Hold this forward's decisions until the model's forward ends (``FusionContext.collect``); outside the
        attached model's forward, record them at once."""
        context = self.context
        if not context.tracing:
            return
        if context.in_forward:  # into __dict__ directly (what collect pops): nn.Module.__setattr__ costs per call
            self.__dict__["kept_decisions"] = (choice, subject_score, style_score)
        else:
            context.trace.record(context.step, self.index, choice, subject_score, style_score)

    def extra_repr(self) -> str:
        dora = ", dora" if self.has_dora else ""
        return f"{self.name}, subject_rank={self.subject_rank}, style_rank={self.style_rank}{dora}"


class DynamicLoRALinear(DynamicLoRALayer):
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

    def _dora_forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A layer with a DoRA branch: the reference path (the fused kernels take plain LoRA only)."""
        context, base = self.context, self.base
        y0 = base_linear(rows, base.weight, base.bias)
        base_out = y0 if base.bias is None else y0 - base.bias.to(y0.dtype)
        subject_delta = self.branch_delta("subject", base_out, lora_delta(rows, self.subject_a, self.subject_b))
        style_delta = self.branch_delta("style", base_out, lora_delta(rows, self.style_a, self.style_b))
        if not context.policy.uses_divergence:
            subject_weight, style_weight = self.policy_weights()
            return (y0 + subject_weight * subject_delta + style_weight * style_delta).to(x.dtype)
        row_group, groups = context.row_groups(x.shape[0], rows.shape[0] // max(x.shape[0], 1), x.device)
        out, subject_score, style_score, choice = fls_select(
            y0, subject_delta, style_delta, row_group, groups, context.policy.divergence, self.has_subject,
            self.has_style,
        )
        self.keep_decisions(choice, subject_score, style_score)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, base = self.context, self.base
        if not context.enabled:
            return base(x)
        subject_scale, style_scale = self.lora_scales
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if self.has_dora:
            out = self._dora_forward(x, rows)
            return out.reshape(*lead, out.shape[-1])
        backend = ops.resolve_backend(context.backend, x.device)
        if context.policy.uses_divergence:
            row_group, groups = context.row_groups(x.shape[0], rows.shape[0] // max(x.shape[0], 1), x.device)
            guess = self._speculation_buffer(groups, x.device) if backend == "triton" else None
            out, subject_score, style_score, choice = ops.fls_linear(
                rows, base.weight, base.bias, self.subject_a, self.subject_b, subject_scale, self.style_a, self.style_b,
                style_scale, row_group, groups, context.policy.divergence, backend=backend, prev_choice=guess,
            )
            if guess is not None:
                guess.copy_(choice)
            self.keep_decisions(choice, subject_score, style_score)
        else:
            coef = self.static_coefficients(x.device)
            out = ops.mix_linear(
                rows, base.weight, base.bias, self.subject_a, self.subject_b, self.style_a, self.style_b, coef,
                backend=backend,
            )
        return out.reshape(*lead, out.shape[-1])


class DynamicLoRAConv2d(DynamicLoRALayer):
    """LoCon layers: the same rule with the channel dimension per pixel (reference path only)."""

    def _conv(self, x, weight, bias=None):
        """The base layer's convolution (stride, padding and padding mode) with another weight."""
        return self.base._conv_forward(x, weight, bias)

    def _raw_delta(self, x, y0, lora_a, lora_b):
        """Unscaled B * (A * x), convolved in x's dtype, returned at y0's precision; zeros for an absent LoRA."""
        if lora_a.shape[0] == 0:
            return torch.zeros_like(y0)
        return F.conv2d(self._conv(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)).to(y0.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the linear ops: the convolutions in the model's dtype, everything after them at accumulation precision.
        context, base, dtype = self.context, self.base, x.dtype
        if not context.enabled:
            return base(x)
        bias = None if base.bias is None else base.bias.to(dtype)
        y0 = self._conv(x, base.weight.to(dtype), bias).to(accumulation_dtype(dtype))
        if not context.policy.uses_divergence and not self.has_dora:
            coef, out = self.static_coefficients(x.device).to(y0.dtype), y0
            for index, (lora_a, lora_b) in enumerate(((self.subject_a, self.subject_b), (self.style_a, self.style_b))):
                if lora_a.shape[0] > 0:  # an absent LoRA adds nothing (its zeros are not materialised)
                    out = out + coef[index] * self._raw_delta(x, y0, lora_a, lora_b)
            return out.to(dtype)
        subject_raw = self._raw_delta(x, y0, self.subject_a, self.subject_b)
        style_raw = self._raw_delta(x, y0, self.style_a, self.style_b)
        base_out = y0 if base.bias is None or not self.has_dora else y0 - base.bias.to(y0.dtype).reshape(-1, 1, 1)
        subject_delta = self.branch_delta("subject", base_out, subject_raw)
        style_delta = self.branch_delta("style", base_out, style_raw)
        if not context.policy.uses_divergence:  # DoRA (plain LoRA returned above)
            subject_weight, style_weight = self.policy_weights()
            return (y0 + subject_weight * subject_delta + style_weight * style_delta).to(dtype)
        batch, _, height, width = y0.shape
        row_group, groups = context.row_groups(batch, height * width, x.device)
        out, subject_score, style_score, choice = fls_select(
            pixel_rows(y0), pixel_rows(subject_delta), pixel_rows(style_delta), row_group, groups,
            context.policy.divergence, self.has_subject, self.has_style,
        )
        self.keep_decisions(choice, subject_score, style_score)
        return from_pixel_rows(out, batch, height, width).to(dtype)


def _keys_into_base(state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a base-model key (``prefix + "weight"``) loads into the base layer."""
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)
