"""Which LoRA did each layer keep at each step? Read the trace, save it as JSON, draw the heatmap.

Run:
    python examples/trace_and_heatmap.py [OUT]    # OUT defaults to example_out/trace_and_heatmap

Every ``FusionPipeline`` call returns a ``Trace``: per step and layer, the choice of every decision group
(``subject``, ``style``, ``both``, ``base``) and, for FLS, both divergence scores.
``trace.subject_fraction()`` is a (steps, layers) tensor: the share of groups that kept the subject.

Example:
    ```py
    >>> trace = pipe(prompt).trace
    >>> trace.heatmap("heatmap.png"); trace.save_json("trace.json")
    ```
"""
import os
import sys
from pathlib import Path

import torch

import fusion_engine as fe
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/trace_and_heatmap")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))

world = load_world("auto", folder=out / "loras")
pipe = fe.FusionPipeline.from_pipe(world.pipe, subject=world.subject(), style=world.style(), policy="fls")
trace = pipe(world.prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).trace

fraction = trace.subject_fraction()  # (steps, layers), NaN where a layer made no decision
print(f"{len(trace.layer_names)} layers x {len(trace.steps)} steps; subject kept in "
      f"{fraction.nanmean().item():.0%} of the decisions")
for step, row in zip(trace.steps, fraction):
    print(f"  step {step:>2}: subject {row.nanmean().item():.0%}")
first = trace.to_dict()["records"][0]  # what trace.json holds, one record per (step, layer)
print(f"  first record: layer {first['layer']}, choices {first['choice']}")
print(f"wrote {trace.save_json(out / 'trace.json')} and {trace.heatmap(out / 'heatmap.png', title='fls[kl]')}")
