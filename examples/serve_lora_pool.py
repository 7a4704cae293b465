"""Serve a directory of LoRAs to a list of requests: one pool, one attached pipeline, batched calls.

Run:
    python examples/serve_lora_pool.py [OUT]     # OUT defaults to example_out/serve_lora_pool

Every ``*.safetensors`` in ``OUT/loras`` goes into a ``fe.LoRAPool`` under its file name; each request names its
own LoRAs (one, a subject-style pair, or more) and seed, and ``BatchFusion`` runs compatible requests in one
pipeline call. A request naming a LoRA the pool lacks fails alone; the others complete. Writes
``request<i>.png`` per successful request and ``results.json`` (per request: its LoRAs, which LoRA each
layer kept over the run, or its error).

Example:
    ```py
    >>> service = BatchFusion(pipe, pool, max_batch=8)
    >>> results = service.run([Request("a dog in szn style", ("dog", "watercolor"), seed=0)])
    >>> results[0].image.save("dog.png")
    ```
"""
import json
import os
import shutil
import sys
from pathlib import Path

import fusion_engine as fe
from fusion_engine import BatchFusion, Request
from fusion_engine.worlds import load_world

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/serve_lora_pool")
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))

# a directory of LoRAs: the world's subject and style, and the subject again at half strength
world = load_world("auto", folder=out / "world")
folder = out / "loras"
folder.mkdir(parents=True, exist_ok=True)
shutil.copy(world.subject_path, folder / "subject.safetensors")
shutil.copy(world.style_path, folder / "style.safetensors")
fe.save_lora(world.subject().with_scale(0.5), folder / "subject_half.safetensors")

pool = fe.LoRAPool(device="cpu")
for path in sorted(folder.glob("*.safetensors")):
    pool.add(path.stem, path)
print(pool)

options = {"num_inference_steps": steps, "guidance_scale": 5.0}
requests = [
    Request(world.prompt, ("subject", "style"), seed=0, options=options),
    Request(world.prompt, ("subject_half", "style"), seed=1, options=options),
    Request(world.subject_prompt, "subject", seed=2, options=options),
    Request(world.prompt, ("subject", "style", "subject_half"), seed=3, options=options),
    Request(world.prompt, ("subject", "no_such_lora"), seed=4, options=options),  # fails alone
]
with BatchFusion(world.pipe, pool, max_batch=8, policy="fls") as service:
    results = service.run(requests)

report = []
for index, result in enumerate(results):
    if result.ok:
        result.image.save(out / f"request{index}.png")
        report.append({"loras": result.summary["loras"], "kept": result.summary["kept"]})
    else:
        report.append({"error": f"{type(result.error).__name__}: {result.error}"})
    print(index, report[-1])
(out / "results.json").write_text(json.dumps(report, indent=1))
print(f"{sum(r.ok for r in results)} of {len(results)} requests served; images in {out}")
