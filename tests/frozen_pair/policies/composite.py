"""LoRA Composite: the sampler predicts noise once per LoRA and averages; each pass uses one LoRA."""
from __future__ import annotations

from fusion_engine.errors import StepContextError

from .base import Policy


class CompositePolicy(Policy):
    name = "composite"
    BRANCH_WEIGHTS = {"subject": (1.0, 0.0), "style": (0.0, 1.0)}

    def weights(self, layer, context):
        branch = context.branch
        if branch not in self.BRANCH_WEIGHTS:
            raise StepContextError(
                "policy 'composite' needs the sampler to say which LoRA's pass this is: use "
                "FusionPipeline, or call fusion.set_branch('subject'|'style') before each UNet call"
            )
        return self.BRANCH_WEIGHTS[branch]
