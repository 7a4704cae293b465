"""Start the HTTP service (Ray Serve, loopback only) and send it requests that mix LoRA pairs.

Run:
    pip install -e ".[serve]"
    python examples/serve_mixed_pairs.py [OUT]     # OUT defaults to example_out/serve_mixed_pairs

Starts a local Ray bound to 127.0.0.1 with the toy world (its subject and style LoRAs, and each at half strength),
sends 8 requests naming 4 different pairs from 4 concurrent clients through ``fusion_engine.serve.Client``
(the replica batches different pairs into one pipeline call), writes ``image<i>.png`` and ``results.json``
(per request: its LoRAs, seed, the trace summary and the batch it shared), and stops the service.
"""
import json
import os
import socket
import sys
from pathlib import Path

from fusion_engine.serve import Client, runner
from fusion_engine.serve.config import ServeConfig

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_out/serve_mixed_pairs")
out.mkdir(parents=True, exist_ok=True)
steps = int(os.environ.get("FUSION_EXAMPLE_STEPS", "20"))
with socket.socket() as probe:  # a free loopback port
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]

url = runner.start(ServeConfig(max_batch_size=8, batch_wait_timeout_s=0.2), port=port)
try:
    client = Client(url)
    print("catalogue:", [entry["name"] for entry in client.loras()])
    pairs = [("subject", "style"), ("subject_half", "style"), ("subject", "style_half"), ("subject_half",)]
    requests = [{"prompt": "a sks mushroom in zzt style", "loras": list(pairs[i % len(pairs)]), "seed": i,
                 "steps": steps} for i in range(8)]
    results = client.generate_many(requests, concurrency=4)
finally:
    runner.stop()

report = []
for index, result in enumerate(results):
    if isinstance(result, Exception):
        report.append({"error": str(result)})
    else:
        result.image.save(out / f"image{index}.png")
        report.append({"loras": result.info["loras"], "seed": result.seed, "trace": result.trace,
                       "batch_size": result.timing["batch_size"]})
    print(index, report[-1])
(out / "results.json").write_text(json.dumps(report, indent=1))
print(f"{sum('error' not in r for r in report)} of {len(report)} served; images in {out}")
sys.exit(0 if all("error" not in r for r in report) else 1)
