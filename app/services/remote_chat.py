"""The chat served by an external inference engine: any OpenAI-compatible server.

With ``SCRATCHGPT_CHAT_BACKEND_URL`` set, the chat's answers come from another server's
``/v1/chat/completions`` (``stream: true``, Server-Sent Events): vLLM, llama.cpp's server, TGI,
SGLang, or another scratchgpt. Everything else stays here: conversations and their storage, the
UI and the REST API, and the service's limits. :class:`RemoteChatWorker` is what the service
already drives for the in-process engine (:class:`app.services.workers.ChatWorker`): ``submit``
returns a job whose ``events`` are places in the queue (:class:`core.serving.Queued`), chunks
(:class:`core.generation.generate.StreamChunk`) and None for keep-alives; ``cancel`` ends it. The
limits are the engine's, kept in this process: ``max_batch`` answers stream from the backend at
once, one owner holds at most ``max_running_per_owner`` of them and ``max_waiting_per_owner``
places in the queue (past that :class:`~app.services.workers.OwnerBusy`, a 429), and the queue
holds ``max_waiting`` (past that :class:`~app.services.workers.ServerBusy`, a 503). Cancelling an
answer (stop button, client gone, conversation deleted) closes its HTTP stream to the backend,
which is how an OpenAI-compatible server learns to stop generating.

The backend applies its own chat template, so it is sent the conversation as OpenAI messages, not
token ids. The service plans prompts with a checkpoint's tokenizer and template
(``app.services.prompts``); :class:`RemoteModel` stands in for that checkpoint: its template keeps
the messages, and its tokenizer counts them with GPT-2's BPE, an estimate good enough to drop old
turns before the backend's context window is full. The answer's token counts are the backend's
own, from the ``usage`` it reports (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.services.workers import OwnerBusy, ServerBusy, WorkerStopped
from core.generation.generate import GenerationConfig, StreamChunk
from core.serving import Queued
from core.serving.wakeup import wakeable_items
from core.tokenizer.gpt2 import gpt2_tokenizer

logger = logging.getLogger("scratchgpt.remote_chat")

# Without a context length from the settings or the backend's model list (vLLM reports
# max_model_len there), prompts are fitted into this many tokens.
DEFAULT_CONTEXT_LENGTH = 4096
PROBE_SECONDS = 3.0  # the longest a look at the backend (its model list) may take
PROBE_EVERY = 5.0  # /ready asks the backend again at most this often
MAX_ERROR_CHARS = 500  # of a backend's error body, in our message


class BackendError(RuntimeError):
    """The backend could not give the answer. ``status`` is what a gateway would answer for it:
    502 for a backend that cannot be reached or answers nonsense, 503 for one that is busy or
    still starting, or the backend's own 4xx for a request it refused."""

    def __init__(self, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.status = status


class InProcessOnly(RuntimeError):
    """Work that needs the chat model's weights in this process (the Lab's measurements)."""


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment: what /ready and error messages may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def api_base(url: str) -> str:
    """The backend's ``/v1`` root: both ``http://host:8000`` and OpenAI clients' ``http://host:8000/v1`` are accepted."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


# --- the stand-in for a checkpoint ------------------------------------------------------------


class MessagesTemplate:
    """The remote model's chat template, for counting only: the backend applies its own to the
    messages it is sent (``PromptPlan.messages``). ChatML's layout, so that the count includes each
    turn's markers."""

    stop: tuple[str, ...] = ()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class CountingTokenizer:
    """Counts a rendered conversation's tokens with GPT-2's BPE; the ids are an estimate's, never sent."""

    special_tokens: dict[str, int] = {}  # none of ours: the backend guards its own

    def __init__(self) -> None:
        self._bpe = gpt2_tokenizer()

    def encode(self, text: str, allowed_special: Any = frozenset()) -> list[int]:
        return self._bpe.encode_ordinary(text)


@dataclass
class RemoteConfig:
    context_length: int


class RemoteModel:
    """What the chat service reads of its model (``name``, ``config.context_length``, ``tokenizer``,
    ``chat_template``, ``stop_token_ids``), for a model served by the backend. It has no weights here
    (``model`` is None), so the Lab's views that read them refuse it."""

    task = "causal-lm"
    model = None
    stop_token_ids: tuple[int, ...] = ()

    def __init__(self, backend: "RemoteBackend") -> None:
        self.backend = backend
        self.tokenizer = CountingTokenizer()
        self.chat_template = MessagesTemplate()

    @property
    def name(self) -> str:
        return self.backend.model or "remote"

    @property
    def config(self) -> RemoteConfig:
        return RemoteConfig(self.backend.context_length)


# --- the backend ------------------------------------------------------------------------------


class RemoteBackend:
    """Where the backend is and what it serves: its URL and key, the model's name and window, and
    whether it answered the last look (its model list, ``GET /v1/models``)."""

    def __init__(self, url: str, key: str | None = None, model: str | None = None,
                 context_length: int | None = None, timeout: float = 300.0) -> None:
        self.base = api_base(url)
        self.url = public_url(url)
        self._key = key
        self.configured_model = model
        self.model = model  # None until the backend's model list names one
        self._context_length = context_length
        self.discovered_context: int | None = None
        self.timeout = timeout
        self.reachable: bool | None = None  # None: not looked at yet
        self.detail = ""
        self.checked_at = 0.0
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self._context_length or self.discovered_context or DEFAULT_CONTEXT_LENGTH

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def describe(self, exc: BaseException) -> BackendError:
        """An httpx failure as a message that names the backend (never its key) and what to check."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"the chat backend at {self.url} did not answer in time "
                                f"({type(exc).__name__}; SCRATCHGPT_CHAT_BACKEND_TIMEOUT)", 504)
        if isinstance(exc, httpx.HTTPError):
            return BackendError(f"the chat backend at {self.url} cannot be reached ({type(exc).__name__}: {exc}); "
                                "is it running, and is SCRATCHGPT_CHAT_BACKEND_URL right?", 502)
        return BackendError(f"the chat backend at {self.url} failed: {type(exc).__name__}: {exc}", 502)

    def refused(self, status: int, body: str) -> BackendError:
        """A backend's error answer (its status and its own message) as ours."""
        message = body.strip()
        try:
            error = json.loads(message)
            error = error.get("error", error) if isinstance(error, dict) else error
            message = str(error.get("message") or error.get("detail") or message) if isinstance(error, dict) else message
        except ValueError:
            pass
        hint = {401: " (check SCRATCHGPT_CHAT_BACKEND_KEY)", 403: " (check SCRATCHGPT_CHAT_BACKEND_KEY)",
                404: " (check SCRATCHGPT_CHAT_BACKEND_MODEL and SCRATCHGPT_CHAT_BACKEND_URL)"}.get(status, "")
        ours = 503 if status in (429, 503) else 502 if status >= 500 else status
        return BackendError(f"the chat backend at {self.url} answered {status}: {message[:MAX_ERROR_CHARS]}{hint}", ours)

    def _learn(self, listing: Any) -> None:
        """Take the model's name (when not configured) and window (vLLM's ``max_model_len``) from a model list."""
        models = [m for m in (listing.get("data") or []) if isinstance(m, dict)] if isinstance(listing, dict) else []
        names = [str(m.get("id")) for m in models if m.get("id")]
        if self.configured_model is None:
            self.model = names[0] if names else None
        card = next((m for m in models if m.get("id") == self.model), None)
        window = card.get("max_model_len") if card else None
        self.discovered_context = int(window) if isinstance(window, int) and window > 0 else None
        if not names:
            self.detail = "the backend lists no models; set SCRATCHGPT_CHAT_BACKEND_MODEL"
        elif self.model not in names:
            self.detail = f"the backend lists {names[:5]}, not {self.model!r} (SCRATCHGPT_CHAT_BACKEND_MODEL)"
        else:
            self.detail = ""

    def probe(self, max_age: float = 0.0) -> None:
        """Look at the backend's model list now (or use a look younger than ``max_age`` seconds)."""
        with self._lock:
            if self.checked_at and time.monotonic() - self.checked_at < max_age:
                return
            try:
                response = httpx.get(f"{self.base}/models", headers=self.headers, timeout=PROBE_SECONDS)
                if response.status_code != 200:
                    raise self.refused(response.status_code, response.text)
                self._learn(response.json())
                self.reachable = True
            except (httpx.HTTPError, BackendError, ValueError) as exc:
                self.reachable = False
                self.detail = str(self.describe(exc))
            self.checked_at = time.monotonic()

    async def aprobe(self, client: httpx.AsyncClient) -> None:
        """:meth:`probe` from the event loop, for an answer that needs the model's name first."""
        try:
            response = await client.get(f"{self.base}/models", headers=self.headers, timeout=PROBE_SECONDS)
        except httpx.HTTPError as exc:
            raise self.describe(exc) from None
        if response.status_code != 200:
            raise self.refused(response.status_code, response.text)
        self._learn(response.json())

    def public(self) -> dict[str, Any]:
        """For /ready: where the backend is and whether it answers; never the key."""
        self.probe(max_age=PROBE_EVERY)
        info: dict[str, Any] = {"url": self.url, "reachable": bool(self.reachable), "model": self.model,
                                "context_length": self.context_length}
        if self.detail:
            info["detail"] = self.detail
        return info

    def request(self, messages: list[dict[str, str]], config: GenerationConfig) -> dict[str, Any]:
        """The body of one streamed chat completion: the messages, and our sampling settings in OpenAI's
        names (``top_k`` and ``repetition_penalty``, which vLLM, llama.cpp, SGLang and scratchgpt take
        as extensions, only when they are set)."""
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": config.max_new_tokens, "temperature": config.temperature,
        }
        optional = {"top_p": config.top_p, "top_k": config.top_k, "seed": config.seed,
                    "stop": list(config.stop_strings) or None,
                    "frequency_penalty": config.frequency_penalty or None,
                    "presence_penalty": config.presence_penalty or None,
                    "repetition_penalty": config.repetition_penalty if config.repetition_penalty != 1.0 else None}
        body.update({k: v for k, v in optional.items() if v is not None})
        if messages and messages[-1]["role"] == "assistant":
            # Continuing a cut answer: vLLM's (and SGLang's) extension writes on in that turn.
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body


