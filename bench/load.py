"""Load: 32 concurrent chat streams plus a classification flood for 60 s against a local server.

    python bench/load.py                       # 32 chat clients + 8 classify clients, 60 s, GPT-2 124M random
    python bench/load.py --duration 20 --tiny  # a quick run on tiny models

The service runs under uvicorn in a subprocess on 127.0.0.1 (as in bench/serve.py). Each chat
client opens a conversation and sends messages back to back, reading each answer to its
``done`` event; one answer in eight it drops the connection after the first words and comes
back to follow the answer, which went on without it (``GET .../answer``, as the page does), and
one in eight it presses stop, so cancellation is part of the load. Classification clients post SMS
messages back to back. At the deadline no new request starts; answers still streaming get a
grace period, then their connections are dropped too.

Pass criteria, checked at the end: no request failed (non-2xx, transport error, ``error``
event); every answer ended ``done`` or was cancelled by the client; afterwards, through the
API, no answer is left ``streaming``, every cancelled one is ``interrupted``, every finished one
``complete``, and every message sent is stored. The server's resident memory is printed at the
start (after a warm-up), during, and at the end. Bounded in time (duration + grace + timeouts)
and in count (``--max-requests``). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve import (  # noqa: E402
    ServerProcess,
    build_checkpoints,
    metric,
    ms,
    parse_events,
    sms_texts,
)
from harness import cpu_model, load_average, percentile, print_table  # noqa: E402


@dataclass
class Tally:
    started: int = 0
    outcomes: Counter = field(default_factory=Counter)  # done / came back / stopped / cut at deadline
    errors: list[str] = field(default_factory=list)
    first_delta: list[float] = field(default_factory=list)
    tokens: int = 0
    classify_latency: list[float] = field(default_factory=list)
    # conversation id -> [(user text, how the answer ended)]
    sent: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def build_tiny(folder: Path) -> tuple[Path, Path]:
    import torch

    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint
    from core.classifier import SequenceClassifier
    from core.model.config import ModelConfig
    from core.model import GPTModel
    from core.tokenizer.gpt2 import gpt2_tokenizer

    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    tiny = dict(vocab_size=50257, emb_dim=64, n_layers=2, n_heads=2)
    chat = save_checkpoint(folder / "tiny-chat", GPTModel(ModelConfig(context_length=1024, **tiny)), tok,
                           chat_template=ALPACA, metadata={"name": "tiny-chat"})
    spam = save_checkpoint(folder / "tiny-spam", SequenceClassifier(GPTModel(ModelConfig(context_length=256, **tiny)), 2),
                           tok, task="classification", labels=["ham", "spam"], metadata={"name": "tiny-spam"})
    return chat, spam


async def chat_client(index: int, url: str, tally: Tally, stop_at: float, cut_at: float, budget: list[int],
                      max_new_tokens: int, timeout: float) -> None:
    import httpx

    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        try:
            created = await client.post("/api/v1/conversations", json={"temperature": 0.8, "max_new_tokens": max_new_tokens,
                                                                       "title": f"load {index}"})
            created.raise_for_status()
        except httpx.HTTPError as exc:
            tally.errors.append(f"chat {index}: create: {type(exc).__name__}: {exc}")
            return
        cid = created.json()["id"]
        tally.sent[cid] = []
        turn = 0
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            turn += 1
            text = f"client {index} message {turn}: tell me something"
            plan = rng.choices(["read", "disconnect", "stop"], weights=[6, 1, 1])[0]
            tally.started += 1
            outcome = await one_answer(client, cid, text, plan, tally, cut_at)
            tally.outcomes[outcome] += 1
            tally.sent[cid].append((text, outcome))
            if outcome == "error":
                return


async def one_answer(client, cid: str, text: str, plan: str, tally: Tally, cut_at: float) -> str:
    """Send one message and follow its answer; returns how it ended."""
    import httpx

    t0 = time.perf_counter()
    got_delta = False
    buffer = ""
    try:
        async with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": text}) as r:
            if r.status_code != 200:
                tally.errors.append(f"send: {r.status_code} {(await r.aread())[:200]!r}")
                return "error"
            stream = r.aiter_text()
            while True:
                remaining = cut_at - time.monotonic()
                if remaining <= 0:
                    return "cut at deadline"  # leaving the block drops the connection
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), remaining)
                except asyncio.TimeoutError:
                    return "cut at deadline"
                except StopAsyncIteration:
                    tally.errors.append("stream ended without done")
                    return "error"
                events, buffer = parse_events(buffer + chunk)
                for event, data in events:
                    if event == "delta" and not got_delta:
                        got_delta = True
                        tally.first_delta.append(time.perf_counter() - t0)
                        if plan == "disconnect":
                            break
                        if plan == "stop":
                            stopped = await client.post(f"/api/v1/conversations/{cid}/stop")
                            if stopped.status_code != 200:
                                tally.errors.append(f"stop: {stopped.status_code}")
                    elif event == "done":
                        tally.tokens += data["completion_tokens"]
                        reason = data["finish_reason"]
                        if plan == "stop" and reason == "cancelled":
                            return "stopped"
                        return "done"
                    elif event == "error":
                        tally.errors.append(f"error event: {data['detail']}")
                        return "error"
                if plan == "disconnect" and got_delta:
                    break  # leaving the block drops the connection; the answer goes on server-side
        return await come_back(client, cid, tally, cut_at)
    except httpx.HTTPError as exc:
        tally.errors.append(f"chat: {type(exc).__name__}: {exc}")
        return "error"


async def come_back(client, cid: str, tally: Tally, cut_at: float) -> str:
    """Follow again the answer this client left (204: it has ended already); returns how it ended."""
    async with client.stream("GET", f"/api/v1/conversations/{cid}/answer") as r:
        if r.status_code == 204:
            return "came back"
        if r.status_code != 200:
            tally.errors.append(f"follow: {r.status_code} {(await r.aread())[:200]!r}")
            return "error"
        buffer = ""
        stream = r.aiter_text()
        while True:
            remaining = cut_at - time.monotonic()
            if remaining <= 0:
                return "cut at deadline"
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), remaining)
            except (asyncio.TimeoutError, StopAsyncIteration):
                return "cut at deadline"
            events, buffer = parse_events(buffer + chunk)
            for event, data in events:
                if event == "done":
                    tally.tokens += data["completion_tokens"]
                    return "came back"
                if event == "error":
                    tally.errors.append(f"error event: {data['detail']}")
                    return "error"


async def classify_client(index: int, url: str, tally: Tally, stop_at: float, budget: list[int], texts: list[str],
                          timeout: float) -> None:
    import httpx

    rng = random.Random(1000 + index)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/api/v1/classify", json={"text": rng.choice(texts)})
                if r.status_code != 200:
                    tally.errors.append(f"classify: {r.status_code} {r.text[:200]}")
                    continue
                tally.classify_latency.append(time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                tally.errors.append(f"classify: {type(exc).__name__}: {exc}")


def half_growth(memory: list[tuple[float, float]]) -> str:
    """RSS gained over the first half of the samples' time and over the second: what a server holds
    by design (KV pages, the prefix cache, oneDNN's compiled products) fills in the first, so a server
    that does not leak is flat in the second."""
    if len(memory) < 3:
        return "too few samples"
    middle = min(memory, key=lambda sample: abs(sample[0] - memory[-1][0] / 2))[1]
    return f"{middle - memory[0][1]:+.0f} MB / {memory[-1][1] - middle:+.0f} MB"


def engine_caches_mb(url: str) -> float:
    """What the chat engines hold by design, from /metrics: the KV pages ever lent plus the prefix caches."""
    touched = metric(url, "scratchgpt_chat_kv_cache_bytes", part="touched")
    return (touched + metric(url, "scratchgpt_chat_prefix_cache_bytes")) / 2**20


def memory_sample(server: ServerProcess, start: float) -> tuple[float, float, float]:
    """(seconds since start, server RSS MB, the engines' caches MB)."""
    return time.monotonic() - start, server.rss_mb(), engine_caches_mb(server.url)


async def sample_memory(server: ServerProcess, samples: list[tuple[float, float, float]], start: float,
                        until: float) -> None:
    while time.monotonic() < until:
        samples.append(memory_sample(server, start))
        await asyncio.sleep(5)


async def run_load(server: ServerProcess, args: argparse.Namespace, texts: list[str]) -> tuple[Tally, list]:
    tally = Tally()
    start = time.monotonic()
    stop_at = start + args.duration
    cut_at = stop_at + args.grace
    budget = [args.max_requests]
    memory: list[tuple[float, float, float]] = []
    tasks = [chat_client(i, server.url, tally, stop_at, cut_at, budget, args.new_tokens, args.timeout)
             for i in range(args.chat_clients)]
    tasks += [classify_client(i, server.url, tally, stop_at, budget, texts, args.timeout)
              for i in range(args.classify_clients)]
    monitor = asyncio.ensure_future(sample_memory(server, memory, start, cut_at + args.timeout))
    await asyncio.wait_for(asyncio.gather(*tasks), args.duration + args.grace + 2 * args.timeout)
    tally.seconds = time.monotonic() - start  # type: ignore[attr-defined]
    monitor.cancel()
    memory.append(memory_sample(server, start))
    return tally, memory


def audit(url: str, tally: Tally, settle_seconds: float = 30) -> list[str]:
    """What the database says about every answer, once the server has settled the cancelled ones."""
    import httpx

    problems: list[str] = []
    expected = {"done": "complete", "came back": "complete", "stopped": "interrupted",
                "cut at deadline": "interrupted"}
    deadline = time.monotonic() + settle_seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while True:
            stored = {cid: client.get(f"/api/v1/conversations/{cid}/messages").json() for cid in tally.sent}
            streaming = sum(m["status"] == "streaming" for ms_ in stored.values() for m in ms_)
            if not streaming or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    for cid, sent in tally.sent.items():
        messages = stored[cid]
        users = [m for m in messages if m["role"] == "user"]
        answers = [m for m in messages if m["role"] == "assistant"]
        if [m["content"] for m in users] != [text for text, _ in sent]:
            problems.append(f"{cid}: user messages stored {len(users)}, sent {len(sent)}")
        if len(answers) != len(sent):
            problems.append(f"{cid}: {len(answers)} answers stored for {len(sent)} messages")
        for answer, (_, outcome) in zip(answers, sent):
            want = expected.get(outcome)
            # A stop or a disconnect can arrive just after the last token: then the answer is complete.
            ok = answer["status"] == want or (outcome in ("stopped", "cut at deadline")
                                              and answer["status"] == "complete")
            if not ok:
                problems.append(f"{cid}: answer {answer['id']} is {answer['status']} after {outcome}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds during which new requests start")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds streams may run past the duration")
    parser.add_argument("--chat-clients", type=int, default=32)
    parser.add_argument("--classify-clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of each answer")
    parser.add_argument("--max-requests", type=int, default=50_000, help="cap on requests started, all clients")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before one request counts as failed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (SCRATCHGPT_TORCH_THREADS)")
    parser.add_argument("--prefix-cache-mb", type=int, default=None,
                        help="SCRATCHGPT_CHAT_PREFIX_CACHE_MB of the server (default: the service's; 0: none)")
    parser.add_argument("--kv-cache-mb", type=int, default=None,
                        help="SCRATCHGPT_CHAT_KV_CACHE_MB of the server: its pool of KV pages (default: the service's)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of GPT-2 124M")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (checkpoints, server log)")
    args = parser.parse_args(argv)

    texts, source = sms_texts()
    workdir = Path(tempfile.mkdtemp(prefix="scratchgpt-bench-load-"))
    try:
        chat, classifier = build_tiny(workdir) if args.tiny else build_checkpoints(workdir, None, None)
        load_before = load_average()
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {load_before}; chat {chat.name}, classifier "
              f"{classifier.name}; texts: {source}")
        settings = {} if args.prefix_cache_mb is None else {"chat_prefix_cache_mb": args.prefix_cache_mb}
        if args.kv_cache_mb is not None:
            settings["chat_kv_cache_mb"] = args.kv_cache_mb
        with ServerProcess(workdir, "load", threads=args.threads, chat_checkpoint=chat, classifier_checkpoint=classifier,
                           stream_flush_seconds=0.5, **settings) as server:
            # Warm-up (not counted): one answer and one classification, so start RSS includes the first passes.
            import httpx

            with httpx.Client(base_url=server.url, timeout=args.timeout) as client:
                cid = client.post("/api/v1/conversations", json={"max_new_tokens": 4}).json()["id"]
                with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "hi"}) as r:
                    r.read()
                client.post("/api/v1/classify", json={"text": texts[0]}).raise_for_status()
            rss_start = server.rss_mb()
            print(f"server RSS at start: {rss_start:.0f} MB; running {args.chat_clients} chat clients and "
                  f"{args.classify_clients} classify clients for {args.duration:.0f} s (+{args.grace:.0f} s grace)")
            tally, memory = asyncio.run(run_load(server, args, texts))
            problems = audit(server.url, tally)
            rss_end = server.rss_mb()
            with httpx.Client(base_url=server.url, timeout=30) as client:
                alive = client.get("/health").status_code == 200
        load_after = load_average()
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    seconds = tally.seconds  # type: ignore[attr-defined]
    finished = sum(tally.outcomes.values())
    print()
    print(f"Load: {args.chat_clients} chat streams + {args.classify_clients} classify clients, {args.duration:.0f} s, "
          f"{'tiny models' if args.tiny else 'GPT-2 124M random weights'}; chat prefix cache "
          f"{'the default' if args.prefix_cache_mb is None else f'{args.prefix_cache_mb} MB'}, KV pages "
          f"{'the default' if args.kv_cache_mb is None else f'{args.kv_cache_mb} MB'}")
    rows = [
        ("measure", "value"),
        ("answers started / ended", f"{tally.started} / {finished}"),
        ("  done", str(tally.outcomes["done"])),
        ("  stopped by the client (stop)", str(tally.outcomes["stopped"])),
        ("  left mid-answer, followed again to its end", str(tally.outcomes["came back"])),
        ("  cut at the end of the run", str(tally.outcomes["cut at deadline"])),
        ("tokens streamed (done answers)", f"{tally.tokens} ({tally.tokens / seconds:.1f}/s)"),
        ("chat time to first delta p50 / p99 (ms)",
         f"{ms(percentile(tally.first_delta, 0.5))} / {ms(percentile(tally.first_delta, 0.99))}"),
        ("classifications", f"{len(tally.classify_latency)} ({len(tally.classify_latency) / seconds:.1f}/s)"),
        ("classify latency p50 / p99 (ms)",
         f"{ms(percentile(tally.classify_latency, 0.5))} / {ms(percentile(tally.classify_latency, 0.99))}"),
        ("errors", str(len(tally.errors))),
        ("database audit problems", str(len(problems))),
        ("server RSS start / end (MB)", f"{rss_start:.0f} / {rss_end:.0f} ({rss_end - rss_start:+.0f})"),
        ("server alive after", "yes" if alive else "NO"),
        ("wall time (s)", f"{seconds:.1f}"),
    ]
    print_table(rows)
    print("server RSS during the run (s: MB, of which the engine's caches): "
          + ", ".join(f"{t:.0f}: {m:.0f} ({c:.0f})" for t, m, c in memory))
    print(f"server RSS growth, first half / second half of the run: {half_growth([(t, m) for t, m, _ in memory])}")
    print("the same less the engine's caches (KV pages ever lent, prefix cache; bounded by their budgets): "
          f"{half_growth([(t, m - c) for t, m, c in memory])}")
    print(f"load average before {load_before}, after {load_after}")
    for line in (tally.errors + problems)[:20]:
        print(f"  problem: {line}")
    ok = not tally.errors and not problems and alive and finished == tally.started
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
