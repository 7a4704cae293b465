"""The trained toy world: 32x32 procedural images of shapes x styles, a tiny text-to-image model trained from
scratch, a subject LoRA (the held-out "sks mushroom") and a style LoRA (the held-out "zzt style"), two small
judges, and transparent measures that need no model. See ``weights/CARD.md``."""
