"""Classification metrics shared by kft.train (validation) and kft.evaluate: numbers, table, PNG;
and kft.train's TensorBoard events (`Summaries`).

Conventions for classes that make a ratio undefined: precision of a class that was never
predicted is 0.0, and recall of a class with no examples is 0.0 (its support says why), so
reports stay plain JSON numbers with no NaN.
"""

import io
import math
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

# The Agg canvas is used directly, not through pyplot: no display is needed, and the global
# backend of a process that imports kft (a notebook, say) is left alone.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kft import augment as augment_lib
from kft import schedule

# Above this many classes the per-cell counts are unreadable, so only colours are drawn.
_MAX_ANNOTATED_CLASSES = 20


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
      labels: int [N] true class indices.
      predictions: int [N] predicted class indices.
      num_classes: C.

    Returns:
      int64 [C, C]; entry [t, p] counts examples of class t predicted as p.

    Raises:
      ValueError: mismatched lengths or an index outside 0..C-1 (named in the message).
    """
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for what, values in (("label", labels), ("prediction", predictions)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{what}s must be integer class indices, got dtype {values.dtype}")
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise ValueError(f"{what} {bad[0]} is not a class index in 0..{num_classes - 1}")
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def classification_report(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix, as plain JSON.

    Args:
      labels: int [N] true class indices.
      probabilities: float [N, C] predicted class probabilities (or any scores; argmax is used).
      class_names: the C class names, in index order.

    Returns:
      {"accuracy": float, "num_examples": int,
       "per_class": [{"class": name, "precision": float, "recall": float, "support": int}, ...],
       "confusion_matrix": [[int, ...], ...]  ([true][predicted])}.
      Precision of a class that was never predicted is 0.0, not NaN; so is the recall of a
      class with support 0.

    Raises:
      ValueError: no examples, or shapes that do not fit `class_names`.
    """
    names = list(class_names)
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(names):
        raise ValueError(
            f"probabilities have shape {probabilities.shape}, expected [N, {len(names)}] for classes {names}"
        )
    if len(labels) == 0:
        raise ValueError("no examples to report on")
    matrix = confusion_matrix(labels, np.argmax(probabilities, axis=-1), len(names))
    correct = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    per_class = [
        {
            "class": name,
            "precision": float(correct[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(correct[i] / support[i]) if support[i] else 0.0,
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    ]
    return {
        "accuracy": float(correct.sum() / matrix.sum()),
        "num_examples": int(matrix.sum()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_png(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Draws a confusion matrix as PNG bytes (for TensorBoard and eval output).

    Cells are coloured by the fraction of the true class (row-normalized), so small classes are
    as visible as large ones; counts are written in the cells up to 20 classes. The title gives
    the accuracy. Sizes scale with the number of classes, readable up to about 100.

    Args:
      matrix: int [C, C] counts, [true, predicted].
      class_names: the C class names.

    Returns:
      The PNG file contents.
    """
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix has shape {matrix.shape}, expected ({num_classes}, {num_classes})")
    total = matrix.sum()
    accuracy = np.trace(matrix) / total if total else 0.0
    rows = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)

    side = min(30.0, max(5.0, 2.5 + 0.28 * num_classes))  # Inches: ~0.28 in per class.
    font = 10 if num_classes <= 20 else max(6.0, 10 - num_classes / 25)
    figure = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    ticks = np.arange(num_classes)
    labels = [_short(str(name)) for name in class_names]
    axes.set_xticks(ticks, labels, rotation=90, fontsize=font)
    axes.set_yticks(ticks, labels, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"accuracy {accuracy:.4f} ({int(np.trace(matrix))}/{int(total)})")
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        for (t, p), count in np.ndenumerate(matrix):
            colour = "white" if fractions[t, p] > 0.5 else "black"
            axes.text(p, t, str(int(count)), ha="center", va="center", color=colour, fontsize=font)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def format_table(report: dict) -> str:
    """An aligned text table of a `classification_report`: one row per class, then accuracy."""
    rows = report["per_class"]
    width = max([len("class")] + [len(str(row["class"])) for row in rows])
    lines = [f"{'class':<{width}}  precision  recall  support"]
    for row in rows:
        lines.append(f"{row['class']:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  {row['support']:>7d}")
    lines.append(f"{'accuracy':<{width}}  {report['accuracy']:>9.4f}  {'':>6}  {report['num_examples']:>7d}")
    return "\n".join(lines)


class Summaries:
    """TensorBoard events: scalars per epoch, stage boundaries, images."""

    def __init__(self, logdir: str):
        self.train = tf.summary.create_file_writer(os.path.join(logdir, "train"))
        self.val = tf.summary.create_file_writer(os.path.join(logdir, "validation"))

    def epoch(self, step: int, record: dict, drift: dict[str, float]) -> None:
        with self.train.as_default(step=step):
            for key in ("loss", "accuracy", "l2sp", "head_l2", "feature_reg", "learning_rate"):
                if key in record:
                    tf.summary.scalar(key, record[key])
            tf.summary.scalar("stage", record["stage"])
            for block, value in drift.items():
                tf.summary.scalar(f"drift/{block}", value)
        with self.val.as_default(step=step):
            for key in ("loss", "accuracy"):
                if f"val_{key}" in record:
                    tf.summary.scalar(key, record[f"val_{key}"])
        self.train.flush()
        self.val.flush()

    def stage_start(self, index: int, stage: schedule.Stage, blocks: list[str], step: int) -> None:
        with self.train.as_default(step=step):
            tf.summary.text(
                "stages",
                f"stage {index + 1} starts at epoch {step}: {stage.describe()}; trainable blocks: "
                f"{', '.join(blocks) if blocks else 'none (head only)'}",
            )

    def augmented_grid(self, dataset: tf.data.Dataset, ops: tuple[str, ...], seed: int, num_classes: int) -> None:
        images, labels = next(iter(dataset))
        x = tf.cast(images[:16], tf.float32)
        if ops:
            # A separate augmenter, so logging does not advance the training RNG.
            x, _ = augment_lib.Augmenter(ops, seed=seed + 1)(x, tf.one_hot(labels[:16], num_classes))
        with self.train.as_default(step=0):
            tf.summary.image("augmented_training_images", _grid(tf.cast(x, tf.uint8)), step=0)

    def delta_attention(self, step: int, weights: np.ndarray) -> None:
        with self.train.as_default(step=step):
            tf.summary.histogram("delta_channel_weights", weights)
        self.train.flush()

    def confusion(self, step: int, png: bytes) -> None:
        with self.val.as_default(step=step):
            tf.summary.image("confusion_matrix", tf.expand_dims(tf.io.decode_png(png, channels=3), 0))
        self.val.flush()


def _grid(images: tf.Tensor, columns: int = 4) -> tf.Tensor:
    """Tiles [N,H,W,3] images into one [1, rows*H, columns*W, 3] image."""
    n = int(images.shape[0])
    rows = math.ceil(n / columns)
    pad = rows * columns - n
    images = tf.concat([images, tf.zeros([pad, *images.shape[1:]], images.dtype)], 0)
    h, w = int(images.shape[1]), int(images.shape[2])
    grid = tf.reshape(images, [rows, columns, h, w, 3])
    grid = tf.transpose(grid, [0, 2, 1, 3, 4])
    return tf.reshape(grid, [1, rows * h, columns * w, 3])
