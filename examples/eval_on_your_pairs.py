"""Evaluate policies on your own subject-style pairs: write a pairs.toml, call ``fusion_engine.eval.run``.

Run:
    python examples/eval_on_your_pairs.py [OUT]   # OUT defaults to example_out/eval_on_your_pairs

Writes ``OUT/images/<pair>/<policy>/seedNNN.png``, one CSV row of scores per image (``OUT/scores/``) and
``OUT/report.md`` (Style Sim, CLIP Score, DINO Score as in the paper's Table 1, and a cost table). Without
``clip=``/``dino=`` (or ``clip_model=``/``dino_model=`` and local checkpoints) the encoders are tiny random
ones and the scores mean nothing: give real ones for real numbers. Rerunning skips what is done.

Example:
    ```py
    >>> from fusion_engine.eval import EvalSettings, run
    >>> run(EvalSettings(out="eval_out", model="./sdxl-base", pairs="pairs.toml", policies=["direct", "fls"],
    ...                  clip_model="ViT-L-14", clip_checkpoint="clip.safetensors",
    ...                  dino_model="vit_base_patch16_224.dino", dino_checkpoint="dino.safetensors"))
    ```
"""
import os
import sys
from pathlib import Path

from fusion_engine.eval import EvalSettings, run
from fusion_engine.utils.io import write_text
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/eval_on_your_pairs")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))
world = load_world("auto", folder=out / "loras")

# One [[pair]] table per subject-style pair; LoRA and image paths are relative to the pairs.toml file.
# Optional: subject_image = "...", style_image = "..." (reference images; else each LoRA alone makes them).
pairs = write_text(out / "pairs.toml", f"""
[[pair]]
name = "my_pair"
subject = "{world.subject_path.resolve()}"
style = "{world.style_path.resolve()}"
prompt = "{world.prompt}"
subject_prompt = "{world.subject_prompt}"
style_prompt = "{world.style_prompt}"
""")

missing = run(EvalSettings(out=out / "eval", pipe=world.pipe, pairs=pairs, policies=["direct", "fls"], seeds=2,
                           steps=steps, guidance=5.0))  # 0: every planned image is scored
print((out / "eval" / "report.md").read_text())
sys.exit(missing)
