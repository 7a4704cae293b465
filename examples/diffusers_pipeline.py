"""Fusion inside a plain diffusers pipeline: swap the UNet's LoRA layers, call the pipeline as usual, detach.

Run:
    python examples/diffusers_pipeline.py [OUT]   # OUT defaults to example_out/diffusers_pipeline

``fe.attach(unet, ...)`` replaces every LoRA-targeted Linear/Conv2d of the UNet by a dynamic LoRA layer;
``detach()`` puts the original modules back (the UNet is bit-for-bit as before). The pipeline's own
``__call__`` runs unchanged; the fusion only needs the batch layout, so that the CFG rows of one image
(unconditional and conditional) make one decision: ``set_batch_layout(images=n, copies=2)``.

Example:
    ```py
    >>> fusion = fe.attach(pipe.unet, subject="dog.safetensors", style="watercolor.safetensors", policy="fls")
    >>> fusion.set_batch_layout(images=1, copies=2)      # guidance_scale > 1: [uncond, cond]
    >>> image = pipe("a sbu dog in szn style").images[0]
    >>> fusion.detach()
    ```
"""
import os
import sys
from pathlib import Path

import torch

import fusion_engine as fe
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/diffusers_pipeline")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))

world = load_world("auto", folder=out / "loras")
pipe = world.pipe  # a diffusers StableDiffusionPipeline; from_pretrained("./your-model") works the same way

fusion = fe.attach(pipe.unet, subject=world.subject(), style=world.style(), policy="fls")
try:
    fusion.set_batch_layout(images=1, copies=2)  # one prompt, one image, classifier-free guidance
    image = pipe(world.prompt, num_inference_steps=steps, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
finally:
    fusion.detach()  # also on an error: the UNet is left exactly as it was
out.mkdir(parents=True, exist_ok=True)
image.save(out / "fls.png")
print(f"wrote {out / 'fls.png'}; the UNet is plain again: {not fusion.attached}")
