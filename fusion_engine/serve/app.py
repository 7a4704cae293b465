"""The Ray Serve application: one deployment per base model, each replica one pipeline and one attached pool.

HTTP routes (JSON in and out; see docs/SERVING.md):

* ``POST /v1/images`` -> ``{"image": <PNG base64>, "seed", "loras", "policy", "trace", "timing", ...}``
* ``POST /sdapi/v1/txt2img`` -> AUTOMATIC1111's answer shape ``{"images": [...], "parameters", "info"}``
* ``GET /v1/loras`` (the catalogue), ``GET /healthz``

A request is validated on the replica's event loop (400/404/413 before it is queued), then waits in
``@serve.batch`` for others; the batch runs in the replica's one worker thread (``Engine.run``), so the event
loop keeps answering health checks and new requests while the pipeline samples. Requests are not multiplexed by
LoRA pair: one batch mixes pairs, which is the point of the pool.

Start it with ``fusion-engine serve`` (a local Ray bound to 127.0.0.1) or on a running cluster with
``fusion-engine serve --address auto`` / ``serve run fusion_engine.serve.app:build_app``.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import FusionEngineError
from .config import API_KEY_ENV, ServeConfig, load_pipeline, toy_catalogue
from .schema import Limits, RequestError, load_json, parse_images, parse_txt2img


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _error(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(int(error.retry_after or 1))} if error.status == 503 else None
    if error.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return _json(error.status, error.body(), headers)


def _bind_internal_grpc_to_loopback() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server on every interface (``[::]:0``) whatever the node's
    address. On a node whose address is loopback (the local instance ``fusion-engine serve`` starts) bind it to
    127.0.0.1 instead, like every other Ray listener there; on a cluster node nothing changes."""
    import ray
    from ray.serve._private import replica as replica_module

    add_port = getattr(replica_module, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "loopback_only", False) or \
            ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return

    def loopback_port(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return add_port(server, address)

    loopback_port.loopback_only = True
    replica_module.add_port_to_grpc_server = loopback_port


class _Metrics:
    """Counters through Ray's metrics API (exported by Ray's metrics agent in Prometheus format)."""

    def __init__(self, backend=None):
        """``backend``: a module with ``Counter``, ``Histogram`` and ``Gauge`` (default ``ray.serve.metrics``;
        tests pass one that records)."""
        if backend is None:
            from ray.serve import metrics as backend
        metrics = backend
        self.requests = metrics.Counter("fusion_requests", description="HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.errors = metrics.Counter("fusion_errors", description="refused or failed requests by kind",
                                      tag_keys=("kind",))
        self.images = metrics.Counter("fusion_images", description="images made (rate: images/s)")
        self.evictions = metrics.Counter("fusion_lora_evictions", description="LoRAs evicted from the pool")
        self.batch_size = metrics.Histogram("fusion_batch_size", description="images per pipeline call",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.queue = metrics.Gauge("fusion_queue_depth", description="requests waiting in this replica")


@serve.deployment(graceful_shutdown_timeout_s=120, graceful_shutdown_wait_loop_s=1, health_check_period_s=5,
                  health_check_timeout_s=30)
class FusionService:
    """One replica: a pipeline, a pool with its catalogue, a worker thread; batches by ``@serve.batch``."""

    def __init__(self, config: dict, metrics: _Metrics | None = None):
        import torch

        import fusion_engine as fe

        from .catalogue import Catalogue
        from .engine import Engine

        _bind_internal_grpc_to_loopback()  # before Serve starts that server, right after this __init__
        self.config = ServeConfig(**config).check()
        self.limits = Limits(**self.config.limits)
        torch.set_num_threads(self.config.threads)
        self.metrics = metrics or _Metrics()
        pipe, device, dtype = load_pipeline(self.config)
        self._closed = False
        self._own_folder = None if self.config.loras else tempfile.mkdtemp(prefix="fusion-serve-loras-")
        folder = self.config.loras or toy_catalogue(self._own_folder)
        pool = fe.LoRAPool(device=device, dtype=dtype, budget_bytes=self.config.budget_bytes)
        self.catalogue = Catalogue(folder, pool, on_evict=lambda name: self.metrics.evictions.inc())
        self.engine = Engine(pipe, self.catalogue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion-engine")
        self._batched.set_max_batch_size(self.config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._waiting = 0
        self._key = (self.config.api_key or "").encode()
        try:
            self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - outside Serve (a unit test): no id
            self.replica = f"pid-{os.getpid()}"

    def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("this replica is shutting down")

    def __del__(self) -> None:
        """Serve's graceful shutdown: the worker finishes, the replica's own toy catalogue folder goes."""
        self._closed = True
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        if getattr(self, "_own_folder", None):
            shutil.rmtree(self._own_folder, ignore_errors=True)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, requests: list) -> list:
        self.metrics.batch_size.observe(len(requests))
        outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.run, requests)
        made = sum(outcome.ok for outcome in outcomes)
        if made:  # Ray's counters take only positive increments
            self.metrics.images.inc(made)
        return outcomes

    # -- HTTP ---------------------------------------------------------------------------------------------------------
    async def __call__(self, http: Request) -> JSONResponse:
        path, root = http.scope.get("path", "/"), http.scope.get("root_path", "")
        if root and root != "/" and path.startswith(root):  # an app deployed under a route prefix
            path = path[len(root):]
        route = path.rstrip("/") or "/"
        routes = {("GET", "/healthz"): self._health, ("GET", "/v1/loras"): self._loras,
                  ("POST", "/v1/images"): self._images, ("POST", "/sdapi/v1/txt2img"): self._txt2img}
        handler = routes.get((http.method, route))
        try:
            if handler is None:
                known = any(path == route for _, path in routes)
                raise RequestError(405 if known else 404, f"no route {http.method} {route}", None)
            if route != "/healthz":
                self._authorize(http)
            response = await handler(http)
        except RequestError as error:
            self.metrics.errors.inc(tags={"kind": str(error.status)})
            response = _error(error)
        self.metrics.requests.inc(tags={"route": route if handler else "other", "status": str(response.status_code)})
        return response

    def _authorize(self, http: Request) -> None:
        if not self._key:
            return
        given = http.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise RequestError(401, "a valid API key is required: Authorization: Bearer <key>", "authorization")

    async def _health(self, http: Request) -> JSONResponse:
        return _json(200, {"status": "ok", "replica": self.replica, "waiting": self._waiting,
                           "loaded": self.catalogue.pool.names})

    async def _loras(self, http: Request) -> JSONResponse:
        pool = self.catalogue.pool
        return _json(200, {"loras": self.catalogue.listing(), "pool_bytes": pool.nbytes,
                           "budget_bytes": pool.budget_bytes, "evictions": self.catalogue.evictions})

    async def _body(self, http: Request):
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise RequestError(413, f"the body has {declared} bytes, over the limit of {self.limits.max_body_bytes}",
                               "body")
        return load_json(await http.body(), self.limits)

    async def _serve_one(self, request):
        """Validate against the catalogue and the pipeline, queue into the batch, wait for the outcome."""
        request = self.engine.normalize(request)
        try:
            self.engine.fusion_pipeline(request)  # the policy and its options, checked before queueing
        except FusionEngineError as error:
            raise RequestError(400, f"{type(error).__name__}: {error}", "options") from None
        for index, name in enumerate(request.loras):
            self.catalogue.path(name, f"loras[{index}]")
        if self._waiting >= self.config.max_queue:
            raise RequestError(503, f"{self._waiting} requests are waiting in this replica; retry later", None,
                               retry_after=max(1, round(self._waiting * 0.1)))
        self._waiting += 1
        self.metrics.queue.set(self._waiting)
        start = time.perf_counter()
        try:
            outcome = await self._batched(request)
        finally:
            self._waiting -= 1
            self.metrics.queue.set(self._waiting)
        if not outcome.ok:
            raise outcome.error
        total = time.perf_counter() - start
        timing = {"total_s": round(total, 4), "run_s": round(outcome.run_s, 4),
                  "queue_s": round(max(0.0, total - outcome.run_s), 4), "batch_size": outcome.batch_size}
        return request, outcome, timing

    async def _images(self, http: Request) -> JSONResponse:
        request, outcome, timing = await self._serve_one(parse_images(await self._body(http), self.limits))
        return _json(200, {"image": _png_base64(outcome.image), "format": "png", "seed": request.seed,
                           "loras": list(request.loras), "policy": request.policy,
                           "options": request.policy_options(), "steps": request.steps,
                           "guidance": request.guidance, "width": request.width, "height": request.height,
                           "trace": outcome.summary["kept"], "timing": timing, "replica": self.replica})

    async def _txt2img(self, http: Request) -> JSONResponse:
        request, outcome, timing = await self._serve_one(parse_txt2img(await self._body(http), self.limits))
        parameters = {"prompt": request.prompt, "seed": request.seed, "steps": request.steps,
                      "cfg_scale": request.guidance, "width": request.width, "height": request.height,
                      "loras": list(request.loras), "policy": request.policy}
        info = {**parameters, "trace": outcome.summary["kept"], "timing": timing}
        return _json(200, {"images": [_png_base64(outcome.image)], "parameters": parameters,
                           "info": json.dumps(info)})


def build_app(args: dict | None = None):
    """The bound application for ``serve.run`` or ``serve run fusion_engine.serve.app:build_app key=value``
    (keys: ``ServeConfig`` fields)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig(**_typed(args or {}))
    return FusionService.options(**config.deployment_options()).bind(asdict(config))


def _typed(args: dict) -> dict:
    """``serve run`` passes strings: turn them into the ``ServeConfig`` field types."""
    kinds = {"replicas": int, "max_batch_size": int, "max_queue": int, "budget_bytes": int, "threads": int,
             "min_replicas": int, "max_replicas": int, "target_ongoing_requests": float, "num_cpus": float,
             "num_gpus": float, "batch_wait_timeout_s": float}
    return {name: kinds[name](value) if name in kinds and isinstance(value, str) else value
            for name, value in args.items()}


__all__ = ["API_KEY_ENV", "FusionService", "ServeConfig", "build_app"]
