"""Metrics against a confusion matrix counted by hand."""

import pytest

from training.classification_metrics import (
    binary_metrics, classification_report, confusion_matrix, predict_at, threshold_for_precision,
)


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


# -- the validation threshold -----------------------------------------------------------


def test_threshold_keeps_precision_and_takes_all_the_recall_it_can():
    # Scores in log-odds; the ham at 1.0 outranks the spam at 0.5 and -0.5.
    y = [1, 1, 0, 1, 1, 0, 0]
    s = [4.0, 3.0, 1.0, 0.5, -0.5, -2.0, -3.0]
    t = threshold_for_precision(y, s, min_precision=1.0)
    assert t == pytest.approx(2.0)  # midway between the lowest spam kept (3.0) and the ham below it (1.0)
    assert classification_report(y, predict_at(s, t))["precision"] == 1.0
    assert classification_report(y, predict_at(s, t))["recall"] == 0.5
    # Allowing one false positive in five buys all the spam down to -0.5, cut midway to -2.0.
    loose = threshold_for_precision(y, s, min_precision=0.8)
    assert loose == pytest.approx(-1.25)
    m = classification_report(y, predict_at(s, loose))
    assert (m["precision"], m["recall"]) == (pytest.approx(0.8), 1.0)


def test_threshold_is_lower_than_argmax_when_validation_allows_it():
    # Argmax (0.0) misses the spam at -1.0; no ham scores above -2.0, so the cut moves down to -1.5.
    y, s = [1, 1, 0, 0], [2.0, -1.0, -2.0, -4.0]
    assert threshold_for_precision(y, s) == pytest.approx(-1.5)
    assert predict_at(s, -1.5) == [1, 1, 0, 0] and predict_at(s, 0.0) == [1, 0, 0, 0]


def test_threshold_edge_cases():
    assert threshold_for_precision([0, 1], [3.0, 1.0]) is None  # the top score is ham: precision 1 is out of reach
    assert threshold_for_precision([0, 0], [1.0, 2.0]) is None  # no positives at all
    assert threshold_for_precision([1, 1], [1.0, 2.0]) == pytest.approx(0.0)  # all spam: a margin below the lowest
    # A spam tied with a ham cannot be separated from it: the cut stays above both.
    assert threshold_for_precision([1, 1, 0], [3.0, 1.0, 1.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        threshold_for_precision([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="min_precision must be in"):
        threshold_for_precision([0, 1], [1.0, 2.0], min_precision=0.0)
