"""The models the service serves: loading them off the event loop, their state, and their workers.

Each model has a slot whose state moves from ``loading`` to ``ready``, ``missing`` (no
checkpoint yet: its endpoints answer 503 naming the command that makes one), ``error``
(a checkpoint that does not load) or ``disabled`` (switched off in settings).

Several chat models are served side by side (``SCRATCHGPT_CHAT_MODELS``), each with its own
decoder and engine; a conversation or a /v1 request names one, and a new conversation gets the
*default*: the first in the settings' order that is ready. The spam classifier is one slot.
:meth:`ModelRegistry.load_model` puts a checkpoint made while the service runs (a background
fine-tuning job) into service without a restart.

The chat model answers through torch's kernels as soon as it is loaded; our C++
kernels (``core.fast``), which compile on first use (minutes on a fresh machine), are
built on a second copy in the background and swapped in when ready. While a fine-tune
that makes a missing model runs, its requests answer 503 with the job's progress
(:meth:`ModelRegistry.set_training`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from app.metrics import Metrics
from app.schemas import Penalty, RepetitionPenalty, Temperature, TopK, TopP
from app.services.remote_chat import RemoteBackend, RemoteChatWorker
from app.services.workers import ChatWorker, ClassifierWorker
from app.settings import Settings
from core.classifier import decision_threshold
from core.fast.prefix_cache import PrefixCache
from core.fast.serving import ServingDecoder
from core.fast.transforms import fast_for_serving
from core.weights.checkpoint import CheckpointError, load_checkpoint, read_config

logger = logging.getLogger("scratchgpt.models")

CHAT = "chat"
CLASSIFIER = "classifier"

MAKE_COMMANDS = {
    CHAT: "scratchgpt download smollm2-135m-instruct",
    CLASSIFIER: "scratchgpt finetune spam",
}
# Our instruction-tuned chat model (settings.DEFAULT_CHAT_MODELS[0]) is made by fine-tuning, not downloaded.
INSTRUCT_CHAT = "smollm2-135m-chat"
SETTING_NAMES = {CHAT: "SCRATCHGPT_CHAT_MODELS", CLASSIFIER: "SCRATCHGPT_CLASSIFIER_CHECKPOINT"}
# A finished answer or classification batch takes seconds; a model being replaced stops after its
# last one, or after this long.
DRAIN_SECONDS = 300.0
RETIRE_GRACE_SECONDS = 1.0

# A checkpoint's decoding defaults (its config.json metadata "generation_defaults"): the
# settings a conversation or a /v1 request that does not choose its own decodes with. None for
# top_k or top_p switches that filter off. Checked against the API's own limits.
GENERATION_DEFAULT_TYPES: dict[str, TypeAdapter[Any]] = {
    "temperature": TypeAdapter(Temperature),
    "top_p": TypeAdapter(TopP | None),
    "top_k": TypeAdapter(TopK | None),
    "repetition_penalty": TypeAdapter(RepetitionPenalty),
    "frequency_penalty": TypeAdapter(Penalty),
    "presence_penalty": TypeAdapter(Penalty),
}
# What decoding without any penalty means.
NO_PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


class ModelUnavailable(RuntimeError):
    """A request needs a model that is not serving; ``detail`` says why and what to do."""

    def __init__(self, role: str, state: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.role, self.state, self.detail, self.retry_after = role, state, detail, retry_after


class UnknownModel(LookupError):
    """A chat model name this service does not serve; ``served`` lists the names it does."""

    def __init__(self, name: str, served: list[str]) -> None:
        self.name, self.served = name, served
        listed = ", ".join(repr(n) for n in served) or "none"
        super().__init__(f"model {name!r} is not served here; the chat models are {listed}")


def generation_defaults(metadata: dict[str, Any], where: Any = "") -> dict[str, Any]:
    """The valid decoding defaults in a checkpoint's metadata; a value out of the API's limits is left out (and logged)."""
    found = metadata.get("generation_defaults") or {}
    if not isinstance(found, dict):
        logger.warning("generation_defaults is not an object; ignored", extra={"path": str(where)})
        return {}
    kept: dict[str, Any] = {}
    for key, value in found.items():
        adapter = GENERATION_DEFAULT_TYPES.get(key)
        try:
            if adapter is None:
                raise ValueError(f"unknown key (known: {', '.join(GENERATION_DEFAULT_TYPES)})")
            kept[key] = adapter.validate_python(value)
        except (ValueError, ValidationError) as exc:
            logger.warning("a decoding default is ignored", extra={"path": str(where), "key": key, "error": str(exc)})
    return kept


@dataclass
class ModelSlot:
    role: str
    path: Path
    state: str = "loading"
    detail: str = ""
    checkpoint: Any = None
    decoder: Any = None  # the chat model's core.fast.serving.ServingDecoder
    worker: Any = None
    load_seconds: float | None = None
    backend: RemoteBackend | None = None  # the chat, when an external engine serves it (remote_chat_slot)
    fixed_name: str | None = None  # a chat model's name, fixed when its slot is made
    label: str = ""  # its metrics' "model" label
    defaults: dict[str, Any] = field(default_factory=dict)  # decoding defaults from its metadata
    kernels: str | None = None  # the chat model's fast path: "building" until it is swapped in, then "done"

    def __post_init__(self) -> None:
        self.label = self.label or self.role

    @property
    def name(self) -> str:
        if self.fixed_name is not None:
            return self.fixed_name
        if self.checkpoint is not None:
            return self.checkpoint.name
        if self.backend is not None:
            return self.backend.model or "remote"
        return self.path.name

    @property
    def make_with(self) -> str:
        if self.role == CHAT and self.path.name == INSTRUCT_CHAT:
            return f"scratchgpt finetune instruct --out {self.path}"
        return MAKE_COMMANDS[self.role]

    def public(self) -> dict[str, Any]:
        info: dict[str, Any] = {"state": self.state, "name": self.name, "path": str(self.path)}
        if self.backend is not None:
            del info["path"]
            info["backend"] = self.backend.public()
        if self.detail:
            info["detail"] = self.detail
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.state == "missing" and self.backend is None:
            info["make_with"] = self.make_with
        if self.checkpoint is not None:
            info["context_length"] = self.checkpoint.config.context_length
        if self.role == CHAT:
            info["generation_defaults"] = dict(self.defaults)
        if self.kernels is not None:
            info["kernels"] = self.kernels
            if self.kernels == "done" and self.decoder is not None:
                info["fast_path"] = str(self.decoder.report)
        return info


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SCRATCHGPT_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def chat_name(name: str | None, path: Path) -> str:
    """A chat model's name: the one given, else its checkpoint's own (its metadata's), else its folder's."""
    if name:
        return name
    try:
        return str(read_config(path).get("metadata", {}).get("name") or path.name)
    except CheckpointError:
        return path.name  # not there yet (or unreadable: its load says why)


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # The chat models by name, in the settings' order (the order a new conversation prefers them).
        self.chat: dict[str, ModelSlot] = {}
        for i, (name, path) in enumerate(settings.chat_model_entries()):
            named = chat_name(name, path)
            # The first chat model keeps the "chat" label the metrics had when there was one.
            self._add_chat(ModelSlot(CHAT, path, fixed_name=named, label=CHAT if i == 0 else f"{CHAT}:{named}"))
        self.classifier = ModelSlot(CLASSIFIER, settings.resolved_classifier_checkpoint)
        if not settings.chat_enabled:
            for slot in self.chat.values():
                self._set(slot, "disabled", "the chat model is switched off (SCRATCHGPT_CHAT_ENABLED=false)")
        elif settings.chat_backend_url:
            # One chat model, served by the external engine, in place of the list.
            self.chat = {}
            self._add_chat(remote_chat_slot(settings))
        if not settings.classifier_enabled:
            self._set(
                self.classifier, "disabled",
                "the spam classifier is switched off (SCRATCHGPT_CLASSIFIER_ENABLED=false)",
            )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._hot_load = threading.Lock()  # one load_model at a time
        self._retiring: list[ModelSlot] = []
        self._stopping = False
        self._background: list[threading.Thread] = []  # fast-path builds still running
        self.training: dict[str, tuple[str, int | None]] = {}  # role -> (job's message, retry-after seconds)

    def _add_chat(self, slot: ModelSlot) -> None:
        if slot.name in self.chat:
            raise ValueError(f"two chat models are named {slot.name!r} ({self.chat[slot.name].path} and {slot.path}); "
                             "name them in SCRATCHGPT_CHAT_MODELS (name=folder)")
        self._replace_chat(slot)

    def _replace_chat(self, slot: ModelSlot) -> None:
        # A new dict, never one changed in place: requests iterate the chat models while a load adds one.
        self.chat = {**self.chat, slot.name: slot}

    # --- state --------------------------------------------------------------

    def _set(self, slot: ModelSlot, state: str, detail: str = "") -> None:
        slot.state, slot.detail = state, detail
        self.metrics.model_ready.labels(slot.label).set(1 if state == "ready" else 0)

    @property
    def slots(self) -> dict[str, ModelSlot]:
        """Every slot once: the default chat model as "chat", the classifier, the other chat models as "chat:<name>"."""
        default = self.default_chat()
        found = {CHAT: default, CLASSIFIER: self.classifier}
        found.update({f"{CHAT}:{name}": slot for name, slot in self.chat.items() if slot is not default})
        return found

    @property
    def loading(self) -> list[str]:
        return [key for key, slot in self.slots.items() if slot.state == "loading"]

    def status(self) -> dict[str, Any]:
        found = {key: slot.public() for key, slot in self.slots.items()}
        found[CHAT]["default"] = True
        return found

    def default_chat(self) -> ModelSlot:
        """The chat model of a new conversation: the first ready, else the first still loading, else the first."""
        slots = list(self.chat.values())
        for state in ("ready", "loading"):
            for slot in slots:
                if slot.state == state:
                    return slot
        return slots[0]

    def chat_slot(self, name: str | None = None) -> ModelSlot:
        """The chat model called ``name`` (None: the default), in whatever state; :class:`UnknownModel` if none is."""
        if name is None:
            return self.default_chat()
        slot = self.chat.get(name)
        if slot is None:
            raise UnknownModel(name, list(self.chat))
        return slot

    def require_chat(self, name: str | None = None) -> ModelSlot:
        """The chat model ``name`` (None: the default) if it is serving, else :class:`ModelUnavailable`."""
        return self._ready(self.chat_slot(name))

    def require(self, role: str) -> ModelSlot:
        return self._ready(self.default_chat() if role == CHAT else self.classifier)

    def _ready(self, slot: ModelSlot) -> ModelSlot:
        if slot.state == "ready":
            return slot
        role = slot.role
        what = f"chat model {slot.name!r}" if role == CHAT and len(self.chat) > 1 else (
            "chat model" if role == CHAT else "spam classifier")
        if slot.state == "loading":
            detail = f"the {what} is still loading; retry in a few seconds"
        elif slot.state == "missing":
            detail = (
                f"the {what} is not available: no checkpoint at {slot.path}. "
                f"Create it with `{slot.make_with}`, or point {SETTING_NAMES[role]} at a checkpoint directory"
            )
        else:
            detail = f"the {what} is not available: {slot.detail}"
        job = self.training.get(role)
        if job is not None and slot.state in ("missing", "error"):
            message, retry_after = job
            if retry_after is not None:
                raise ModelUnavailable(role, "training", message, retry_after=retry_after)
            detail = f"{message}. {detail}"
        raise ModelUnavailable(role, slot.state, detail)

    def conversation_defaults(self, slot: ModelSlot) -> dict[str, Any]:
        """Decoding settings of a new conversation with ``slot``: the model's own defaults over the service's."""
        s = self.settings
        return {"temperature": s.default_temperature, "top_k": s.default_top_k, "top_p": s.default_top_p,
                **NO_PENALTIES, **slot.defaults}

    def set_training(self, role: str, message: str | None, retry_after: int | None = 30) -> None:
        """A fine-tune is making ``role``'s model (``message`` None: none is): until it is served, its
        requests answer 503 with ``message`` and ``retry_after``; with ``retry_after`` None the job
        failed, and ``message`` is added to the reason (``app.services.jobs`` keeps this current)."""
        if message is None:
            self.training.pop(role, None)
        else:
            self.training[role] = (message, retry_after)

    # --- loading --------------------------------------------------------------

    def start_loading(self) -> None:
        """Load every enabled model in a background thread; /ready turns 200 when all are settled."""
        self._thread = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for the models to load and for the chat model's fast path to be in place."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        if self._thread is not None:
            self._thread.join(left())
        for thread in list(self._background):  # the loader starts these: read after it ended
            thread.join(left())
        return not self.loading and not any(t.is_alive() for t in self._background)

    def _load_all(self) -> None:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        for slot in [*self.chat.values(), self.classifier]:
            if slot.state != "loading" or self._stopping:
                continue
            try:
                self._load(slot)
            except Exception as exc:  # a broken model must not take the service down
                logger.exception("model failed to load", extra={"model": slot.label, "path": str(slot.path)})
                self._set(slot, "error", f"{type(exc).__name__}: {exc}")

    def _in_service(self, slot: ModelSlot) -> bool:
        return slot is self.classifier or self.chat.get(slot.name) is slot

    def _load(self, slot: ModelSlot, replacing: ModelSlot | None = None) -> None:
        """Load ``slot``'s checkpoint and start its worker; with ``replacing``, put it in that slot's place."""
        if slot.backend is not None:
            self._connect(slot)
            return
        if not (slot.path / "config.json").is_file():
            if replacing is not None:
                raise CheckpointError(f"no checkpoint at {slot.path} (config.json is missing)")
            self._set(slot, "missing", f"no checkpoint at {slot.path}")
            logger.warning(
                "model checkpoint missing",
                extra={"model": slot.label, "path": str(slot.path), "make_with": slot.make_with},
            )
            return
        device = resolve_device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype_for(slot.role), device)
        start = time.perf_counter()
        checkpoint = load_checkpoint(slot.path, device=device, dtype=dtype)
        self._validate(slot.role, checkpoint)
        # Our kernels compile on first use, minutes on a fresh machine: the chat answers with torch's
        # meanwhile (CUDA's fast path has nothing to compile, so it is built at once).
        kernels_later = slot.role == CHAT and self.settings.fast_kernels and device.type == "cpu"
        decoder = self._serving_decoder(checkpoint, fast=not kernels_later) if slot.role == CHAT else None
        with self._lock:
            # Stopping, or replaced by load_model while this one loaded: its worker is never started.
            if self._stopping or (replacing is None and not self._in_service(slot)):
                return
            slot.checkpoint, slot.decoder = checkpoint, decoder
            slot.defaults = generation_defaults(checkpoint.metadata, slot.path) if slot.role == CHAT else {}
            slot.worker = self._make_worker(slot, checkpoint, decoder).start()
            slot.load_seconds = time.perf_counter() - start
            if replacing is not None:
                self._put(slot, replacing)
            self.metrics.model_load_seconds.labels(slot.label).set(slot.load_seconds)
            self._set(slot, "ready")
            if kernels_later:
                slot.kernels = "building"
                thread = threading.Thread(target=self._switch_to_fast, args=(slot, device, dtype),
                                          name="fast-path-build", daemon=True)
                self._background.append(thread)
                thread.start()
        logger.info(
            "model loaded",
            extra={"model": slot.label, "model_name": slot.name, "path": str(slot.path), "device": str(device),
                   "dtype": str(dtype).removeprefix("torch."), "seconds": round(slot.load_seconds, 3)},
        )

    def _connect(self, slot: ModelSlot) -> None:
        """Serve the chat through its external engine: one look at the backend (its model's name and
        window), then ready whether or not it answered: it may start after us, and each answer that
        finds it down fails with a message that says so (stored on the answer)."""
        backend, s = slot.backend, self.settings
        start = time.perf_counter()
        backend.probe()
        role, tokens = slot.role, self.metrics.tokens_generated.labels(slot.role)
        computed, cached = (self.metrics.prompt_tokens.labels(role, kind) for kind in ("prefilled", "cached"))

        def on_prompt(prompt: int, reused: int) -> None:
            computed.inc(prompt - reused)
            cached.inc(reused)

        worker = RemoteChatWorker(
            backend, role, max_batch=s.chat_max_batch, max_waiting=s.chat_max_waiting,
            max_running_per_owner=s.chat_max_running_per_owner, max_waiting_per_owner=s.chat_max_waiting_per_owner,
            on_tokens=tokens.inc, on_queue_depth=self.metrics.queue_depth.labels(role).set, on_prompt=on_prompt,
            on_observe=self.metrics.engine_observer(role))
        stats = worker.stats  # read when /metrics is scraped
        self.metrics.engine_running.labels(role).set_function(lambda: stats.running)
        self.metrics.engine_waiting.labels(role).set_function(lambda: stats.waiting)
        with self._lock:
            if self._stopping:
                return
            if backend.model and slot.fixed_name != backend.model:
                # Unnamed in settings: the chat model goes by the name the backend gave it.
                self.chat = {backend.model if s is slot else name: s for name, s in self.chat.items()}
                slot.fixed_name = backend.model
            slot.checkpoint, slot.worker = worker.checkpoint, worker.start()
            slot.load_seconds = time.perf_counter() - start
            self._set(slot, "ready")
        logger.info("chat served by an external engine",
                    extra={"model": role, "backend": backend.url, "model_name": backend.model,
                           "reachable": backend.reachable, "detail": backend.detail})

    # --- putting a new checkpoint into service ------------------------------------

    async def load_model(self, role: str, path: Path, name: str | None = None) -> ModelSlot:
        """Load the checkpoint at ``path`` in a thread and put it into service, without a restart.

        ``role`` "chat": the chat model ``name`` (by default the one already served from ``path``,
        else the one with the checkpoint's own name) is replaced, or added after the others. ``role``
        "classifier": the spam classifier is replaced. The model it replaces serves until the new
        one is ready, then finishes the answers it has started and stops. A checkpoint that does not
        load raises its error; the model served before stays (one that had none turns "error", with
        the reason). Returns the slot now in service.
        """
        return await asyncio.to_thread(self.load_model_now, role, path, name)

    def load_model_now(self, role: str, path: Path, name: str | None = None) -> ModelSlot:
        """:meth:`load_model` in the calling thread (it blocks while the checkpoint loads)."""
        if role not in (CHAT, CLASSIFIER):
            raise ValueError(f"role must be {CHAT!r} or {CLASSIFIER!r}, not {role!r}")
        enabled = self.settings.chat_enabled if role == CHAT else self.settings.classifier_enabled
        if not enabled:
            raise ValueError(f"the {role} model is switched off in settings; it is not put into service")
        path = Path(path).expanduser()
        with self._hot_load:
            old = self._replaced(role, path, name)
            slot = ModelSlot(role, path)
            if old is not None:
                slot.fixed_name, slot.label = old.fixed_name, old.label
            else:
                slot.fixed_name = chat_name(name, path)
                slot.label = f"{CHAT}:{slot.fixed_name}"
            try:
                self._load(slot, replacing=old or slot)
            except Exception as exc:
                logger.exception("model failed to load into service", extra={"model": role, "path": str(path)})
                if old is not None and old.state != "ready":
                    with self._lock:
                        self._set(old, "error", f"{type(exc).__name__}: {exc}")
                raise
            if slot.worker is None:
                raise RuntimeError("the service is stopping; the model was not put into service")
            if old is not None and old is not slot:
                self._retire(old)
        logger.info("model put into service", extra={"model": slot.label, "model_name": slot.name, "path": str(path)})
        return slot

    def _replaced(self, role: str, path: Path, name: str | None) -> ModelSlot | None:
        """The slot a new checkpoint of ``role`` at ``path`` replaces; None: a new chat model."""
        if role == CLASSIFIER:
            return self.classifier
        if name is not None:
            return self.chat.get(name)
        for slot in self.chat.values():
            if slot.path.resolve() == path.resolve():
                return slot
        return self.chat.get(chat_name(None, path))

    def _put(self, slot: ModelSlot, old: ModelSlot) -> None:
        """Serve ``slot`` in ``old``'s place (``old`` is ``slot``: a chat model added after the others). Under the lock."""
        if slot.role == CLASSIFIER:
            self.classifier = slot
        elif old is slot:
            self._add_chat(slot)
        else:
            self._replace_chat(slot)

    def _retire(self, old: ModelSlot) -> None:
        """Stop a replaced model's worker once the work it had taken is done (in a thread of its own)."""
        worker = old.worker
        if worker is None:
            return
        self._retiring.append(old)

        def drain() -> None:
            # A request that looked the old model up just before the swap may still hand it work.
            time.sleep(RETIRE_GRACE_SECONDS)
            deadline = time.monotonic() + DRAIN_SECONDS
            # A chat worker finishes its answers; the classifier's queue ends with its stop sentinel.
            while getattr(worker, "current", None) is not None and time.monotonic() < deadline and not self._stopping:
                time.sleep(0.1)
            worker.stop()
            self._retiring.remove(old)
            logger.info("replaced model stopped", extra={"model": old.label, "path": str(old.path)})

        threading.Thread(target=drain, name=f"retire-{old.label}", daemon=True).start()

    def _switch_to_fast(self, slot: ModelSlot, device: torch.device, dtype: torch.dtype) -> None:
        """Build the fast path on a second copy of ``slot``'s checkpoint (compiling our kernels when
        this machine has not yet), then serve that copy in ``slot``'s place. The copy, not the model
        in use: the transforms change a model in place, and the worker is decoding with it."""
        try:
            checkpoint = load_checkpoint(slot.path, device=device, dtype=dtype)
            decoder = self._serving_decoder(checkpoint, fast=True)
        except Exception:  # the torch path keeps serving
            logger.exception("fast path not built; the chat model keeps torch's kernels", extra={"model": slot.role})
            slot.kernels = "failed"
            return
        fast = ModelSlot(slot.role, slot.path, checkpoint=checkpoint, decoder=decoder, load_seconds=slot.load_seconds,
                         kernels="done", fixed_name=slot.fixed_name, label=slot.label, defaults=slot.defaults)
        with self._lock:
            if self._stopping or not self._in_service(slot):
                return  # stopped, or replaced by another model meanwhile
            fast.worker = self._make_worker(fast, checkpoint, decoder).start()
            self._set(fast, "ready")
            self._replace_chat(fast)
        self._retire(slot)
        logger.info("chat model switched to the fast path", extra={"model": slot.label, "report": str(decoder.report)})

    def _serving_decoder(self, checkpoint: Any, fast: bool = True) -> ServingDecoder:
        """The chat model's decoder: our kernels where the settings ask (``fast``) and they fit, and
        recent chats' caches kept for their next turn (``SCRATCHGPT_CHAT_PREFIX_CACHE_MB``)."""
        mb = self.settings.chat_prefix_cache_mb
        kept = PrefixCache(mb * 2**20) if mb else None
        if fast and self.settings.fast_kernels:
            try:
                decoder = fast_for_serving(checkpoint, prefix_cache=kept)
                logger.info("chat model fast path", extra={"model": CHAT, "report": str(decoder.report)})
                return decoder
            except Exception:  # a damaged blocks file costs speed, not the chat model
                logger.exception("fast path unusable; the chat model decodes with torch's kernels",
                                 extra={"model": CHAT, "path": str(checkpoint.path)})
        return ServingDecoder(checkpoint.model, prefix_cache=kept)

    @staticmethod
    def _validate(role: str, checkpoint: Any) -> None:
        if role == CHAT and checkpoint.task != "causal-lm":
            raise ValueError(f"{checkpoint.path} is a {checkpoint.task} checkpoint; the chat model must be causal-lm")
        if role == CLASSIFIER:
            if checkpoint.task != "classification":
                raise ValueError(
                    f"{checkpoint.path} is a {checkpoint.task} checkpoint; the spam classifier must be a "
                    "classification checkpoint (made by `scratchgpt finetune spam`)"
                )
            if "spam" not in (checkpoint.labels or []):
                raise ValueError(f"{checkpoint.path} has labels {checkpoint.labels}; a spam classifier needs 'spam'")
            decision_threshold(checkpoint)  # a stored threshold that cannot be used fails the load, not each request

    def _make_worker(self, slot: ModelSlot, checkpoint: Any, decoder: ServingDecoder | None) -> Any:
        role, label = slot.role, slot.label
        depth = self.metrics.queue_depth.labels(label)
        if role == CHAT:
            tokens = self.metrics.tokens_generated.labels(label)
            computed, cached = (self.metrics.prompt_tokens.labels(label, kind) for kind in ("prefilled", "cached"))

            def on_prompt(prompt: int, reused: int) -> None:
                computed.inc(prompt - reused)
                cached.inc(reused)

            s = self.settings
            worker = ChatWorker(
                checkpoint, decoder, label, max_batch=s.chat_max_batch, max_waiting=s.chat_max_waiting,
                max_running_per_owner=s.chat_max_running_per_owner, max_waiting_per_owner=s.chat_max_waiting_per_owner,
                prefill_chunk=s.chat_prefill_chunk, max_kv_bytes=s.chat_kv_cache_mb * 2**20 or None,
                threads=s.torch_threads, on_tokens=tokens.inc, on_queue_depth=depth.set, on_prompt=on_prompt,
                on_observe=self.metrics.engine_observer(label))
            stats = worker.engine.stats  # read when /metrics is scraped
            self.metrics.engine_running.labels(label).set_function(lambda: stats.running)
            self.metrics.engine_waiting.labels(label).set_function(lambda: stats.waiting)
            engine = worker.engine
            kv = {"budget": lambda: engine.kv_bytes, "touched": lambda: engine.kv_bytes_touched,
                  "in_use": lambda: engine.kv_bytes_in_use}
            for part, read in kv.items():
                self.metrics.kv_cache.labels(label, part).set_function(read)
            kept = getattr(decoder, "prefix_cache", None)
            self.metrics.prefix_cache.labels(label).set_function(lambda: kept.nbytes if kept is not None else 0)
            return worker

        def on_batch(n: int) -> None:
            self.metrics.classify_batch.observe(n)
            self.metrics.classify_texts.inc(n)

        return ClassifierWorker(
            checkpoint, label,
            max_batch=self.settings.classifier_batch_size,
            max_wait_ms=self.settings.classifier_batch_wait_ms,
            pack_tokens=self.settings.classifier_pack_tokens or None,
            batch_tokens=self.settings.classifier_batch_tokens,
            on_batch=on_batch,
            on_queue_depth=depth.set,
            threads=self.settings.torch_threads,
        )

    @property
    def stopped(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        for slot in [*self.chat.values(), self.classifier, *self._retiring]:
            if slot.worker is not None:
                slot.worker.stop()


def remote_chat_slot(settings: Settings) -> ModelSlot:
    """The chat's slot when ``SCRATCHGPT_CHAT_BACKEND_URL`` names an OpenAI-compatible server to
    generate its answers (``app.services.remote_chat``); it is "loading" until the registry has looked at it."""
    key = settings.chat_backend_key.get_secret_value() if settings.chat_backend_key else None
    backend = RemoteBackend(settings.chat_backend_url or "", key, settings.chat_backend_model,
                            settings.chat_backend_context_length, settings.chat_backend_timeout)
    return ModelSlot(CHAT, Path(backend.url), backend=backend, fixed_name=settings.chat_backend_model or "remote",
                     label=CHAT)
