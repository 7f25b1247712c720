"""Feature-space regularizers toward the pretrained model, beside L2-SP (kft.l2sp).

From the Transfer-Learning-Library's benchmark set, selected with `--regularizer`:

DELTA (Li et al. 2019, "DELTA: Deep Learning Transfer using Feature Map with Attention"),
the plain (unweighted) form on the backbone's last feature map::

    delta = alpha * mean_batch sum_{h,w,c} (FM(x; theta) - FM(x; theta0))^2 / (h * w)

where FM(.; theta0) is a frozen copy of the backbone as first loaded, run on the same
(augmented, preprocessed) batch in inference mode. The attention-weighted form, which weights
channels by how much zeroing them hurts the pretrained model's loss, is not implemented.

BSS (Chen et al. 2019, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral
Shrinkage"), on the pooled features F [B, D] of the batch::

    bss = eta * sum_{i=1..k} sigma_{-i}(F)^2

the squares of the k smallest singular values of F (k = 1 by default).

Both act only through the backbone: a head-only stage (or cached features) has nothing for
them to change.
"""

import keras
import numpy as np
import tensorflow as tf


class Delta:
    """Plain DELTA: squared distance of the last feature map to the pretrained backbone's."""

    def __init__(self, backbone: keras.Model, anchors: dict[str, np.ndarray], alpha: float):
        self.alpha = float(alpha)
        self.reference = keras.models.clone_model(backbone)
        for source, copy in zip(backbone.weights, self.reference.weights):
            value = anchors.get(source.path, source.numpy())
            copy.assign(value)
        self.reference.trainable = False

    def __call__(self, preprocessed, feature_map) -> tf.Tensor:
        reference = tf.stop_gradient(self.reference(preprocessed, training=False))
        diff = tf.cast(feature_map, tf.float32) - tf.cast(reference, tf.float32)
        spatial = tf.cast(tf.shape(diff)[1] * tf.shape(diff)[2], tf.float32)
        return self.alpha * tf.reduce_mean(tf.reduce_sum(tf.square(diff), axis=[1, 2, 3]) / spatial)


class BatchSpectralShrinkage:
    """BSS: the k smallest squared singular values of the batch's pooled features."""

    def __init__(self, eta: float, k: int = 1):
        self.eta = float(eta)
        self.k = int(k)

    def __call__(self, features) -> tf.Tensor:
        singular = tf.linalg.svd(tf.cast(features, tf.float32), compute_uv=False)  # descending
        return self.eta * tf.reduce_sum(tf.square(singular[-self.k :]))
