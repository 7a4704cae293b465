from .loader import detect_layout, load_lora
from .weights import LoRA, LoRALayer
from .writer import LAYOUTS, lora_to_state_dict, save_lora

__all__ = ["LAYOUTS", "LoRA", "LoRALayer", "detect_layout", "load_lora", "lora_to_state_dict", "save_lora"]
