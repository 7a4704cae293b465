"""A small batch API for services: requests (prompt, LoRAs, seed, options) in, one image each out.

``BatchFusion`` attaches a ``LoRAPool`` to one pipeline once and runs requests through it in batches: requests
whose call options agree (steps, guidance, size, ...) share one pipeline call, up to ``max_batch`` images, each
image fusing its own LoRAs with its own seed (so an image is the same whatever shares its batch). A request that
cannot run (a LoRA name the pool lacks, bad options) fails alone with its error; the rest of its batch completes.
If a whole batch call raises, each of its requests is run alone, so only the faulty ones fail.

Requests share a call only when their options are equal as plain values (numbers, strings, None, and lists,
tuples and dicts of them): a request whose options hold anything else (a tensor, an image, an array) runs in a
call of its own, since such values cannot be compared exactly (torch abbreviates a large tensor's repr).

Two ways to drive it: ``run(requests)`` (synchronous: group, run, return results in order), or ``start()`` +
``submit(request)`` -> ``concurrent.futures.Future`` with a worker thread that drains a bounded queue, waiting
at most ``max_wait_s`` after the first request of a batch for more to join it. Inside a network server (any
framework): create one ``BatchFusion`` per GPU at start-up, ``start()`` it, and from each request handler
``await asyncio.wrap_future(service.submit(request))``; a full queue raises ``ServiceBusyError`` at once
(answer 503). A future cancelled while it waits (a client that timed out or left) is skipped; the worker
survives whatever a batch raises, and should it stop anyway ``submit`` raises ``ServiceStoppedError`` rather
than queue a request nothing would answer. The attached pipeline is used only by the worker thread.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FusionEngineError, OptionError, OptionTypeError, ServiceBusyError, ServiceStoppedError
from .attach import attach_target

_RESERVED = ("prompt", "loras", "pairs", "generator", "num_images_per_prompt", "callback_on_step_end")


@dataclass
class Request:
    """One image to make: ``loras`` is a name, a (subject, style) pair, or N names (priority order)."""

    prompt: str
    loras: Any
    seed: int = 0
    options: dict = field(default_factory=dict)  # pipeline call options: num_inference_steps, guidance_scale, ...

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call: the options as exact plain values; a request with
        an option that cannot be compared exactly (a tensor, an image) gets a key of its own."""
        key = _exact(self.options)
        return key if key is not None else ("alone", object())


