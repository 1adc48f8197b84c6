"""Many users at once: the continuous-batching engine against one request at a time, in one run.

    python bench/engine.py                                  # SmolLM2 checkpoint, 1..32 clients, 32 new tokens
    python bench/engine.py --clients 1 8 --rounds 1         # a smoke run
    python bench/engine.py --threads 1                      # on a busy shared machine
    python bench/engine.py --memory 240 --threads 1         # 32 growing conversations: where the memory goes
    python bench/engine.py --lone --threads 1               # one request: the engine against a lone stream

What runs: the chat model loaded as the service loads it (``core.weights.checkpoint.load_checkpoint``
in fp32 on the CPU, then ``core.fast.transforms.fast_for_serving``), driven in this process by
``core.serving.Engine`` (no web server: ``bench/serve.py`` measures the service). For each number
of clients, two engines face the same load in turn: one with ``--max-batch`` places (continuous
batching) and one with a single place (one request at a time, what the service's chat worker did).
Each client, an asyncio task, streams ``--rounds`` chat answers back to back; all clients start
together. Every prompt is its own question through the model's chat template (no two alike, so the
prefix cache, on as in the service, can only share the template's preamble), greedy, stopped at
``--new-tokens`` or the template's end token.

Columns: aggregate tokens/s (all clients' tokens over the level's wall time), time to first
token (submit to the first chunk) and time between tokens (between a sequence's chunks), p50 and
p99 over all requests, errors, and tokens per CPU-second of the whole process (steadier than
wall time when neighbours load the machine). "vs one" divides the batched engine's tokens/s by
the one-at-a-time engine's at the same number of clients. Two reference rows come from the same
model in the same run: ``core.generation.generate.stream`` for one request (today's path: a lone
request must not get slower), and ``generate`` on 8 prompts at once (static batch 8, as
``bench/generate.py`` measures it), whose tokens/s the engine at 8 clients is compared with.

``--lone``: only one request at a time, on GPT-2 124M with random weights (``bench/generate.py``'s
model, decoded by ``make_fast``'s decoder, as ``fast_for_serving`` builds it for an fp32 GPT-2):
the serving decoder's single stream (``ServingDecoder.stream``, the lone-request path of
``scratchgpt generate`` and of the service before the engine; speculative where the draft's kernels
build) against the same decoder's engine running that request alone (its own cache, the decoder's
lone strategy). Runs alternate, each figure the best of ``--repeats``; greedy, 32-token random prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import torch

from harness import (  # also puts the repository on sys.path
    describe_device, load_average, percentile, print_table, story_question,
)

from core.fast.prefix_cache import PrefixCache  # noqa: E402
from core.fast.transforms import fast_for_serving  # noqa: E402
from core.generation.generate import GenerationConfig, generate, stream  # noqa: E402
from core.serving import Engine  # noqa: E402
from core.serving.engine import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK  # noqa: E402
from core.weights.checkpoint import load_checkpoint  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "scratchgpt" / "models" / "smollm2-135m-instruct"
MEBIBYTE = 2**20


def chat_prompts(checkpoint, n: int) -> list[list[int]]:
    """``n`` different questions through the checkpoint's chat template, encoded as the service encodes them."""
    tokenizer = checkpoint.tokenizer
    specials = frozenset(getattr(tokenizer, "special_tokens", {}) or {})
    prompts = []
    for i in range(n):
        text = checkpoint.chat_template.render([{"role": "user", "content": story_question(i)}])
        prompts.append(tokenizer.encode(text, allowed_special=specials))
    return prompts


def answer_config(checkpoint, new_tokens: int) -> GenerationConfig:
    """Greedy, with the stops the service derives from the template and the tokenizer."""
    specials = getattr(checkpoint.tokenizer, "special_tokens", {}) or {}
    stops = set(checkpoint.stop_token_ids) | {specials[s] for s in checkpoint.chat_template.stop if s in specials}
    strings = tuple(s for s in checkpoint.chat_template.stop if s not in specials)
    return GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=tuple(sorted(stops)), stop_strings=strings)


