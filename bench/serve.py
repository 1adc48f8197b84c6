"""Service speed: classification with micro-batching against one at a time; chat time to first token, cold and in a conversation.

    python bench/serve.py                        # 32 clients, 20 s a phase, GPT-2 124M random weights
    python bench/serve.py --duration 10 --ttft-samples 10
    python bench/serve.py --classifier ~/.cache/scratchgpt/models/spam-classifier --chat ~/.cache/scratchgpt/models/smollm2-135m-instruct
    python bench/serve.py --sweep 1,2,4,8,16,32 --threads 1   # many users at once, SmolLM2 (only this phase)

What runs: the real service (uvicorn in a subprocess, started as production starts it) on
127.0.0.1, and clients in this process (asyncio + httpx, one event loop). Two servers in turn:
one with the classifier's dynamic micro-batching as configured (``SCRATCHGPT_CLASSIFIER_BATCH_SIZE``
texts or ``..._BATCH_WAIT_MS``, whichever first), one with a batch size of 1. Each faces
``--clients`` clients that post single SMS messages (``../shared/data/sms_spam`` when present,
else a built-in handful) back to back for ``--duration`` seconds. The first server then answers
``--ttft-samples`` chats, one at a time, each a new conversation whose prompt is exactly
``--prompt-tokens`` tokens through the chat template: time to first token is measured at the
client, from sending the request to the first ``delta`` event; that server keeps no chat
prefix cache, so each sample prefills its whole prompt. Then one conversation of ``--turns``
messages goes to it and to a third server that keeps the default prefix cache
(``SCRATCHGPT_CHAT_PREFIX_CACHE_MB``, ``core.fast.prefix_cache``), a message to each in turn: the
first token of each later turn, whose prompt is the whole conversation so far, and whether the
answers were the same.

On a shared machine wall-clock rates follow the neighbours' load, so the table also gives
classifications per CPU-second of the server process (user + system time from /proc), and
``--threads 1`` keeps torch's thread hand-offs from burning that time in spin-waits.

By default both models are GPT-2 124M with random weights, saved with core's
``save_checkpoint`` (the classifier is the book's chapter 6 model: the backbone with a 2-class
head). Everything is bounded: each phase by its duration and ``--max-requests``, each request
by a timeout, the servers by a start timeout. Loopback only.

``--sweep N,N,...`` runs only the concurrency sweep (issue 19): the default chat model
(SmolLM2-135M-Instruct from the model cache, or ``--chat``) behind two servers up side by side, one
decoding through the continuous-batching engine (``SCRATCHGPT_CHAT_MAX_BATCH``, ``--sweep-batch``),
one a single answer at a time (``SCRATCHGPT_CHAT_MAX_BATCH=1``). For each N, N clients each open a
conversation of their own, then all send their message at once and stream the answer
(``--sweep-tokens`` new tokens, greedy) to its ``done`` event; first one server, then the other,
with the same questions (each level its own, so no level finds an earlier one's prompts in the
prefix cache). Aggregate tokens/s is all answers' tokens over the level's wall time; time to first
token is from sending to the first ``delta`` event, time between tokens between a stream's
``delta`` events (one token each, unless a partial character was held back), p50 and p99 over all
answers; "mean batch" is the engine's answers per decoding step (``/metrics``). A reference row,
static batch 8, is ``generate`` on the 8-client level's questions at once in this process
(bench/engine.py's ``static_batch``), the figure continuous batching is held to. The clients run
on the same machine as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (  # also puts the repository on sys.path
    bench_device, describe_device, load_average, percentile, print_table, story_question,
)

REPO = Path(__file__).resolve().parents[1]

HOST = "127.0.0.1"  # loopback only, always
SMS_FILE = REPO.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection"
FALLBACK_TEXTS = [
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight, k?",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to receive entry",
    "Even my brother is not like to speak with me. They treat me like aids patent.",
    "Had your mobile 11 months or more? U R entitled to Update to the latest colour mobiles with camera for Free!",
    "Nah I don't think he goes to usf, he lives around here though",
    "SIX chances to win CASH! From 100 to 20,000 pounds txt> CSH11 and send to 87575.",
]
PASSAGE = (
    "The lighthouse stood at the end of a long spit of sand, and every evening the keeper climbed its hundred and "
    "twelve steps to light the lamp. Ships passing in the night saw the beam sweep across the water and knew where "
    "the rocks were. One winter a storm came that lasted nine days, and the keeper did not sleep, because the lamp "
    "had to turn and the glass had to be kept clean of salt. Tell me what the keeper thought about during those "
    "long nights, and whether he was afraid."
)


# --- the server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """The service under uvicorn in its own process, as ``scratchgpt serve`` runs a worker process."""

    def __init__(self, workdir: Path, name: str, start_timeout: float = 180, threads: int | None = None,
                 **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = workdir / f"{name}.log"
        self.start_timeout = start_timeout
        home = workdir / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCHGPT_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env.update(SCRATCHGPT_HOME=str(home), SCRATCHGPT_DATABASE_URL=f"sqlite:///{workdir / (name + '.db')}",
                   SCRATCHGPT_DEVICE="cpu", SCRATCHGPT_LOG_LEVEL="WARNING", SCRATCHGPT_LOG_JSON="false")
        if threads:  # the service's own setting, and OMP's for anything torch starts before it applies
            env["OMP_NUM_THREADS"] = env["SCRATCHGPT_TORCH_THREADS"] = str(threads)
        for key, value in settings.items():
            env[f"SCRATCHGPT_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.server:app_from_environment", "--factory",
             "--host", HOST, "--port", str(self.port), "--no-access-log"],
            cwd=home, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> "ServerProcess":
        import httpx

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                ready = httpx.get(f"{self.url}/ready", timeout=5)
                if ready.status_code == 200:
                    states = {role: m["state"] for role, m in ready.json()["models"].items()}
                    if "error" in states.values():
                        raise RuntimeError(f"a model failed to load: {ready.json()['models']}")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"server not ready after {self.start_timeout} s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rss_mb(self) -> float:
        """Resident memory of the server process, from /proc (Linux)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far, all threads (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of the server's Prometheus metrics, summed over the series that carry ``labels``
    (all of them when none are given; 0 when absent)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    series = re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, flags=re.M)
    return sum(float(value) for found, value in series if all(f'{k}="{v}"' in found for k, v in labels.items()))


