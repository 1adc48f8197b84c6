"""Inference workers: one thread per model, fed by a queue, so the event loop never runs a forward pass.

- :class:`ChatWorker` runs one generation at a time and pushes text deltas back to the
  request's event loop. Cancelling a job (stop button, client gone) is checked between
  tokens, so the worker moves on to the next job within one decoding step.
- :class:`ClassifierWorker` does dynamic micro-batching: it waits for the first request,
  then keeps collecting until it holds ``max_batch`` texts or ``max_wait_ms`` have passed,
  and classifies them in one forward pass (the batching idea of Clipper, Crankshaw et al., 2017),
  packed back to back without padding (``core.classifier.pack_texts``).

Both also run other work on their model in turn with the jobs (``await worker.call(fn, *args)``):
the Lab's measurements go through it, so a Lab request and a chat answer never compute on the
same model at the same time and the worker's thread settings apply to both.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.classifier import Prediction, classify
from core.fast.serving import ServingDecoder
from core.generation.generate import GenerationConfig, StreamChunk

logger = logging.getLogger("scratchgpt.workers")

_STOP = object()  # sentinel that ends a worker thread


class WorkerStopped(RuntimeError):
    """The model worker has shut down (the server is stopping)."""


def _thread_setup(threads: int | None) -> None:
    """Per worker thread: no autograd, and the configured torch CPU thread count (a per-thread setting)."""
    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)


@dataclass
class _End:
    error: BaseException | None = None


@dataclass
class ChatJob:
    """One generation request: the worker writes chunks, the request reads them with :meth:`events`."""

    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events_queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens taken from a kept cache, not prefilled (core.fast.prefix_cache)
    finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events_queue.put_nowait, item)
        except RuntimeError:  # the request's loop is gone: nobody is listening
            self.cancelled.set()

    async def events(self, heartbeat: float | None = None) -> AsyncIterator[StreamChunk | None]:
        """Chunks as the worker produces them; raises the worker's error if generation failed.

        With ``heartbeat``, yields None after that many idle seconds (a queued job), so a
        stream can send a keep-alive instead of going silent behind a proxy's timeout.
        """
        while True:
            try:
                item = await asyncio.wait_for(self.events_queue.get(), heartbeat)
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    @property
    def generation_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.perf_counter()) - self.started_at


@dataclass
class _Call:
    """A function to run on the worker's thread, between jobs; its result settles ``future``."""

    fn: Callable[..., Any]
    args: tuple
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:
        try:
            result = self.fn(*self.args)
        except Exception as exc:  # reported to the caller; the worker carries on
            _settle(self.loop, self.future, error=exc)
        else:
            _settle(self.loop, self.future, result=result)


class _Callable:
    """``call``: what both workers offer besides their own jobs."""

    name: str
    _queue: queue.Queue
    _closed: bool

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on this worker's thread, in turn with its jobs, and return its result."""
        if self._closed:
            raise WorkerStopped(f"the {self.name} worker has stopped")
        loop = asyncio.get_running_loop()
        item = _Call(fn, args, loop, loop.create_future())
        self._queue.put(item)
        return await item.future


