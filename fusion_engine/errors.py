"""Errors raised by fusion_engine. Each message names the file, key, layer or shape at fault.

Every class also derives from the built-in exception a caller would expect (``ValueError`` for bad
input, ``RuntimeError`` for bad sampler state, ``FileNotFoundError`` for missing paths), so existing
``except`` clauses keep working; ``except FusionEngineError`` catches all of them.

    FusionEngineError
    ├── LoRAFormatError (ValueError) ........ a file or state dict that is not a usable LoRA
    │   ├── LoRAFileError ................... not safetensors, truncated, header that lies
    │   │   └── LoRAFileNotFoundError (FileNotFoundError)
    │   ├── LoRALayoutError ................. keys in no known layout, unpaired factors
    │   ├── LoRAShapeError .................. factor shapes that disagree (ranks, ndim, rank 0)
    │   ├── LoRADtypeError .................. integer, bool, complex or float8 factors
    │   └── LoRAValueError .................. NaN or Inf in factors or alphas
    ├── AttachError (ValueError) ............ a LoRA that does not fit the model, a model that cannot take it now
    │   ├── ModelMismatchError .............. targets missing or shaped differently (another base model)
    │   └── AlreadyAttachedError ............ the model (or a layer) already holds a fusion or adapters
    ├── StepContextError (RuntimeError) ..... sampler state a policy needs is missing
    │   ├── StepRangeError (ValueError) ..... a step outside [0, num_steps)
    │   ├── BatchLayoutError (ValueError) ... a batch/prompt/granularity combination that cannot be grouped
    │   └── ConcurrentUseError .............. a second thread using an attached model while another one does
    ├── ModelPathError (FileNotFoundError) .. a model path that is not local (pipeline folder, encoder checkpoint)
    ├── BackendError (RuntimeError) ......... a backend that cannot run here (no triton; CPU without the interpreter)
    ├── ServiceBusyError (RuntimeError) ..... a BatchFusion queue that is full (retry later)
    ├── ServiceStoppedError (RuntimeError) .. a BatchFusion whose worker thread is not running (nothing would answer)
    ├── OptionError (ValueError) ............ an argument, option or options file the caller gave that cannot be used
    │   ├── OptionTypeError (TypeError) ..... options of the wrong kind (e.g. options beside a ready policy)
    │   ├── UnknownLoRAError (KeyError) ..... a LoRA name that the LoRA pool does not hold
    │   ├── PoolBudgetError ................. adding a LoRA would take the pool past its byte budget
    │   └── InputFileNotFoundError (FileNotFoundError) .. a file the caller named (pairs.toml) is not there
    └── LayerAttributeError (AttributeError)  an attribute neither a dynamic layer nor its base layer has
"""
from __future__ import annotations


class FusionEngineError(Exception):
    """Base class of every error this library raises on purpose."""


class LoRAFormatError(FusionEngineError, ValueError):
    """A LoRA file or state dict that cannot be read as a LoRA."""


class LoRAFileError(LoRAFormatError):
    """The file itself: not safetensors, truncated, or a header whose shapes/offsets do not add up."""


class LoRAFileNotFoundError(LoRAFileError, FileNotFoundError):
    """No file at the given path (or a folder where a file was expected)."""


class LoRALayoutError(LoRAFormatError):
    """Keys that no known LoRA layout (diffusers, PEFT, kohya) explains, or factors without a partner."""


class LoRAShapeError(LoRAFormatError):
    """Factor shapes that cannot form a LoRA: ranks that disagree, wrong ndim, rank 0."""


class LoRADtypeError(LoRAFormatError):
    """Factors stored in a dtype the fused ops do not compute in (integer, bool, complex, float8)."""


class LoRAValueError(LoRAFormatError):
    """NaN or Inf in a factor or an alpha: it would poison every image."""


class AttachError(FusionEngineError, ValueError):
    """A LoRA that does not fit the model, or a model that cannot take a fusion now."""


class ModelMismatchError(AttachError):
    """LoRA targets that the model lacks or shapes differently: usually a LoRA made for another base model."""


class AlreadyAttachedError(AttachError):
    """The model (or one of the target layers) already carries a fusion or PEFT adapters."""


class StepContextError(FusionEngineError, RuntimeError):
    """A policy needs sampler state (the step, the batch layout) that nobody provided."""


class StepRangeError(StepContextError, ValueError):
    """A denoising step outside ``[0, num_steps)``."""


class BatchLayoutError(StepContextError, ValueError):
    """A batch layout and granularity that cannot be split into decision groups."""


class ConcurrentUseError(StepContextError):
    """A thread used (or detached) an attached model while another thread was running it."""


class ModelPathError(FusionEngineError, FileNotFoundError):
    """A model path that is not a local diffusers folder or checkpoint file (hub ids are never downloaded)."""


class BackendError(FusionEngineError, RuntimeError):
    """A compute backend that cannot run on these tensors here (triton not importable, CPU tensors
    without the Triton interpreter, CUDA tensors with it)."""


class ServiceBusyError(FusionEngineError, RuntimeError):
    """``fe.BatchFusion.submit`` with its bounded queue full: retry later (a server answers 503)."""


class ServiceStoppedError(FusionEngineError, RuntimeError):
    """``fe.BatchFusion.submit`` when the worker thread is not running any more: nothing would answer."""


class OptionError(FusionEngineError, ValueError):
    """A bad argument, option or options file (an unknown policy, divergence, backend; a value out of range;
    a pairs.toml that lacks a field)."""


class OptionTypeError(OptionError, TypeError):
    """Options of the wrong kind, where Python itself would raise ``TypeError`` (options beside a ready policy,
    keywords a policy does not take); ``except TypeError`` and ``except OptionError`` both catch it."""


class UnknownLoRAError(OptionError, KeyError):
    """A LoRA name the pool does not hold (in an assignment, ``pool.remove``, or removed since it was assigned)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PoolBudgetError(OptionError):
    """Adding a LoRA would take a ``LoRAPool`` past its byte budget; the pool is left as it was."""


class InputFileNotFoundError(OptionError, FileNotFoundError):
    """A file the caller named as input (a pairs.toml) does not exist."""


class LayerAttributeError(FusionEngineError, AttributeError):
    """An attribute that neither a dynamic LoRA layer nor its base layer has (``hasattr`` still sees False)."""


def preview(names, limit: int = 5) -> str:
    """'a, b, c (+12 more)': enough names to find the problem without flooding the terminal."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