class Level:
    """What one engine did for one number of clients."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tbt: list[float] = []
        self.tokens = 0
        self.errors = 0
        self.answers: dict[int, list[int]] = {}
        self.seconds = self.cpu_seconds = 0.0

    def row(self, label: str, clients: int | str, baseline: float | None = None) -> list:
        tps = self.tokens / self.seconds
        return [label, clients, f"{tps:.1f}", f"{percentile(self.ttft, 0.5):.2f}", f"{percentile(self.ttft, 0.99):.2f}",
                f"{1000 * percentile(self.tbt, 0.5):.0f}", f"{1000 * percentile(self.tbt, 0.99):.0f}", self.errors,
                f"{self.tokens / self.cpu_seconds:.1f}", f"{tps / baseline:.2f}x" if baseline else ""]


async def client(engine: Engine, prompts: list[tuple[int, list[int]]], cfg: GenerationConfig, level: Level) -> None:
    for key, prompt in prompts:
        start = last = time.perf_counter()
        got: list[int] = []
        try:
            async for chunk in engine.submit(prompt, cfg):
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                (level.tbt if got else level.ttft).append(now - last if got else now - start)
                last = now
                got.extend(chunk.token_ids)
        except Exception as err:  # counted and shown, the other clients carry on
            level.errors += 1
            print(f"  error: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        level.tokens += len(got)
        level.answers[key] = got


def drive(engine: Engine, prompts: list[list[int]], clients: int, rounds: int, cfg: GenerationConfig) -> Level:
    """``clients`` asyncio tasks, each streaming ``rounds`` answers back to back, all started together."""
    level = Level()
    work = [[(c * rounds + r, prompts[c * rounds + r]) for r in range(rounds)] for c in range(clients)]

    async def main() -> None:
        await asyncio.gather(*(client(engine, w, cfg, level) for w in work))

    cpu, start = time.process_time(), time.perf_counter()
    asyncio.run(main())
    level.seconds, level.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return level


def read_chunks(chunks, level: Level, key: int) -> None:
    """Time one answer's chunks into ``level`` as a client sees them."""
    start = last = time.perf_counter()
    got: list[int] = []
    for chunk in chunks:
        if chunk.token_ids:
            now = time.perf_counter()
            (level.tbt if got else level.ttft).append(now - last if got else now - start)
            last = now
            got.extend(chunk.token_ids)
    level.tokens += len(got)
    level.answers[key] = got


def lone_request(args) -> None:
    """``--lone``: see the module docstring."""
    from harness import gpt2_pair

    from core.fast.transforms import make_fast
    from core.tokenizer import gpt2_tokenizer

    model, _ = gpt2_pair()
    decoder = make_fast(model.eval())  # fast_for_serving's decoder for an fp32 GPT-2 without GGUF blocks
    tokenizer = gpt2_tokenizer()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1000, model.cfg.vocab_size, (args.rounds, 32), generator=g).tolist()
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    print(f"{describe_device(torch.device('cpu'))}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"GPT-2 124M fp32 (random weights), fast path: {decoder.report}; {args.rounds} requests of 32 prompt "
          f"tokens in turn, {args.new_tokens} new tokens, best of {args.repeats}; load average {load_average()}",
          flush=True)
    engine = Engine(decoder, tokenizer, threads=args.threads).start()
    paths = {"ServingDecoder.stream, one request": lambda prompt: decoder.stream(tokenizer, prompt, cfg),
             "engine, lone sequence": lambda prompt: engine.submit(prompt, cfg)}
    best: dict[str, Level] = {}
    try:
        for path in paths.values():
            read_chunks(path(prompts[0]), Level(), 0)  # warm-up: first allocations and kernels
        for _ in range(args.repeats):
            for name, path in paths.items():  # alternating, so load from neighbours falls on both alike
                level = Level()
                cpu, start = time.process_time(), time.perf_counter()
                for key, prompt in enumerate(prompts):
                    read_chunks(path(prompt), level, key)
                level.seconds, level.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
                if name not in best or level.tokens / level.seconds > best[name].tokens / best[name].seconds:
                    best[name] = level
                print(f"  {name}: {level.tokens / level.seconds:.1f} tok/s, load {load_average()}",
                      file=sys.stderr, flush=True)
    finally:
        engine.stop()
    stream_tps = best["ServingDecoder.stream, one request"].tokens / best["ServingDecoder.stream, one request"].seconds
    print_table([["path", "clients", "tok/s", "TTFT p50 s", "TTFT p99 s", "TBT p50 ms", "TBT p99 ms", "errors",
                  "tok per CPU-s", "vs stream"],
                 *(level.row(name, 1, stream_tps) for name, level in best.items())])
    same = best["engine, lone sequence"].answers == best["ServingDecoder.stream, one request"].answers
    print(f"- the engine's tokens {'equal' if same else 'DIFFER from'} the stream's")
    if decoder.draft is not None:
        c = decoder.draft.counts
        print(f"- draft, both paths together: {c['accepted']} of {c['drafted']} drafted tokens accepted "
              f"in {c['passes']} verifying passes")
    print(f"- load average at the end {load_average()}; pid {os.getpid()}")


