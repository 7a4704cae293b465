"""Load on the Ray Serve service: C concurrent clients, each sending requests for K distinct LoRA pairs.

Reports images/s, p50/p95/p99 latency and the batch-size histogram of the pooled service, the same requests
against a replica that serves one pair per call (max_batch_size=1: no pooled batching), and an idle-queue check
(one request alone waits no longer than batch_wait_timeout_s before its batch starts).

Run (starts a local, loopback-only Ray with both applications; the toy world on CPU):
    python bench/serve_load.py --clients 8 --pairs 4 --requests 4 --steps 10
    python bench/serve_load.py --smoke                       # seconds: what tests/test_serve_ray.py runs
Against a running service (no comparison unless --single-url is given):
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY

Every request loop is bounded (clients x requests, each with a timeout) and talks to the URLs given (loopback by
default) only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_engine.serve.client import Client, ServiceError  # noqa: E402

PROMPT = "a sks mushroom in zzt style"
PAIRS = [("subject", "style"), ("subject_half", "style"), ("subject", "style_half"), ("subject_half", "style_half"),
         ("subject",), ("style",)]
SINGLE_APP, SINGLE_PREFIX = "fusion_engine_single", "/single"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load(url: str, api_key: str | None, clients: int, pairs: int, per_client: int, steps: int,
         timeout_s: float = 300.0) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in turn, pairs assigned round-robin over ``pairs``
    distinct ones (so concurrent requests name different pairs)."""
    if not 1 <= pairs <= len(PAIRS):
        raise SystemExit(f"--pairs must be in 1..{len(PAIRS)}")
    client = Client(url, api_key=api_key, timeout_s=timeout_s)

    def one_client(index: int) -> list[tuple]:
        out = []
        for turn in range(per_client):
            pair = PAIRS[(index + turn * clients) % pairs]
            start = time.perf_counter()
            try:
                answer = client.generate(PROMPT, loras=list(pair), seed=index * 1000 + turn, steps=steps)
                out.append(("ok", time.perf_counter() - start, answer.timing["batch_size"]))
            except (ServiceError, OSError) as error:
                out.append((type(error).__name__ + str(getattr(error, "status", "")), time.perf_counter() - start,
                            0))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [row for rows in pool.map(one_client, range(clients)) for row in rows]
    wall = time.perf_counter() - start
    latencies = [latency for status, latency, _ in results if status == "ok"]
    return {"requests": len(results), "ok": len(latencies), "errors": dict(Counter(s for s, _, _ in results
                                                                                  if s != "ok")),
            "wall_s": wall, "images_per_s": len(latencies) / wall if wall else 0.0,
            "p50_s": percentile(latencies, 50) if latencies else None,
            "p95_s": percentile(latencies, 95) if latencies else None,
            "p99_s": percentile(latencies, 99) if latencies else None,
            "mean_s": statistics.fmean(latencies) if latencies else None,
            "batch_sizes": dict(sorted(Counter(size for status, _, size in results if status == "ok").items()))}


def idle_check(url: str, api_key: str | None, steps: int, wait_s: float, slack_s: float = 0.15) -> dict:
    """One request alone on an idle service: the time it waited before its batch ran (``queue_s``: total minus
    the pipeline call) must stay within ``batch_wait_timeout_s`` (plus ``slack_s`` for the HTTP hops)."""
    answer = Client(url, api_key=api_key, timeout_s=120).generate(PROMPT, loras=["subject", "style"], seed=1,
                                                                  steps=steps)
    queued = answer.timing["queue_s"]
    return {"queue_s": queued, "total_s": answer.timing["total_s"], "batch_wait_timeout_s": wait_s,
            "ok": queued <= wait_s + slack_s}


def table(rows: dict, clients: int, pairs: int, steps: int, threads: int) -> str:
    lines = [f"C={clients} clients, K={pairs} pairs, {steps} steps, 32x32 toy world, CPU, torch threads per "
             f"replica: {threads}", "",
             "| service | images/s | p50 (s) | p95 (s) | p99 (s) | batch sizes (size: images) | errors |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        def cell(key, row=row):
            return "-" if row[key] is None else f"{row[key]:.2f}"
        lines.append(f"| {name} | {row['images_per_s']:.2f} | {cell('p50_s')} | {cell('p95_s')} | {cell('p99_s')} | "
                     f"{row['batch_sizes']} | {row['errors'] or 0} |")
    return "\n".join(lines)


def run(url: str, api_key: str | None, single_url: str | None, args) -> dict:
    rows = {"pooled batches": load(url, api_key, args.clients, args.pairs, args.requests, args.steps)}
    if single_url:
        rows["one pair per call"] = load(single_url, api_key, args.clients, args.pairs, args.requests, args.steps)
    time.sleep(args.batch_wait_timeout_s * 2)  # the queue drains
    idle = idle_check(url, api_key, args.steps, args.batch_wait_timeout_s)
    report = {"rows": rows, "idle": idle, "table": table(rows, args.clients, args.pairs, args.steps, args.threads)}
    print(report["table"])
    print(f"\nidle-queue check: a lone request waited {idle['queue_s']:.3f} s before its batch ran "
          f"(batch_wait_timeout_s={args.batch_wait_timeout_s}): {'ok' if idle['ok'] else 'TOO LONG'}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running service (default: start one on a local Ray)")
    p.add_argument("--single-url", default=None, help="with --url: a service with max_batch_size=1 to compare")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (both services)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny: 3 clients, 3 pairs, 2 requests each, 2 steps")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.clients, args.pairs, args.requests, args.steps = 3, 3, 2, 2
    for name in ("clients", "requests", "steps"):
        if not 1 <= getattr(args, name) <= 1000:
            raise SystemExit(f"--{name} must be in 1..1000")
    started = args.url is None
    url, single_url = args.url, args.single_url
    if started:
        from fusion_engine.serve import runner
        from fusion_engine.serve.config import ServeConfig

        common = dict(batch_wait_timeout_s=args.batch_wait_timeout_s, threads=args.threads, max_queue=256)
        url = runner.start(ServeConfig(max_batch_size=args.max_batch_size, **common), port=args.port)
        runner.deploy(ServeConfig(max_batch_size=1, **common), SINGLE_APP, SINGLE_PREFIX)
        single_url = url + SINGLE_PREFIX
    try:
        report = run(url, args.api_key, single_url, args)
    finally:
        if started:
            runner.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    failed = sum(row["requests"] - row["ok"] for row in report["rows"].values())
    return 0 if report["idle"]["ok"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
