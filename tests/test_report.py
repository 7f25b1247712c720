"""Metrics against hand computation; the confusion-matrix PNG decodes."""

import json

import numpy as np
import pytest
import tensorflow as tf

from kft import report

NAMES = ["ant", "bee", "cow"]
#          true:  ant ant ant bee bee cow cow cow cow
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDICTIONS = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
# By hand: [true, predicted] counts.
MATRIX = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])


def one_hot_probabilities(predictions, num_classes=3):
    probabilities = np.full((len(predictions), num_classes), 0.1, np.float32)
    probabilities[np.arange(len(predictions)), predictions] = 0.8
    return probabilities


def test_confusion_matrix_by_hand():
    matrix = report.confusion_matrix(LABELS, PREDICTIONS, 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, MATRIX)


def test_classification_report_by_hand():
    result = report.classification_report(LABELS, one_hot_probabilities(PREDICTIONS), NAMES)
    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["num_examples"] == 9
    assert result["confusion_matrix"] == MATRIX.tolist()
    # precision = correct / predicted as the class; recall = correct / true members.
    want = [
        {"class": "ant", "precision": 2 / 3, "recall": 2 / 3, "support": 3},
        {"class": "bee", "precision": 1 / 2, "recall": 1 / 2, "support": 2},
        {"class": "cow", "precision": 3 / 4, "recall": 3 / 4, "support": 4},
    ]
    for got, expected in zip(result["per_class"], want, strict=True):
        assert got == {
            **expected,
            "precision": pytest.approx(expected["precision"]),
            "recall": pytest.approx(expected["recall"]),
        }
    json.dumps(result, allow_nan=False)  # Plain JSON types only.


def test_class_never_predicted_has_precision_zero_not_nan():
    labels = np.array([0, 1, 2, 2])
    predictions = np.array([0, 0, 2, 2])  # "bee" is never predicted.
    result = report.classification_report(labels, one_hot_probabilities(predictions), NAMES)
    bee = result["per_class"][1]
    assert bee == {"class": "bee", "precision": 0.0, "recall": 0.0, "support": 1}
    assert result["per_class"][0]["precision"] == pytest.approx(0.5)
    json.dumps(result, allow_nan=False)


def test_class_without_examples_has_recall_zero():
    result = report.classification_report(np.array([0, 0]), one_hot_probabilities(np.array([0, 2])), NAMES)
    assert result["per_class"][1] == {"class": "bee", "precision": 0.0, "recall": 0.0, "support": 0}
    assert result["per_class"][2]["precision"] == 0.0


@pytest.mark.parametrize(
    "labels, probabilities, match",
    [
        (np.array([0, 3]), one_hot_probabilities(np.array([0, 1])), "label 3 is not a class index in 0..2"),
        (np.array([0]), one_hot_probabilities(np.array([0, 1])), "1 labels but 2 predictions"),
        (np.array([0, 1]), np.zeros((2, 4)), r"shape \(2, 4\), expected \[N, 3\]"),
        (np.array([], np.int64), np.zeros((0, 3)), "no examples"),
        (np.array([0.0, 1.0]), one_hot_probabilities(np.array([0, 1])), "integer class indices"),
    ],
)
def test_bad_inputs_are_named(labels, probabilities, match):
    with pytest.raises(ValueError, match=match):
        report.classification_report(labels, probabilities, NAMES)


@pytest.mark.parametrize("num_classes", [3, 60])
def test_confusion_png_decodes(num_classes):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, (num_classes, num_classes))
    matrix[0] = 0  # A class with no examples must not divide by zero.
    names = [f"class_{i}_with_a_rather_long_name" for i in range(num_classes)]
    png = report.confusion_png(matrix, names)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = tf.io.decode_png(png)
    assert image.shape[-1] in (3, 4) and image.shape[0] >= 400
    assert image.shape[0] > 1500 if num_classes == 60 else image.shape[0] < 1000


def test_confusion_png_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 3\)"):
        report.confusion_png(np.eye(2, dtype=int), NAMES)


def test_format_table_aligns_columns():
    result = report.classification_report(LABELS, one_hot_probabilities(PREDICTIONS), NAMES)
    lines = report.format_table(result).splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "support"]
    assert lines[1].split() == ["ant", "0.6667", "0.6667", "3"]
    assert lines[3].split() == ["cow", "0.7500", "0.7500", "4"]
    assert lines[-1].split() == ["accuracy", "0.6667", "9"]
    assert len({len(line.rstrip()) for line in lines[:-1]}) == 1  # Same width: aligned.
