"""Validation of LoRA tensors: raw keys before diffusers converts them, then each (down, up, alpha) layer.

Raw checks run first so a message can name the key exactly as it is in the user's file.
"""
from __future__ import annotations

import math

import torch

from ..errors import LoRADtypeError, LoRAFormatError, LoRAShapeError, LoRAValueError, OptionError

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALPHA_DTYPES = FACTOR_DTYPES + (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ALPHA_SUFFIX = ".alpha"
# Scales reach the fused ops as float32 coefficients: a float64 alpha of 1e300 would be Inf there.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _first_bad_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0]) if bad.ndim else ()


def _check_finite(source: str, key: str, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not finite.all():
        nans = int(torch.isnan(tensor).sum())
        infs = int((~finite).sum()) - nans
        raise LoRAValueError(
            f"{source}: key {key!r} {_describe(tensor)} holds {nans} NaN and {infs} Inf value(s) "
            f"(first at index {_first_bad_index(~finite)})"
        )


def _check_alpha(source: str, key: str, tensor: torch.Tensor) -> None:
    if tensor.numel() != 1:
        raise LoRAShapeError(f"{source}: key {key!r} {_describe(tensor)}: an alpha must be one number")
    if tensor.dtype not in ALPHA_DTYPES:
        raise LoRADtypeError(f"{source}: key {key!r} {_describe(tensor)}: an alpha must be a float or integer number")
    _check_finite(source, key, tensor)
    if tensor.dtype.is_floating_point and float(tensor.abs().max()) > FLOAT32_MAX:
        raise LoRAValueError(f"{source}: key {key!r} {_describe(tensor)}: alpha {float(tensor):g} is Inf in float32, "
                             "the precision scales are applied in")


def check_raw_tensors(raw: dict, source: str) -> None:
    """Every key a string, every value a tensor of a supported dtype with finite values."""
    for key, tensor in raw.items():
        if not isinstance(key, str):
            raise LoRAFormatError(f"{source}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(tensor, torch.Tensor):
            raise LoRAFormatError(f"{source}: key {key!r} holds a {type(tensor).__name__}, not a tensor")
        if key.endswith(_ALPHA_SUFFIX):
            _check_alpha(source, key, tensor)
            continue
        if tensor.dtype not in FACTOR_DTYPES:
            raise LoRADtypeError(
                f"{source}: key {key!r} {_describe(tensor)}: unsupported dtype; LoRA factors must be float16, "
                "bfloat16, float32 or float64 (dequantize int8/float8 LoRAs first)"
            )
        _check_finite(source, key, tensor)


def check_layer(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, source: str) -> None:
    """(A, B) must form a Linear or Conv2d LoRA of rank >= 1 in a float dtype."""
    shapes = f"A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)}"
    if lora_a.ndim not in (2, 4) or lora_b.ndim != lora_a.ndim:
        raise LoRAShapeError(f"{source}: layer {module}: {shapes} are not a Linear (2-D) or Conv2d (4-D) LoRA pair")
    if lora_a.shape[0] != lora_b.shape[1]:
        raise LoRAShapeError(
            f"{source}: layer {module}: ranks disagree, A {tuple(lora_a.shape)} has rank {lora_a.shape[0]} "
            f"but B {tuple(lora_b.shape)} has rank {lora_b.shape[1]}"
        )
    if lora_a.shape[0] == 0 or 0 in lora_a.shape or 0 in lora_b.shape:
        raise LoRAShapeError(f"{source}: layer {module}: {shapes}: an empty factor (rank or a dimension is 0)")
    if lora_a.ndim == 4 and lora_b.shape[2:] != (1, 1):
        raise LoRAShapeError(f"{source}: layer {module}: conv B factor must be 1x1, got {tuple(lora_b.shape)}")
    if not (lora_a.dtype in FACTOR_DTYPES and lora_b.dtype in FACTOR_DTYPES):  # state dicts converted in memory
        raise LoRADtypeError(f"{source}: layer {module}: unsupported dtype {lora_a.dtype}/{lora_b.dtype}")


def check_alpha(module: str, alpha: float, source: str) -> None:
    """Alphas from adapter metadata bypass the raw-tensor checks: NaN or Inf would poison every image."""
    if not math.isfinite(alpha):
        raise LoRAValueError(f"{source}: layer {module}: alpha is {alpha}")
    if abs(alpha) > FLOAT32_MAX:
        raise LoRAValueError(f"{source}: layer {module}: alpha {alpha:g} is Inf in float32, the precision scales "
                             "are applied in")


def check_scale(scale, where: str) -> float:
    """A user's LoRA strength: a finite number within float32's range, returned as a float."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise OptionError(f"{where}: scale={scale!r} is a {type(scale).__name__}, not a number")
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise OptionError(f"{where}: scale={scale!r} is not a finite number in float32")
    return float(scale)


def check_cast_factor(source: str, module: str, key: str, original: torch.Tensor, cast: torch.Tensor) -> None:
    """A factor must be finite as given (a ``LoRA`` built in memory gets the check files get at load), and a factor
    finite in the file can overflow when cast to the model's dtype (7e4 -> Inf in float16).

    The cast is checked only when it narrows the range (float32/float64 -> float16, float64 -> float32).
    """
    _check_finite(f"{source}: layer {module}", key, original)
    if torch.finfo(cast.dtype).max >= torch.finfo(original.dtype).max:
        return
    finite = torch.isfinite(cast)
    if not bool(finite.all()):
        largest = float(original.abs().max())
        raise LoRAValueError(
            f"{source}: layer {module}: {key} {_describe(original)} overflows to Inf when cast to the model's "
            f"{str(cast.dtype).removeprefix('torch.')} (largest |value| {largest:g}, first at index "
            f"{_first_bad_index(~finite)}; {str(cast.dtype).removeprefix('torch.')} holds up to "
            f"{torch.finfo(cast.dtype).max:g}): load the model in float32/bfloat16 or rescale the LoRA"
        )


def check_layer_scale(source: str, module: str, scale: float) -> None:
    """The effective per-layer scale (alpha / rank * strength) as the float32 coefficient the ops use."""
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise LoRAValueError(f"{source}: layer {module}: effective scale alpha / rank * scale = {scale:g} is not "
                             "finite in float32")
