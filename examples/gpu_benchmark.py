"""The GPU benchmark of the fused FLS kernels: runs ``bench/gpu_table.py`` when CUDA is there, else says how.

Run (from a checkout of the repository; ``bench/`` is not part of the installed package):
    python examples/gpu_benchmark.py                  # every table (a few minutes on an H100/H200)
    python examples/gpu_benchmark.py --out RESULTS.md # ... and append them to a file

``bench/gpu_table.py`` first checks the Triton op against a float64 run of the reference at every shape,
rank and dtype it times, then prints markdown tables: one LoRA linear at SDXL's and at FLUX's shapes (merged
weights, naive eager FLS, K-LoRA, two-adapter unmerged, the fused and the split op with a right and a wrong
guess), the attention part of one SDXL UNet step, and the LoRA pool (one pooled call and one pooled step for
8 images with 8 pairs against one pair at a time), eager and from a CUDA graph. Arguments are passed on.

Example:
    ```sh
    python bench/gpu_table.py --tables sdxl flux     # the layer tables only
    python bench/gpu_table.py --smoke                # CPU + Triton interpreter: checks the logic, no timings
    ```
"""
import subprocess
import sys
from pathlib import Path

import torch

script = Path(__file__).resolve().parents[1] / "bench" / "gpu_table.py"
if not script.is_file():
    sys.exit(f"{script}: not found; run this example from a checkout of the fusion_engine repository")
if not torch.cuda.is_available():
    print("No CUDA device: the benchmark times Triton kernels on a GPU, so there is nothing to time here.\n"
          f"On a machine with an NVIDIA GPU run:  python {script}\n"
          f"To check the script's logic on this CPU (Triton interpreter, tiny shapes, timings meaningless):\n"
          f"  python {script} --smoke")
    sys.exit(0)
print(f"benchmarking on {torch.cuda.get_device_name()}")
sys.exit(subprocess.call([sys.executable, str(script), *sys.argv[1:]]))
