"""Prometheus metrics: one registry per app, so tests can build many apps in one process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "scratchgpt_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "scratchgpt_http_request_duration_seconds",
            "Time from request to the end of the response body (whole stream for SSE)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_generated = Counter("scratchgpt_tokens_generated_total", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "scratchgpt_prompt_tokens_total",
            "Prompt tokens of chat requests: prefilled, or cached (taken from a kept cache, core.fast.prefix_cache)",
            ["model", "source"], registry=r,
        )
        self.generations = Counter(
            "scratchgpt_generations_total", "Generations by how they ended", ["model", "outcome"], registry=r
        )
        self.queue_depth = Gauge("scratchgpt_inference_queue_depth", "Jobs waiting for a model worker", ["model"], registry=r)
        self.model_load_seconds = Gauge("scratchgpt_model_load_seconds", "Time taken to load a model", ["model"], registry=r)
        self.model_ready = Gauge("scratchgpt_model_ready", "1 when the model is loaded and serving", ["model"], registry=r)
        self.classify_texts = Counter("scratchgpt_classified_texts_total", "Texts classified", registry=r)
        self.classify_batch = Histogram(
            "scratchgpt_classifier_batch_size",
            "Texts per classifier forward pass (dynamic micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )

        # The chat engine (core.serving): what it holds, and how long answers wait and stream.
        self.engine_batch = Histogram(
            "scratchgpt_chat_batch_size", "Answers decoded together in each step of the chat engine",
            ["model"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.ttft = Histogram(
            "scratchgpt_chat_time_to_first_token_seconds", "From an answer's request to its first token (queue included)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram(
            "scratchgpt_chat_time_between_tokens_seconds", "Between two tokens of one answer",
            ["model"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.queue_wait = Histogram(
            "scratchgpt_chat_queue_seconds", "From an answer's request to its place in the engine",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_running = Gauge("scratchgpt_chat_running", "Answers holding a place in the chat engine", ["model"],
                                    registry=r)
        self.engine_waiting = Gauge("scratchgpt_chat_waiting", "Answers waiting for a place in the chat engine",
                                    ["model"], registry=r)
        # What the chat engine holds by design, bounded by its budgets: the process grows with
        # these, and only these, under load (bench/load.py reads them beside the RSS).
        self.kv_cache = Gauge(
            "scratchgpt_chat_kv_cache_bytes", "The chat engine's pool of KV pages: its budget, the pages ever lent "
            "(resident), and those lent now", ["model", "part"], registry=r)
        self.prefix_cache = Gauge("scratchgpt_chat_prefix_cache_bytes", "KV caches of recent answers kept for reuse",
                                  ["model"], registry=r)

    def engine_observer(self, model: str):
        """The chat engine's ``on_observe(name, value)`` for ``model``, into these histograms."""
        histograms = {"batch_size": self.engine_batch, "ttft_seconds": self.ttft, "tbt_seconds": self.tbt,
                      "queue_seconds": self.queue_wait}
        children = {name: h.labels(model) for name, h in histograms.items()}

        def observe(name: str, value: float) -> None:
            child = children.get(name)
            if child is not None:
                child.observe(value)

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests and times them to the last body byte, labelled by route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