class ChatWorker(_Callable):
    def __init__(self, checkpoint: Any, decoder: ServingDecoder, name: str, on_tokens: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None, threads: int | None = None,
                 on_prompt: Callable[[int, int], None] | None = None) -> None:
        self.checkpoint = checkpoint
        self.decoder = decoder
        self.name = name
        self.threads = threads
        self._queue: queue.Queue = queue.Queue()
        self._on_tokens = on_tokens or (lambda n: None)
        self._on_prompt = on_prompt or (lambda prompt, cached: None)  # each job's prompt tokens, and of them cached
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._thread = threading.Thread(target=self._run, name=f"chat-worker-{name}", daemon=True)
        self._closed = False
        self.current: ChatJob | None = None

    def start(self) -> "ChatWorker":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> ChatJob:
        if self._closed:
            raise WorkerStopped(f"the {self.name} worker has stopped")
        job = ChatJob(prompt_ids, config, asyncio.get_running_loop())
        self._queue.put(job)
        self._on_queue_depth(self._queue.qsize())
        return job

    def stop(self, timeout: float = 10.0) -> None:
        self._closed = True
        if self.current is not None:
            self.current.cancel()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        _thread_setup(self.threads)
        while True:
            job = self._queue.get()
            self._on_queue_depth(self._queue.qsize())
            if job is _STOP:
                break
            if isinstance(job, _Call):
                job.run()
                continue
            self.current = job
            try:
                self._generate(job)
            finally:
                self.current = None
        # Anything still queued at shutdown ends with an error instead of waiting forever.
        while not self._queue.empty():
            job = self._queue.get_nowait()
            stopped = WorkerStopped(f"the {self.name} worker stopped before this request ran")
            if isinstance(job, ChatJob):
                job._post(_End(stopped))
            elif isinstance(job, _Call):
                _settle(job.loop, job.future, error=stopped)

    def _generate(self, job: ChatJob) -> None:
        job.started_at = time.perf_counter()
        if job.cancelled.is_set():
            job.finished_at = job.started_at
            job._post(_End())
            return
        # This thread alone decodes with the model, so the kept caches' count moves for this job only.
        kept = self.decoder.prefix_cache
        reused_before = kept.reused_tokens if kept is not None else 0
        chunks = self.decoder.stream(self.checkpoint.tokenizer, job.prompt_ids, job.config)
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                for chunk in chunks:
                    job.completion_tokens += len(chunk.token_ids)
                    self._on_tokens(len(chunk.token_ids))
                    if chunk.finish_reason is not None:
                        job.finish_reason = chunk.finish_reason
                    job._post(chunk)
                    if job.cancelled.is_set():
                        job.finish_reason = job.finish_reason or "cancelled"
                        break
        except Exception as exc:  # reported to the request; the worker carries on with the next job
            logger.exception("generation failed", extra={"model": self.name})
            error = exc
        finally:
            chunks.close()
            job.finished_at = time.perf_counter()
            if kept is not None:
                job.cached_prompt_tokens = kept.reused_tokens - reused_before
            self._on_prompt(len(job.prompt_ids), job.cached_prompt_tokens)
            job._post(_End(error))


@dataclass
class _ClassifyRequest:
    """One caller's texts; the worker labels them a few at a time, in turn with other owners' requests."""

    texts: list[str]
    owner: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tokens: list[int] = field(default_factory=list)  # each text's tokens, as the model will see it
    predictions: list[Prediction | None] = field(default_factory=list)
    next: int = 0  # the first text not yet given to a micro-batch
    done: int = 0

    @property
    def scheduled(self) -> bool:
        return self.next == len(self.texts)


