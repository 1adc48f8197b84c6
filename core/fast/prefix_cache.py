"""Keys and values of recent requests, kept so that a prompt which continues one prefills only its new tokens.

The next turn of a chat is the last turn's prompt, the answer and a new
message: everything but the new message was run through the model a moment
ago. Prefilling it again costs time linear in the conversation before the
first new token appears (figures: docs/performance.md, "The next turn of a
chat"). Keeping the KV cache of each finished request, keyed by the token ids
it holds, lets the next request take the longest matching prefix and run only
the rest. This is the prefix caching of serving engines (vLLM's automatic
prefix caching; SGLang's RadixAttention, Zheng et al., 2023), kept simple: a
few whole caches, trimmed to the tokens they hold, least recently used dropped
first, within a byte budget.

A cache holds keys and values that depend only on the tokens before each
position, so reusing the first m positions of a cache built for the same
tokens gives the logits a fresh prefill gives, up to summation order (the
fused decoding layers and a whole-prompt pass sum in different orders).

One request owns a cache at a time. A prompt that continues a whole entry (the
next turn) takes it over: :meth:`PrefixCache.take` removes it, and
:meth:`PrefixCache.put` stores the request's cache when it ends. A prompt that
shares only the start of an entry (a template's preamble, a system prompt, an
edited message) gets a copy of that start, and the entry stays for its own
conversation. ``core.serving``'s engine does both for every sequence it serves (the service),
and ``core.fast.serving.ServingDecoder`` for a single prompt when its ``prefix_cache`` is set
(``scratchgpt chat``). If
the model's weights change (in place, replaced or cast), every kept cache is
stale and is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from core.fast.kernels import weight_key
from core.model.kv_cache import KVCache

# Shared prefixes shorter than this are not reused, nor caches this short kept: the
# prefill they would save is a few milliseconds, less than keeping them costs.
MIN_REUSE = 16


@dataclass
class _Entry:
    tokens: list[int]
    cache: KVCache

    @property
    def nbytes(self) -> int:
        return self.cache.keys.nbytes + self.cache.values.nbytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Whole KV caches of finished requests (batch 1), up to ``max_bytes`` of them together."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self._weights: tuple | None = None  # what the model's weights were when the entries were made
        self._lock = threading.Lock()
        self.reused_tokens = 0  # prompt tokens not prefilled again, over all requests

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        # A copy of the model (deepcopy, pickling) starts with an empty store: nothing to share or lock.
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def take(self, model: torch.nn.Module, prompt: list[int], capacity: int) -> KVCache:
        """A batch-1 cache of at least ``capacity`` positions for ``prompt``, already holding the longest
        stored prefix of it (``cache.length`` tokens; at most all but the prompt's last token, whose
        logits the request needs), or empty.

        A prompt that continues a whole entry (a chat's next turn) takes that entry over. One that
        shares only its start (the template's preamble, a system prompt, an edited message) gets a
        copy of that start, and the entry stays for the conversation it belongs to."""
        p = model.head_weight
        weights = tuple(weight_key(w) for w in model.parameters())
        with self._lock:
            if weights != self._weights:
                self._entries.clear()
                self._weights = weights
            best, shared = None, 0
            for entry in self._entries:
                n = common_prefix(entry.tokens, prompt)
                if n > shared:
                    best, shared = entry, n
            shared = min(shared, len(prompt) - 1)
            if shared < MIN_REUSE:
                return KVCache(model.cfg, 1, capacity, p.device, p.dtype)
            self.reused_tokens += shared
            if shared < len(best.tokens):
                # Copied under the lock: the entry may be taken over next, and its positions written.
                return best.cache.resized(max(capacity, shared), shared)
            self._entries.remove(best)
        # Kept caches are trimmed to what they hold (put), so the next turn's room is a copy of them.
        return best.cache if best.cache.max_len >= capacity else best.cache.resized(capacity)

    def put(self, tokens: list[int], cache: KVCache) -> None:
        """Keep ``cache``, whose first positions hold the keys and values of ``tokens`` (it may hold
        fewer: the last token generated is never run through the model)."""
        length = min(cache.length, len(tokens))
        if length < MIN_REUSE or cache.keys.shape[1] != 1:
            return
        cache.length = length
        if cache.max_len > length:
            # The room left for new tokens (often most of max_new_tokens, unused) is not kept:
            # the budget then holds more conversations, for a copy of a few MB at each end.
            cache = cache.resized(length)
        entry = _Entry(list(tokens[:length]), cache)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            # An entry this one extends holds nothing it does not.
            self._entries = [e for e in self._entries if common_prefix(e.tokens, entry.tokens) < len(e.tokens)]
            self._entries.append(entry)
            while self.nbytes > self.max_bytes:
                self._entries.pop(0)
