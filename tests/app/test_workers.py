"""The chat worker (the engine as the service uses it): answers decode together, cancelling takes one out,
limits refuse with a reason, waiting streams hear their place; and the classifier worker."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app_testing import TokenGate, classify_concurrently

from core.fast.serving import ServingDecoder
from app.services.workers import ChatWorker, ClassifierWorker, OwnerBusy, ServerBusy, WorkerStopped
from core.generation.generate import StreamChunk
from core.serving import Queued


def make_worker(chat_checkpoint, **limits) -> ChatWorker:
    from core.weights.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(chat_checkpoint)
    return ChatWorker(checkpoint, ServingDecoder(checkpoint.model), "chat", **limits)


def test_a_waiting_job_hears_its_place_then_heartbeats(chat_checkpoint):
    from core.generation.generate import GenerationConfig

    worker = make_worker(chat_checkpoint)  # not started: nothing is admitted

    async def main():
        job = worker.submit([1, 2, 3], GenerationConfig(max_new_tokens=2))
        events = job.events(heartbeat=0.02)
        first, second = await events.__anext__(), await events.__anext__()
        await events.aclose()  # leaving cancels it
        return job, first, second

    try:
        job, first, second = asyncio.run(main())
    finally:
        worker.stop()
    assert first == Queued(0) and second is None  # its place, then a heartbeat while nothing happens
    assert job.finish_reason == "cancelled"


@pytest.mark.parametrize("max_batch", [1, 2])
def test_answers_decode_together_and_cancel_takes_one_out(chat_checkpoint, max_batch):
    """Two answers: with two places they decode together, with one the second waits for the first
    (the service before continuous batching); a cancel ends the long one at the token it was on."""
    from core.generation.generate import GenerationConfig

    tokens = []
    worker = make_worker(chat_checkpoint, max_batch=max_batch, on_tokens=tokens.append).start()
    prompt = worker.checkpoint.tokenizer.encode("Once upon a time")

    async def main(gate: TokenGate):
        long_job = worker.submit(prompt, GenerationConfig(max_new_tokens=900))
        short_job = worker.submit(prompt, GenerationConfig(max_new_tokens=5))
        held_at = await asyncio.to_thread(gate.wait_held)  # the engine, held after the third token
        long_job.cancel()  # what a stop or a disconnect does
        gate.release()
        async for _ in long_job.events():
            pass
        text = "".join([c.text async for c in short_job.events() if isinstance(c, StreamChunk)])
        return long_job, short_job, text, held_at

    try:
        with TokenGate(worker, hold_at=3) as gate:
            long_job, short_job, text, held_at = asyncio.run(main(gate))
    finally:
        worker.stop()
    assert short_job.completion_tokens == 5 and short_job.finish_reason == "length" and text
    assert long_job.finish_reason == "cancelled"
    if max_batch == 1:
        # One at a time: the cancel took effect at the next token, and the short answer started after.
        assert long_job.completion_tokens == held_at
        assert short_job.handle.admitted_at >= long_job.handle.finished_at
    else:
        # Together: both were admitted at once, and the short one's tokens counted towards the hold.
        assert short_job.handle.admitted_at < long_job.handle.finished_at
        assert long_job.completion_tokens <= held_at
    assert sum(tokens) == long_job.completion_tokens + 5


def test_limits_per_owner_and_for_the_queue(chat_checkpoint):
    from core.generation.generate import GenerationConfig

    worker = make_worker(chat_checkpoint, max_waiting=3, max_waiting_per_owner=2)  # not started: all wait
    cfg = GenerationConfig(max_new_tokens=2)

    async def main():
        jobs = [worker.submit([1, 2], cfg, owner="session:a") for _ in range(2)]
        with pytest.raises(OwnerBusy, match="SCRATCHGPT_CHAT_MAX_WAITING_PER_OWNER") as busy:
            worker.submit([1, 2], cfg, owner="session:a")
        jobs.append(worker.submit([1, 2], cfg, owner="session:b"))  # another user still gets in
        with pytest.raises(ServerBusy, match="SCRATCHGPT_CHAT_MAX_WAITING") as full:
            worker.submit([1, 2], cfg)  # the queue holds 3: full, whoever asks
        jobs[0].cancel()
        await asyncio.sleep(0)
        return jobs, busy.value, full.value

    try:
        jobs, busy, full = asyncio.run(main())
    finally:
        worker.stop()
    assert busy.retry_after >= 1 and full.retry_after >= 1


def test_a_stopped_worker_refuses_new_jobs(chat_checkpoint):
    from core.weights.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(chat_checkpoint)
    worker = ChatWorker(checkpoint, ServingDecoder(checkpoint.model), "chat").start()
    worker.stop()

    async def main():
        worker.submit([1], None)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
    except WorkerStopped as exc:
        assert "stopped" in str(exc)
    else:
        raise AssertionError("a stopped worker accepted a job")


def test_micro_batches_pack_texts_and_answer_as_one_at_a_time(classifier_checkpoint):
    """The worker's packed micro-batches give each caller what its text alone gives."""
    from core.weights.checkpoint import load_checkpoint
    from core.classifier import classify

    checkpoint = load_checkpoint(classifier_checkpoint)
    batches: list[int] = []
    worker = ClassifierWorker(checkpoint, "classifier", max_batch=16, max_wait_ms=200, on_batch=batches.append,
                              pack_tokens=64).start()
    texts = [("free prize " * (i % 7)) + f"message {i}" + (" see you soon" * (i % 5)) for i in range(24)] + [""]
    results = classify_concurrently(worker, texts)
    assert max(batches) > 1 and sum(batches) == len(texts)  # requests were grouped
    alone = [classify(checkpoint, [t], batch_size=1, pack_tokens=None)[0] for t in texts]
    spams = [a.probabilities["spam"] for a in alone]
    assert max(spams) - min(spams) > 1e-3  # different texts, different answers: a mix-up would show
    for [got], want in zip(results, alone):
        assert got.label == want.label
        assert abs(got.probabilities["spam"] - want.probabilities["spam"]) < 1e-5


