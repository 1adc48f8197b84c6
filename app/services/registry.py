"""The models the service serves: loading them off the event loop, their state, and their workers.

Each model has a slot whose state moves from ``loading`` to ``ready``, ``missing`` (no
checkpoint yet: its endpoints answer 503 naming the command that makes one), ``error``
(a checkpoint that does not load) or ``disabled`` (switched off in settings).

The chat model answers through torch's kernels as soon as it is loaded; our C++
kernels (``core.fast``), which compile on first use (minutes on a fresh
machine), are built on a second copy in the background and swapped in when ready.
A model's checkpoint can also be replaced while serving (:meth:`ModelRegistry.load_model`:
a background fine-tune has finished), and while a fine-tune that makes a missing
model runs, its requests answer 503 with the job's progress (:meth:`ModelRegistry.set_training`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.metrics import Metrics
from app.services.workers import ChatWorker, ClassifierWorker
from app.settings import Settings
from core.fast.prefix_cache import PrefixCache
from core.fast.serving import ServingDecoder
from core.fast.transforms import fast_for_serving
from core.weights.checkpoint import load_checkpoint

logger = logging.getLogger("scratchgpt.models")

CHAT = "chat"
CLASSIFIER = "classifier"

MAKE_COMMANDS = {
    CHAT: "scratchgpt download smollm2-135m-instruct",
    CLASSIFIER: "scratchgpt finetune spam",
}
SETTING_NAMES = {CHAT: "SCRATCHGPT_CHAT_CHECKPOINT", CLASSIFIER: "SCRATCHGPT_CLASSIFIER_CHECKPOINT"}
# A replaced model's worker is stopped when idle, looked at first after RETIRE_GRACE_SECONDS (a request
# that found the old model just before the swap has queued its work by then), and at the latest after
# RETIRE_SECONDS (a chat answer can run for minutes).
RETIRE_GRACE_SECONDS = 5.0
RETIRE_SECONDS = 600.0


class ModelUnavailable(RuntimeError):
    """A request needs a model that is not serving; ``detail`` says why and what to do."""

    def __init__(self, role: str, state: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.role, self.state, self.detail, self.retry_after = role, state, detail, retry_after


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
    kernels: str | None = None  # the chat model's fast path: "building" until it is swapped in, then "done"
    served_name: str | None = None  # load_model's name, else the checkpoint's

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.checkpoint is not None:
            return self.checkpoint.name
        return self.path.name

    def public(self) -> dict[str, Any]:
        info: dict[str, Any] = {"state": self.state, "name": self.name, "path": str(self.path)}
        if self.detail:
            info["detail"] = self.detail
        if self.load_seconds is not None:
            info["load_seconds"] = round(self.load_seconds, 3)
        if self.state == "missing":
            info["make_with"] = MAKE_COMMANDS[self.role]
        if self.checkpoint is not None:
            info["context_length"] = self.checkpoint.config.context_length
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


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.slots: dict[str, ModelSlot] = {
            CHAT: ModelSlot(CHAT, settings.resolved_chat_checkpoint),
            CLASSIFIER: ModelSlot(CLASSIFIER, settings.resolved_classifier_checkpoint),
        }
        if not settings.chat_enabled:
            self._set(self.slots[CHAT], "disabled", "the chat model is switched off (SCRATCHGPT_CHAT_ENABLED=false)")
        if not settings.classifier_enabled:
            self._set(
                self.slots[CLASSIFIER], "disabled",
                "the spam classifier is switched off (SCRATCHGPT_CLASSIFIER_ENABLED=false)",
            )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._background: list[threading.Thread] = []  # fast-path builds still running
        self.training: dict[str, tuple[str, int | None]] = {}  # role -> (job's message, retry-after seconds)

    # --- state --------------------------------------------------------------

    def _set(self, slot: ModelSlot, state: str, detail: str = "") -> None:
        slot.state, slot.detail = state, detail
        self.metrics.model_ready.labels(slot.role).set(1 if state == "ready" else 0)

    @property
    def loading(self) -> list[str]:
        return [role for role, slot in self.slots.items() if slot.state == "loading"]

    def status(self) -> dict[str, Any]:
        return {role: slot.public() for role, slot in self.slots.items()}

    def require(self, role: str) -> ModelSlot:
        slot = self.slots[role]
        if slot.state == "ready":
            return slot
        what = "chat model" if role == CHAT else "spam classifier"
        if slot.state == "loading":
            detail = f"the {what} is still loading; retry in a few seconds"
        elif slot.state == "missing":
            detail = (
                f"the {what} is not available: no checkpoint at {slot.path}. "
                f"Create it with `{MAKE_COMMANDS[role]}`, or point {SETTING_NAMES[role]} at a checkpoint directory"
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

    def set_training(self, role: str, message: str | None, retry_after: int | None = 30) -> None:
        """A fine-tune is making ``role``'s model (``message`` None: none is): until it is served, its
        requests answer 503 with ``message`` and ``retry_after``; with ``retry_after`` None the job
        failed, and ``message`` is added to the reason (``app.services.jobs`` keeps this current)."""
        if message is None:
            self.training.pop(role, None)
        else:
            self.training[role] = (message, retry_after)

    def load_model(self, role: str, path: Path, name: str | None = None) -> ModelSlot:
        """Serve the checkpoint at ``path`` as ``role``'s model from now on, without a restart.

        The new model is loaded beside the one it replaces, which keeps answering until then;
        answers it is still giving finish before its worker stops. Raises when the checkpoint
        does not load (the old model stays).
        """
        slot = ModelSlot(role, Path(path), served_name=name)
        if not (slot.path / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint at {slot.path}")
        self._load(slot, install=lambda: self._replace(self.slots[role], slot))
        if slot.state != "ready":
            raise RuntimeError(f"{slot.path} did not load: {slot.detail}")
        return slot

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
        for slot in self.slots.values():
            if slot.state != "loading" or self._stopping:
                continue
            try:
                self._load(slot)
            except Exception as exc:  # a broken model must not take the service down
                logger.exception("model failed to load", extra={"model": slot.role, "path": str(slot.path)})
                self._set(slot, "error", f"{type(exc).__name__}: {exc}")

    def _load(self, slot: ModelSlot, install: Any = None) -> None:
        """Load ``slot``'s checkpoint and start its worker; ``install`` (under the lock) puts a slot
        that is not serving yet in place once it is ready."""
        if not (slot.path / "config.json").is_file():
            self._set(slot, "missing", f"no checkpoint at {slot.path}")
            logger.warning(
                "model checkpoint missing",
                extra={"model": slot.role, "path": str(slot.path), "make_with": MAKE_COMMANDS[slot.role]},
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
            if self._stopping:
                return
            slot.checkpoint, slot.decoder = checkpoint, decoder
            slot.worker = self._make_worker(slot.role, checkpoint, decoder).start()
            slot.load_seconds = time.perf_counter() - start
            self.metrics.model_load_seconds.labels(slot.role).set(slot.load_seconds)
            self._set(slot, "ready")
            if install is not None:
                install()
            if kernels_later:
                slot.kernels = "building"
                thread = threading.Thread(target=self._switch_to_fast, args=(slot, device, dtype),
                                          name="fast-path-build", daemon=True)
                self._background.append(thread)
                thread.start()
        logger.info(
            "model loaded",
            extra={"model": slot.role, "model_name": checkpoint.name, "path": str(slot.path), "device": str(device),
                   "dtype": str(dtype).removeprefix("torch."), "seconds": round(slot.load_seconds, 3)},
        )

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
                         kernels="done", served_name=slot.served_name)
        with self._lock:
            if self._stopping or self.slots.get(slot.role) is not slot:
                return  # stopped, or replaced by another model meanwhile
            fast.worker = self._make_worker(fast.role, checkpoint, decoder).start()
            self._set(fast, "ready")
            self._replace(slot, fast)
        logger.info("chat model switched to the fast path", extra={"model": slot.role, "report": str(decoder.report)})

    def _replace(self, old: ModelSlot, new: ModelSlot) -> None:
        """Serve ``new`` in ``old``'s role (under the lock); ``old``'s worker stops once its answers are given."""
        self.slots[new.role] = new
        if old.worker is not None:
            threading.Thread(target=self._retire, args=(old.worker,), name="retire-worker", daemon=True).start()

    def _retire(self, worker: Any) -> None:
        # Requests that found the old slot keep it; new ones find the new. The old worker is left
        # to finish what it was given.
        start = time.monotonic()
        while not self._stopping and time.monotonic() - start < RETIRE_SECONDS and (
                time.monotonic() - start < RETIRE_GRACE_SECONDS
                or isinstance(worker, ChatWorker) and worker.current is not None):
            time.sleep(0.1)
        worker.stop()

    def _serving_decoder(self, checkpoint: Any, fast: bool = True) -> ServingDecoder:
        """The chat model's decoder: our kernels where the settings ask (``fast``) and they fit, and
        recent chats' caches kept for their next turn (``SCRATCHGPT_CHAT_PREFIX_CACHE_MB``)."""
        mb = self.settings.chat_prefix_cache_mb
        kept = PrefixCache(mb * 2**20) if mb else None
        if fast and self.settings.fast_kernels:
            try:
                decoder = fast_for_serving(checkpoint, prefix_cache=kept, batched=True)  # for ChatWorker's engine
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

    def _make_worker(self, role: str, checkpoint: Any, decoder: ServingDecoder | None) -> Any:
        depth = self.metrics.queue_depth.labels(role)
        if role == CHAT:
            tokens = self.metrics.tokens_generated.labels(role)
            computed, cached = (self.metrics.prompt_tokens.labels(role, kind) for kind in ("prefilled", "cached"))

            def on_prompt(prompt: int, reused: int) -> None:
                computed.inc(prompt - reused)
                cached.inc(reused)

            s = self.settings
            worker = ChatWorker(
                checkpoint, decoder, role, max_batch=s.chat_max_batch, max_waiting=s.chat_max_waiting,
                max_running_per_owner=s.chat_max_running_per_owner, max_waiting_per_owner=s.chat_max_waiting_per_owner,
                prefill_chunk=s.chat_prefill_chunk, max_kv_bytes=s.chat_kv_cache_mb * 2**20 or None,
                threads=s.torch_threads, on_tokens=tokens.inc, on_queue_depth=depth.set, on_prompt=on_prompt,
                on_observe=self.metrics.engine_observer(role))
            stats = worker.engine.stats  # read when /metrics is scraped
            self.metrics.engine_running.labels(role).set_function(lambda: stats.running)
            self.metrics.engine_waiting.labels(role).set_function(lambda: stats.waiting)
            return worker

        def on_batch(n: int) -> None:
            self.metrics.classify_batch.observe(n)
            self.metrics.classify_texts.inc(n)

        return ClassifierWorker(
            checkpoint, role,
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
        for slot in self.slots.values():
            if slot.worker is not None:
                slot.worker.stop()
