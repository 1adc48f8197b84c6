"""Evaluating a spam classifier on a whole UCI-format file (the book's chapter 6.6 ``calc_accuracy_loader``).

``scratchgpt evaluate spam --checkpoint DIR --data PATH``

Every line is classified: no balancing and no split, so on the raw collection
the numbers reflect the real ham/spam mix. Accuracy alone flatters a model on
that mix, hence precision, recall and F1 of "spam" as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.weights.checkpoint import load_checkpoint
from core.classifier import classify, decision_threshold
from core.device import resolve_device
from training.classification_metrics import classification_report
from training.spam_data import LABELS, read_spam_file


class SpamEvaluationError(ValueError):
    """A checkpoint that cannot be evaluated on spam data."""


def evaluate_spam(checkpoint: str | Path, data: str | Path, batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """accuracy, precision, recall, f1 (spam is the positive class), n and confusion_matrix
    (rows true, columns predicted, order ham, spam) over every line of ``data``, and the
    threshold (the checkpoint's stored p(spam) cut, as the service applies it; None: argmax)."""
    ckpt = load_checkpoint(checkpoint, resolve_device(device))
    if ckpt.task != "classification" or list(ckpt.labels or []) != LABELS:
        raise SpamEvaluationError(
            f"--checkpoint {checkpoint} is not a ham/spam classifier (task {ckpt.task!r}, labels {ckpt.labels})"
        )
    examples = read_spam_file(data)
    texts = [e.text for e in examples]
    # Length-sorted batches pad little; results go back to file order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions = classify(ckpt, [texts[i] for i in order], batch_size=batch_size)
    predicted = [0] * len(texts)
    for i, p in zip(order, predictions):
        predicted[i] = LABELS.index(p.label)
    report = classification_report([e.label for e in examples], predicted, num_classes=len(LABELS), positive=1)
    return {**report, "threshold": decision_threshold(ckpt)}