def test_call_runs_on_the_engines_thread_between_steps(chat_checkpoint):
    """worker.call(fn): fn runs on the worker's own thread, after the job in front of it, and
    its result or error comes back to the caller."""
    import threading

    from core.weights.checkpoint import load_checkpoint
    from core.generation.generate import GenerationConfig

    checkpoint = load_checkpoint(chat_checkpoint)
    worker = ChatWorker(checkpoint, ServingDecoder(checkpoint.model), "chat").start()
    prompt = checkpoint.tokenizer.encode("Once upon a time")
    jobs = []

    def measure() -> tuple[str, bool, bool]:
        return threading.current_thread().name, jobs[0].completion_tokens < 20, torch.is_grad_enabled()

    def fail() -> None:
        raise ValueError("bad measurement")

    async def main():
        job = worker.submit(prompt, GenerationConfig(max_new_tokens=20))
        jobs.append(job)
        result = await worker.call(measure)
        async for _ in job.events():
            pass
        try:
            await worker.call(fail)
        except ValueError as exc:
            error = exc
        return job, result, error, await worker.call(sum, [1, 2, 3])

    try:
        job, (thread, answer_midway, grad), error, total = asyncio.run(main())
    finally:
        worker.stop()
    assert thread == "serving-engine" and not grad  # the engine's thread and its settings
    # Between two steps of the answer, not after it (nor beside a step: one thread runs both).
    assert answer_midway and job.completion_tokens == 20
    assert str(error) == "bad measurement" and total == 6  # an error reached the caller; the worker went on

    async def after_stop():
        await worker.call(sum, [1])

    with pytest.raises(WorkerStopped):
        asyncio.run(after_stop())


def test_classifier_worker_runs_calls_between_batches(classifier_checkpoint):
    import threading

    from core.weights.checkpoint import load_checkpoint

    worker = ClassifierWorker(load_checkpoint(classifier_checkpoint), "classifier", max_batch=8,
                              max_wait_ms=100).start()

    async def main():
        texts = [worker.classify([f"text {i}"]) for i in range(6)]
        name = worker.call(lambda: threading.current_thread().name)  # arrives while the batch collects
        results = await asyncio.gather(*texts, name)
        return results[:-1], results[-1]

    try:
        predictions, name = asyncio.run(main())
    finally:
        worker.stop()
    assert name == "classifier-worker-classifier"
    assert all(p[0].label in ("ham", "spam") for p in predictions)
