"""B-LoRA: the subject delta only in one block, the style delta only in another, nothing elsewhere."""
from __future__ import annotations

from ..errors import AttachError, OptionError
from .base import Policy

# SDXL's two blocks from the B-LoRA paper; any UNet with these module paths can use them.
SDXL_BLOCKS = {"subject": ("up_blocks.0.attentions.0",), "style": ("up_blocks.0.attentions.1",)}


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class BLoRAPolicy(Policy):
    name = "blora"

    def __init__(self, blocks: dict | None = None):
        if not isinstance(blocks, (dict, type(None))):
            raise OptionError(f"blora: blocks must be a dict {{'subject': [...], 'style': [...]}}, got {blocks!r:.80}")
        blocks = dict(SDXL_BLOCKS if blocks is None else blocks)
        unknown = set(blocks) - {"subject", "style"}
        if unknown:
            raise OptionError(f"blora: block map keys must be 'subject' and 'style', got {sorted(map(str, unknown))}")
        for role, prefixes in blocks.items():
            if isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes):
                raise OptionError(
                    f"blora: blocks[{role!r}] must be a list of module-path prefixes, got {prefixes!r:.80}")
        self.subject_blocks = tuple(blocks.get("subject", ()))
        self.style_blocks = tuple(blocks.get("style", ()))
        self._weights = {}

    def setup(self, layers) -> None:
        self._weights = {
            layer.name: (
                float(layer.has_subject and _inside(layer.name, self.subject_blocks)),
                float(layer.has_style and _inside(layer.name, self.style_blocks)),
            )
            for layer in layers
        }
        if not any(sum(w) for w in self._weights.values()):
            raise AttachError(
                f"blora: no fused layer lies in the subject blocks {list(self.subject_blocks)} or the style "
                f"blocks {list(self.style_blocks)}; pass blocks={{'subject': [...], 'style': [...]}} for this UNet"
            )

    def weights(self, layer, context):
        return self._weights[layer.name]

    def describe(self) -> str:
        return f"blora[subject={list(self.subject_blocks)}, style={list(self.style_blocks)}]"
