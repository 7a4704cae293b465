"""A small batch API for services: requests (prompt, LoRAs, seed, options) in, one image each out.

``BatchFusion`` attaches a ``LoRAPool`` to one pipeline once and runs requests through it in batches: requests
whose call options agree (steps, guidance, size, ...) share one pipeline call, up to ``max_batch`` images, each
image fusing its own LoRAs with its own seed (so an image is the same whatever shares its batch). A request that
cannot run (a LoRA name the pool lacks, bad options) fails alone with its error; the rest of its batch completes.
If a whole batch call raises, each of its requests is run alone, so only the faulty ones fail.

Two ways to drive it: ``run(requests)`` (synchronous: group, run, return results in order), or ``start()`` +
``submit(request)`` -> ``concurrent.futures.Future`` with a worker thread that drains a bounded queue, waiting
at most ``max_wait_s`` after the first request of a batch for more to join it. Inside a network server (any
framework): create one ``BatchFusion`` per GPU at start-up, ``start()`` it, and from each request handler
``await asyncio.wrap_future(service.submit(request))``; a full queue raises ``ServiceBusyError`` at once
(answer 503). The attached pipeline is used only by the worker thread.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FusionEngineError, OptionError, ServiceBusyError
from .pool_attach import attach_pool_target

_RESERVED = ("prompt", "loras", "pairs", "generator", "num_images_per_prompt", "callback_on_step_end")


@dataclass
class Request:
    """One image to make: ``loras`` is a name, a (subject, style) pair, or N names (priority order)."""

    prompt: str
    loras: Any
    seed: int = 0
    options: dict = field(default_factory=dict)  # pipeline call options: num_inference_steps, guidance_scale, ...

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return tuple(sorted((k, repr(v)) for k, v in self.options.items()))


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
        if not max_wait_s >= 0:
            raise OptionError(f"BatchFusion: max_wait_s must be >= 0, got {max_wait_s!r}")
        self.pipe, self.pool, self.max_batch, self.max_wait_s = pipe, pool, max_batch, max_wait_s
        self.fusion = attach_pool_target(pipe, pool, **attach_options)
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
            if not isinstance(request.prompt, str):
                raise OptionError(f"prompt must be a string, got {type(request.prompt).__name__}")
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
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            pending, deadline = [first], time.monotonic() + self.max_wait_s
            while len(pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                results = self.run([request for request, _ in pending])
            except BaseException as error:  # a failure of the service itself: every waiting request learns it
                for _, future in pending:
                    future.set_exception(error)
                continue
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
