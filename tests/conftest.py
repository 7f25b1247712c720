"""Shared test setup: quiet TensorFlow, keep runs small and deterministic."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# --mixed_precision=auto on a CPU times the backbone (kft.calibration, ~10-60 s per backbone)
# and picks by the timings: tests run float32 instead, the same on every machine, in every
# subprocess they start. tests/test_calibration.py turns it back on where it tests it.
os.environ.setdefault("KFT_CALIBRATE_PRECISION", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_splits(num_classes=3, per_class=8, size=32, batch_size=8, seed=0):
    """A tiny in-memory kft.data.Splits of coloured squares (class = colour channel)."""
    import tensorflow as tf

    from kft import data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(num_classes):
        for _ in range(per_class):
            image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            image[:, :, label % 3] += 150
            images.append(image)
            labels.append(label)
    images, labels = np.stack(images), np.array(labels, np.int32)
    order = rng.permutation(len(labels))
    images, labels = images[order], labels[order]
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True)
    val = tf.data.Dataset.from_tensor_slices((images[:batch_size], labels[:batch_size])).batch(batch_size)
    return data.Splits(
        train=train,
        val=val,
        class_names=tuple(str(i) for i in range(num_classes)),
        num_train=len(labels),
        num_val=batch_size,
        skipped=0,
    )


def colour_model(logit_scale: float):
    """A keras model that predicts an image's dominant channel as classes blue, green, red
    (the sorted class-folder order): logits = logit_scale * the channel means in 0..1."""
    import keras

    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, activation="softmax")
    probabilities = dense(x)
    kernel = np.zeros((3, 3), np.float32)
    kernel[0, 2] = kernel[1, 1] = kernel[2, 0] = logit_scale  # Channel R -> class 2, G -> 1, B -> 0.
    dense.set_weights([kernel, np.zeros(3, np.float32)])
    return keras.Model(images, probabilities)


@pytest.fixture
def tiny_splits():
    return make_splits()