# --- checkpoints ----------------------------------------------------------------------------


def build_checkpoints(folder: Path, chat: Path | None, classifier: Path | None) -> tuple[Path, Path]:
    """GPT-2 124M with random weights as a chat model and as a 2-class classifier, unless given."""
    import torch

    from core.generation.chat_template import ALPACA
    from core.weights.checkpoint import save_checkpoint
    from core.classifier import SequenceClassifier
    from core.model.config import ModelConfig
    from core.model import GPTModel
    from core.tokenizer.gpt2 import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    if chat is None:
        chat = save_checkpoint(folder / "gpt2-124m-random-chat", GPTModel(ModelConfig.from_preset("gpt2-small")),
                               tokenizer, chat_template=ALPACA, metadata={"name": "gpt2-124m-random"})
    if classifier is None:
        model = SequenceClassifier(GPTModel(ModelConfig.from_preset("gpt2-small")), num_classes=2)
        classifier = save_checkpoint(folder / "gpt2-124m-random-spam", model, tokenizer, task="classification",
                                     labels=["ham", "spam"], metadata={"name": "gpt2-124m-random-spam"})
    return chat, classifier


def sms_texts() -> tuple[list[str], str]:
    if SMS_FILE.is_file():
        lines = SMS_FILE.read_text(encoding="utf-8", errors="replace").splitlines()
        texts = [line.split("\t", 1)[1] for line in lines if "\t" in line]
        return texts, f"{len(texts)} SMS messages from {SMS_FILE}"
    return FALLBACK_TEXTS, f"{len(FALLBACK_TEXTS)} built-in SMS-like texts ({SMS_FILE} not present)"


def prompt_of_length(chat_checkpoint: Path, tokens: int) -> str:
    """User text that makes the chat prompt (template included, no system prompt) exactly ``tokens`` long."""
    from types import SimpleNamespace

    from app.services.prompts import encode_prompt
    from core.weights.checkpoint import read_config
    from core.generation.chat_template import ChatTemplate
    from core.tokenizer import load_tokenizer

    config = read_config(chat_checkpoint)
    template = ChatTemplate.from_dict(config["chat_template"]) if config.get("chat_template") else None
    checkpoint = SimpleNamespace(tokenizer=load_tokenizer(config.get("tokenizer"), chat_checkpoint), chat_template=template)
    words = (PASSAGE + " ") * 20
    words = words.split()
    for n in range(1, len(words)):
        text = " ".join(words[:n])
        length = len(encode_prompt(checkpoint, [{"role": "user", "content": text}]))
        if length == tokens:
            return text
        if length > tokens:
            break
    raise SystemExit(f"could not make a prompt of exactly {tokens} tokens")


