"""Image scoring shared by refine and eval: encoders (CLIP, DINO), metrics, and bootstrap intervals (``stats.py``)."""
