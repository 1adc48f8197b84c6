"""Decoding steps replayed from CUDA graphs: one launch per token instead of one per kernel.

On a GPU a small model's decoding step is bound by launches, not by memory:
GPT-2 small's step is about 150 kernels (norms, products, attention and
residuals in each of 12 layers, then the output layer), most of which finish
in a few microseconds, so Python dispatch and kernel launches take most of the
time. A CUDA graph (NVIDIA's CUDA Graphs, ``torch.cuda.CUDAGraph``) records
the kernels of one step once and replays them with one launch; this is what
vLLM and gpt-fast do for decoding.

A graph replays fixed kernels on fixed addresses, and the ordinary step has
neither: its view of the KV cache grows by a token each step and its position
is a Python int. :class:`StaticStep` is the same model's step rebuilt for a
graph:

- the cache has a fixed length and the new keys and values land at ``slot``,
  a one-element tensor (:class:`StaticKVCache`);
- attention reads the whole cache, masked to the slots filled so far and to
  each row's real (not padding) tokens;
- positions are counted from that mask, as ``GPTModel.context`` counts them
  from the attention mask for left-padded rows.

So the logits are the ordinary step's up to the order of summation (attention
sums over masked slots as zeros). The prompt's pass (prefill, whose shape
varies) runs as usual, into the same cache.

Graphs are kept per batch size and cache length; lengths are rounded up to a
power of two (at least 256, at most the context window) so that a few graphs
serve every request. ``core.fast.transforms`` installs a :class:`GraphedDecoder` on CUDA
models; on a CPU the same static step runs without a graph (what the tests
compare), which is not installed there: attending over the whole buffer costs
arithmetic a CPU has no launches to win back.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from core.model.kv_cache import KVCache
from core.model import ForwardContext, GPTModel

logger = logging.getLogger(__name__)

MIN_LENGTH = 256  # the shortest cache a graph is recorded for
MAX_GRAPHS = 4  # graphs kept, each with its own cache; the least recently used goes first


class StaticKVCache(KVCache):
    """A KV cache that, while ``static`` is set, writes the new keys and values at ``slot`` (a tensor)
    and hands back the whole buffer; otherwise it is a :class:`KVCache` (the prompt's pass)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.keys.device)
        self.static = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.static:
            return super().update(layer, k, v)
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        if not self.static:  # a static step's length is kept by StaticStep, outside what a graph records
            super().advance(n)


class StaticStep:
    """One decoding step of ``model`` for ``batch`` rows with every tensor at a fixed address.

    Use: :meth:`begin` with the request's attention mask, the prompt's pass
    through ``model(..., cache=self.cache)``, then :meth:`step` per new token.
    With ``capture`` (a CUDA model) the step is recorded once as a CUDA graph
    and replayed; without, it runs eagerly.
    """

    def __init__(self, model: GPTModel, batch: int, length: int, capture: bool,
                 logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        p = next(model.parameters())
        self.model = model
        self.logits_of = logits or model.logits  # the output layer (a serving decoder's, if given)
        self.cache = StaticKVCache(model.cfg, batch, length, p.device, p.dtype)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.real = torch.ones(batch, length, dtype=torch.bool, device=p.device)  # False: left padding
        self.slots = torch.arange(length, device=p.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        model, cache = self.model, self.cache
        visible = (self.slots <= cache.slot) & self.real  # (B, S): the keys each row's new token sees
        positions = visible.sum(-1, keepdim=True) - 1
        ctx = ForwardContext(positions, visible[:, None, None, :], model.rope_at(positions), cache)
        hidden, _ = model.run_blocks(model.embed(self.token, ctx), ctx)
        return self.logits_of(hidden)

    def _capture(self) -> None:
        # A few eager steps on a side stream first, as torch's docs prescribe: they make the
        # lazy allocations (cuBLAS workspaces, the allocator's blocks) that a graph must not.
        # They write into the last slot, which every request overwrites before it can see it.
        self.cache.static = True
        self.cache.slot.fill_(self.cache.max_len - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the service's other worker (the classifier) may use the GPU from its own
        # thread meanwhile; only this thread's calls must be ones a capture allows.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.cache.static = False

    def begin(self, attention_mask: torch.Tensor | None) -> None:
        """Start a request: an empty cache and, for left-padded rows, their (B, L) mask of real tokens."""
        self.cache.reset()
        self.real.fill_(True)
        if attention_mask is not None:
            self.real[:, : attention_mask.shape[1]] = attention_mask.bool()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) after the new tokens (B,) at the next free slot of the cache.
        With a graph the tensor is the graph's output, overwritten by the next step."""
        cache = self.cache
        n = cache.length
        if n >= cache.max_len:
            raise ValueError(f"KV cache overflow: {n + 1} tokens > capacity {cache.max_len}")
        cache.slot.fill_(n)
        self.token.copy_(token.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            cache.static = True
            try:
                logits = self._forward()
            finally:
                cache.static = False
        cache.length = n + 1
        return logits


def cache_length(tokens: int, context_length: int) -> int:
    """The cache length a request of ``tokens`` (prompt plus new) is decoded in: a power of two."""
    length = MIN_LENGTH
    while length < tokens:
        length *= 2
    return min(length, context_length)


class GraphedDecoder:
    """The :class:`StaticStep` of each (batch, cache length) a model has decoded, recorded on first use.

    One request decodes through them at a time; :meth:`session` gives None to a
    second one meanwhile, which then decodes eagerly (its own cache), so
    concurrent callers never share a cache. If a step cannot be recorded (an
    operation this torch build cannot capture), ``failed`` says why and every
    request decodes eagerly from then on: slower, never wrong.
    """

    def __init__(self, model: GPTModel, logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 capture: bool | None = None) -> None:
        self.model = model
        self.logits = logits
        self.capture = next(model.parameters()).device.type == "cuda" if capture is None else capture
        self.failed: str | None = None
        self._steps: OrderedDict[tuple[int, int], StaticStep] = OrderedDict()
        self._busy = threading.Lock()

    def __len__(self) -> int:
        return len(self._steps)

    def __getstate__(self) -> dict:
        # A copy of the model (deepcopy, pickling) records its own graphs, on its own weights.
        return {"model": self.model, "logits": self.logits, "capture": self.capture}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["logits"], state["capture"])

    @contextmanager
    def session(self, batch: int, tokens: int) -> Iterator[StaticStep | None]:
        """The static step for ``batch`` rows of up to ``tokens`` tokens, for the length of a request."""
        if self.failed or tokens > self.model.cfg.context_length or not self._busy.acquire(blocking=False):
            yield None
            return
        try:
            yield self._step_for(batch, cache_length(tokens, self.model.cfg.context_length))
        finally:
            self._busy.release()

    def _step_for(self, batch: int, length: int) -> StaticStep | None:
        key = (batch, length)
        if key not in self._steps:
            while len(self._steps) >= MAX_GRAPHS:
                self._steps.popitem(last=False)
            try:
                self._steps[key] = StaticStep(self.model, batch, length, capture=self.capture, logits=self.logits)
            except RuntimeError as err:
                self.failed = f"{type(err).__name__}: {err}"
                logger.warning("decoding steps cannot be recorded as CUDA graphs; decoding without them: %s",
                               self.failed)
                return None
        self._steps.move_to_end(key)
        return self._steps[key]