# --- clients --------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server_cpu: float = float("nan")  # CPU seconds the server spent during the timed part
    to_start: list[float] = field(default_factory=list)  # chats: seconds to the stream's start event

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU second of the server: what a busy shared machine cannot blur."""
        return len(self.latencies) / self.server_cpu if self.server_cpu else float("nan")


async def classify_flood(server: ServerProcess, clients: int, duration: float, max_requests: int, texts: list[str],
                         timeout: float, name: str) -> Phase:
    """``clients`` tasks posting one text each, back to back, until ``duration`` s or ``max_requests`` in all."""
    import httpx

    url = server.url
    phase = Phase(name)
    budget = [max_requests]
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        # Warm up: the first forward passes (allocations, lazy inits) are not timed.
        for text in texts[:2]:
            await client.post("/api/v1/classify", json={"text": text})
        start = time.perf_counter()
        cpu_start = server.cpu_seconds()
        deadline = start + duration

        async def one_client() -> None:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/api/v1/classify", json={"text": rng.choice(texts)})
                    if r.status_code != 200:
                        phase.errors.append(f"{r.status_code} {r.text[:120]}")
                        continue
                    assert r.json()["label"] in ("spam", "ham")
                    phase.latencies.append(time.perf_counter() - t0)
                except (httpx.HTTPError, AssertionError) as exc:
                    phase.errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one_client() for _ in range(clients)))
        phase.seconds = time.perf_counter() - start
        phase.server_cpu = server.cpu_seconds() - cpu_start
    return phase


def parse_events(buffer: str) -> tuple[list[tuple[str, dict]], str]:
    """Complete SSE events in ``buffer`` and what is left of it."""
    events = []
    while "\n\n" in buffer:
        raw, buffer = buffer.split("\n\n", 1)
        event, data = "message", []
        for line in raw.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((event, json.loads("\n".join(data))))
    return events, buffer


async def chat_once(client, content: str, max_new_tokens: int) -> tuple[float, float, float, dict, dict]:
    """One new conversation, one message: seconds to the ``start`` event (the request's database
    writes, template and tokenization are done), to the first delta and to the end; start and done events."""
    return await send_message(client, await new_conversation(client, max_new_tokens), content)


async def new_conversation(client, max_new_tokens: int) -> str:
    created = await client.post("/api/v1/conversations",
                                json={"system_prompt": "", "temperature": 0.0, "max_new_tokens": max_new_tokens})
    created.raise_for_status()
    return created.json()["id"]


async def send_message(client, cid: str, content: str,
                       deltas: list[float] | None = None) -> tuple[float, float, float, dict, dict]:
    """A message to conversation ``cid``, streamed: as :func:`chat_once`; each ``delta`` event's
    seconds since the request are appended to ``deltas`` when given."""
    t0 = time.perf_counter()
    first = started = None
    start_event: dict = {}
    done: dict = {}
    buffer = ""
    async with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": content}) as r:
        r.raise_for_status()
        async for text in r.aiter_text():
            events, buffer = parse_events(buffer + text)
            for event, data in events:
                if event == "start":
                    start_event, started = data, time.perf_counter() - t0
                elif event == "delta":
                    now = time.perf_counter() - t0
                    first = now if first is None else first
                    if deltas is not None:
                        deltas.append(now)
                elif event == "done":
                    done = data
                    if first is None:  # the one token's text was held back to the end (a partial character)
                        first = time.perf_counter() - t0
                elif event == "error":
                    raise RuntimeError(data["detail"])
    if not done:
        raise RuntimeError("the stream ended without a done event")
    nan = float("nan")
    return (started if started is not None else nan), (first if first is not None else nan), \
        time.perf_counter() - t0, start_event, done


@dataclass
class Turns:
    """One conversation's turns after the first, on one server."""

    name: str
    latencies: list[float] = field(default_factory=list)  # seconds to each turn's first token
    prompt_tokens: list[int] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def next_turns(servers: dict[str, ServerProcess], turns: int, max_new_tokens: int, timeout: float) -> dict[str, Turns]:
    """The same conversation on each server, a turn on each in turn (so load falls on all alike):
    the time to each later turn's first token, whose prompt is the whole conversation so far."""
    import httpx

    words = ((PASSAGE + " ") * turns).split()
    per_turn = len(words) // turns
    messages = [" ".join(words[i * per_turn:(i + 1) * per_turn]) for i in range(turns)]
    results = {name: Turns(name) for name in servers}
    clients = {name: httpx.AsyncClient(base_url=s.url, timeout=timeout) for name, s in servers.items()}
    try:
        cids = {name: await new_conversation(c, max_new_tokens) for name, c in clients.items()}
        for turn, content in enumerate(messages):
            for name, client in clients.items():
                try:
                    _, first, _, start, done = await send_message(client, cids[name], content)
                except (httpx.HTTPError, RuntimeError) as exc:
                    results[name].errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                results[name].answers.append(done["message"]["content"])
                if turn > 0:
                    results[name].latencies.append(first)
                    results[name].prompt_tokens.append(start.get("prompt_tokens", 0))
    finally:
        for client in clients.values():
            await client.aclose()
    return results


