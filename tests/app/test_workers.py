"""The chat worker thread: jobs run one at a time, cancellation frees it, idle streams get heartbeats."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app_testing import TokenGate, classify_concurrently

from core.fast.serving import ServingDecoder
from app.services.workers import ChatJob, ChatWorker, ClassifierWorker, WorkerStopped, _End


def test_heartbeat_while_a_job_waits():
    async def main():
        job = ChatJob([1], config=None, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        events = job.events(heartbeat=0.02)
        assert await events.__anext__() is None  # nothing yet: a heartbeat
        job._post(_End())
        return [e async for e in events]

    assert asyncio.run(main()) == []


def test_jobs_queue_behind_each_other_and_cancel_frees_the_worker(chat_checkpoint):
    from core.weights.checkpoint import load_checkpoint
    from core.generation.generate import GenerationConfig

    checkpoint = load_checkpoint(chat_checkpoint)
    tokens = []
    worker = ChatWorker(checkpoint, ServingDecoder(checkpoint.model), "chat", on_tokens=tokens.append).start()
    prompt = checkpoint.tokenizer.encode("Once upon a time")

    async def main(gate: TokenGate):
        long_job = worker.submit(prompt, GenerationConfig(max_new_tokens=900))
        short_job = worker.submit(prompt, GenerationConfig(max_new_tokens=5))
        held_at = await asyncio.to_thread(gate.wait_held)  # the worker, held after its third token
        long_job.cancel()  # what a stop or a disconnect does
        gate.release()
        async for _ in long_job.events():
            pass
        text = "".join([c.text async for c in short_job.events() if c is not None])
        return long_job, short_job, text, held_at

    try:
        with TokenGate(worker, hold_at=3) as gate:
            long_job, short_job, text, held_at = asyncio.run(main(gate))
    finally:
        worker.stop()
    # The cancel took effect at the next token: not one more was generated for the long job.
    assert long_job.finish_reason == "cancelled" and long_job.completion_tokens == held_at
    assert short_job.completion_tokens == 5 and short_job.finish_reason == "length" and text
    assert short_job.started_at >= long_job.finished_at  # one job at a time
    assert sum(tokens) == long_job.completion_tokens + 5


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


def test_call_runs_on_the_worker_thread_in_turn_with_its_jobs(chat_checkpoint):
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
        return threading.current_thread().name, jobs[0].finished_at is not None, torch.is_grad_enabled()

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
        job, (thread, answer_finished, grad), error, total = asyncio.run(main())
    finally:
        worker.stop()
    assert thread == "chat-worker-chat" and not grad  # the worker's thread and its settings
    assert answer_finished and job.completion_tokens == 20  # queued behind the answer, never beside it
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