def _exact(value):
    """A hashable key equal only for equal plain values (numbers, strings, None, and lists, tuples and dicts of
    them; the type is part of the key, so 1, 1.0 and True differ), or None for anything else."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return type(value).__name__, value
    if isinstance(value, (list, tuple)):
        items = tuple(_exact(item) for item in value)
        return None if None in items else (type(value).__name__, items)
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        items = tuple((name, _exact(value[name])) for name in sorted(value))
        return None if any(item is None for _, item in items) else ("dict", items)
    return None


@dataclass
class Result:
    """The outcome of one request: ``image`` and ``summary`` (which LoRA each layer kept, counted over the
    steps and layers; FLS), or ``error``."""

    request: Request
    image: Any = None
    summary: dict | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchFusion:
    """Serve a pool of LoRAs through one pipeline, many requests per call (see the module docstring).

    Args:
        pipe: a diffusers pipeline (SD1.x/SDXL; any pipeline ``fe.attach`` follows).
        pool: the ``fe.LoRAPool`` the requests name LoRAs from (add/remove between batches is fine).
        max_batch: images per pipeline call at most.
        max_wait_s: how long the worker waits after a batch's first request for more to join.
        max_queue: requests waiting at most; ``submit`` beyond it raises ``ServiceBusyError``.
        **attach_options: ``policy``, ``divergence``, ... as ``fe.attach(pipe, pool=pool, ...)`` takes them.

    Example:
        >>> service = BatchFusion(pipe, pool, max_batch=8)
        >>> results = service.run([Request("a dog", ("dog", "watercolor"), seed=1), Request("a cat", "cat")])
        >>> results[0].image.save("dog.png"); results[1].summary
    """

    def __init__(self, pipe, pool, *, max_batch: int = 8, max_wait_s: float = 0.05, max_queue: int = 64,
                 **attach_options):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"BatchFusion: {name} must be a whole number >= 1, got {value!r}")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s < math.inf:
            raise OptionError(f"BatchFusion: max_wait_s must be a finite number of seconds >= 0, got {max_wait_s!r}")
        self.pipe, self.pool, self.max_batch, self.max_wait_s = pipe, pool, max_batch, max_wait_s
        self.fusion = attach_target(pipe, pool=pool, **attach_options)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    # -- synchronous ---------------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Result]:
        """Results in the order of ``requests``; compatible requests share calls of up to ``max_batch`` images."""
        results = [Result(request) for request in requests]
        groups: dict[tuple, list[Result]] = {}
        for result in results:
            problem = self._check(result.request)
            if problem is not None:
                result.error = problem
            else:
                groups.setdefault(result.request.batch_key(), []).append(result)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                self._run_batch(group[start:start + self.max_batch])
        return results

    def _check(self, request: Request) -> BaseException | None:
        """Why ``request`` cannot run (its own fault), or None."""
        try:
            if not isinstance(request, Request):
                raise OptionTypeError(f"expected a fe.Request, got {type(request).__name__}")
            if not isinstance(request.prompt, str):
                raise OptionTypeError(f"prompt must be a string, got {type(request.prompt).__name__}")
            loras = request.loras
            if isinstance(loras, dict):
                raise OptionTypeError(f"loras is a dict ({sorted(map(str, loras))}): give a name, a (subject, style) "
                                      "pair or N names in priority order; a LoRA's strength is set when it is added "
                                      "to the pool")
            if not isinstance(loras, str) and not (isinstance(loras, (list, tuple)) and loras
                                                   and all(isinstance(name, str) for name in loras)):
                raise OptionTypeError(f"loras must be a LoRA name or a non-empty list/tuple of names, got "
                                      f"{type(loras).__name__} {loras!r:.80}")
            if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
                raise OptionTypeError(f"seed must be a whole number in [0, 2**63), got {request.seed!r}")
            if not isinstance(request.options, dict) or not all(isinstance(name, str) for name in request.options):
                raise OptionTypeError(f"options must be a dict of pipeline call options by name, got "
                                      f"{type(request.options).__name__} {request.options!r:.80}")
            reserved = sorted(set(request.options) & set(_RESERVED))
            if reserved:
                raise OptionError(f"options {reserved} are set by BatchFusion per request; pass prompt, loras, seed")
            self.fusion.policy.check_named(len(self._names(request)))
            for name in self._names(request):
                self.pool.slot(name)
        except FusionEngineError as error:
            return error
        return None

    @staticmethod
    def _names(request: Request) -> tuple:
        return (request.loras,) if isinstance(request.loras, str) else tuple(request.loras)

    def _run_batch(self, batch: list[Result]) -> None:
        requests = [result.request for result in batch]
        try:
            output = self.pipe([r.prompt for r in requests], loras=[self._names(r) for r in requests],
                               generator=[torch.Generator().manual_seed(r.seed) for r in requests],
                               **requests[0].options)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            for result in batch:  # isolate the faulty request(s)
                self._run_batch([result])
            return
        trace = self.fusion.trace
        for index, result in enumerate(batch):
            result.image = output.images[index]
            names = self._names(result.request)
            kept = trace.image_summary(index, names) if trace is not None and self.fusion.policy.uses_divergence \
                else None
            result.summary = {"policy": self.fusion.policy.describe(), "loras": list(names), "kept": kept}

    # -- queued, with a worker thread ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Queue ``request``; its ``Future`` resolves to a ``Result``. ``ServiceBusyError`` when the queue is full."""
        if self._worker is None:
            raise OptionError("BatchFusion.submit needs the worker: call start() first (or use run(requests))")
        if not self._worker.is_alive():
            raise ServiceStoppedError("BatchFusion: the worker thread has stopped, so nothing would answer this "
                                      "request; close() this service and start a new one")
        future: Future = Future()
        try:
            self._queue.put_nowait((request, future))
        except queue.Full:
            raise ServiceBusyError(f"BatchFusion: {self._queue.maxsize} requests are waiting already; retry later")\
                from None
        return future

    def start(self) -> BatchFusion:
        if self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._serve, name="BatchFusion", daemon=True)
            self._worker.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            try:
                self._serve_one()
            except BaseException:  # noqa: BLE001 - the worker outlives anything one batch does
                continue

    def _serve_one(self) -> None:
        """Take one batch from the queue (up to ``max_batch``, ``max_wait_s`` after its first request), run it and
        resolve its futures; a future cancelled while it waited is dropped (its client has gone)."""
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return
        pending, deadline = [first], time.monotonic() + self.max_wait_s
        while len(pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                pending.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        pending = [(request, future) for request, future in pending if future.set_running_or_notify_cancel()]
        if not pending:
            return
        try:
            results = self.run([request for request, _ in pending])
        except BaseException as error:  # a failure of the service itself: every waiting request learns it
            for _, future in pending:
                future.set_exception(error)
            return
        for (_, future), result in zip(pending, results):
            future.set_result(result)

    def close(self) -> None:
        """Finish what is queued, stop the worker, detach the pool from the pipeline."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
        self.fusion.detach()

    def __enter__(self) -> BatchFusion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["BatchFusion", "Request", "Result"]
