"""Classification metrics from a confusion matrix (the book's chapter 6.6, extended).

The book reports accuracy only. On a balanced spam set that is fair, but the
evaluation command also runs on the raw, imbalanced collection (about 87% ham),
where a model that always says "ham" is 87% accurate; precision, recall and F1
of the positive class ("spam") expose that.

Convention: ``matrix[true][predicted]``, rows and columns in label order, so for
labels ``["ham", "spam"]`` the matrix is ``[[TN, FP], [FN, TP]]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> list[list[int]]:
    """Counts of (true class, predicted class) pairs as a num_classes x num_classes list."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= t < num_classes and 0 <= p < num_classes):
            raise ValueError(f"label pair ({t}, {p}) outside 0..{num_classes - 1}")
        matrix[t][p] += 1
    return matrix


def _ratio(num: int | float, den: int | float) -> float:
    # An empty denominator (no predicted / no actual positives) scores 0, as
    # scikit-learn does with zero_division=0, rather than NaN in a JSON file.
    return float(num) / den if den else 0.0


def binary_metrics(matrix: list[list[int]], positive: int = 1) -> dict[str, Any]:
    """accuracy, precision, recall, f1 (of class ``positive``), n and the matrix itself."""
    n = sum(sum(row) for row in matrix)
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    tp = matrix[positive][positive]
    predicted_pos = sum(row[positive] for row in matrix)
    actual_pos = sum(matrix[positive])
    precision = _ratio(tp, predicted_pos)
    recall = _ratio(tp, actual_pos)
    return {
        "accuracy": _ratio(correct, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "n": n,
        "confusion_matrix": [list(row) for row in matrix],
    }


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 2, positive: int = 1) -> dict[str, Any]:
    """``binary_metrics`` straight from label lists."""
    return binary_metrics(confusion_matrix(y_true, y_pred, num_classes), positive)


# -- decision thresholds -------------------------------------------------------------


def predict_at(scores: Sequence[float], threshold: float) -> list[int]:
    """1 where ``score >= threshold``, else 0 (scores are the positive class's log-odds)."""
    return [int(s >= threshold) for s in scores]


def threshold_for_precision(y_true: Sequence[int], scores: Sequence[float], min_precision: float = 1.0) -> float | None:
    """The decision threshold on ``scores`` with the highest recall whose precision is at least
    ``min_precision`` on these examples (a validation split), or None when no threshold reaches it.

    Every threshold between two neighbouring scores classifies the split alike, so the one
    returned is the midpoint of that gap (in log-odds): the positive with the lowest score
    still called positive, and the highest score below it. That is the choice with the widest
    margin on both sides, so a message scoring like the nearest validation ham or spam still
    lands on the side that one did.
    """
    if len(y_true) != len(scores):
        raise ValueError(f"{len(y_true)} labels but {len(scores)} scores")
    if not 0.0 < min_precision <= 1.0:
        raise ValueError(f"min_precision must be in (0, 1], got {min_precision}")
    ranked = sorted(zip(scores, y_true), key=lambda pair: -pair[0])
    best: tuple[int, int] | None = None  # (true positives, index of the last example called positive)
    tp = 0
    for i, (score, label) in enumerate(ranked):
        tp += label
        if i + 1 < len(ranked) and ranked[i + 1][0] == score:
            continue  # a threshold cannot separate equal scores
        # Strictly more true positives: of the cuts with equal recall, the first has the best precision.
        if tp and tp / (i + 1) >= min_precision and (best is None or tp > best[0]):
            best = (tp, i)
    if best is None:
        return None
    i = best[1]
    lowest_called = ranked[i][0]
    if i + 1 == len(ranked):  # every example called positive: keep a margin below the last one
        return lowest_called - 1.0
    return (lowest_called + ranked[i + 1][0]) / 2
