"""Many prompts, one fused model, one batched call.

Run:
    python examples/batch_of_prompts.py [OUT]     # OUT defaults to example_out/batch_of_prompts

With ``granularity="image"`` (the default) every image makes its own decision per layer, from its own CFG
rows only: an image's result does not depend on which other prompts share its batch.

Example:
    ```py
    >>> result = pipe(["a sbu dog in szn style", "a sbu dog on a beach in szn style"], num_images_per_prompt=2)
    >>> len(result.images)
    4
    ```
"""
import os
import sys
from pathlib import Path

import torch

import fusion_engine as fe
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/batch_of_prompts")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))

world = load_world("auto", folder=out / "loras")
pipe = fe.FusionPipeline.from_pipe(world.pipe, subject=world.subject(), style=world.style(), policy="fls",
                                   granularity="image")
prompts = [world.prompt, world.subject_prompt, world.style_prompt]
result = pipe(prompts, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(0))
out.mkdir(parents=True, exist_ok=True)
for index, image in enumerate(result.images):  # prompt-major: 2 images of prompts[0], then of prompts[1], ...
    image.save(out / f"prompt{index // 2}_image{index % 2}.png")
print(f"wrote {len(result.images)} images for {len(prompts)} prompts to {out}")
