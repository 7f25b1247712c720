"""Backbone features computed once: the probe stage's feature pass and --cache_features.

A frozen backbone in inference mode gives the same pooled features every epoch, so a stage that
trains only the head (the probe, a head stage with --cache_features) needs one forward pass.
"""

import math
import time

import numpy as np
import tensorflow as tf
from absl import logging

from kft import data, model

# Images per feature-pass batch at 224 px; the batch grows as the image area shrinks.
FEATURE_BATCH_AT_224 = 64
MAX_FEATURE_BATCH = 512


def feature_batch_size(image_size: int) -> int:
    """The feature pass's batch: as many pixels as 64 images at 224 px, a power of two in 8..512.

    Eager calls cost a fixed overhead each: at a training batch of 8, that overhead was most of
    the probe stage's time (ResNet50, 32 px: 4.9 s for 89 images at batch 8, 1.3 s at 256).
    """
    images = FEATURE_BATCH_AT_224 * (224 / max(1, image_size)) ** 2
    return int(min(MAX_FEATURE_BATCH, max(8, 2 ** math.floor(math.log2(images)))))


def features_of(classifier, dataset, batch_size: int | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Pooled backbone features (float32, inference mode) and labels of a whole dataset.

    Args:
      dataset: batches of (images, labels); None (no validation split) gives (None, no labels).
      batch_size: rebatch the (batched) dataset to this many images per call, or keep its own.
    """
    if dataset is None:
        return None, np.zeros(0, np.int64)
    if batch_size is not None:
        dataset = dataset.unbatch().batch(batch_size)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(np.asarray(classifier.features(images, training=False), np.float32))
        labels.append(np.asarray(batch_labels))
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


def cache_features(
    classifier: model.Classifier, splits: data.Splits, batch_size: int, seed: int
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Pooled backbone features of the train and val sets, computed once (--cache_features).

    A head-only stage with a frozen backbone in inference mode sees the same features every
    epoch, so the backbone's forward pass need not be repeated. Augmentation cannot apply to
    cached features: head-only stages then train without it.

    Returns:
      (train, val) datasets of (float32 features, int32 labels); train reshuffles each epoch
      and keeps the image pipeline's batch layout; val is None where splits.val is.
    """
    started = time.time()
    # One pass over the training pipeline as an epoch sees it (its batches, partial one dropped).
    train_x, train_y = features_of(classifier, splits.train)
    val_x, val_y = features_of(classifier, splits.val)
    drop = len(train_y) >= batch_size
    train = (
        tf.data.Dataset.from_tensor_slices((train_x, train_y))
        .shuffle(len(train_y), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=drop)
        .prefetch(tf.data.AUTOTUNE)
    )
    val = None
    if val_x is not None:
        val = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    logging.info(
        "cached %d train and %d val feature vectors of size %d in %.1fs",
        len(train_y),
        len(val_y),
        train_x.shape[1],
        time.time() - started,
    )
    return train, val
