"""Metrics against a confusion matrix counted by hand."""

import pytest

from training.classification_metrics import binary_metrics, classification_report, confusion_matrix


def test_confusion_matrix_and_metrics_match_hand_counts():
    # true:  ham ham ham ham spam spam spam
    # pred:  ham ham spam ham spam ham  spam
    y_true = [0, 0, 0, 0, 1, 1, 1]
    y_pred = [0, 0, 1, 0, 1, 0, 1]
    # TN=3 FP=1 / FN=1 TP=2
    assert confusion_matrix(y_true, y_pred, 2) == [[3, 1], [1, 2]]
    m = classification_report(y_true, y_pred)
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[3, 1], [1, 2]]
    assert set(m) == {"accuracy", "precision", "recall", "f1", "n", "confusion_matrix"}


def test_asymmetric_errors():
    # TN=5 FP=0 / FN=3 TP=2: precise but low recall.
    m = binary_metrics([[5, 0], [3, 2]])
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx(0.4)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert m["accuracy"] == pytest.approx(0.7)


def test_no_positive_predictions_scores_zero_not_nan():
    m = binary_metrics([[4, 0], [2, 0]])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_rejects_mismatched_or_out_of_range_labels():
    with pytest.raises(ValueError, match="2 true labels but 1"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 2], [0, 1], 2)
