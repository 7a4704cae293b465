"""B-LoRA: the subject delta only in one block, the style delta only in another, nothing elsewhere.

The default blocks are SDXL's, from the B-LoRA paper's analysis (Frenkel et al., "Implicit Style-Content
Separation using B-LoRA", ECCV 2024: ``up_blocks.0.attentions.0`` content, ``up_blocks.0.attentions.1``
style). No published analysis this library knows of names such blocks for FLUX or SD3 transformers, so on a
transformer there is no preset: ``blocks=`` is required there (an ``AttachError`` says so).
"""
from __future__ import annotations

from ..errors import AttachError, OptionError
from .base import Policy

# SDXL's two blocks from the B-LoRA paper; any UNet with these module paths can use them.
SDXL_BLOCKS = {"subject": ("up_blocks.0.attentions.0",), "style": ("up_blocks.0.attentions.1",)}
DIT_BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # FLUX and SD3 top-level block lists


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class BLoRAPolicy(Policy):
    name = "blora"
    per_layer = True  # a pool: position 0 (the subject) in the subject blocks, position 1 (the style) in the style's

    def __init__(self, blocks: dict | None = None):
        if not isinstance(blocks, (dict, type(None))):
            raise OptionError(f"blora: blocks must be a dict {{'subject': [...], 'style': [...]}}, got {blocks!r:.80}")
        self.preset = blocks is None
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
            if self.preset and any(_inside(layer.name, DIT_BLOCKS) for layer in layers):
                raise AttachError(
                    "blora: this model is a diffusion transformer (FLUX/SD3 transformer_blocks), and B-LoRA's "
                    "published block analysis covers SDXL's UNet only, so there is no preset for it; pass "
                    "blocks={'subject': [...], 'style': [...]} with module-path prefixes, e.g. "
                    "blocks={'subject': ['transformer_blocks.0'], 'style': ['single_transformer_blocks.0']}"
                )
            raise AttachError(
                f"blora: no fused layer lies in the subject blocks {list(self.subject_blocks)} or the style "
                f"blocks {list(self.style_blocks)}; pass blocks={{'subject': [...], 'style': [...]}} for this UNet"
            )

    def weights(self, layer, context):
        return self._weights[layer.name]

    def layer_weights(self, layer: str, names: tuple[str, ...], context) -> list[float]:
        inside = (_inside(layer, self.subject_blocks), _inside(layer, self.style_blocks))
        return [float(position < 2 and inside[position]) for position in range(len(names))]

    def describe(self) -> str:
        return f"blora[subject={list(self.subject_blocks)}, style={list(self.style_blocks)}]"
