"""A policy of your own: subclass ``Policy``, register it, use it by name everywhere a policy is named.

Run:
    python examples/custom_policy.py [OUT]        # OUT defaults to example_out/custom_policy

A static policy returns ``(w_subject, w_style)`` per layer and call from host-side state only (no device
sync); this one gives the style LoRA the up-blocks (late, high-resolution layers) and the subject the rest,
and ramps with the step. ``needs_step = True`` makes the sampler call ``fusion.set_step(i, n)`` first.

Example:
    ```py
    >>> fe.POLICIES["updown"] = UpDownPolicy
    >>> pipe = fe.FusionPipeline.from_pipe(sd_pipe, subject, style, policy="updown", ramp=0.5)
    ```
"""
import os
import sys
from pathlib import Path

import torch

import fusion_engine as fe
from fusion_engine.policies import Policy
from fusion_engine.worlds import load_world


class UpDownPolicy(Policy):
    """Style in ``up_blocks``, subject elsewhere; the other LoRA fades in to ``ramp`` over the sampling run.

    Args:
        ramp: the weight the other LoRA reaches at the last step (0: never added).
    """

    name = "updown"
    needs_step = True

    def __init__(self, ramp: float = 0.5):
        if not 0.0 <= ramp <= 1.0:
            raise fe.OptionError(f"updown: ramp must be in [0, 1], got {ramp!r}")  # library errors for bad options
        self.ramp = ramp

    def weights(self, layer, context):
        other = self.ramp * context.current_step() / max(context.num_steps - 1, 1)
        return (other, 1.0) if layer.name.startswith("up_blocks") else (1.0, other)

    def describe(self) -> str:
        return f"updown[{self.ramp:g}]"


fe.POLICIES[UpDownPolicy.name] = UpDownPolicy  # now policy="updown" works in attach, FusionPipeline, make_policy

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/custom_policy")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))
world = load_world("auto", folder=out / "loras")
pipe = fe.FusionPipeline.from_pipe(world.pipe, subject=world.subject(), style=world.style(), policy="updown",
                                   ramp=0.25)
result = pipe(world.prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
out.mkdir(parents=True, exist_ok=True)
result.images[0].save(out / "updown.png")
print(f"wrote {out / 'updown.png'} with {fe.make_policy('updown', ramp=0.25)}")
