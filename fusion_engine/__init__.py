"""fusion_engine: training-free dynamic fusion of a subject LoRA and a style LoRA in diffusion models.

The public API is ``fusion_engine/api.py`` (re-exported here) and the errors of ``fusion_engine/errors.py``."""
from .api import (
    POLICIES,
    BatchFusion,
    Fusion,
    FusionPipeline,
    FusionPipelineOutput,
    LoRA,
    LoRALayer,
    LoRAPool,
    PipelineAttachment,
    Refiner,
    Request,
    Result,
    Trace,
    attach,
    detach_all,
    load_lora,
    make_policy,
    save_lora,
)
from .errors import (
    AlreadyAttachedError,
    AttachError,
    BackendError,
    BatchLayoutError,
    ConcurrentUseError,
    FusionEngineError,
    InputFileNotFoundError,
    LayerAttributeError,
    LoRADtypeError,
    LoRAFileError,
    LoRAFileNotFoundError,
    LoRAFormatError,
    LoRALayoutError,
    LoRAShapeError,
    LoRAValueError,
    ModelMismatchError,
    ModelPathError,
    OptionError,
    OptionTypeError,
    PoolBudgetError,
    ServiceBusyError,
    ServiceStoppedError,
    StepContextError,
    StepRangeError,
    UnknownLoRAError,
)
from .runtime import trace  # the module, as before: fe.trace.DEFAULT_MAX_RECORDS
from .utils.deprecation import warn_renamed

__version__ = "0.1.0"

__all__ = [
    # errors: every error the library raises on purpose (fusion_engine/errors.py has the tree)
    "AlreadyAttachedError", "AttachError", "BackendError", "BatchLayoutError", "ConcurrentUseError",
    "FusionEngineError", "InputFileNotFoundError", "LayerAttributeError", "LoRADtypeError", "LoRAFileError",
    "LoRAFileNotFoundError", "LoRAFormatError", "LoRALayoutError", "LoRAShapeError", "LoRAValueError",
    "ModelMismatchError", "ModelPathError", "OptionError", "OptionTypeError", "PoolBudgetError", "ServiceBusyError",
    "ServiceStoppedError", "StepContextError", "StepRangeError", "UnknownLoRAError",
    # the API (fusion_engine/api.py)
    "BatchFusion", "Fusion", "FusionPipeline", "FusionPipelineOutput", "LoRA", "LoRALayer", "LoRAPool", "POLICIES",
    "PipelineAttachment", "Refiner", "Request", "Result", "Trace", "attach", "detach_all", "load_lora", "make_policy",
    "save_lora", "trace",
]


def _batching():
    from .integration import batching

    return batching


# renamed public names: each still works for one release and warns once (FutureWarning)
_RENAMED = {"PipelineFusion": ("fusion_engine.PipelineAttachment", lambda: PipelineAttachment),
            "serve": ("fusion_engine.BatchFusion, Request and Result", _batching)}


def __getattr__(name: str):
    if name in _RENAMED:
        new, value = _RENAMED[name]
        warn_renamed(f"fusion_engine.{name}", new)
        return value()
    raise AttributeError(f"module 'fusion_engine' has no attribute {name!r}")