async def time_to_first_token(server: ServerProcess, content: str, samples: int, max_new_tokens: int,
                              timeout: float) -> Phase:
    import httpx

    phase = Phase("chat time to first token")
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
        await chat_once(client, content, max_new_tokens)  # warm-up
        start = time.perf_counter()
        cpu_start = server.cpu_seconds()
        for _ in range(samples):
            try:
                started, first, _, start_event, _ = await chat_once(client, content, max_new_tokens)
                phase.latencies.append(first)
                phase.to_start.append(started)
                phase.prompt_tokens = start_event.get("prompt_tokens")  # type: ignore[attr-defined]
            except (httpx.HTTPError, RuntimeError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}")
        phase.seconds = time.perf_counter() - start
        phase.server_cpu = server.cpu_seconds() - cpu_start
    return phase


def padding_overhead(classifier: Path, texts: list[str], batch: float, pack_tokens: int,
                     draws: int = 2000) -> float:
    """Tokens a batch of this size computes per real token: each text padded to the longest
    (``pack_tokens`` 0), or packed back to back into rows of ``pack_tokens`` as the service does."""
    from core.weights.checkpoint import read_config
    from core.classifier import pack_texts
    from core.tokenizer import load_tokenizer

    size = max(1, round(batch))
    tokenizer = load_tokenizer(read_config(classifier).get("tokenizer"), classifier)
    lengths = [len(tokenizer.encode(t)) or 1 for t in texts[:3000]]
    rng = random.Random(0)
    real = computed = 0
    for _ in range(draws):
        sample = rng.sample(lengths, min(size, len(lengths)))
        real += sum(sample)
        if pack_tokens:
            computed += pack_texts([[0] * n for n in sample], pack_tokens, 0).ids.numel()
        else:
            computed += max(sample) * len(sample)
    return computed / real


# --- many users at once: the concurrency sweep ----------------------------------------------

SWEEP_MODES = ("one at a time", "continuous")
# Issue 19's targets: at 8 clients against one at a time and against static batch 8 (generate), and
# the first tokens of 32 clients arriving together.
STATIC_BATCH, CROWD = 8, 32


def default_chat_checkpoint() -> Path:
    """The service's default chat model where ``scratchgpt download`` puts it (SmolLM2-135M-Instruct)."""
    from core.paths import models_dir

    return models_dir() / "smollm2-135m-instruct"


async def arrive_together(server: ServerProcess, contents: list[str], max_new_tokens: int, timeout: float):
    """One client per message, each in a conversation of its own, all sending at once and reading their
    answers to the end: an ``engine.Level`` whose time between tokens is between ``delta`` events, its
    CPU the server's, plus the engine's mean batch (``/metrics``) and the errors' text."""
    import httpx

    from engine import Level

    level, problems = Level(), []
    limits = httpx.Limits(max_connections=len(contents), max_keepalive_connections=len(contents))
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        cids = [await new_conversation(client, max_new_tokens) for _ in contents]  # not timed

        async def one(key: int, cid: str, content: str) -> None:
            deltas: list[float] = []
            try:
                _, first, _, _, done = await send_message(client, cid, content, deltas)
            except (httpx.HTTPError, RuntimeError) as exc:
                level.errors += 1
                problems.append(f"{type(exc).__name__}: {exc}")
                return
            level.ttft.append(first)
            level.tbt.extend(b - a for a, b in zip(deltas, deltas[1:]))
            level.tokens += done["completion_tokens"]
            level.answers[key] = done["message"]["content"]

        steps = [metric(server.url, f"scratchgpt_chat_batch_size_{part}") for part in ("sum", "count")]
        cpu, start = server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(one(key, cid, content) for key, (cid, content) in enumerate(zip(cids, contents))))
        level.seconds, level.cpu_seconds = time.perf_counter() - start, server.cpu_seconds() - cpu
    answers, passes = (metric(server.url, f"scratchgpt_chat_batch_size_{part}") - before
                       for part, before in zip(("sum", "count"), steps))
    return level, (answers / passes if passes else float("nan")), problems