def lone_stream(model, tokenizer, prompts: list[list[int]], rounds: int, cfg: GenerationConfig) -> Level:
    """Today's path for one request: ``stream`` in this thread, ``rounds`` answers in turn."""
    level = Level()
    cpu, begin = time.process_time(), time.perf_counter()
    for key in range(rounds):
        read_chunks(stream(model, tokenizer, prompts[key], cfg), level, key)
    level.seconds, level.cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
    return level


def static_batch(model, prompts: list[list[int]], new_tokens: int) -> Level:
    """``generate`` on the prompts at once (left-padded), no stops: every row decodes ``new_tokens``."""
    level = Level()
    cpu, start = time.process_time(), time.perf_counter()
    out = generate(model, prompts, GenerationConfig(max_new_tokens=new_tokens))
    level.seconds, level.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    level.tokens = sum(len(o) for o in out)
    return level


def memory_probe(engine: Engine, checkpoint, seconds: float, conversations: int, new_tokens: int) -> None:
    """``conversations`` threads, each a chat that grows turn by turn for ``seconds``; every 10 s the
    process's RSS beside what the engine holds by design: the prefix cache (bounded by its budget)
    and the KV pages ever lent (bounded by ``max_kv_bytes``). "rest" is RSS less both: flat if
    nothing else grows."""
    tokenizer, store, pages = checkpoint.tokenizer, engine.prefix_cache, engine._pages
    specials = frozenset(getattr(tokenizer, "special_tokens", {}) or {})
    page_mb = (pages.keys[:, 0].nbytes + pages.values[:, 0].nbytes) / MEBIBYTE
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    stop = time.monotonic() + seconds

    def chat(index: int) -> None:
        messages: list[dict] = []
        turn = 0
        while time.monotonic() < stop:
            messages.append({"role": "user", "content": story_question(index * 1000 + turn)})
            ids = tokenizer.encode(checkpoint.chat_template.render(messages), allowed_special=specials)
            if len(ids) > engine.max_len // 2:
                messages = messages[-1:]  # a new conversation, as a user starts one
                continue
            messages.append({"role": "assistant", "content": engine.submit(ids, cfg).text()})
            turn += 1

    threads = [threading.Thread(target=chat, args=(i,), daemon=True) for i in range(conversations)]
    start = time.monotonic()
    print(f"RSS at start {rss_mb():.0f} MB; {conversations} conversations, {new_tokens} new tokens an answer")
    for thread in threads:
        thread.start()
    while time.monotonic() < stop:
        time.sleep(min(10.0, max(0.0, stop - time.monotonic())))
        rss, kept = rss_mb(), (store.nbytes if store is not None else 0) / MEBIBYTE
        lent = pages._zeroed * page_mb
        print(f"{time.monotonic() - start:4.0f} s: RSS {rss:.0f} MB = prefix cache {kept:.0f} + pages lent {lent:.0f} "
              f"(in use {engine.pages_used * page_mb:.0f}) + rest {rss - kept - lent:.0f}; answers "
              f"{engine.stats.finished}, preempted {engine.stats.preempted}", flush=True)
    for thread in threads:
        thread.join()


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a causal-LM checkpoint directory")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rounds", type=int, default=2, help="answers each client streams, back to back")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="the batched engine's places")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, as the service)")
    p.add_argument("--prefix-cache-mb", type=int, default=256, help="as the service's default; 0: none")
    p.add_argument("--memory", type=float, default=None, metavar="SECONDS",
                   help="only the memory probe: 32 conversations growing for SECONDS (see memory_probe)")
    p.add_argument("--lone", action="store_true", help="only one request at a time on GPT-2 (see the docstring)")
    p.add_argument("--repeats", type=int, default=3, help="--lone: each figure is the best of this many runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.lone:
        lone_request(args)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model}: no checkpoint; run `scratchgpt download smollm2-135m-instruct`")
    checkpoint = load_checkpoint(args.model, device="cpu", dtype=torch.float32)
    decoder = fast_for_serving(checkpoint)  # as the service builds it for its engine
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    cfg = answer_config(checkpoint, args.new_tokens)
    prompts = chat_prompts(checkpoint, max(args.clients) * args.rounds)
    lengths = [len(q) for q in prompts]
    print(f"{describe_device(torch.device('cpu'))}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{checkpoint.name} fp32, fast path: {decoder.report}; prompts {min(lengths)}-{max(lengths)} tokens, "
          f"{args.new_tokens} new tokens, {args.rounds} answers per client; batched engine: {args.max_batch} places, "
          f"prefill chunk {args.prefill_chunk}; load average {load_average()}", flush=True)

    def engine(max_batch: int) -> Engine:
        store = PrefixCache(args.prefix_cache_mb * MEBIBYTE) if args.prefix_cache_mb else None
        return Engine(decoder, tokenizer, max_batch=max_batch, prefill_chunk=args.prefill_chunk, prefix_cache=store,
                      threads=args.threads)

    if args.memory is not None:
        with engine(args.max_batch) as running:
            memory_probe(running, checkpoint, args.memory, 32, args.new_tokens)
        return
    started = time.perf_counter()
    drive(engine(args.max_batch).start(), prompts, 1, 1, cfg)  # warm-up: first allocations and kernels
    rows: list[list] = []
    notes: list[str] = []
    # Today's path keeps caches on the model, as the service sets it up.
    model.prefix_cache = PrefixCache(args.prefix_cache_mb * MEBIBYTE) if args.prefix_cache_mb else None
    lone = lone_stream(model, tokenizer, prompts, args.rounds, cfg)
    model.prefix_cache = None
    rows.append(lone.row("stream(), today", 1))
    static = static_batch(model, prompts[:8], args.new_tokens)
    rows.append(static.row("static batch 8", "8"))
    static_tps = static.tokens / static.seconds
    for clients in args.clients:
        levels = {}
        for name, slots in (("one at a time", 1), ("continuous", args.max_batch)):
            with engine(slots) as running:
                levels[name] = drive(running, prompts, clients, args.rounds, cfg)
            print(f"  {clients} clients, {name}: {levels[name].tokens / levels[name].seconds:.1f} tok/s, "
                  f"load {load_average()}", file=sys.stderr, flush=True)
        one = levels["one at a time"].tokens / levels["one at a time"].seconds
        rows.append(levels["one at a time"].row("one at a time", clients))
        rows.append(levels["continuous"].row("continuous", clients, one))
        same = levels["continuous"].answers == levels["one at a time"].answers
        if not same:
            notes.append(f"{clients} clients: the batched answers differ from the one-at-a-time ones")
        if clients == 8:
            tps = levels["continuous"].tokens / levels["continuous"].seconds
            notes.append(f"8 clients: continuous batching {tps:.1f} tok/s = {100 * tps / static_tps:.0f}% of "
                         f"static batch 8 ({static_tps:.1f} tok/s)")
        if clients == 1:
            tps = levels["continuous"].tokens / levels["continuous"].seconds
            notes.append(f"1 client: the engine {tps:.1f} tok/s against stream() {lone.tokens / lone.seconds:.1f}")
    print_table([["engine", "clients", "tok/s", "TTFT p50 s", "TTFT p99 s", "TBT p50 ms", "TBT p99 ms", "errors",
                  "tok per CPU-s", "vs one"], *rows])
    for note in notes:
        print(f"- {note}")
    print(f"- load average at the end {load_average()}; {time.perf_counter() - started:.0f} s; "
          f"pid {os.getpid()}")


if __name__ == "__main__":
    main()
