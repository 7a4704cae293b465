"""The service's metrics, recorded through a fake backend injected into the replica class (no Ray instance: the
deployment's class is built and called directly, with ``@serve.batch`` running on this test's event loop)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

import pytest

pytest.importorskip("ray.serve")

from starlette.requests import Request  # noqa: E402

from fusion_engine.serve.app import FusionService, _Metrics  # noqa: E402
from fusion_engine.serve.config import ServeConfig  # noqa: E402

PROMPT = "a sks mushroom in zzt style"


class _Recorder:
    """Stands for ``ray.serve.metrics``: every Counter/Histogram/Gauge call lands in ``calls``."""

    def __init__(self):
        self.calls = []
        recorder = self

        class _Metric:
            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                self.name = name

            def _record(self, kind, value, tags):
                recorder.calls.append((self.name, kind, value, dict(tags or {})))

            def inc(self, value=1.0, tags=None):
                self._record("inc", value, tags)

            def observe(self, value, tags=None):
                self._record("observe", value, tags)

            def set(self, value, tags=None):
                self._record("set", value, tags)

        self.Counter = self.Histogram = self.Gauge = _Metric

    def of(self, name):
        return [(kind, value, tags) for metric, kind, value, tags in self.calls if metric == name]


def _post(path: str, body) -> Request:
    data = json.dumps(body).encode()
    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": data, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    return Request(scope, receive)


def test_a_served_batch_an_error_and_an_eviction_are_counted_with_their_tags(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    config = ServeConfig(max_batch_size=4, batch_wait_timeout_s=0.5)
    # outside a replica, @serve.batch asks the replica context only for the deployment's max_ongoing_requests
    context = SimpleNamespace(_deployment_config=SimpleNamespace(
        max_ongoing_requests=config.deployment_options()["max_ongoing_requests"]))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    recorder = _Recorder()
    service = FusionService.func_or_class(asdict(config), metrics=_Metrics(recorder))
    try:
        pair = {"prompt": PROMPT, "steps": 2, "width": 16, "height": 16}

        async def scenario():
            served = await asyncio.gather(
                service(_post("/v1/images", {**pair, "subject": "subject", "style": "style", "seed": 1})),
                service(_post("/v1/images", {**pair, "subject": "subject_half", "style": "style", "seed": 2})))
            unknown = await service(_post("/v1/images", {**pair, "subject": "nobody", "style": "style"}))
            bad = await service(_post("/v1/images", {**pair, "subject": "subject", "style": "style", "steps": 0}))
            # then a budget that holds only the LoRAs loaded so far: a new pair evicts the least recently used
            pool = service.catalogue.pool
            pool.budget_bytes, loaded = pool.nbytes, len(pool.names)
            evictions = list(recorder.of("fusion_lora_evictions"))
            other = await service(_post("/v1/images", {**pair, "subject": "subject", "style": "style_half"}))
            return served, unknown, bad, evictions, other, loaded

        # one event loop for all: @serve.batch's queue lives on the loop that first used it
        served, unknown, bad, evictions_before, other, loaded = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert [r.status_code for r in served] == [200, 200] and (unknown.status_code, bad.status_code) == (404, 400)
        # one pooled call of two images with different pairs
        assert recorder.of("fusion_batch_size") == [("observe", 2, {}), ("observe", 1, {})]
        assert recorder.of("fusion_images") == [("inc", 2, {}), ("inc", 1, {})]
        assert [json.loads(r.body)["timing"]["batch_size"] for r in served] == [2, 2]
        # two waited together, then the queue emptied; refused requests never entered it
        depths = [value for kind, value, _ in recorder.of("fusion_queue_depth")]
        assert depths[:2] == [1, 2] and depths[2:] == [1, 0, 1, 0]
        assert recorder.of("fusion_errors") == [("inc", 1.0, {"kind": "404"}), ("inc", 1.0, {"kind": "400"})]
        statuses = sorted(tags["status"] for _, _, tags in recorder.of("fusion_requests"))
        assert statuses == ["200", "200", "200", "400", "404"]
        assert {tags["route"] for _, _, tags in recorder.of("fusion_requests")} == {"/v1/images"}
        assert evictions_before == [] and other.status_code == 200
        evicted = recorder.of("fusion_lora_evictions")
        assert evicted and all(call == ("inc", 1.0, {}) for call in evicted)
        assert len(evicted) == service.catalogue.evictions and len(service.catalogue.pool.names) <= loaded
    finally:
        service.__del__()
        # @serve.batch keeps its queue (bound to this test's finished loop) on the class's method: drop it, or the
        # deployment class no longer pickles for a later Ray test in this process
        FusionService.func_or_class._batched.set_max_batch_size.__self__._queue = None


def test_ray_serve_accepts_the_autoscaling_config_from_serve_run_arguments():
    from fusion_engine.serve.app import build_app

    # `serve run ... min_replicas=0 max_replicas=3` passes strings; Ray validates the config when it is bound
    config = build_app({"min_replicas": "0", "max_replicas": "3"})._bound_deployment._deployment_config
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (0, 3, 1)
    assert scaling.target_ongoing_requests == 8.0 and config.max_ongoing_requests == 64 + 8
