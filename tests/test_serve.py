"""fe.BatchFusion: requests in, one image each out; a bad request fails alone; batched images equal the
same requests run one at a time; the queued worker with a bounded queue."""
import threading

import pytest
import torch

import fusion_engine as fe
from fusion_engine import BatchFusion, Request
from fusion_engine.worlds.random import default_loras

OPTIONS = {"num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "pt"}


@pytest.fixture
def pool(tiny_pipe):
    s0, t0 = default_loras(tiny_pipe.unet, seed=0)
    s1, t1 = default_loras(tiny_pipe.unet, seed=10)
    return fe.LoRAPool().add("dog", s0).add("watercolor", t0).add("cat", s1).add("pixel", t1)


def test_a_request_naming_an_unknown_lora_fails_alone(tiny_pipe, pool):
    requests = [Request("a dog", ("dog", "watercolor"), seed=1, options=OPTIONS),
                Request("a cow", ("cow", "watercolor"), seed=2, options=OPTIONS),
                Request("a cat", ("cat", "pixel", "dog"), seed=3, options=OPTIONS),
                Request("a house", "watercolor", seed=4, options={**OPTIONS, "guidance_scale": 3.0})]
    with BatchFusion(tiny_pipe, pool, max_batch=8) as service:
        batched = service.run(requests)
        alone = [service.run([request])[0] for request in requests]
    assert [r.ok for r in batched] == [True, False, True, True]
    assert isinstance(batched[1].error, fe.UnknownLoRAError) and "'cow'" in str(batched[1].error)
    for together, single in zip(batched, alone):
        if together.ok:  # an image does not depend on what shares its batch
            torch.testing.assert_close(together.image, single.image, atol=2e-5, rtol=1e-4)
            assert together.summary["kept"] == single.summary["kept"]
    assert set(batched[2].summary["kept"]) == {"cat", "pixel", "dog", "base"}
    assert sum(batched[0].summary["kept"].values()) == 2 * len(service.fusion.layers)
    assert not any(isinstance(m, fe.runtime.layers.DynamicLoRALayer) for m in tiny_pipe.unet.modules())  # closed


def test_a_batch_that_raises_is_retried_per_request(tiny_pipe, pool):
    def faulty(self, prompt, *args, **kwargs):  # a request the pipeline itself chokes on, in any batch
        if any("boom" in p for p in prompt):
            raise RuntimeError("the pipeline choked on 'boom'")
        return original(self, prompt, *args, **kwargs)

    with BatchFusion(tiny_pipe, pool) as service:
        original = type(tiny_pipe).__call__
        type(tiny_pipe).__call__ = faulty  # the attach's own subclass: its scope wraps this call
        try:
            results = service.run([Request("a dog", "dog", seed=1, options=OPTIONS),
                                   Request("boom", "cat", options=OPTIONS),
                                   Request("a cat", "cat", options={**OPTIONS, "generator": 3}),
                                   Request("a cat", "cat", seed=2, options=OPTIONS)])
        finally:
            type(tiny_pipe).__call__ = original
    assert [r.ok for r in results] == [True, False, False, True], [r.error for r in results]
    assert "choked" in str(results[1].error) and "['generator'] are set by BatchFusion" in str(results[2].error)


def test_worker_batches_queued_requests_and_refuses_when_full(tiny_pipe, pool):
    service = BatchFusion(tiny_pipe, pool, max_batch=3, max_wait_s=0.5, max_queue=2)
    with pytest.raises(fe.OptionError, match="start"):
        service.submit(Request("a dog", "dog", options=OPTIONS))
    calls, original = [], type(tiny_pipe).__call__
    gate = threading.Event()

    def counting(self, prompt, *args, **kwargs):
        gate.wait(10)
        calls.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    type(tiny_pipe).__call__ = counting  # the attach's own subclass: its scope wraps this call
    try:
        service.start()
        futures = [service.submit(Request(f"a dog {i}", "dog", seed=i, options=OPTIONS)) for i in range(2)]
        while not service._queue.empty():  # the worker took both into one pending batch
            threading.Event().wait(0.01)
        futures += [service.submit(Request("a cat", "cat", options=OPTIONS)) for _ in range(2)]
        with pytest.raises(fe.ServiceBusyError, match="2 requests are waiting"):
            service.submit(Request("one too many", "cat", options=OPTIONS))
        gate.set()
        results = [future.result(timeout=120) for future in futures]
    finally:
        type(tiny_pipe).__call__ = original
        service.close()
    assert all(r.ok for r in results) and sum(calls) == 4 and len(calls) <= 3
