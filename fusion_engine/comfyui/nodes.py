"""The ComfyUI node classes: "Fuse Subject + Style LoRA" and "LoRA Fusion Trace".

ComfyUI is imported only inside the methods ComfyUI calls (``INPUT_TYPES``, the node functions).
"""
from __future__ import annotations

import os
import tempfile

import torch

from ..ops import BACKENDS, DIVERGENCES
from ..runtime.context import GRANULARITIES
from .fuse import POLICY_NAMES, ComfyFusionError, folder_paths_module, fuse, fusion_state

NONE = "None"
CATEGORY = "loaders/fusion_engine"


class FuseSubjectStyleLoRA:
    """Subject LoRA + style LoRA, chosen per layer and per denoiser call by the engine's policies (no weight merge)."""

    DESCRIPTION = ("Fuses a subject LoRA and a style LoRA per layer at every denoiser call (FLS by default), without "
                   "merging weights. SD1.x/SD2.x/SDXL. Text-encoder parts go to CLIP with both deltas added. When "
                   "ComfyUI splits an image's cond and uncond into separate calls (low free memory), the first call "
                   "at a sigma (ComfyUI runs the uncond first) decides for both.")
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "fuse"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        loras = [NONE, *folder_paths_module().get_filename_list("loras")]
        strength = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL",),
                "subject_lora": (loras, {"tooltip": "the LoRA of the subject (identity, object)"}),
                "subject_strength": ("FLOAT", strength),
                "style_lora": (loras, {"tooltip": "the LoRA of the style"}),
                "style_strength": ("FLOAT", strength),
                "policy": (list(POLICY_NAMES), {"default": "fls", "tooltip": (
                    "fls: per layer and call, the LoRA whose delta perturbs the features more; direct: both added; "
                    "klora: K-LoRA's top-k rule; blora: B-LoRA's blocks (SDXL preset); switch: alternate every tau "
                    "steps")}),
                "divergence": (list(DIVERGENCES), {"default": "kl", "tooltip": "fls's divergence"}),
                "granularity": (list(GRANULARITIES), {"default": "image", "tooltip": (
                    "which rows decide together: image (an image's cond and uncond rows), sample, token, batch")}),
            },
            "optional": {
                "clip": ("CLIP",),
                "backend": (list(BACKENDS), {"default": "auto",
                                             "tooltip": "auto: Triton kernels on CUDA when importable"}),
                "policy_options": ("STRING", {"default": "", "multiline": False, "tooltip": (
                    'JSON object, e.g. {"tau": 3} (switch), {"pattern": "s*"} (klora), '
                    '{"blocks": {"subject": ["up_blocks.0.attentions.0"], "style": ["up_blocks.0.attentions.1"]}}')}),
            },
        }

    def fuse(self, model, subject_lora, subject_strength, style_lora, style_strength, policy, divergence,
             granularity, clip=None, backend="auto", policy_options=""):
        # A bad input raises a FusionEngineError (its class and message are what ComfyUI shows in the node), before
        # anything is changed: the MODEL and CLIP given are never modified, the fusion lives on clones.
        return fuse(
            model, clip, None if subject_lora == NONE else subject_lora, subject_strength,
            None if style_lora == NONE else style_lora, style_strength, policy=policy, divergence=divergence,
            granularity=granularity, backend=backend, policy_options=policy_options,
        )


class LoRAFusionTrace:
    """The heatmap of the last sampling's choices: layers down, steps across; orange subject, blue style."""

    DESCRIPTION = ("Heatmap of which LoRA each fused layer took at each step of the last sampling (rows: layers, "
                   "columns: steps; orange = subject, blue = style, in between = share of images/groups, grey = "
                   "no record). Connect the KSampler's LATENT so it runs after sampling.")
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "render"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the MODEL from 'Fuse Subject + Style LoRA'"}),
                "samples": ("LATENT", {"tooltip": "the sampler's output: orders this node after sampling"}),
            },
            "optional": {
                "save_json": ("BOOLEAN", {"default": False}),
                "filename_prefix": ("STRING", {"default": "fusion_trace"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, *args, **kwargs):  # noqa: N802 — the trace changes with every sampling
        return float("nan")

    def render(self, model, samples, save_json=False, filename_prefix="fusion_trace"):
        state = fusion_state(model)
        if state is None:
            raise ComfyFusionError(
                "this MODEL carries no fusion: connect the MODEL output of 'Fuse Subject + Style LoRA'")
        trace = state.trace
        if not trace.steps:
            raise ComfyFusionError("no decisions recorded: sample with the fused MODEL first")
        with tempfile.TemporaryDirectory() as folder:
            path = trace.heatmap(os.path.join(folder, "trace.png"), title=f"{state.family} {trace.policy}")
            image = heatmap_tensor(path)
        if save_json:
            out = folder_paths_module().get_output_directory()
            index = 0
            while os.path.exists(os.path.join(out, f"{filename_prefix}_{index:05d}.json")) and index < 100_000:
                index += 1
            trace.save_json(os.path.join(out, f"{filename_prefix}_{index:05d}.json"))
        return (image,)


def heatmap_tensor(path) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: (1, H, W, 3) float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


NODE_CLASS_MAPPINGS = {
    "FusionEngineFuseSubjectStyleLoRA": FuseSubjectStyleLoRA,
    "FusionEngineLoRAFusionTrace": LoRAFusionTrace,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FusionEngineFuseSubjectStyleLoRA": "Fuse Subject + Style LoRA",
    "FusionEngineLoRAFusionTrace": "LoRA Fusion Trace",
}