# --- one answer --------------------------------------------------------------------------------


class _End:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


_ADMITTED = object()  # the job may open its stream to the backend


class RemoteJob:
    """One answer streamed from the backend: what a request reads and cancels (as ``ChatJob``)."""

    def __init__(self, worker: "RemoteChatWorker", messages: list[dict[str, str]], config: GenerationConfig,
                 owner: str | None, prompt_tokens: int) -> None:
        self.worker, self.messages, self.config, self.owner = worker, messages, config, owner
        self.prompt_tokens = prompt_tokens  # our estimate until the backend's usage says
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0
        self.finish_reason: str | None = None
        self.position: int | None = None  # answers ahead of this one in our queue; None once admitted
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = threading.Event()
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waker: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ended = False

    @property
    def done(self) -> bool:
        return self._ended

    @property
    def generation_seconds(self) -> float:
        """From admission to the end, or to now while it runs."""
        if self.admitted_at is None:
            return 0.0
        return (self.finished_at or time.perf_counter()) - self.admitted_at

    def cancel(self) -> None:
        """End the answer from any thread: at once while it waits; while it streams, its connection to
        the backend is closed (the backend's cue to stop generating)."""
        self.cancelled.set()
        if self.worker._dequeue(self):
            return
        loop, task = self._loop, self._task
        if task is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # that loop has closed, and the task with it
                self._end("cancelled")
        elif not self._ended:  # admitted, but nobody ever read it: there is no stream to close
            self._end("cancelled")

    async def events(self, heartbeat: float | None = None) -> AsyncIterator[StreamChunk | Queued | None]:
        """Places in our queue until the answer is admitted, then the backend's chunks; None after
        ``heartbeat`` idle seconds. Raises :class:`BackendError` if the backend fails; leaving early cancels."""
        loop = asyncio.get_running_loop()

        def take() -> Any:
            with self._lock:
                return self._items.popleft() if self._items else None

        def set_waker(waker: Callable[[], None] | None) -> None:
            self._waker = waker

        self._loop = loop
        try:
            async with aclosing(wakeable_items(take, set_waker, heartbeat)) as items:
                async for item in items:
                    if item is _ADMITTED:
                        if not self.cancelled.is_set():
                            self._task = loop.create_task(self._stream())
                        else:
                            self._end("cancelled")
                        continue
                    if isinstance(item, _End):
                        if item.error is not None:
                            raise item.error
                        return
                    yield item
        finally:
            if not self._ended:
                self.cancel()
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})  # its connection closed before the reader goes

    async def _stream(self) -> None:
        """Read the backend's Server-Sent Events into this job's items; runs as a task of the reader's loop."""
        if self.cancelled.is_set():  # cancelled while the task was being made: nothing was opened
            return
        backend = self.worker.backend
        timeout = httpx.Timeout(backend.timeout, connect=min(10.0, backend.timeout))
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                if backend.model is None:
                    await backend.aprobe(client)
                    if backend.model is None:
                        raise BackendError(f"the chat backend at {backend.url} lists no models; "
                                           "set SCRATCHGPT_CHAT_BACKEND_MODEL", 502)
                body = backend.request(self.messages, self.config)
                async with client.stream("POST", f"{backend.base}/chat/completions", json=body,
                                         headers=backend.headers) as response:
                    if response.status_code != 200:
                        text = (await response.aread()).decode("utf-8", "replace")
                        raise backend.refused(response.status_code, text)
                    reason = await self._relay(response)
        except asyncio.CancelledError:
            self._end("cancelled")  # leaving the `async with` blocks closed the connection
            return
        except Exception as exc:
            error = backend.describe(exc)
            logger.warning("chat backend failed", extra={"backend": backend.url, "detail": str(error)})
            self._end(None, error)
            return
        self._end(reason)

    async def _relay(self, response: httpx.Response) -> str:
        """Chunks of the backend's stream as ours, until ``[DONE]``; the finish reason."""
        reason: str | None = None
        last: float | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # event names, comments (keep-alives), blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise BackendError(f"the chat backend at {self.worker.backend.url} sent a chunk that is not JSON: "
                                   f"{data[:100]!r}", 502) from None
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                raise self.worker.backend.refused(502, json.dumps(chunk))
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._take_usage(usage)
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    now = time.perf_counter()
                    self.worker._token(self, None if last is None else now - last)
                    last = now
                    self.completion_tokens += 1  # one per chunk, until the usage says
                    self._push(StreamChunk(text))
                reason = choice.get("finish_reason") or reason
        else:
            if reason is None:
                raise BackendError(f"the chat backend at {self.worker.backend.url} closed the stream before the "
                                   "answer ended", 502)
        return reason if reason in ("stop", "length") else "stop"

    def _take_usage(self, usage: dict[str, Any]) -> None:
        completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        if isinstance(completion, int):
            self.worker._count(completion - self.completion_tokens)
            self.completion_tokens = completion
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            self.cached_prompt_tokens = cached if isinstance(cached, int) else 0
            self.worker._on_prompt(prompt, self.cached_prompt_tokens)

    # -- written by the worker and the stream task --------------------------------------------

    def _push(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            waker = self._waker
        if waker is not None:
            waker()

    def _end(self, reason: str | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self.position = None
        self.worker._finished(self)
        self._push(_End(error))


# --- the worker --------------------------------------------------------------------------------


@dataclass
class RemoteStats:
    """What /metrics reads, as the engine's ``EngineStats``."""

    running: int = 0  # answers streaming from the backend
    waiting: int = 0  # answers in our queue
    submitted: int = 0
    cancelled: int = 0
    failed: int = 0


class RemoteChatWorker:
    """The chat's answers from an OpenAI-compatible backend, under the service's own limits.

    Admission follows the engine's rule (``core.serving.Engine``): oldest first, up to
    ``max_batch`` running, and an owner with ``max_running_per_owner`` running lets the next
    owner's answer go ahead of its own.
    """

    def __init__(self, backend: RemoteBackend, name: str, *, max_batch: int = 8, max_waiting: int | None = 64,
                 max_running_per_owner: int | None = 4, max_waiting_per_owner: int | None = 8,
                 on_tokens: Callable[[int], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None,
                 on_prompt: Callable[[int, int], None] | None = None,
                 on_observe: Callable[[str, float], None] | None = None) -> None:
        self.backend = backend
        self.checkpoint = RemoteModel(backend)
        self.name = name
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_running_per_owner = max_running_per_owner
        self.max_waiting_per_owner = max_waiting_per_owner
        self._on_tokens = on_tokens or (lambda n: None)
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._on_prompt = on_prompt or (lambda prompt, cached: None)
        self._on_observe = on_observe or (lambda name, value: None)
        self.stats = RemoteStats()
        self._waiting: deque[RemoteJob] = deque()
        self._running: list[RemoteJob] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "RemoteChatWorker":
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new answers and end those in flight (each closes its stream to the backend)."""
        self._closed = True
        with self._lock:
            jobs = list(self._waiting) + list(self._running)
        for job in jobs:
            job.cancel()

    @property
    def current(self) -> RemoteJob | None:
        """The oldest answer still streaming or waiting; None when there is none."""
        with self._lock:
            jobs = self._running + list(self._waiting)
        return min(jobs, key=lambda j: j.submitted_at) if jobs else None

    def submit(self, prompt_ids: list[int], config: GenerationConfig, owner: str | None = None, *,
               messages: list[dict[str, str]] | None = None) -> RemoteJob:
        """Queue one answer for ``owner``: ``messages`` are sent (the backend applies its own template);
        ``prompt_ids``, as :class:`RemoteModel` counted them, only size it. Raises :class:`OwnerBusy` or
        :class:`ServerBusy` at a limit, :class:`WorkerStopped` once stopped."""
        if self._closed:
            raise WorkerStopped(f"the {self.name} worker has stopped")
        if not messages:
            raise ValueError("a remote chat model is sent messages, not token ids: pass the plan's messages")
        job = RemoteJob(self, messages, config, owner, len(prompt_ids))
        with self._lock:
            mine = sum(1 for j in self._waiting if j.owner == owner)
            if owner is not None and self.max_waiting_per_owner is not None and mine >= self.max_waiting_per_owner:
                raise OwnerBusy(
                    f"you have {mine} answers waiting already, the most one user may queue "
                    "(SCRATCHGPT_CHAT_MAX_WAITING_PER_OWNER); wait for one to start", retry_after=self._retry_after())
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise ServerBusy(f"the chat queue is full: {len(self._waiting)} answers are waiting already "
                                 "(SCRATCHGPT_CHAT_MAX_WAITING)", retry_after=self._retry_after())
            self.stats.submitted += 1
            self._waiting.append(job)
            job.position = len(self._waiting) - 1
            job._push(Queued(job.position))
            self._admit()
        return job

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise InProcessOnly("the chat model runs on an external inference engine (SCRATCHGPT_CHAT_BACKEND_URL); "
                            "its weights are not in this process")

    def _retry_after(self) -> int:
        return max(1, min(60, len(self._waiting) + len(self._running)))

    def _admit(self) -> None:
        """Admit what fits (under the lock), and tell each waiting answer whose place changed."""
        running: dict[str | None, int] = {}
        for job in self._running:
            running[job.owner] = running.get(job.owner, 0) + 1
        cap, held, admitted = self.max_running_per_owner, [], []
        while self._waiting and len(self._running) < self.max_batch:
            job = self._waiting.popleft()
            if cap is not None and job.owner is not None and running.get(job.owner, 0) >= cap:
                held.append(job)  # its owner has enough running: the next owner's answer goes first
                continue
            running[job.owner] = running.get(job.owner, 0) + 1
            self._running.append(job)
            admitted.append(job)
        self._waiting.extendleft(reversed(held))
        now = time.perf_counter()
        for job in admitted:
            job.position, job.admitted_at = None, now
            self._on_observe("queue_seconds", now - job.submitted_at)
            job._push(_ADMITTED)
        for ahead, job in enumerate(self._waiting):
            if job.position != ahead:
                job.position = ahead
                job._push(Queued(ahead))
        self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)
        self._on_queue_depth(len(self._waiting))

    def _dequeue(self, job: RemoteJob) -> bool:
        """Take a cancelled answer out of the queue if it is still there (then it has ended)."""
        with self._lock:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            self._admit()
        job._end("cancelled")
        return True

    def _finished(self, job: RemoteJob) -> None:
        with self._lock:
            if job in self._running:
                self._running.remove(job)
            if job.finish_reason == "cancelled":
                self.stats.cancelled += 1
            elif job.finish_reason is None:
                self.stats.failed += 1
            self._admit()

    def _token(self, job: RemoteJob, gap: float | None) -> None:
        """A chunk arrived: the first one's wait since submission, or the gap since the one before."""
        if gap is None:
            self._on_observe("ttft_seconds", time.perf_counter() - job.submitted_at)
        else:
            self._on_observe("tbt_seconds", gap)
        self._on_tokens(1)

    def _count(self, more: int) -> None:
        """Tokens the backend's usage counts beyond the chunks (a chunk may carry several)."""
        if more > 0:
            self._on_tokens(more)
