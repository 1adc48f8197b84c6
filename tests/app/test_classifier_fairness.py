"""The classifier serves owners in turn: a large batch is several micro-batches, and another owner's
one text rides in the next of them instead of waiting for the whole batch (counted in batches)."""

from __future__ import annotations

import asyncio

from app.services.workers import ClassifierWorker
from core.classifier import classify
from core.weights.checkpoint import load_checkpoint


def run_two_owners(checkpoint, big: list[str], small: str, max_batch: int = 8):
    worker = ClassifierWorker(checkpoint, "classifier", max_batch=max_batch, max_wait_ms=0, pack_tokens=64)
    worker.start()

    async def main():
        loop = asyncio.get_running_loop()
        first_batch_done = asyncio.Event()
        worker._on_batch = lambda n: loop.call_soon_threadsafe(first_batch_done.set)
        large = asyncio.ensure_future(worker.classify(big, "alice"))
        await asyncio.wait_for(first_batch_done.wait(), timeout=120)  # guards a hang, times nothing
        submitted_at = worker.batches
        one = await worker.classify([small], "bob")
        answered_at = worker.batches
        return await large, one, submitted_at, answered_at, worker.batches

    try:
        return asyncio.run(main())
    finally:
        worker.stop()


def test_another_owners_text_waits_behind_at_most_the_running_micro_batch(classifier_checkpoint):
    checkpoint = load_checkpoint(classifier_checkpoint)
    big = [f"message {i} " + "win a free prize now " * (i % 9) for i in range(64)]
    large, (one,), submitted_at, answered_at, total = run_two_owners(checkpoint, big, "see you at lunch")
    assert total >= 64 // 8 + 1  # the large request was split, not run as one batch
    # bob's text went into the batch after the one running when it came: two batches at most.
    assert answered_at - submitted_at <= 2, (submitted_at, answered_at, total)
    assert answered_at < total  # ... long before alice's last batch
    # Split, interleaved and put back together, every text has its own answer.
    alone = [classify(checkpoint, [t], batch_size=1, pack_tokens=None)[0] for t in big + ["see you at lunch"]]
    for got, want in zip(large + [one], alone):
        assert got.label == want.label
        assert abs(got.probabilities["spam"] - want.probabilities["spam"]) < 1e-5


def test_a_micro_batch_keeps_to_its_token_budget(classifier_checkpoint):
    checkpoint = load_checkpoint(classifier_checkpoint)
    worker = ClassifierWorker(checkpoint, "classifier", max_batch=64, max_wait_ms=0, batch_tokens=40)
    sizes: list[int] = []
    worker._on_batch = sizes.append
    worker.start()
    texts = ["one two three four five six seven eight nine ten " * 2] * 6  # about 20 tokens each

    async def main():
        return await worker.classify(texts, "alice")

    try:
        results = asyncio.run(main())
    finally:
        worker.stop()
    assert len(results) == 6 and sum(sizes) == 6
    assert max(sizes) <= 2  # 40 tokens hold two of these texts, never three
