"""fusion_engine: training-free dynamic fusion of a subject LoRA and a style LoRA in diffusion models."""
from .errors import AttachError, FusionEngineError, LoRAFormatError, StepContextError
from .fusion import Fusion, detach_all
from .integration import PipelineFusion, attach
from .lora import LoRA, LoRALayer, load_lora, save_lora
from .pipeline import FusionPipeline, FusionPipelineOutput
from .policies import POLICIES, make_policy
from .refine import Refiner
from .trace import Trace

__version__ = "0.1.0"

__all__ = [
    "AttachError", "Fusion", "FusionEngineError", "FusionPipeline", "FusionPipelineOutput", "LoRA", "LoRAFormatError",
    "LoRALayer", "POLICIES", "PipelineFusion", "Refiner", "StepContextError", "Trace", "attach", "detach_all", "load_lora",
    "make_policy", "save_lora",
]
