"""fusion_engine: training-free dynamic fusion of a subject LoRA and a style LoRA in diffusion models."""
from . import serve
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
from .fusion import Fusion, detach_all
from .integration import PipelineFusion, attach
from .lora import LoRA, LoRALayer, load_lora, save_lora
from .pipeline import FusionPipeline, FusionPipelineOutput
from .policies import POLICIES, make_policy
from .pool import LoRAPool
from .refine import Refiner
from .trace import Trace

__version__ = "0.1.0"

__all__ = [
    # errors: every error the library raises on purpose (fusion_engine/errors.py has the tree)
    "AlreadyAttachedError", "AttachError", "BackendError", "BatchLayoutError", "ConcurrentUseError",
    "FusionEngineError", "InputFileNotFoundError", "LayerAttributeError", "LoRADtypeError", "LoRAFileError",
    "LoRAFileNotFoundError", "LoRAFormatError", "LoRALayoutError", "LoRAShapeError", "LoRAValueError",
    "ModelMismatchError", "ModelPathError", "OptionError", "OptionTypeError", "PoolBudgetError", "ServiceBusyError",
    "ServiceStoppedError", "StepContextError", "StepRangeError", "UnknownLoRAError",
    # the API
    "Fusion", "FusionPipeline", "FusionPipelineOutput", "LoRA", "LoRALayer", "LoRAPool", "POLICIES", "PipelineFusion",
    "Refiner", "Trace", "attach", "detach_all", "load_lora", "make_policy", "save_lora", "serve",
]
