"""LoRA Composite: the sampler predicts noise once per LoRA and averages; each pass uses one LoRA."""
from __future__ import annotations

from ..errors import StepContextError
from .base import Policy


class CompositePolicy(Policy):
    name = "composite"
    BRANCH_WEIGHTS = {"subject": (1.0, 0.0), "style": (0.0, 1.0)}

    def weights(self, layer, context):
        return self.BRANCH_WEIGHTS[self._branch(context)]

    def image_weights(self, count: int, context) -> list[float]:
        """A pool image: the pass's LoRA by position (``"subject"``: position 0, ``"style"``: 1)."""
        turn = self.BRANCH_WEIGHTS[self._branch(context)].index(1.0)
        return [float(position == turn) for position in range(count)]

    def _branch(self, context) -> str:
        branch = context.branch
        if branch not in self.BRANCH_WEIGHTS:
            raise StepContextError(
                "policy 'composite' needs the sampler to say which LoRA's pass this is: use "
                "FusionPipeline, or call fusion.set_branch('subject'|'style') before each UNet call"
            )
        return branch
