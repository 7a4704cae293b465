"""ComfyUI nodes of fusion_engine ("Fuse Subject + Style LoRA", "LoRA Fusion Trace"); see docs/COMFYUI.md.

This package is the node pack ComfyUI loads (through ``integrations/comfyui/`` in ``custom_nodes``, or the
``comfyui.custom_nodes`` entry point). It imports ComfyUI only when a node runs; ``import fusion_engine`` never
imports it.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
