from .world import (
    FUSED_PROMPT, STYLE_PROMPT, SUBJECT_PROMPT, DefaultWorld, attention_targets, build_tiny_pipeline, default_loras,
    load_default_world, random_lora,
)

__all__ = [
    "FUSED_PROMPT", "STYLE_PROMPT", "SUBJECT_PROMPT", "DefaultWorld", "attention_targets", "build_tiny_pipeline",
    "default_loras", "load_default_world", "random_lora",
]
