"""L2-SP (Li, Grandvalet, Davoine 2018): pull fine-tuned weights toward the pretrained ones.

    penalty = alpha * sum_backbone ||theta - theta0||^2 + beta * sum_head ||W||^2

theta0 are the backbone's weights as first loaded (saved once to MODEL_DIR/anchors.npz and read
back on resume, never the resumed weights). The alpha term runs over the backbone parameters
trainable in the current stage (a frozen parameter equals its anchor, so it adds nothing); the
beta term over the head's kernels. alpha = 0 is plain fine-tuning. Because the penalty already
pulls the backbone toward theta0, kft never adds weight decay on the same parameters.
"""

import keras
import numpy as np
import tensorflow as tf


def backbone_parameters(backbone: keras.Model) -> list:
    """Every parameter of the backbone, frozen or not (BatchNorm moving statistics excluded).

    Keras flips `variable.trainable` when a layer is frozen, so the variable's flag cannot
    tell a frozen parameter from a statistic; each layer's own list of trainable-kind
    variables can.
    """
    return [w for layer in backbone.layers for w in layer._trainable_variables]


def anchor_arrays(backbone: keras.Model) -> dict[str, np.ndarray]:
    """The backbone parameters as numpy arrays keyed by variable path (what anchors.npz holds)."""
    return {w.path: np.asarray(w.numpy()) for w in backbone_parameters(backbone)}


class L2SP:
    """Holds theta0 on the device and computes the penalty and per-block drift."""

    def __init__(
        self, backbone: keras.Model, head_kernels: list, anchors: dict[str, np.ndarray], alpha: float, beta: float
    ):
        params = backbone_parameters(backbone)
        missing = [w.path for w in params if w.path not in anchors]
        if missing:
            raise ValueError(
                f"anchors lack {len(missing)} backbone variables, e.g. {missing[0]}; delete MODEL_DIR/anchors.npz only if the run is to start over"
            )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.params = params
        self.head_kernels = list(head_kernels)
        # Non-trainable variables, not tracked by the model: they are never saved as weights
        # and never receive gradients.
        self.anchors = {
            w.path: tf.Variable(anchors[w.path], trainable=False, name="anchor", dtype=w.dtype) for w in params
        }

    def penalty(self, trainable_variables) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns (alpha term, beta term) as float32 scalars for the given trainable variables."""
        trainable = {id(v) for v in trainable_variables}
        sp = tf.constant(0.0)
        if self.alpha:
            terms = [
                tf.reduce_sum(tf.square(tf.cast(w.value, tf.float32) - tf.cast(self.anchors[w.path], tf.float32)))
                for w in self.params
                if id(w) in trainable
            ]
            if terms:
                sp = self.alpha * tf.add_n(terms)
        head = tf.constant(0.0)
        if self.beta:
            terms = [
                tf.reduce_sum(tf.square(tf.cast(k.value, tf.float32))) for k in self.head_kernels if id(k) in trainable
            ]
            if terms:
                head = self.beta * tf.add_n(terms)
        return sp, head


def drift(backbone: keras.Model, anchors: dict[str, np.ndarray], block_of: dict[str, str]) -> dict[str, float]:
    """||theta - theta0|| per block (numpy, for logging), given variable path -> block name."""
    sums: dict[str, float] = {}
    for w in backbone_parameters(backbone):
        block = block_of.get(w.path)
        if block is None or w.path not in anchors:
            continue
        diff = np.asarray(w.numpy(), np.float64) - np.asarray(anchors[w.path], np.float64)
        sums[block] = sums.get(block, 0.0) + float(np.sum(diff * diff))
    return {block: float(np.sqrt(s)) for block, s in sums.items()}
