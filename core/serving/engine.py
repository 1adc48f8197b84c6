"""Continuous batching: many sequences decoded together, each joining and leaving between steps.

A server that runs one request to its end before the next makes everyone wait
behind everyone, while a decoding step reads every weight once whether it
decodes one sequence or eight: on a CPU or a GPU a batch of eight costs little
more than one. Serving engines therefore schedule per step, not per request
(iteration-level scheduling: Orca, Yu et al., 2022; vLLM, Kwon et al., 2023;
llama.cpp's server slots; Hugging Face TGI). :class:`Engine` does it for our
models. Every step it

1. admits waiting sequences while places (``max_batch``) and pages for their
   prompts are free (first come, first served);
2. prefills their prompts, at most ``prefill_chunk`` prompt tokens in all per
   step while others are running, so a long prompt is spread over several
   steps instead of freezing everyone else's tokens (chunked prefill:
   Sarathi, Agrawal et al., 2023);
   prompts of similar lengths share one right-padded pass, since on a CPU a
   pass over 12 tokens costs about twice one over a single token, whatever
   the batch, and 32 new prompts in one pass cost a quarter of 32 passes;
3. decodes one token for every running sequence in ONE batched pass, each row
   at its own position and with its own sampling settings (temperature,
   top-k, top-p, seed, stop tokens and strings, token limit);
4. retires at once the sequences that finished or were cancelled.

KV memory: pages, not slots (PagedAttention's blocks: vLLM, Kwon et al., 2023).
One pool of ``max_kv_bytes`` is cut once into pages of ``page_size`` positions;
a sequence takes pages for its prompt when it is admitted and one more each
time its answer crosses a page, and gives them all back when it ends. A slot
per sequence had to be as long as the longest sequence could grow (the
context window: 8,192 positions for SmolLM2, 377 MB each in fp32), so a budget
that holds 32 short chats in pages held 1.4 slots, and the earlier engine ran
8 sequences by default for that reason. With pages, a chat of 100 tokens holds
7 pages of 16, and how many sequences run at once is set by what they hold, not
what they might hold; the cost is a gather of each row's pages per layer and
pass (``index_select``; a custom attention kernel would read them in place).
What does not fit waits in the queue. When the running sequences' answers
outgrow the pool, the youngest gives its pages back and waits at the head of
the queue (preemption by recomputation, vLLM's), its keys and values kept in the
prefix cache so that it copies them back when it is admitted again. A prompt
longer than ``max_len`` (the context window, or what the pool holds) is refused
at :meth:`Engine.submit`, and an answer that would outgrow it ends there with
finish reason "length".

What exists keeps working:

- a prompt that continues a conversation kept in the prefix cache
  (``core.fast.prefix_cache``) copies those rows into its pages instead of
  prefilling them, and every retired sequence stores its rows back. Each
  prompt's rows are also stored as soon as its prefill ends, and the cache is
  looked up when a prefill starts, so that requests arriving together run the
  chat template's preamble (or a shared system prompt) once, not once each;
- the model's own modules run, so the serving transforms installed on them
  (``core.fast.transforms``: panels, oneDNN copies, the screened output layer
  for all-greedy batches) apply by themselves. A fused decoding layer
  (``core.fast.fused_layers``) writes a cache of one piece at one common
  position, so the batched step runs each block's own code around those fast
  linear layers. A sequence running alone moves into a cache of its own (one
  copy of its pages, and back when another is admitted) and decodes by the
  serving decoder's strategy for one sequence (``core.fast.serving``):
  speculatively where the decoder has a draft (``core.fast.speculative``; greedy,
  or sampled without a seed, and no one waiting who could run beside it),
  several tokens per step; from its CUDA graphs on a GPU
  (``core.fast.cuda_graphs``); else the model's ordinary forward, fused layers
  included. A lone request thus runs the passes ``ServingDecoder.stream`` runs
  for it, and the next step after another is admitted is batched again.

Text: each sequence turns its tokens into text with ``core.generation``'s
:class:`~core.generation.generate.TextStream`, exactly as ``stream`` does
(UTF-8 characters whole, possible stop-string prefixes held back).

Threads: :meth:`Engine.start` runs the scheduler on a thread the engine owns,
which sleeps while there is nothing to do; :meth:`Engine.step` runs one step
in the caller's thread instead (the tests). :meth:`Engine.submit` may be
called from any thread; the :class:`Handle` it returns is read from a worker
thread (``for chunk in handle``) or from asyncio (``async for chunk in
handle``). Closing the iterator cancels the sequence; asyncio closes an async
iterator left early only when it is collected, so a reader that leaves early
closes it (``contextlib.aclosing``) or calls :meth:`Handle.cancel`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any

import torch

from core.generation.generate import GenerationConfig, StreamChunk, TextStream, check_prompt
from core.fast.serving import ServingDecoder
from core.fast.speculative import Speculation
from core.generation.sampling import Penalties, make_generator, sample
from core.model import ForwardContext, GPTModel, KVCache, TransformerBlock
from core.serving.wakeup import wakeable_items

logger = logging.getLogger(__name__)

PAGE_SIZE = 16  # positions per page of KV memory (vLLM's default block size)
DEFAULT_MAX_BATCH = 32  # sequences running at once
DEFAULT_KV_BYTES = 512 * 2**20  # the pages' keys and values, all sequences together
# Prompts in one prefill pass at most: 32 prompts of ten new tokens arriving together get their
# first tokens in four waves, not all at the end of one pass four times as long (time to first token
# p50), for a few percent more time in all (passes of 80 tokens fill a CPU's matrix products well).
PREFILL_ROWS = 8
# Prompt tokens prefilled per step: 32 chat prompts arriving together (about ten tokens each past the
# template's preamble, which they copy) all start in the step they arrive, instead of a quarter of
# them waiting a whole decoding step of the others for theirs.
DEFAULT_PREFILL_CHUNK = 512
MIN_SOLO_LENGTH = 256  # a lone sequence's own cache starts this long, doubled as it grows


class EngineError(RuntimeError):
    """Decoding failed; the sequences running at the time end with this error."""


class EngineFull(EngineError):
    """The queue holds ``max_waiting`` sequences already: try again later (a server's 503)."""


class EngineStopped(EngineError):
    """The engine has stopped, or stopped before this sequence finished."""


@dataclass
class Queued:
    """A waiting sequence's place in the queue: ``ahead`` sequences will be admitted before it."""

    ahead: int


@dataclass
class EngineStats:
    """Counters a server exports (plain numbers, read any time). The timings go to the engine's
    ``on_observe(name, value)`` hook instead, one call per event: "queue_seconds" (submit to
    admission), "ttft_seconds" (submit to first token), "tbt_seconds" (between two tokens of a
    sequence) and "batch_size" (sequences in each decoding step)."""

    running: int = 0  # sequences holding pages (prefilling or decoding)
    waiting: int = 0  # sequences in the queue
    submitted: int = 0
    rejected: int = 0  # refused with EngineFull
    finished: int = 0  # ended by a stop or their length, cancelled and failed not counted
    cancelled: int = 0
    failed: int = 0
    steps: int = 0  # decoding steps (batched passes)
    generated_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through the model
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead
    preempted: int = 0  # sequences that gave their pages back to let older ones grow, and waited again


@dataclass
class _End:
    error: BaseException | None = None


class Handle:
    """One submitted sequence: read its chunks, see its place in the queue, cancel it.

    Iterating (``for`` in a thread, ``async for`` in asyncio) yields the
    :class:`~core.generation.generate.StreamChunk` s of the answer; the last one
    carries ``finish_reason`` ("stop" or "length"), while a cancelled sequence's
    chunks just end (the handle's ``finish_reason`` says "cancelled"). :meth:`events` and
    :meth:`aevents` also yield a :class:`Queued` whenever the place in the queue
    changes before admission, and None after ``heartbeat`` idle seconds (for
    keep-alives). A failed step raises :class:`EngineError` in the reader.
    One reader per handle.
    """

    def __init__(self, engine: "Engine", prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_prompt_tokens = 0  # of them, copied from the prefix cache
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled" once done
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._position: int | None = None
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waker: Callable[[], None] | None = None
        self._ended = False
        self._seq: _Sequence | None = None  # set by the engine

    @property
    def position(self) -> int | None:
        """Sequences ahead of this one in the queue; None once admitted (or done)."""
        return self._position

    @property
    def done(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        """Stop this sequence: at once while it waits, before the next step while it runs."""
        self._engine._cancel(self)

    # -- reading ---------------------------------------------------------------------------

    def events(self, heartbeat: float | None = None) -> Iterator[Queued | StreamChunk | None]:
        """Queue places and chunks as they come, in the calling thread; closing it cancels."""
        try:
            while True:
                with self._cond:
                    if not self._items and not self._cond.wait_for(lambda: self._items, heartbeat):
                        item = None
                    else:
                        item = self._items.popleft()
                if self._ends(item):
                    return
                yield item
        finally:
            if not self._ended:
                self.cancel()

    async def aevents(self, heartbeat: float | None = None) -> AsyncIterator[Queued | StreamChunk | None]:
        """:meth:`events` for asyncio: waiting never blocks the event loop; closing it cancels."""
        def take() -> Any:
            with self._cond:
                return self._items.popleft() if self._items else None

        def set_waker(waker: Callable[[], None] | None) -> None:
            self._waker = waker

        def loop_closed() -> None:
            # Only flagged: this runs under the engine's lock, and the next step retires it.
            self._seq.cancelled = True

        try:
            async with aclosing(wakeable_items(take, set_waker, heartbeat, loop_closed)) as items:
                async for item in items:
                    if item is not None and self._ends(item):
                        return
                    yield item
        finally:
            if not self._ended:
                self.cancel()

    @staticmethod
    def _ends(item: Any) -> bool:
        """Whether ``item`` ends the stream; raises the error of a sequence that failed."""
        if isinstance(item, _End) and item.error is not None:
            raise item.error
        return isinstance(item, _End)

    def __iter__(self) -> Iterator[StreamChunk]:
        events = self.events()
        try:
            for item in events:
                if isinstance(item, StreamChunk):
                    yield item
        finally:
            events.close()  # now, not when collected: closing cancels an unfinished sequence

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        events = self.aevents()
        try:
            async for item in events:
                if isinstance(item, StreamChunk):
                    yield item
        finally:
            await events.aclose()

    def text(self) -> str:
        """The whole answer, waiting for it in the calling thread."""
        return "".join(chunk.text for chunk in self)

    # -- written by the engine -------------------------------------------------------------

    def _push(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            waker()

    def _end(self, reason: str | None, error: BaseException | None = None) -> None:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self._position = None
        self._ended = True
        self._push(_End(error))


@dataclass(eq=False)
class _Sequence:
    """What the scheduler keeps for one sequence."""

    handle: Handle
    prompt: list[int]
    config: GenerationConfig
    limit: int  # new tokens at most: max_new_tokens, or what fits the budget
    text: TextStream
    generator: torch.Generator | None
    penalties: Penalties | None = None  # the sequence's history, when its settings penalize repeats
    owner: str | None = None  # who sent it (max_running_per_owner)
    context: list[int] = field(default_factory=list)  # what its prefill runs: the prompt, or more once preempted
    pages: list[int] = field(default_factory=list)  # its pages, in position order, while admitted
    solo: KVCache | None = None  # its keys and values in one piece while it runs alone (see Engine)
    graphs: ExitStack | None = None  # the decoder's CUDA graphs, held while it runs alone on them
    static: Any = None  # and their static step (core.fast.cuda_graphs.StaticStep), whose cache is its solo
    speculation: Speculation | None = None  # its drafting so far, once it decoded alone with a draft
    cached: int = 0  # positions holding keys and values
    next_token: int | None = None  # the last token sampled, fed at the next step; None while prefilling
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    started: bool = False  # whether its prefill has begun (and the prefix cache was looked up)
    last_token_at: float = 0.0


class _Pages:
    """The KV memory: ``count`` pages of ``size`` positions each, allocated once, lent to sequences.

    Laid out ``[layers, pages, size, kv_heads, head_dim]`` so that the pages a batched pass reads
    gather (``index_select`` on the page dimension) into ``(rows, positions, kv_heads, head_dim)``
    for every row at once, and a transpose makes that the ``(rows, kv_heads, positions, head_dim)``
    attention takes."""

    def __init__(self, model: GPTModel, count: int, size: int) -> None:
        p = next(model.parameters())
        cfg = self.cfg = model.cfg
        self.count, self.size, self.device, self.dtype = count, size, p.device, p.dtype
        # Empty memory, each page zeroed when first lent: the pool's untouched pages then cost no
        # resident memory (a fresh mapping), so the process grows with the pages used, not the budget.
        # Zeroed, because attention reads positions past a row's own under its mask, and a NaN left
        # there would turn into NaN weights (0 * NaN) despite the mask.
        shape = (cfg.n_layers, count, size, cfg.kv_heads, cfg.head_dim)
        self.keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.values = torch.empty(shape, device=self.device, dtype=self.dtype)
        self._free = list(range(count - 1, -1, -1))  # popped from the end: low pages, touched already, first
        self._zeroed = 0  # pages below this were zeroed; the free list lends them in ascending order first
        self._zero_up_to(1)  # page 0 pads the rows a batched pass reads

    @staticmethod
    def bytes_per_position(model: GPTModel) -> int:
        """Bytes of keys and values one position holds."""
        cfg, p = model.cfg, next(model.parameters())
        return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * p.element_size()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of keys and values one page holds."""
        return (self.keys.nbytes + self.values.nbytes) // self.count

    @property
    def touched(self) -> int:
        """Pages ever lent (zeroed): resident in memory from then on."""
        return self._zeroed

    def needed(self, pages: list[int], length: int) -> int:
        """Pages more that ``pages`` need to hold ``length`` positions."""
        return max(0, -(-length // self.size) - len(pages))

    def grow(self, pages: list[int], length: int) -> bool:
        """Extend ``pages`` to hold ``length`` positions; False (and nothing taken) if too few are free."""
        need = self.needed(pages, length)
        if need > len(self._free):
            return False
        taken = [self._free.pop() for _ in range(need)]
        self._zero_up_to(max(taken, default=-1) + 1)
        pages.extend(taken)
        return True

    def _zero_up_to(self, end: int) -> None:
        if end > self._zeroed:
            self.keys[:, self._zeroed : end].zero_()
            self.values[:, self._zeroed : end].zero_()
            self._zeroed = end

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()

    def _where(self, pages: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page and offset of positions 0 to ``length`` - 1."""
        positions = torch.arange(length, device=self.device)
        table = torch.tensor(pages, device=self.device, dtype=torch.long)
        return table[positions // self.size], positions % self.size

    def load(self, pages: list[int], cache: KVCache, length: int) -> None:
        """Copy the first ``length`` positions of a batch-1 cache into ``pages``."""
        at, offset = self._where(pages, length)
        self.keys[:, at, offset] = cache.keys[:, 0, :, :length].transpose(1, 2)
        self.values[:, at, offset] = cache.values[:, 0, :, :length].transpose(1, 2)

    def export(self, pages: list[int], length: int, capacity: int | None = None) -> KVCache:
        """A batch-1 cache of ``capacity`` positions (default ``length``) holding a copy of the first
        ``length`` positions of ``pages``."""
        cache = KVCache(self.cfg, 1, max(capacity or length, 1), self.device, self.dtype)
        at, offset = self._where(pages, length)
        cache.keys[:, 0, :, :length] = self.keys[:, at, offset].transpose(1, 2)
        cache.values[:, 0, :, :length] = self.values[:, at, offset].transpose(1, 2)
        cache.length = length
        return cache


class _PagedStep:
    """The cache of one batched pass, row i over the pages ``tables[i]`` with its own new tokens at
    its own positions: the real ones' keys and values land in their pages, padding's nowhere, and
    attention reads every row's pages up to the furthest position, masked per query."""

    def __init__(self, pages: _Pages, tables: list[list[int]], positions: torch.Tensor, real: torch.Tensor) -> None:
        self.pages, self.real = pages, real
        device, size = positions.device, pages.size
        self.rows, self.span = len(tables), int(positions.max()) + 1
        self.width = -(-self.span // size)  # pages read per row
        # A row shorter than the furthest reads some page under its mask (page 0): finite, never seen.
        table = torch.tensor([t[: self.width] + [0] * (self.width - len(t[: self.width])) for t in tables],
                             device=device, dtype=torch.long)
        self.read = table.reshape(-1)
        self.write_pages = table.gather(1, positions // size)[real]
        self.write_offsets = (positions % size)[real]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, kv_heads, T, head_dim); a page and an offset address one (kv_heads, head_dim) block.
        out = []
        for store, new in ((self.pages.keys[layer], k), (self.pages.values[layer], v)):
            store[self.write_pages, self.write_offsets] = new.transpose(1, 2)[self.real]
            rows = store.index_select(0, self.read).view(self.rows, self.width * self.pages.size, *store.shape[2:])
            out.append(rows[:, : self.span].transpose(1, 2))
        return out[0], out[1]

    def advance(self, n: int) -> None:
        pass  # the engine counts each row's positions itself



def _similar_lengths(work: list[tuple[Any, int]], waste: float = 1.25,
                     rows: int | None = None) -> list[list[tuple[Any, int]]]:
    """``(sequence, tokens)`` pairs in groups run as one right-padded pass each: longest first, a
    group taking the next while its padded size stays within ``waste`` times its real tokens and
    it holds fewer than ``rows`` pairs (None: any number)."""
    groups: list[list[tuple[Any, int]]] = []
    real = 0
    for item in sorted(work, key=lambda w: -w[1]):
        if (groups and (rows is None or len(groups[-1]) < rows)
                and (len(groups[-1]) + 1) * groups[-1][0][1] <= waste * (real + item[1])):
            groups[-1].append(item)
            real += item[1]
        else:
            groups.append([item])
            real = item[1]
    return groups


# glibc's malloc raises its mmap threshold to the size of any large block freed (up to 32 MiB),
# after which blocks of that size come from the heap, where a KV copy freed between two live ones
# stays behind as a hole: a server that keeps and drops conversations' caches (the prefix cache)
# then grows for as long as it runs. A fixed threshold (which also turns the dynamic one off) keeps
# every large tensor in its own mapping, given back to the system when it is freed.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20


def _large_blocks_mapped() -> None:
    """Keep large allocations out of glibc's heap (see above); nothing elsewhere (no glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _argmax_only(seq: "_Sequence") -> bool:
    """Whether only the argmax of this sequence's logits matters (greedy and no penalties to apply)."""
    return seq.config.greedy and seq.penalties is None


class Engine:
    """Decodes many sequences at once for ``model`` (a ``GPTModel`` in eval mode, or the
    ``core.fast.serving.ServingDecoder`` whose output layers its passes should use) and ``tokenizer``.

    ``max_batch``: the most sequences running at once (each decoding step is one
    pass over up to this many rows). ``max_kv_bytes``: the keys and values of
    all running sequences together (default :data:`DEFAULT_KV_BYTES`, raised to
    hold one whole ``max_len``), cut into pages of ``page_size`` positions.
    ``max_len``: positions one sequence holds at most, prompt and answer
    together (default: the model's context window, lowered to what the budget
    holds). ``prefill_chunk``: prompt tokens prefilled per step at most, over all
    sequences. ``prefix_cache``: a ``core.fast.prefix_cache.PrefixCache`` to
    take kept conversations from and store finished ones in. ``max_waiting``:
    queue length past which :meth:`submit` raises :class:`EngineFull` (None: no
    limit). ``max_running_per_owner``: sequences one owner runs at most (None: no
    limit); a sequence past it waits while other owners' sequences behind it are admitted.
    ``threads``: torch threads of the scheduler's thread.
    ``on_observe(name, value)``: timings as they happen (see :class:`EngineStats`).
    """

    def __init__(
        self,
        model: GPTModel | ServingDecoder,
        tokenizer: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_len: int | None = None,
        max_kv_bytes: int | None = None,
        page_size: int = PAGE_SIZE,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache: Any = None,
        max_waiting: int | None = None,
        max_running_per_owner: int | None = None,
        threads: int | None = None,
        on_observe: Callable[[str, float], None] | None = None,
    ) -> None:
        # The decoder's output layers (core.fast.serving) serve every pass; a plain model gets a plain decoder.
        self.decoder = model if isinstance(model, ServingDecoder) else ServingDecoder(model)
        model = self.decoder.model
        context = model.cfg.context_length
        max_len = context if max_len is None else max_len
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= max_len <= context:
            raise ValueError(f"max_len must be 1 to the model's context window {context}, got {max_len}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        per_page = page_size * _Pages.bytes_per_position(model)
        if max_kv_bytes is None:
            max_kv_bytes = max(DEFAULT_KV_BYTES, -(-max_len // page_size) * per_page)
        elif max_kv_bytes < per_page:
            raise ValueError(f"max_kv_bytes {max_kv_bytes} holds not one page of {page_size} positions "
                             f"({per_page} bytes): raise it or lower page_size")
        pages = max_kv_bytes // per_page
        max_len = min(max_len, pages * page_size)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {max_waiting}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if model.training:
            raise ValueError("the engine decodes with dropout off: put the model in eval mode first")
        self.model, self.tokenizer = model, tokenizer
        _large_blocks_mapped()
        self.max_batch, self.max_len, self.prefill_chunk = max_batch, max_len, prefill_chunk
        self.prefix_cache, self.max_waiting, self.threads = prefix_cache, max_waiting, threads
        if max_running_per_owner is not None and max_running_per_owner < 1:
            raise ValueError(f"max_running_per_owner must be >= 1 or None, got {max_running_per_owner}")
        self.max_running_per_owner = max_running_per_owner
        self.stats = EngineStats()
        self._observe = on_observe or (lambda name, value: None)
        self._pages = _Pages(model, pages, page_size)
        self._device = self._pages.device
        self._active: list[_Sequence] = []  # oldest admitted first; touched only by the stepping thread
        self._waiting: deque[_Sequence] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def kv_bytes(self) -> int:
        """Bytes of the page pool (allocated once: the budget, rounded down to whole pages)."""
        return self._pages.keys.nbytes + self._pages.values.nbytes

    @property
    def pages_used(self) -> int:
        """Pages lent to running sequences now."""
        return self._pages.count - self._pages.free

    @property
    def kv_bytes_in_use(self) -> int:
        """Bytes of the pages lent to running sequences now."""
        return self.pages_used * self._pages.page_bytes

    @property
    def kv_bytes_touched(self) -> int:
        """Bytes of the pool's pages ever lent: the part of the budget the process holds in memory
        (untouched pages cost none), growing to the budget under load and never shrinking."""
        return self._pages.touched * self._pages.page_bytes

    # -- the public face -------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], config: GenerationConfig, owner: str | None = None) -> Handle:
        """Queue one sequence for ``owner`` (who sent it, for ``max_running_per_owner``; None: nobody
        in particular); its :class:`Handle` streams the answer. Raises ValueError (a
        ``ContextLengthError`` for a prompt longer than ``max_len``) for a prompt it cannot
        decode, :class:`EngineFull` when the queue is full, :class:`EngineStopped` after :meth:`stop`."""
        prompt = [int(t) for t in prompt_ids]
        check_prompt(prompt, self.max_len)
        vocab = self.model.cfg.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt holds token ids outside the model's vocabulary of {vocab}")
        handle = Handle(self, len(prompt))
        # The first new token needs no position of its own (only the ones fed back do).
        limit = min(config.max_new_tokens, self.max_len - len(prompt) + 1)
        penalties = Penalties(config, [prompt], self.model.cfg.vocab_size, self._device) if config.penalized else None
        seq = _Sequence(handle, prompt, config, limit, TextStream(self.tokenizer, config),
                        make_generator(config, self._device), penalties, owner, context=prompt)
        handle._seq = seq
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine has stopped")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                self.stats.rejected += 1
                raise EngineFull(f"{len(self._waiting)} sequences are waiting already; try again shortly")
            self.stats.submitted += 1
            if limit == 0:
                handle._push(seq.text.finish())
                handle._end("length")
                self.stats.finished += 1
                return handle
            self._waiting.append(seq)
            self.stats.waiting = len(self._waiting)
            handle._position = len(self._waiting) - 1
            handle._push(Queued(handle._position))
            self._wake.notify()
        return handle

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the stepping thread between two steps (other work on the same model,
        never at the same time as a step). Await it from asyncio with ``asyncio.wrap_future``."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine has stopped")
            self._calls.append((lambda: fn(*args), future))
            self._wake.notify()
        return future

    def start(self) -> "Engine":
        """Run the scheduler on a thread of its own until :meth:`stop`."""
        with self._lock:
            if self._thread is not None or self._stopping:
                raise RuntimeError("the engine's thread was started already")
            self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the scheduler; sequences still waiting or running end with :class:`EngineStopped`."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:
            self._abandon()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @torch.inference_mode()
    def step(self) -> int:
        """One scheduling step in the calling thread (when no thread was started): admit, prefill
        up to ``prefill_chunk`` prompt tokens, decode one token for every running sequence, retire.
        Returns how many sequences are still running or waiting."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's own thread is stepping it: do not call step() as well")
        self._run_calls()
        try:
            self._retire_cancelled()
            self._admit()
            self._prefill()
            self._decode()
        except Exception as err:  # one failed step ends the sequences in it, not the engine
            logger.exception("decoding step failed; its sequences end with the error")
            self._fail_active(err)
        with self._lock:
            self.stats.running = len(self._active)
            return len(self._active) + len(self._waiting)

    # -- the scheduler ---------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._active or self._calls):
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        self._abandon()

    def _abandon(self) -> None:
        """What a stopped engine leaves: every sequence ends with EngineStopped, every call too."""
        with self._lock:
            left = list(self._active) + list(self._waiting)
            calls = list(self._calls)
            self._active.clear()
            self._waiting.clear()
            self._calls.clear()
        for seq in left:
            self._pages.release(seq.pages)
            self._drop_solo(seq)
            seq.handle._end(None, EngineStopped("the engine stopped before this answer finished"))
        for _, future in calls:
            future.set_exception(EngineStopped("the engine stopped before this call ran"))

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as err:  # the caller gets it; the engine carries on
                    future.set_exception(err)

    def _cancel(self, handle: Handle) -> None:
        seq = handle._seq
        with self._lock:
            if handle._ended:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._requeue()
                self.stats.cancelled += 1
                handle._end("cancelled")
            self._wake.notify()

    def _requeue(self) -> None:
        """Tell each waiting sequence whose place changed (under the lock). A preempted sequence
        streamed tokens already: its reader sees a pause, not a place in the queue."""
        self.stats.waiting = len(self._waiting)
        for ahead, seq in enumerate(self._waiting):
            if seq.handle._position != ahead:
                seq.handle._position = ahead
                if not seq.generated:
                    seq.handle._push(Queued(ahead))

    def _admit(self) -> None:
        """Admit waiting sequences, first come first served, while places and pages for their whole
        prompt are free; the first that does not fit waits, and so does everyone behind it."""
        with self._lock:
            admitted, dropped, held = [], [], []
            running: dict[str | None, int] = {}
            for seq in self._active:
                running[seq.owner] = running.get(seq.owner, 0) + 1
            cap = self.max_running_per_owner
            while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                seq = self._waiting[0]
                if seq.cancelled:
                    dropped.append(self._waiting.popleft())
                elif cap is not None and seq.owner is not None and running.get(seq.owner, 0) >= cap:
                    held.append(self._waiting.popleft())  # its owner has enough running: the next owner's goes first
                elif self._pages.grow(seq.pages, len(seq.context)):
                    admitted.append(self._waiting.popleft())
                    running[seq.owner] = running.get(seq.owner, 0) + 1
                else:
                    break  # no pages for it: it waits for a sequence to finish
            self._waiting.extendleft(reversed(held))
            if admitted or dropped:
                self._requeue()
            self.stats.cancelled += len(dropped)
        for seq in dropped:  # cancelled by a reader whose event loop had closed
            seq.handle._end("cancelled")
        now = time.perf_counter()
        for seq in admitted:
            self._active.append(seq)
            seq.handle._position = None
            if seq.handle.admitted_at is None:
                seq.handle.admitted_at = now
                self._observe("queue_seconds", now - seq.handle.submitted_at)
        if len(self._active) > 1:
            for seq in self._active:
                self._unsolo(seq)

    def _solo(self) -> _Sequence | None:
        """The sequence running alone, if one does: it decodes in a cache of its own (see the module docstring)."""
        return self._active[0] if len(self._active) == 1 else None

    def _solo_cache(self, seq: _Sequence, length: int) -> KVCache:
        """The lone sequence's own cache, holding its ``cached`` positions, with room for ``length``."""
        cache = seq.solo
        if cache is None or cache.max_len < length:
            capacity = self._solo_capacity(length, cache.max_len if cache is not None else 1)
            if cache is None:
                seq.solo = self._pages.export(seq.pages, seq.cached, capacity)
            else:
                seq.solo = cache.resized(capacity, seq.cached)
        seq.solo.length = seq.cached
        return seq.solo

    def _solo_capacity(self, length: int, now: int = 1) -> int:
        capacity = max(MIN_SOLO_LENGTH, now)
        while capacity < length:
            capacity *= 2
        return min(capacity, self.max_len)

    def _unsolo(self, seq: _Sequence) -> None:
        """Back into its pages, now that others run beside it."""
        if seq.solo is not None:
            self._pages.load(seq.pages, seq.solo, seq.cached)
            self._drop_solo(seq)

    def _drop_solo(self, seq: _Sequence) -> None:
        """Forget the lone sequence's own cache, and give back the CUDA graphs it decoded on."""
        seq.solo = seq.static = None
        if seq.graphs is not None:
            seq.graphs.close()
            seq.graphs = None

    def _kv(self, seq: _Sequence) -> KVCache:
        """A copy of the sequence's keys and values (for the prefix cache)."""
        if seq.solo is not None:
            seq.solo.length = seq.cached
            return seq.solo.resized(seq.cached)
        return self._pages.export(seq.pages, seq.cached)

    def _take_kept(self, seq: _Sequence) -> None:
        """Copy the longest kept prefix of the prompt into the sequence's pages. Looked up when its
        prefill starts, not at admission: sequences admitted together then find the prompts that
        went before them in this very step (the chat template's preamble, a shared system prompt)."""
        seq.started = True
        if self.prefix_cache is None:
            return
        if seq is self._solo():
            # Running alone: the kept rows become its own cache (a conversation's next turn takes the
            # entry over), one copy fewer than through its pages.
            kept = self.prefix_cache.take(self.model, seq.context, self._solo_capacity(len(seq.context) + 1))
            seq.solo = kept
        else:
            kept = self.prefix_cache.take(self.model, seq.context, 1)
            if kept.length:
                self._pages.load(seq.pages, kept, kept.length)
        seq.cached = kept.length
        if not seq.generated:
            seq.handle.cached_prompt_tokens = kept.length
        self.stats.cached_tokens += kept.length

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens in all, oldest sequence first, batched; a prompt whose
        last token is run samples its first new token from there.

        Two passes when new prompts start cold: the prompts under way and the oldest new one first,
        then the other new ones, which look up the prefix cache only then: prompts arriving together
        mostly share their start (the chat template's preamble, a system prompt), and that start
        is then run once and copied, not run once each. New prompts that find their start kept
        already all go in the first pass: waiting for one of them would only delay the others'
        first tokens by a pass."""
        budget = self.prefill_chunk
        if len(self._active) == 1 and not self._waiting:
            # Nobody to keep waiting: a lone prompt runs whole, as core.generation runs it.
            budget = len(self._active[0].context)
        first: list[tuple[_Sequence, int]] = []
        later: list[_Sequence] = []
        starting = False  # whether a new prompt that found nothing kept is in the first pass
        for seq in self._active:
            if budget == 0:
                break
            if seq.next_token is not None:
                continue  # decoding already
            if seq.started or not starting:
                if not seq.started:
                    self._take_kept(seq)
                    starting = seq.cached == 0  # cold: the new prompts after it wait for its start
                n = min(budget, len(seq.context) - seq.cached)
                first.append((seq, n))
                budget -= n
            else:
                later.append(seq)
        self._prefill_pass(first)
        second = []
        for seq in later:
            if budget == 0:
                break
            self._take_kept(seq)
            n = min(budget, len(seq.context) - seq.cached)
            second.append((seq, n))
            budget -= n
        self._prefill_pass(second)

    def _prefill_pass(self, work: list[tuple[_Sequence, int]]) -> None:
        """Run ``n`` more prompt tokens of each sequence: alone, the model's ordinary forward (the very
        pass ``core.generation`` runs for a lone prompt), else groups of similar lengths, one pass each."""
        lone = self._solo()
        for group in _similar_lengths(work, rows=PREFILL_ROWS):
            finishing = [i for i, (seq, n) in enumerate(group) if seq.cached + n == len(seq.context)]
            greedy = all(_argmax_only(group[i][0]) for i in finishing)
            logits = None
            if len(group) == 1 and group[0][0] is lone:
                seq, n = group[0]
                ids = torch.tensor([seq.context[seq.cached : seq.cached + n]], device=self._device)
                cache = self._solo_cache(seq, seq.cached + n)
                if finishing:
                    logits = self.decoder(ids, cache=cache, last_only=True, argmax_only=greedy)[:, -1]
                else:  # no logits needed: the blocks alone fill the cache
                    ctx = self.model.context(ids, cache=cache)
                    self.model.run_blocks(self.model.embed(ids, ctx), ctx)
            else:
                logits = self._pass([seq for seq, _ in group],
                                    [seq.context[seq.cached : seq.cached + n] for seq, n in group], finishing, greedy)
            for seq, n in group:
                seq.cached += n
                self.stats.prefilled_tokens += n
            done = [group[i][0] for i in finishing]
            if self.prefix_cache is not None:
                for seq in done:  # for the prompts after it that share its start
                    self.prefix_cache.put(seq.context, self._kv(seq))
            # Each group's first tokens go out as soon as it is run, not after the step's last group.
            for seq, token in zip(done, self._sample(done, logits) if done else []):
                self._emit(seq, token)

    def _make_room(self, seqs: list[_Sequence]) -> None:
        """A page for each decoding sequence's next position where it needs one; when none is free,
        the youngest running sequence gives its pages back and waits at the head of the queue
        (preemption by recomputation: vLLM's, Kwon et al., 2023), its keys and values kept in the
        prefix cache, so that it copies them back when pages free up instead of running them again."""
        for seq in seqs:
            if seq not in self._active:
                continue  # preempted for an older one's page
            while not self._pages.grow(seq.pages, seq.cached + 1):
                victim = self._active[-1]
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: _Sequence) -> None:
        if self.prefix_cache is not None and seq.cached:
            self.prefix_cache.put(seq.prompt + seq.generated, self._kv(seq))
        self._pages.release(seq.pages)
        self._active.remove(seq)
        self._drop_solo(seq)
        seq.cached, seq.next_token, seq.started = 0, None, False
        seq.context = seq.prompt + seq.generated  # its prefill samples the token after the last one streamed
        with self._lock:
            self._waiting.appendleft(seq)
            self.stats.preempted += 1
            self.stats.running = len(self._active)
            self._requeue()

    def _decode(self) -> None:
        """One token for every sequence past its prompt, in one pass."""
        self._make_room([s for s in self._active if s.next_token is not None])
        seqs = [s for s in self._active if s.next_token is not None]
        if not seqs:
            return
        self.stats.steps += 1
        self._observe("batch_size", len(seqs))
        greedy = all(_argmax_only(s) for s in seqs)
        if seqs[0] is self._solo():
            self._decode_alone(seqs[0], greedy)
            return
        logits = self._pass(seqs, [[s.next_token] for s in seqs], list(range(len(seqs))), greedy)
        for seq in seqs:
            seq.cached += 1
        for seq, token in zip(seqs, self._sample(seqs, logits)):
            self._emit(seq, token)

    def _decode_alone(self, seq: _Sequence, greedy: bool) -> None:
        """The lone sequence's step, in its own cache, by the decoder's strategy for one sequence
        (``core.fast.serving``): a verifying pass over its draft's guesses where it speculates, a
        replay of its CUDA graphs where it has them, else the model's ordinary step, the one
        ``core.generation`` runs (fused layers included)."""
        speculation = self._speculation(seq)
        if speculation is not None:
            room = min(seq.limit - len(seq.generated), speculation.draft.max_draft + 1)
            if not self._pages.grow(seq.pages, seq.cached + room):
                room = 1  # its pages must hold what it keeps, for when others join (_make_room gave one)
            new = speculation.step(seq.next_token, self._solo_cache(seq, seq.cached + room), room)
        else:
            static = self._graphed(seq)
            token = torch.tensor([[seq.next_token]], device=self._device)
            cache = self._solo_cache(seq, seq.cached + 1)
            if static is not None:
                logits = static.step(token)[:, -1]
            else:
                logits = self.decoder(token, cache=cache, last_only=True, argmax_only=greedy)[:, -1]
            new = self._sample([seq], logits)
        for token in new:
            seq.cached += 1
            self._emit(seq, token)
            if seq.handle.done:
                break  # it ended there (a stop, its length): the tokens after are not its own

    def _speculation(self, seq: _Sequence) -> Speculation | None:
        """The lone sequence's speculative decoding, where the decoder's draft takes it and no one
        who could run beside it waits (a pass of eight tokens is a longer step to wait through).
        Greedy tokens are the model's own either way; a sampled sequence speculates only unseeded,
        since a seed's tokens drawn by the rejection rule differ from those drawn token by token,
        and a seed must give the same answer whether its sequence ran alone or beside others."""
        cfg = seq.config
        if (not self.decoder.speculates(cfg) or not (cfg.greedy or cfg.seed is None)
                or self._waiting and len(self._active) < self.max_batch):
            return None
        if seq.speculation is None:
            seq.speculation = Speculation(self.decoder, self.decoder.draft, cfg, seq.generator)
        return seq.speculation

    def _graphed(self, seq: _Sequence):
        """The decoder's static step (``core.fast.cuda_graphs``) holding the lone sequence's cache, on
        a GPU that has them; its rows are copied in once, and back into its pages when others join.
        None where there are none, or another caller holds them (it then decodes eagerly)."""
        graphs = self.decoder.graphs
        if graphs is None:
            return None
        if seq.graphs is None:
            stack = ExitStack()
            static = stack.enter_context(graphs.session(1, len(seq.prompt) + seq.limit - 1))
            if static is None:
                stack.close()
                return None
            static.begin(None)
            rows = self._solo_cache(seq, seq.cached + 1)
            n = seq.cached
            static.cache.keys[:, :, :, :n] = rows.keys[:, :, :, :n]
            static.cache.values[:, :, :, :n] = rows.values[:, :, :, :n]
            seq.solo, seq.graphs, seq.static = static.cache, stack, static
        return seq.static

    def _pass(self, seqs: list[_Sequence], chunks: list[list[int]], heads: list[int],
              argmax_only: bool) -> torch.Tensor | None:
        """One forward pass over the pages of ``seqs``, row i taking the tokens ``chunks[i]`` at the
        positions from its ``cached`` on (right-padded to the longest); the logits (len(heads),
        vocab) after the last token of the rows whose indices are ``heads`` (None for none)."""
        model, device = self.model, self._device
        T = max(len(c) for c in chunks)
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=device)
        counts = torch.tensor([len(c) for c in chunks], device=device)
        offsets = torch.arange(T, device=device)
        real = offsets[None, :] < counts[:, None]
        # Padding sits at its row's last real position: inside its pages and the position tables,
        # and never written, since only real tokens store keys and values.
        last = counts - 1
        starts = torch.tensor([s.cached for s in seqs], device=device)
        positions = starts[:, None] + torch.minimum(offsets[None, :], last[:, None])
        cache = _PagedStep(self._pages, [s.pages for s in seqs], positions, real)
        visible = torch.arange(cache.span, device=device)[None, None, :] <= positions[:, :, None]  # (B, T, S)
        ctx = ForwardContext(positions, visible[:, None], model.rope_at(positions), cache)
        x = model.embed(ids, ctx)
        for block in model.blocks:
            # The block's own code, even where a fused twin (core.fast.fused_layers) replaced it: the
            # fused kernel writes every row at one position. Its linear layers keep their fast paths.
            x, _ = TransformerBlock.forward(block, x, ctx)
        if not heads:
            return None
        heads_at = torch.tensor(heads, device=device)
        hidden = x[heads_at, last[heads_at]][:, None]  # (len(heads), 1, d)
        return self.decoder.logits(hidden, argmax_only)[:, 0]

    @staticmethod
    def _sample(seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's token under its own settings: greedy rows in one argmax, the others one by one
        with their own generator (so a seed gives the tokens it gives alone)."""
        tokens = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.config.greedy and s.penalties is None]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = t
        for i, seq in enumerate(seqs):
            if seq.penalties is not None:
                row = seq.penalties.apply(logits[i : i + 1])
                tokens[i] = int(sample(row, seq.config, seq.generator))
                seq.penalties.update(torch.tensor([tokens[i]], device=row.device))
            elif not seq.config.greedy:
                tokens[i] = int(sample(logits[i : i + 1], seq.config, seq.generator))
        return tokens

    def _emit(self, seq: _Sequence, token: int) -> None:
        """Hand one new token to its reader; retire the sequence if it ended there."""
        handle, now = seq.handle, time.perf_counter()
        seq.generated.append(token)
        handle.completion_tokens += 1
        self.stats.generated_tokens += 1
        # Observed once counted, before its text reaches the reader.
        if handle.first_token_at is None:
            handle.first_token_at = now
            self._observe("ttft_seconds", now - handle.submitted_at)
        else:
            self._observe("tbt_seconds", now - seq.last_token_at)
        seq.last_token_at = now
        chunk = seq.text.push(token)
        handle._push(chunk)
        if chunk.finish_reason is None and len(seq.generated) < seq.limit:
            seq.next_token = token
            return
        if chunk.finish_reason is None:
            chunk = seq.text.finish()
            handle._push(chunk)
        self._retire(seq, chunk.finish_reason)

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._retire(seq, "cancelled")

    def _retire(self, seq: _Sequence, reason: str) -> None:
        """Give the sequence's pages back and end its handle."""
        if self.prefix_cache is not None and seq.cached:
            # Its positions hold the prompt and all but the last new token.
            self.prefix_cache.put(seq.prompt + seq.generated, self._kv(seq))
        self._pages.release(seq.pages)
        self._drop_solo(seq)
        self._active.remove(seq)
        with self._lock:
            self.stats.running = len(self._active)
            if reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1
        seq.handle._end(reason)

    def _fail_active(self, err: Exception) -> None:
        failed, self._active = self._active, []
        with self._lock:
            self.stats.failed += len(failed)
            self.stats.running = 0
        for seq in failed:
            self._pages.release(seq.pages)
            self._drop_solo(seq)
            error = EngineError(f"decoding failed: {type(err).__name__}: {err}")
            error.__cause__ = err
            seq.handle._end(None, error)