def static_reference(chat: Path, device, prompts_from: int, batch: int):
    """The model loaded and made fast as the service loads it, and ``batch`` of the sweep's prompts, for
    ``static_batch`` (bench/engine.py): ``generate`` on them at once in this process, the figure the
    engine is held to. Warmed up here; timed beside the sweep's level of as many clients."""
    import torch

    from engine import chat_prompts, static_batch

    from core.fast.transforms import fast_for_serving
    from core.weights.checkpoint import load_checkpoint

    with torch.no_grad():
        checkpoint = load_checkpoint(chat, device=str(device), dtype=torch.float32)
        fast_for_serving(checkpoint)
        prompts = chat_prompts(checkpoint, prompts_from + batch)[prompts_from:]
        static_batch(checkpoint.model, prompts, 2)  # first allocations
    return checkpoint.model, prompts


def concurrency_sweep(args: argparse.Namespace, device, workdir: Path) -> int:
    """Each number of clients arriving together at a continuous-batching server and at a one-at-a-time
    one (``SCRATCHGPT_CHAT_MAX_BATCH`` 1), both up for the whole run, taking each level in turn."""
    import contextlib
    import torch

    clients = args.sweep
    chat = args.chat or default_chat_checkpoint()
    if not (chat / "config.json").is_file():
        raise SystemExit(f"--sweep: no chat checkpoint at {chat}; run `scratchgpt download smollm2-135m-instruct` "
                         "or pass --chat")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Request i asks story_question(i) in both modes; each level its own questions, so no level finds
    # an earlier one's prompts in the prefix cache.
    offsets = [sum(clients[:n]) for n in range(len(clients))]
    load_before = load_average()
    print(f"machine: {describe_device(device)}; load average {load_before}; torch threads in the servers and "
          f"the static reference: {args.threads or 'torch default'}")
    print(f"chat model {chat}; {args.sweep_tokens} new tokens, greedy; continuous: SCRATCHGPT_CHAT_MAX_BATCH="
          f"{args.sweep_batch}, one at a time: 1; the clients are asyncio tasks in this process", flush=True)
    static = reference = None
    if STATIC_BATCH in clients:
        reference = static_reference(chat, device, offsets[clients.index(STATIC_BATCH)], STATIC_BATCH)
    results: dict[tuple[int, str], tuple] = {}
    common: dict = dict(threads=args.threads, start_timeout=args.start_timeout, chat_checkpoint=chat,
                        classifier_enabled=False, device=args.device, chat_max_waiting=max(64, max(clients)))
    if args.chat_dtype:
        common["chat_dtype"] = args.chat_dtype
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode, slots in zip(SWEEP_MODES, (1, args.sweep_batch)):  # both load at once
            servers[mode] = ServerProcess(workdir, mode.replace(" ", "-"), chat_max_batch=slots, **common)
            stack.callback(servers[mode].close)
        for server in servers.values():
            stack.enter_context(server)
            asyncio.run(arrive_together(server, ["Say hello."], args.sweep_tokens, args.timeout))  # warm-up
        for n, offset in zip(clients, offsets):
            contents = [story_question(offset + i) for i in range(n)]
            for mode, server in servers.items():
                results[n, mode] = asyncio.run(arrive_together(server, contents, args.sweep_tokens, args.timeout))
                level = results[n, mode][0]
                print(f"  {n} clients, {mode}: {level.tokens / level.seconds:.1f} tok/s, {level.errors} errors, "
                      f"load {load_average()}", file=sys.stderr, flush=True)
            if n == STATIC_BATCH and reference:  # timed beside that level, under the same load
                from engine import static_batch

                with torch.no_grad():
                    static = static_batch(*reference, args.sweep_tokens)
                reference = None  # the model's memory back before the larger levels
    load_after = load_average()

    print()
    print(f"Many users at once: 1 to {max(clients)} clients streaming together, {args.sweep_tokens} new tokens each")
    rows = [["clients", "mode", "tok/s", "TTFT p50 s", "TTFT p99 s", "TBT p50 ms", "TBT p99 ms", "errors",
             "tok per server CPU-s", "vs one", "mean batch", "same answers"]]
    for n in clients:
        one = results[n, SWEEP_MODES[0]][0]
        for mode in SWEEP_MODES:
            level, batch, _ = results[n, mode]
            label, _, *cells = level.row(mode, n, one.tokens / one.seconds if mode != SWEEP_MODES[0] else None)
            same = "yes" if level.answers == one.answers else "NO"
            rows.append([n, label, *cells, f"{batch:.1f}", same if mode != SWEEP_MODES[0] else ""])
    if static is not None:
        label, _, *cells = static.row(f"static batch {STATIC_BATCH}", STATIC_BATCH)
        cells = ["" if cell == "nan" else cell for cell in cells[:-1]]  # no stream: no TTFT, no TBT
        rows.append([STATIC_BATCH, f"{label} (generate, this process)", *cells, "", STATIC_BATCH, ""])
    print_table(rows)
    print(f"load average before {load_before}, after {load_after}")

    def tps(level) -> float:
        return level.tokens / level.seconds

    checks = []
    if STATIC_BATCH in clients:
        many, one = (results[STATIC_BATCH, mode][0] for mode in reversed(SWEEP_MODES))
        checks.append((f"{STATIC_BATCH} clients: continuous / one at a time tokens/s {tps(many) / tps(one):.2f}x",
                       ">= 2.5x", tps(many) >= 2.5 * tps(one)))
        share = tps(many) / tps(static)
        per_cpu = (many.tokens / many.cpu_seconds) / (static.tokens / static.cpu_seconds)
        checks.append((f"{STATIC_BATCH} clients: continuous {tps(many):.1f} tok/s = {100 * share:.0f}% of static batch "
                       f"{STATIC_BATCH} ({tps(static):.1f}); per CPU-second {100 * per_cpu:.0f}%", ">= 80%",
                       share >= 0.8))
    if CROWD in clients:
        many = results[CROWD, SWEEP_MODES[1]][0]
        p50, p99 = percentile(many.ttft, 0.5), percentile(many.ttft, 0.99)
        checks.append((f"{CROWD} clients, continuous: TTFT p50 {p50:.2f} s, p99 {p99:.2f} s", "p50 <= 2 s, p99 <= 4 s",
                       p50 <= 2 and p99 <= 4))
    errors = sum(result[0].errors for result in results.values())
    checks.append((f"errors: {errors}", "0", errors == 0))
    for text, target, met in checks:
        print(f"- {text} (target {target}): {'met' if met else 'NOT met'}")
    for (n, mode), (_, _, problems) in results.items():
        for problem in problems[:3]:
            print(f"  {n} clients, {mode} error: {problem}")
    return 1 if errors else 0


