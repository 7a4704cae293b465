"""Fuse a subject LoRA and a style LoRA with the Python API, on the embedded default world (no downloads).

Run:
    python examples/python_api.py [OUT]          # OUT defaults to example_out/python_api

``fusion_engine.worlds.load_world`` gives a small base pipeline, a subject and a style LoRA file and their
prompts; with your own model, load the pipeline with diffusers and the LoRAs with ``fe.load_lora(path)``.
``FUSION_EXAMPLE_STEPS`` sets the number of denoising steps (CI runs every example with 2).

Example:
    ```py
    >>> subject = fe.load_lora("dog_lora.safetensors")           # diffusers, PEFT or kohya layout
    >>> style = fe.load_lora("watercolor.safetensors", scale=0.8)
    >>> pipe = fe.FusionPipeline.from_pipe(sdxl_pipe, subject=subject, style=style, policy="fls")
    ```
"""
import os
import sys
from pathlib import Path

import torch

import fusion_engine as fe
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/python_api")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))

world = load_world("auto", folder=out / "loras")  # the trained toy world when its weights ship, else random
print(f"subject: {world.subject()}\nstyle:   {world.style()}")

# FLS: at every LoRA layer and forward, keep the branch whose output diverges most (KL) from the base output.
pipe = fe.FusionPipeline.from_pipe(world.pipe, subject=world.subject(), style=world.style(), policy="fls",
                                   divergence="kl")
result = pipe(world.prompt, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(0))
out.mkdir(parents=True, exist_ok=True)
result.images[0].save(out / "fls.png")
print(f"wrote {out / 'fls.png'} ({world.prompt!r}, {steps} steps)")
