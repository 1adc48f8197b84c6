"""The models the service serves: loading them off the event loop, their state, and their workers.

Each model has a slot whose state moves from ``loading`` to ``ready``, ``missing`` (no
checkpoint yet: its endpoints answer 503 naming the command that makes one), ``error``
(a checkpoint that does not load) or ``disabled`` (switched off in settings).
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
from core.classifier import decision_threshold
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


class ModelUnavailable(RuntimeError):
    """A request needs a model that is not serving; ``detail`` says why and what to do."""

    def __init__(self, role: str, state: str, detail: str) -> None:
        super().__init__(detail)
        self.role, self.state, self.detail = role, state, detail


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

    @property
    def name(self) -> str:
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
        raise ModelUnavailable(role, slot.state, detail)

    # --- loading --------------------------------------------------------------

    def start_loading(self) -> None:
        """Load every enabled model in a background thread; /ready turns 200 when all are settled."""
        self._thread = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.loading

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

    def _load(self, slot: ModelSlot) -> None:
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
        decoder = self._serving_decoder(checkpoint) if slot.role == CHAT else None
        with self._lock:
            if self._stopping:
                return
            slot.checkpoint, slot.decoder = checkpoint, decoder
            slot.worker = self._make_worker(slot.role, checkpoint, decoder).start()
            slot.load_seconds = time.perf_counter() - start
            self.metrics.model_load_seconds.labels(slot.role).set(slot.load_seconds)
            self._set(slot, "ready")
        logger.info(
            "model loaded",
            extra={"model": slot.role, "model_name": checkpoint.name, "path": str(slot.path), "device": str(device),
                   "dtype": str(dtype).removeprefix("torch."), "seconds": round(slot.load_seconds, 3)},
        )

    def _serving_decoder(self, checkpoint: Any) -> ServingDecoder:
        """The chat model's decoder: our kernels where the settings ask and they fit, and recent chats'
        caches kept for their next turn (``SCRATCHGPT_CHAT_PREFIX_CACHE_MB``)."""
        mb = self.settings.chat_prefix_cache_mb
        kept = PrefixCache(mb * 2**20) if mb else None
        if self.settings.fast_kernels:
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
            decision_threshold(checkpoint)  # a stored threshold that cannot be used fails the load, not each request

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
