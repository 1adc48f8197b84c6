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
