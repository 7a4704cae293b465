"""CPU throughput of the LoRA pool on the embedded world: run with `pytest bench/test_bench_pool.py -m bench`.

K requests, each with its own (subject, style) pair, K = 1, 2, 4, 8, 16, made two ways:
* pool        - one `fe.attach(pipe, pool=pool)` and one pipeline call of K images, `loras=` one per image;
* pool_direct - the same with policy "direct" (each image adds its pair, no selection: what the diffusers way
  below computes);
* per_request - for each request: `fe.attach(pipe, subject, style)`, a one-image call, `detach` (what a
  service does without a pool);
* diffusers   - diffusers' own way, in a second copy of the pipeline: both LoRA files loaded once as PEFT
  adapters (`load_lora_weights`), then for each request `set_adapters` with its pair's weights and a one-image
  call (plain LoRA addition, no fusion policy: the cost of adapter switching without any selection).
The K pairs are the world's subject and style LoRAs at K different scales, each its own pool entry (the pool
gathers each image's factors by slot whatever they hold, so this costs what K unrelated LoRA pairs of the same
ranks cost). Same seeds, steps and guidance both ways; images/s and the ratio are printed at the end
(bench/conftest.py). Steps: FUSION_BENCH_STEPS (default 4); rounds: FUSION_BENCH_ROUNDS (default 3). On a shared
machine pass `--benchmark-timer time.process_time`: both ways run on one thread, so CPU time measures the work.
"""
from __future__ import annotations

import os

import pytest
import torch

import fusion_engine as fe

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.bench

COUNTS = (1, 2, 4, 8, 16)
STEPS = int(os.environ.get("FUSION_BENCH_STEPS", "4"))
ROUNDS = int(os.environ.get("FUSION_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fusion_engine.worlds import load_world

    world = load_world("auto", folder=tmp_path_factory.mktemp("world"))
    subject, style = world.subject(), world.style()
    pairs = [(subject.with_scale(1 + 0.05 * k), style.with_scale(1 + 0.05 * k)) for k in range(max(COUNTS))]
    pool = fe.LoRAPool()
    for k, (s, t) in enumerate(pairs):
        pool.add(f"subject{k}", s).add(f"style{k}", t)
    return world, pairs, pool


@pytest.fixture(scope="module")
def diffusers_pipe(world):
    """A second pipeline of the same world with both LoRA files loaded as diffusers (PEFT) adapters."""
    pytest.importorskip("peft")
    from fusion_engine.worlds.toy.world import build_toy_pipeline

    world = world[0]
    pipe = build_toy_pipeline()
    pipe.load_lora_weights(str(world.subject_path), adapter_name="subject")
    pipe.load_lora_weights(str(world.style_path), adapter_name="style")
    return pipe


def _options(seed):
    return dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seed])


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("method", ["pool", "pool_direct", "per_request", "diffusers"])
def test_pool_throughput_cpu(benchmark, record_pool, world, method, count, request):
    world, pairs, pool = world
    pipe, prompts = world.pipe, [world.prompt] * count

    def batched(policy="fls"):
        with fe.attach(pipe, pool=pool, policy=policy):
            pipe(prompts, loras=[(f"subject{k}", f"style{k}") for k in range(count)], **_options(range(count)))

    def one_by_one():
        for k in range(count):
            with fe.attach(pipe, *pairs[k]):
                pipe(prompts[:1], **_options([k]))

    def diffusers_adapters():
        adapters = request.getfixturevalue("diffusers_pipe")
        for k in range(count):
            adapters.set_adapters(["subject", "style"], [1 + 0.05 * k, 1 + 0.05 * k])  # the pairs' scales
            adapters(prompts[:1], **_options([k]))

    run = {"pool": batched, "pool_direct": lambda: batched("direct"), "per_request": one_by_one,
           "diffusers": diffusers_adapters}[method]
    with torch.inference_mode():
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record_pool(count, method, benchmark)