class ClassifierWorker(_Callable):
    """Labels texts in micro-batches, serving owners in turn.

    A request is split into texts; a micro-batch takes texts round-robin from
    every owner that is waiting, one text per owner per round, until it holds
    ``max_batch`` texts or ``batch_tokens`` tokens. So a one-text request waits
    behind at most the micro-batch already running, however large the requests
    of other owners are (a 64-text batch is several micro-batches, not one).
    """

    def __init__(self, checkpoint: Any, name: str, max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None, threads: int | None = None,
                 pack_tokens: int | None = 512, batch_tokens: int = 4096) -> None:
        self.checkpoint = checkpoint
        self.name = name
        self.threads = threads
        self.max_batch = max_batch
        self.batch_tokens = batch_tokens
        self.pack_tokens = pack_tokens  # None: pad each text to the batch's longest (see core.classifier)
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._on_batch = on_batch or (lambda n: None)
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._thread = threading.Thread(target=self._run, name=f"classifier-worker-{name}", daemon=True)
        self._closed = False
        self._waiting: dict[str, deque[_ClassifyRequest]] = {}  # owner -> requests, in the order owners came
        self.batches = 0  # micro-batches run so far

    def start(self) -> "ClassifierWorker":
        self._thread.start()
        return self

    async def classify(self, texts: list[str], owner: str = "") -> list[Prediction]:
        if self._closed:
            raise WorkerStopped(f"the {self.name} worker has stopped")
        loop = asyncio.get_running_loop()
        request = _ClassifyRequest(texts, owner, loop, loop.create_future())
        self._queue.put(request)
        self._on_queue_depth(self._queue.qsize())
        return await request.future

    def stop(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _accept(self, request: _ClassifyRequest) -> None:
        tokenizer = self.checkpoint.tokenizer
        max_length = int(self.checkpoint.metadata.get("max_length") or self.checkpoint.model.cfg.context_length)
        try:
            request.tokens = [min(len(tokenizer.encode(text)), max_length) for text in request.texts]
        except Exception as exc:  # a text the tokenizer refuses: that caller's error; the worker carries on
            _settle(request.loop, request.future, error=exc)
            return
        request.predictions = [None] * len(request.texts)
        if not request.texts:
            _settle(request.loop, request.future, result=[])
            return
        self._waiting.setdefault(request.owner, deque()).append(request)

    def _take(self, calls: list[_Call], block: bool) -> bool:
        """Move what arrived into the owners' lines (waiting for one item if ``block``); False on stop."""
        while True:
            try:
                item = self._queue.get(timeout=None) if block else self._queue.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Call):
                calls.append(item)
            else:
                self._accept(item)

    def _plan(self) -> list[tuple[_ClassifyRequest, int]]:
        """The next micro-batch: (request, text index) pairs taken one per owner per round."""
        batch: list[tuple[_ClassifyRequest, int]] = []
        tokens = 0
        while len(batch) < self.max_batch:
            took = False
            for owner in list(self._waiting):
                line = self._waiting[owner]
                request = line[0]
                cost = request.tokens[request.next]
                if batch and tokens + cost > self.batch_tokens:
                    continue  # too long for what is left of this batch; a shorter text may still fit
                batch.append((request, request.next))
                tokens += cost
                took = True
                request.next += 1
                if request.scheduled:
                    line.popleft()
                    if not line:
                        del self._waiting[owner]
                if len(batch) == self.max_batch:
                    break
            if not took:
                break
        # The owner served first this time goes last next time.
        if self._waiting:
            first = next(iter(self._waiting))
            self._waiting[first] = self._waiting.pop(first)
        return batch

    def _run(self) -> None:
        _thread_setup(self.threads)
        calls: list[_Call] = []
        running = True
        while running:
            for call in calls:
                call.run()
            calls.clear()
            idle = not self._waiting
            running = self._take(calls, block=idle)
            if calls or not running:
                continue
            if idle and self.max_wait and sum(len(r.texts) for line in self._waiting.values() for r in line) < self.max_batch:
                # The first request after a quiet spell: give those arriving with it a moment to share the batch.
                time.sleep(self.max_wait)
                running = self._take(calls, block=False)
            self._on_queue_depth(self._queue.qsize() + sum(len(line) for line in self._waiting.values()))
            batch = self._plan()
            if batch:
                self._classify(batch)
        self._fail_waiting(calls)

    def _classify(self, batch: list[tuple[_ClassifyRequest, int]]) -> None:
        texts = [request.texts[i] for request, i in batch]
        try:
            predictions = classify(self.checkpoint, texts, batch_size=self.max_batch, pack_tokens=self.pack_tokens)
        except Exception as exc:
            logger.exception("classification failed", extra={"model": self.name})
            for request in {id(r): r for r, _ in batch}.values():
                self._drop(request)
                _settle(request.loop, request.future, error=exc)
            return
        self.batches += 1
        self._on_batch(len(texts))
        for (request, i), prediction in zip(batch, predictions):
            request.predictions[i] = prediction
            request.done += 1
            if request.done == len(request.texts):
                _settle(request.loop, request.future, result=request.predictions)

    def _drop(self, request: _ClassifyRequest) -> None:
        """Take a failed request's texts that are still waiting out of its owner's line."""
        line = self._waiting.get(request.owner)
        if line is not None and request in line:
            line.remove(request)
            if not line:
                del self._waiting[request.owner]
        request.next = len(request.texts)

    def _fail_waiting(self, calls: list[_Call]) -> None:
        stopped = WorkerStopped(f"the {self.name} worker stopped before this request ran")
        for call in calls:
            _settle(call.loop, call.future, error=stopped)
        for line in self._waiting.values():
            for request in line:
                _settle(request.loop, request.future, error=stopped)
        self._waiting.clear()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, (_ClassifyRequest, _Call)):
                _settle(item.loop, item.future, error=stopped)


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None,
            error: BaseException | None = None) -> None:
    """Set a future of another thread's event loop from this thread."""

    def settle() -> None:
        if future.done():  # the caller went away (cancelled)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that loop is closed: nobody is waiting
        pass