# --- report ---------------------------------------------------------------------------------


def client_counts(text: str) -> list[int]:
    """``--sweep``'s list: positive whole numbers, comma-separated."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected client counts like 1,2,4,8, got {text!r}")
    return counts


def ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each classification phase")
    parser.add_argument("--max-requests", type=int, default=20_000, help="cap on requests in each phase")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch size of the batched server (default: the service's setting)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="its wait (default: the service's setting)")
    parser.add_argument("--ttft-samples", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=1,
                        help="tokens generated per chat sample (1: the server's CPU time per chat is the first token's)")
    parser.add_argument("--turn-tokens", type=int, default=48, help="new tokens of each turn's answer")
    parser.add_argument("--turns", type=int, default=6,
                        help="turns of the conversation whose later turns' first tokens are timed (0: skip); "
                             "past six the default chat model's window is full and the service drops the oldest "
                             "messages, which changes every prompt's start")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before one request counts as failed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (SCRATCHGPT_TORCH_THREADS)")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help="row length of packed micro-batches, 0 to pad instead (default: the service's setting)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="SCRATCHGPT_DEVICE of both servers")
    parser.add_argument("--classifier-dtype", default=None, help="SCRATCHGPT_CLASSIFIER_DTYPE of both servers")
    parser.add_argument("--chat-dtype", default=None, help="SCRATCHGPT_CHAT_DTYPE of the server that answers chats")
    parser.add_argument("--chat", type=Path, default=None, help="a chat checkpoint (default: GPT-2 124M random; "
                        "with --sweep, SmolLM2-135M-Instruct from the model cache)")
    parser.add_argument("--classifier", type=Path, default=None, help="a classifier checkpoint (default: random)")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to load its models")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (checkpoints, server logs)")
    parser.add_argument("--sweep", type=client_counts, default=None, metavar="N,N,...",
                        help="run only the concurrency sweep: these numbers of chat clients streaming at once, "
                             "against continuous batching and one at a time (e.g. 1,2,4,8,16,32)")
    parser.add_argument("--sweep-batch", type=int, default=None,
                        help="SCRATCHGPT_CHAT_MAX_BATCH of the sweep's continuous server (default: the service's)")
    parser.add_argument("--sweep-tokens", type=int, default=32, help="max_new_tokens of each sweep answer")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.device)  # here, not in a server that would only fail to load its models

    from app.settings import Settings

    defaults = Settings(home=Path(tempfile.gettempdir()))
    if args.sweep:
        args.sweep_batch = args.sweep_batch or defaults.chat_max_batch
        if args.sweep_batch < 2:
            parser.error("--sweep-batch: the continuous server needs at least 2 places to batch")
        workdir = Path(tempfile.mkdtemp(prefix="scratchgpt-bench-sweep-"))
        try:
            return concurrency_sweep(args, device, workdir)
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    batch_size = args.batch_size or defaults.classifier_batch_size
    batch_wait = defaults.classifier_batch_wait_ms if args.batch_wait_ms is None else args.batch_wait_ms
    pack_tokens = defaults.classifier_pack_tokens if args.pack_tokens is None else args.pack_tokens
    texts, source = sms_texts()
    workdir = Path(tempfile.mkdtemp(prefix="scratchgpt-bench-serve-"))
    try:
        load_before = load_average()
        t0 = time.perf_counter()
        chat, classifier = build_checkpoints(workdir, args.chat, args.classifier)
        content = prompt_of_length(chat, args.prompt_tokens)
        gpu = f"{describe_device(device)}; " if device.type == "cuda" else ""
        print(f"machine: {os.cpu_count()} CPUs, load average {load_before}; {gpu}texts: {source}")
        print(f"chat model {chat}; classifier {classifier} (made in {time.perf_counter() - t0:.1f} s)")

        common: dict = dict(threads=args.threads, start_timeout=args.start_timeout, chat_checkpoint=chat,
                            classifier_checkpoint=classifier, device=args.device)
        if args.classifier_dtype:
            common["classifier_dtype"] = args.classifier_dtype
        chat_settings = {"chat_dtype": args.chat_dtype} if args.chat_dtype else {}
        # The prefix cache off in this server: its time to first token is a whole 100-token prompt's prefill,
        # not a cache hit on the same prompt sent again.
        with ServerProcess(workdir, "batched", classifier_batch_size=batch_size, classifier_batch_wait_ms=batch_wait,
                           classifier_pack_tokens=pack_tokens, chat_prefix_cache_mb=0, **chat_settings,
                           **common) as server:
            batched = asyncio.run(classify_flood(server, args.clients, args.duration, args.max_requests, texts,
                                                 args.timeout, "micro-batched"))
            texts_done, passes = metric(server.url, "scratchgpt_classifier_batch_size_sum"), metric(
                server.url, "scratchgpt_classifier_batch_size_count")
            mean_batch = texts_done / passes if passes else float("nan")
            ttft = asyncio.run(time_to_first_token(server, content, args.ttft_samples, args.new_tokens,
                                                   args.timeout))
            turns = {}
            if args.turns > 1:
                with ServerProcess(workdir, "prefix", **chat_settings, **common) as kept:
                    turns = asyncio.run(next_turns({"off": server, "on": kept}, args.turns, args.turn_tokens,
                                                   args.timeout))
        with ServerProcess(workdir, "single", classifier_batch_size=1, chat_enabled=False, **common) as server:
            single = asyncio.run(classify_flood(server, args.clients, args.duration, args.max_requests, texts,
                                                args.timeout, "one at a time"))
        load_after = load_average()
        padding = padding_overhead(classifier, texts, mean_batch, pack_tokens) if mean_batch == mean_batch else float("nan")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and a == a and b == b else "n/a"

    print()
    print(f"Service bench: {args.clients} concurrent clients, {args.duration:.0f} s a phase; "
          f"micro-batching: up to {batch_size} texts or {batch_wait:g} ms, "
          + (f"packed into rows of {pack_tokens} tokens" if pack_tokens else "padded to the longest"))
    print(f"device {args.device}; dtypes: classifier {args.classifier_dtype or 'the service default'}, "
          f"chat {args.chat_dtype or 'the service default'}")
    rows = [
        ("measure", "micro-batched", "one at a time", "ratio", "target"),
        ("classify requests/s", f"{batched.rate:.1f}", f"{single.rate:.1f}", ratio(batched.rate, single.rate), ">= 5x"),
        ("classify requests per server CPU-second", f"{batched.per_cpu_second:.2f}", f"{single.per_cpu_second:.2f}",
         ratio(batched.per_cpu_second, single.per_cpu_second), ""),
        ("classify p50 latency (ms)", ms(percentile(batched.latencies, 0.5)), ms(percentile(single.latencies, 0.5)),
         ratio(percentile(single.latencies, 0.5), percentile(batched.latencies, 0.5)), ""),
        ("classify p99 latency (ms)", ms(percentile(batched.latencies, 0.99)), ms(percentile(single.latencies, 0.99)),
         ratio(percentile(single.latencies, 0.99), percentile(batched.latencies, 0.99)), ""),
        ("texts per forward pass (mean)", f"{mean_batch:.1f}", "1", "", ""),
        ("tokens computed per real token", f"{padding:.2f}", "1.00", "", ""),
        ("requests (errors)", f"{len(batched.latencies)} ({len(batched.errors)})",
         f"{len(single.latencies)} ({len(single.errors)})", "", "0 errors"),
        (f"chat TTFT p50, {getattr(ttft, 'prompt_tokens', '?')}-token prompt (ms)",
         ms(percentile(ttft.latencies, 0.5)), "", "", "< 300"),
        ("chat TTFT p99 (ms)", ms(percentile(ttft.latencies, 0.99)), "", "", ""),
        ("  of which request to start event, p50 (ms)", ms(percentile(ttft.to_start, 0.5)), "", "", ""),
        ("  of which start event to first token, p50 (ms)",
         ms(percentile([f - s for f, s in zip(ttft.latencies, ttft.to_start)], 0.5)), "", "", ""),
        (f"server CPU-s per chat (prefill + {args.new_tokens} token{'s' if args.new_tokens > 1 else ''})",
         f"{ttft.server_cpu / max(len(ttft.latencies), 1):.2f}", "", "", ""),
        ("chat samples (errors)", f"{len(ttft.latencies)} ({len(ttft.errors)})", "", "", ""),
    ]
    if turns:
        on, off = turns["on"], turns["off"]
        history = f"{min(on.prompt_tokens, default=0)}-{max(on.prompt_tokens, default=0)}"
        rows += [
            ("", "prefix cache on", "off", "", ""),
            (f"chat TTFT, turns 2-{args.turns} of a conversation, p50 (ms)", ms(percentile(on.latencies, 0.5)),
             ms(percentile(off.latencies, 0.5)), ratio(percentile(off.latencies, 0.5), percentile(on.latencies, 0.5)),
             ""),
            ("  the last turn (ms)", ms(on.latencies[-1] if on.latencies else float("nan")),
             ms(off.latencies[-1] if off.latencies else float("nan")), "", ""),
            (f"  prompt tokens, turns 2-{args.turns}", history, "", "", ""),
            ("  the same answers", "yes" if on.answers == off.answers and on.answers else "NO", "", "", ""),
            ("  turns (errors)", f"{len(on.answers)} ({len(on.errors)})", f"{len(off.answers)} ({len(off.errors)})",
             "", ""),
        ]
    print_table(rows)
    print(f"load average before {load_before}, after {load_after}; torch threads in the server: "
          f"{args.threads or 'torch default'}")
    for phase in (batched, single, ttft, *turns.values()):
        for error in phase.errors[:5]:
            print(f"  {phase.name} error: {error}")
    turn_errors = any(t.errors for t in turns.values())
    return 1 if batched.errors or single.errors or ttft.errors or turn_errors else 0


if __name__ == "__main__":
    sys.exit(main())
