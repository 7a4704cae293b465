"""Fused stand-ins for LoRA-targeted layers, one family for a pair and a pool: each keeps the original module
untouched inside it, its bank of adapters and the shared context.

The bank: a pair's layer holds its two entries (subject, style: factors cast to the base weight, each with its own
rank (0 = absent), scale and DoRA gain); a pool's layer reads the pool's stacks for it (``LoRAPool.layer``: every
slot's factors padded to one rank, with per-slot scales and presence). The assignment is the context's. A uniform one
(a pair; a pool batch whose images all name the same one or two LoRAs, whose entries the layer then loads from the
pool) runs the pair ops (two 2-D matmuls: ``ops.fls_linear`` / ``ops.mix_linear``); a mixed pool batch runs the pooled
ops over the slots each image names. ``DynamicLoRALinear`` and ``DynamicLoRAConv2d`` are siblings.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..errors import LayerAttributeError
from ..ops.pooled import pooled_fls_conv2d, pooled_mix_conv2d
from ..ops.reference import accumulation_dtype, base_linear, fls_select, from_pixel_rows, lora_delta, pixel_rows
from .context import STATIC_POSITIONS


def absent_factors(base: nn.Module):
    """(lora_a, lora_b, scale, dora_gain) of an absent adapter at ``base``: rank-0 factors, scale 0, no gain."""
    weight = base.weight
    lora_a = weight.new_zeros(0, *weight.shape[1:])
    lora_b = weight.new_zeros(weight.shape[0], 0, *([1, 1] if weight.ndim == 4 else []))
    return lora_a, lora_b, 0.0, weight.new_zeros(0, dtype=accumulation_dtype(weight.dtype))


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


def pool_entry(pool, name: str, base: nn.Module, layer: str):
    """(lora_a, lora_b, scale, dora_gain) of pool LoRA ``name`` at ``layer``, shaped for ``base`` as
    ``fit.layer_factors`` gives a pair's (the LoRA's own rank, not the pool's padded one); None where it is absent."""
    if name not in pool or layer not in pool.lora_layers(name):
        return None
    (lora_a, lora_b), scale = pool.factors(name, layer), pool.lora_layers(name)[layer][1]
    weight, magnitude = base.weight, pool.magnitudes(layer).get(pool.slot(name))
    gain = absent_factors(base)[3] if magnitude is None else dora_gain(weight, lora_a, lora_b, scale, magnitude)
    lora_b = lora_b.reshape(*lora_b.shape, *weight.shape[2:] and (1, 1))  # a conv's B: a 1x1 conv
    return lora_a.reshape(-1, *weight.shape[1:]), lora_b, scale, gain


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
        self.set_entries(subject, style)
        self.context = context
        self._last_choice: dict[tuple, torch.Tensor] = {}
        self.last_size: dict | None = None  # backend="auto" on CUDA: the last call's size class, for describe()
        self._register_load_state_dict_pre_hook(_keys_into_base)

    def set_entries(self, subject, style) -> None:
        """The pair's entries at this layer, ``(lora_a, lora_b, scale, dora_gain)`` as ``fit.layer_factors`` resolves
        them (None: absent, rank 0); a pool layer's are a uniform batch's LoRAs (``uniform``), absent before."""
        for role, entry in (("subject", subject), ("style", style)):
            lora_a, lora_b, scale, gain = entry or absent_factors(self.base)
            setattr(self, f"{role}_scale", scale)
            # Non-persistent: an attached model's state_dict stays the base model's plus "base." paths.
            for part, tensor in (("a", lora_a), ("b", lora_b), ("gain", gain)):  # DoRA gain: (out,); empty otherwise
                self.register_buffer(f"{role}_{part}", tensor, persistent=False)
        # what every call reads, as plain attributes (a buffer is an nn.Module.__getattr__ lookup per read)
        subject_rank, style_rank = self.subject_a.shape[0], self.style_a.shape[0]
        self.__dict__.update(subject_rank=subject_rank, style_rank=style_rank, has_subject=subject_rank > 0,
                             has_style=style_rank > 0,
                             has_dora=self.subject_gain.numel() > 0 or self.style_gain.numel() > 0)

    def uniform(self, batch: int | None = None) -> bool:
        """Whether a pool forward (of ``batch`` rows, checked as the pooled path checks them) runs the pair path: every
        image names the same one or two LoRAs (``context.uniform``, decided once per assignment). This layer's entries
        are then those LoRAs', as a pair attach resolves them, loaded from the pool once per assignment and version."""
        context = self.context
        if context.uniform is None:
            return False
        if batch is not None:
            context.check_images(batch)
        if self.__dict__.get("_loaded") != (context.uniform, context.pool.version):
            context.image_slots(0, context.uniform)  # a LoRA removed since the assignment: the pooled path's error
            entries = [pool_entry(context.pool, name, self.base, self.name) for name in context.uniform]
            self.set_entries(*entries, *[None] * (2 - len(entries)))
            self.__dict__["_loaded"] = (context.uniform, context.pool.version)
        return True

    def drop_uniform(self) -> None:
        """Back to a pool layer's empty entries once the batch is mixed (the pre-hook calls it): the uniform batch's
        LoRAs (their B factors and DoRA gains are copies) are not held past it."""
        if self.__dict__.pop("_loaded", None) is not None:
            self.set_entries(None, None)

    def _pool_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """A pool forward's output, None where it runs the pair path (``uniform``): the pooled ops for a mixed batch,
        the base layer where no pool LoRA (of a uniform batch: neither) adapts the layer, as a pair attach leaves it
        (a uniform batch's FLS keeps the base position, -1, per group)."""
        batch = x.shape[0] if x.ndim > 1 else 1
        held = self.context.pool.layer(self.name)
        if not self.uniform(batch):
            return self.base(x) if held is None else self._pooled_forward(x, held, self.context.sample_slots(
                batch, x.device))
        if self.has_subject or self.has_style:
            return None
        out = self.base(x)
        if self.context.policy.uses_divergence:
            groups = self.context.row_groups(x.shape[0], out[0].numel() // self.base.weight.shape[0], x.device)[1]
            self.keep_decisions(torch.full((groups,), -1, device=x.device))
        return out

    def _select(self, x: torch.Tensor, y0: torch.Tensor, subject_raw: torch.Tensor, style_raw: torch.Tensor,
                rows_per_sample: int, to_rows=lambda t: t, from_rows=lambda t: t) -> torch.Tensor:
        """The reference rule on the base output ``y0`` and both raw deltas, DoRA applied (``branch_delta``): a static
        policy's weighted sum, or FLS's choice per group on rows (``to_rows``/``from_rows``: a conv's pixels)."""
        context, bias = self.context, self.base.bias
        base_out = y0 if bias is None or not self.has_dora else y0 - bias.to(y0.dtype).reshape(-1, *[1] * (y0.ndim - 2))
        subject_delta = self.branch_delta("subject", base_out, subject_raw)
        style_delta = self.branch_delta("style", base_out, style_raw)
        if not context.policy.uses_divergence:  # (a conv's plain LoRA runs its own static path)
            subject_weight, style_weight = context.pair_weights(self)
            return (y0 + subject_weight * subject_delta + style_weight * style_delta).to(x.dtype)
        row_group, groups = context.row_groups(x.shape[0], rows_per_sample, x.device)
        out, subject_score, style_score, choice = fls_select(
            to_rows(y0), to_rows(subject_delta), to_rows(style_delta), row_group, groups, context.policy.divergence,
            self.has_subject, self.has_style)
        self.keep_decisions(choice, subject_score, style_score)
        return from_rows(out).to(x.dtype)

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

    def static_coefficients(self, device) -> torch.Tensor:
        """Policy weights times LoRA scales as a (2,) float32 device tensor: this layer's row of the table the
        model's forward pre-hook fills (``FusionContext.update_coefficients``), so no step reaches a graph.
        A forward that bypassed the attached model's own (a submodule called directly) computes it here."""
        context = self.context
        if context.in_forward:
            return context.coefficients[str(device)][self.index]
        return torch.tensor(context.layer_coefficients(self, device), dtype=torch.float32, device=device)

    def keep_decisions(self, choice, *scores) -> None:
        """Hold this forward's decisions until the model's forward ends (``FusionContext.collect``); outside the
        attached model's forward, record them at once. A uniform pool batch naming one LoRA keeps its score only."""
        context = self.context
        if not context.tracing:
            return
        if len(scores) == 2 and context.uniform is not None and len(context.uniform) == 1:
            scores = (scores[0][:, None],)  # the pool trace's (groups, 1) form
        if context.in_forward:  # into __dict__ directly (what collect pops): nn.Module.__setattr__ costs per call
            self.__dict__["kept_decisions"] = (choice, *scores)
        else:
            context.trace.record(context.step, self.index, *context.resolve_kept(self, (choice, *scores)))

    def _guess(self, groups: int, device, dtype: torch.dtype) -> torch.Tensor:
        """This layer's decisions at its previous call with this many groups (the subject, position 0, at first): the
        Triton kernel's speculation guess. Decisions barely change between denoising steps, so the kernel writes the
        guessed branch and only recomputes tiles whose group decided otherwise. A persistent buffer updated in place
        keeps CUDA-graph replays valid; a wrong guess costs a recompute, never another result."""
        key = (groups, str(device), dtype)
        if key not in self._last_choice:
            self._last_choice[key] = (torch.ones if dtype == torch.bool else torch.zeros)(groups, dtype=dtype,
                                                                                          device=device)
        return self._last_choice[key]

    def pool_gains(self, held) -> torch.Tensor | None:
        """DoRA on a pool: ``(S, N)`` gains of every slot against this layer's base weight (``dora_gain``; 1 for a
        slot that is not DoRA here), None when no pool LoRA is DoRA at this layer. Cached per pool version."""
        pool = self.context.pool
        magnitudes = pool.magnitudes(self.name)
        if not magnitudes:
            return None
        cached = self.__dict__.get("_pool_gains")
        if cached is None or cached[0] != pool.version:
            weight = self.base.weight
            gains = torch.ones(held.rows, held.b.shape[1], dtype=accumulation_dtype(weight.dtype), device=weight.device)
            for slot, magnitude in magnitudes.items():
                gains[slot] = dora_gain(weight, held.a[slot], held.b[slot], float(held.scales[slot]), magnitude)
            self.__dict__["_pool_gains"] = cached = (pool.version, gains)
        return cached[1]

    def _static(self, held, slots: torch.Tensor, device, gains) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot scales, per-row weights) of a pool's static policy, the call's LoRA scale folded into the weights (with
        DoRA into the scales: inside DoRA's gain, as a pair's ``branch_delta`` applies it); records each image's
        position kept (the one LoRA weighted and adapting the layer, ``ALL`` for several, ``-1`` for none)."""
        context = self.context
        if gains is None:
            scales, weights = held.scales, context.sample_weights(slots.shape[0], device, self.name)
        else:
            scales = self.slot_scales(held)
            weights = context.sample_weights(slots.shape[0], device, self.name, scaled=False)
        if context.tracing:  # the positions kept are built on the host after the forward (FusionContext.collect)
            self.keep_decisions(STATIC_POSITIONS, gains is None)
        return scales, weights

    def slot_scales(self, held) -> torch.Tensor:
        """The pool slots' scales times the call's LoRA scale (``cross_attention_kwargs["scale"]``); the stack itself at
        the usual scale 1, so a call pays no tensor op (on a GPU, no launch) for it."""
        scale = self.context.lora_scale
        return held.scales if scale == 1.0 else held.scales * scale

    def extra_repr(self) -> str:
        if self.context.pool is not None:
            held = self.context.pool.layer(self.name)
            return f"{self.name}, pool rank={held.rank if held is not None else 0}"
        dora = ", dora" if self.has_dora else ""
        return f"{self.name}, subject_rank={self.subject_rank}, style_rank={self.style_rank}{dora}"


class DynamicLoRALinear(DynamicLoRALayer):
    """A Linear layer. Triton backend: the pair kernels (``fls_linear`` / ``mix_linear``) for a pair or a uniform pool
    batch, the pooled ones for a mixed one, each speculating on this layer's previous decisions; elsewhere, DoRA, and
    in a pooled forward that carries a gradient to ``x`` (the pooled kernels are forward only), the reference ops."""

    def _backend(self, op: str, rows: torch.Tensor, rank: int) -> str:
        """The concrete backend of this call: ``"auto"`` on CUDA picks by the call's size class on the recorded
        measurements (``ops/backend_choice.py``), in the mode it runs in (CUDA-graph capture or compile, else eager)."""
        if self.context.backend != "auto" or rows.device.type != "cuda":
            return ops.resolve_backend(self.context.backend, rows.device)
        compiling = torch.compiler.is_compiling()
        capturing = compiling or torch.cuda.is_current_stream_capturing()
        size = dict(op=op, M=rows.shape[0], N=self.base.weight.shape[0], K=rows.shape[1], rank=rank,
                    dtype=rows.dtype, mode="graph" if capturing else "eager")
        if not compiling:  # no module mutation inside a traced graph
            self.last_size = size
        return ops.resolve_backend("auto", rows.device, size)

    def _pooled_forward(self, x: torch.Tensor, held, slots: torch.Tensor) -> torch.Tensor:
        context, base, rows = self.context, self.base, x.reshape(-1, x.shape[-1])
        op = "pooled_fls" if context.policy.uses_divergence else "pooled_mix"
        backend = self._backend(op, rows, held.a.shape[-2])
        gains = self.pool_gains(held)
        if backend == "triton" and (gains is not None or (torch.is_grad_enabled() and rows.requires_grad)):
            backend = "reference"  # the pooled kernels are forward only and plain LoRA: else the reference (autograd)
        dora = {} if gains is None else {"gains": gains}
        if not context.policy.uses_divergence:
            scales, weights = self._static(held, slots, x.device, gains)
            out = ops.pooled_mix_linear(rows, base.weight, base.bias, held.a, held.b, scales, slots, weights,
                                        backend=backend, **dora)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        row_group, groups = context.row_groups(slots.shape[0], rows.shape[0] // slots.shape[0], x.device)
        guess = self._guess(groups, x.device, torch.int64) if backend == "triton" else None
        out, scores, choice = ops.pooled_fls_linear(
            rows, base.weight, base.bias, held.a, held.b, self.slot_scales(held), held.present, slots,
            row_group, groups, context.policy.divergence, backend=backend, prev_choice=guess, **dora,
        )
        if guess is not None:
            guess.copy_(choice)
        self.keep_decisions(choice, scores)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, base = self.context, self.base
        if not context.enabled:
            return base(x)
        if context.pool is not None and (out := self._pool_forward(x)) is not None:
            return out
        lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
        subject_scale, style_scale = self.lora_scales
        if self.has_dora:  # the reference path: the fused kernels take plain LoRA only
            raw = [lora_delta(rows, a, b) for a, b in ((self.subject_a, self.subject_b), (self.style_a, self.style_b))]
            out = self._select(x, base_linear(rows, base.weight, base.bias), *raw, rows.shape[0] // max(x.shape[0], 1))
            return out.reshape(*lead, out.shape[-1])
        backend = self._backend("fls" if context.policy.uses_divergence else "mix", rows,
                                max(self.subject_rank, self.style_rank))
        if context.policy.uses_divergence:
            row_group, groups = context.row_groups(x.shape[0], rows.shape[0] // max(x.shape[0], 1), x.device)
            guess = self._guess(groups, x.device, torch.bool) if backend == "triton" else None
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
    """LoCon layers: the same rule with the channel dimension per pixel, the reference ops on every backend (there is
    no Triton conv kernel). A mixed pool batch runs the pooled conv ops (grouped convolutions over the samples, the
    base layer's stride, padding, dilation and padding mode)."""

    def _pooled_forward(self, x: torch.Tensor, held, slots: torch.Tensor) -> torch.Tensor:
        context, base, batch = self.context, self.base, x.shape[0]
        gains = self.pool_gains(held)
        if not context.policy.uses_divergence:
            scales, weights = self._static(held, slots, x.device, gains)
            return pooled_mix_conv2d(x, base, held.a, held.b, scales, slots, weights, gains=gains)
        out, scores, choice = pooled_fls_conv2d(
            x, base, held.a, held.b, self.slot_scales(held), held.present, slots,
            lambda pixels: context.row_groups(batch, pixels, x.device), context.policy.divergence, gains=gains,
        )
        self.keep_decisions(choice, scores)
        return out

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
        if context.pool is not None:
            if x.ndim == 3:  # an unbatched input, as nn.Conv2d takes it
                return self.forward(x.unsqueeze(0)).squeeze(0)
            if (out := self._pool_forward(x)) is not None:
                return out
        bias = None if base.bias is None else base.bias.to(dtype)
        y0 = self._conv(x, base.weight.to(dtype), bias).to(accumulation_dtype(dtype))
        factors = ((self.subject_a, self.subject_b), (self.style_a, self.style_b))
        if not context.policy.uses_divergence and not self.has_dora:
            coef, out = self.static_coefficients(x.device).to(y0.dtype), y0
            for index, (lora_a, lora_b) in enumerate(factors):
                if lora_a.shape[0] > 0:  # an absent LoRA adds nothing (its zeros are not materialised)
                    out = out + coef[index] * self._raw_delta(x, y0, lora_a, lora_b)
            return out.to(dtype)
        raw = [self._raw_delta(x, y0, lora_a, lora_b) for lora_a, lora_b in factors]
        return self._select(x, y0, *raw, y0.shape[2] * y0.shape[3], pixel_rows,
                            lambda rows: from_pixel_rows(rows, y0.shape[0], *y0.shape[2:]))


def _keys_into_base(state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a base-model key (``prefix + "weight"``) loads into the base layer."""
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)
