"""Stratified k-fold splits of a small training set, on which kft.tune ranks its trials when the
data has no validation split to rank them on.

On a small set kft.train's recipe trains on every image (a carved validation split of fewer than
kft.schedule.MIN_RANKING_VAL images cannot rank models, and it costs training images). Ranking
tuning trials on such a split is ranking on noise: at 10 images per class, ranked on 3 or 5
validation images, kft.tune's best was 2.5-2.9 points below the recipe alone (BENCHMARKS.md).
Cross-validation holds out every image once (but a class's only one), so a trial is scored on
all N images instead of a tenth of them, and the tuned model still trains on every image.

Each fold trains on (FOLDS - 1) / FOLDS of the images: the trial's cost is FOLDS runs.
"""

import zlib

import numpy as np
import tensorflow as tf
from absl import logging

from kft import data

FOLDS = 3
# Up to this many training images a search without a validation split ranks by cross-validation
# (every fold's images are held in memory). Above it a 10% validation split has 200 images or
# more, enough to rank on, and costs the tuned model little.
MAX_IMAGES = 2_000


def check(num_train: int, class_names, class_counts) -> int:
    """The number of folds for this training set.

    Args:
      num_train: training images.
      class_names: the class names, for the message.
      class_counts: training images per class, in class_names' order.

    Raises:
      ValueError: more than MAX_IMAGES images, or no class with two images (one line each).
    """
    if num_train > MAX_IMAGES:
        raise ValueError(
            f"kft.tune ranks its trials on a validation split, and there is none: {num_train} training "
            f"images is more than the {MAX_IMAGES} it cross-validates instead; hold some out "
            "(--val_fraction=0.1, or a val/ folder)"
        )
    if max(class_counts) < 2:
        raise ValueError(
            f"every class has a single training image ({len(class_names)} classes): ranking kft.tune's trials "
            "by cross-validation needs a class of at least 2 (or a validation split: a val/ folder)"
        )
    # A class with fewer images than folds is held out in as many folds as it has images.
    return int(min(FOLDS, max(class_counts)))


def folds(splits: data.Splits, seed: int) -> list[data.Splits]:
    """The training images of `splits` as stratified folds: fold i validates on the i-th share
    of every class and trains on the rest; a class of one image trains in every fold.

    Args:
      splits: the run's data; its training images are read once, in their fixed order.
      seed: assigns each class's images to folds (each class by its own generator, seeded from
        (seed, class name), as kft.data splits them).

    Returns:
      One data.Splits per fold, batched as `splits`.

    Raises:
      ValueError: see `check`.
    """
    images, labels = _read(splits.train_in_order)
    counts = np.bincount(labels, minlength=len(splits.class_names))
    num_folds = check(len(labels), splits.class_names, counts)
    single = [name for name, count in zip(splits.class_names, counts) if count < 2]
    if single:
        logging.warning(
            "cross-validation scores no image of %s: a class of one image trains in every fold",
            ", ".join(repr(name) for name in single),
        )
    fold_of = np.empty(len(labels), np.int64)
    for index, name in enumerate(splits.class_names):
        members = np.flatnonzero(labels == index)
        if len(members) < 2:
            # Held out, its class would be missing from that fold's training: it trains in every fold.
            fold_of[members] = -1
            continue
        rng = np.random.default_rng([seed % 2**32, zlib.crc32(name.encode())])
        fold_of[rng.permutation(members)] = np.arange(len(members)) % num_folds
    return [
        _fold_splits(images, labels, fold_of != i, fold_of == i, splits.class_names, splits.batch_size, seed)
        for i in range(num_folds)
    ]


def _read(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _fold_splits(images, labels, train, val, class_names, batch_size: int, seed: int) -> data.Splits:
    def pipeline(mask, training: bool) -> tf.data.Dataset:
        return data.finish(
            tf.data.Dataset.from_tensor_slices((images[mask], labels[mask])),
            num_examples=int(mask.sum()),
            batch_size=batch_size,
            image_size=images.shape[1],
            training=training,
            seed=seed,
            cache=False,  # Already in memory.
            shuffle=True,
        )

    def build(batch_size: int) -> data.Splits:
        return _fold_splits(images, labels, train, val, class_names, batch_size, seed)

    return data.Splits(
        train=pipeline(train, training=True),
        val=pipeline(val, training=False),
        class_names=tuple(class_names),
        num_train=int(train.sum()),
        num_val=int(val.sum()),
        skipped=0,
        train_in_order=pipeline(train, training=False),
        batch_size=batch_size,
        rebuild=build,
        val_carved=True,
    )
