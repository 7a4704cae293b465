"""The work of one replica, without Ray: a pipeline, its pool's catalogue, and batches of ``ImageRequest``s.

``Engine.run(requests)`` takes whatever a ``@serve.batch`` call gathered and returns one ``Outcome`` per
request, in order. Inside it:

* each request's LoRAs are loaded and held (``Catalogue.acquire``); a request whose LoRA cannot load fails alone;
  one whose LoRAs do not fit beside the batch's held ones waits for the next round of the same call;
* requests are grouped by ``ImageRequest.batch_key()`` (exact comparisons of plain values), and each group is
  one ``FusionPipeline(pipe, pool=pool, policy=...)`` call with per-image prompts, pairs and generators, so an
  image is the one that pipeline makes for it alone with the same seed and options;
* a call that runs out of memory is split in halves and retried (down to one image, which then fails with 503);
  a call that raises anything else is re-run one image at a time, so only the faulty request fails.

Only one thread may run an engine (the replica's worker thread): the pipeline and the pool are not shared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..errors import FusionEngineError, PoolBudgetError, UnknownLoRAError
from ..integration.pipeline import FusionPipeline
from .schema import ImageRequest, RequestError


@dataclass
class Outcome:
    """One request's answer: ``image`` (PIL) and ``summary``, or ``error`` (a ``RequestError``)."""

    request: ImageRequest
    image: object = None
    summary: dict | None = None
    error: RequestError | None = None
    batch_size: int = 0
    run_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def as_request_error(error: BaseException) -> RequestError:
    """The HTTP answer for an error raised while serving one request."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, UnknownLoRAError):
        return RequestError(404, str(error), "loras")
    if isinstance(error, PoolBudgetError):
        return RequestError(413, f"the LoRA does not fit the replica's pool budget: {error}", "loras")
    if is_out_of_memory(error):
        return RequestError(503, "the replica ran out of memory for this image alone; retry later", None,
                            retry_after=5)
    if isinstance(error, FusionEngineError):
        return RequestError(500, f"{type(error).__name__}: {error}", None)
    return RequestError(500, f"internal error ({type(error).__name__})", None)


class Engine:
    """A pipeline and a catalogue; ``run`` serves batches (see the module docstring)."""

    def __init__(self, pipe, catalogue, call=None):
        self.pipe, self.catalogue, self.pool = pipe, catalogue, catalogue.pool
        self._pipelines: dict[tuple, FusionPipeline] = {}
        self._call = call or self._pipeline_call  # tests swap in a call that fails on purpose
        self.default_size = FusionPipeline(pipe, pool=self.pool).default_size()
        self.size_multiple = FusionPipeline(pipe, pool=self.pool).size_multiple()

    def normalize(self, request: ImageRequest) -> ImageRequest:
        """The request with the default size filled in (so omitted and explicit defaults share batches); a side
        that is not a multiple of the pipeline's is a 400 naming it."""
        for side in ("width", "height"):
            value = getattr(request, side)
            if value and value % self.size_multiple:
                raise RequestError(400, f"{side} must be a multiple of {self.size_multiple}, got {value}", side)
        return replace(request, width=request.width or self.default_size, height=request.height or self.default_size)

    def fusion_pipeline(self, request: ImageRequest) -> FusionPipeline:
        key = (request.policy, request.options)
        if key not in self._pipelines:
            self._pipelines[key] = FusionPipeline(self.pipe, pool=self.pool, policy=request.policy,
                                                  trace=request.policy == "fls", **request.policy_options())
        return self._pipelines[key]

    # -- a batch ----------------------------------------------------------------------------------------------------
    def run(self, requests: list[ImageRequest]) -> list[Outcome]:
        outcomes = [Outcome(request) for request in requests]
        waiting = list(outcomes)
        for _ in range(len(outcomes)):  # each round serves at least one request or fails it
            if not waiting:
                break
            waiting = self._round(waiting)
        for outcome in waiting:  # not reached: a round always makes progress
            outcome.error = RequestError(503, "the replica's pool had no room for this request", None, 5)
        return outcomes

    def _round(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Hold LoRAs for as many requests as fit, run them, release; returns the requests left for later."""
        ready, later = [], []
        for outcome in outcomes:
            try:
                self.catalogue.acquire(outcome.request.loras)
            except PoolBudgetError as error:
                if ready:  # the batch's held LoRAs fill the pool: next round
                    later.append(outcome)
                else:
                    outcome.error = as_request_error(error)
                continue
            except Exception as error:  # a bad or vanished file: this request alone
                outcome.error = as_request_error(error)
                continue
            ready.append(outcome)
        try:
            groups: dict[tuple, list[Outcome]] = {}
            for outcome in ready:
                groups.setdefault(outcome.request.batch_key(), []).append(outcome)
            for group in groups.values():
                self._run_group(group)
        finally:
            for outcome in ready:
                self.catalogue.release(outcome.request.loras)
        return later

    def _run_group(self, group: list[Outcome]) -> None:
        start = time.perf_counter()
        try:
            images, summaries = self._call(self.fusion_pipeline(group[0].request), [o.request for o in group])
        except Exception as error:
            if len(group) == 1:
                group[0].error = as_request_error(error)
                return
            if is_out_of_memory(error):  # smaller calls may fit
                half = len(group) // 2
                self._run_group(group[:half])
                self._run_group(group[half:])
            else:  # isolate the faulty request(s)
                for outcome in group:
                    self._run_group([outcome])
            return
        spent = time.perf_counter() - start
        for outcome, image, summary in zip(group, images, summaries):
            outcome.image, outcome.summary, outcome.batch_size, outcome.run_s = image, summary, len(group), spent

    @staticmethod
    def _pipeline_call(pipeline: FusionPipeline, requests: list[ImageRequest]):
        """One pooled call: per-image prompt, LoRAs and generator; the options every request shares."""
        output = pipeline([r.prompt for r in requests], loras=[r.loras for r in requests],
                          generator=[torch.Generator().manual_seed(r.seed) for r in requests],
                          progress=False, **requests[0].call_options())
        summaries = []
        for index, request in enumerate(requests):
            kept = output.trace.image_summary(index, output.loras[index]) if output.trace is not None else None
            summaries.append({"policy": request.policy, "loras": list(request.loras), "kept": kept})
        return output.images, summaries


__all__ = ["Engine", "Outcome", "as_request_error", "is_out_of_memory"]
