"""Feature-space regularizers toward the pretrained model, beside L2-SP (kft.l2sp).

From the Transfer-Learning-Library's benchmark set, selected with `--regularizer`:

DELTA (Li et al. 2019, "DELTA: Deep Learning Transfer using Feature Map with Attention"), on
the backbone's last feature map FM [B, h, w, C]::

    delta = alpha * mean_batch sum_c w_c * sum_{h,w} (FM_c(x; theta) - FM_c(x; theta0))^2 / (h * w)

where FM(.; theta0) is a frozen copy of the backbone as first loaded, run on the same
(augmented, preprocessed) batch in inference mode. Channel weights w_c:
- plain: w_c = 1.
- attention (the paper's supervised attention): w_c = C * softmax_c(z_c / 5), where z is the
  standardized mean increase of the cross-entropy when channel c of the pretrained backbone's
  feature map is zeroed, measured with the head trained so far (`channel_attention`). Channels
  the target task relies on are held close to the pretrained ones; the others may drift.
  Uniform attention gives back the plain form, so `--delta_alpha` means the same in both.
  (TLlib also multiplies by 1/2; kft leaves that in alpha.)

BSS (Chen et al. 2019, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral
Shrinkage"), on the pooled features F [B, D] of the batch::

    bss = eta * sum_{i=1..k} sigma_{-i}(F)^2

the squares of the k smallest singular values of F (k = 1 by default).

Both act only through the backbone: a head-only stage (or cached features) has nothing for
them to change.

Every `--regularizer` value is a class registered here (`register`, `REGISTRY`): it names the
Config field holding its strength (what kft.tune searches), whether L2-SP's weight term is on,
and builds the term the train step adds (`from_config`, `step_penalty`). A new regularizer is
one registered class.
"""

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

# TLlib's softmax temperature for DELTA's channel attention.
ATTENTION_TEMPERATURE = 5.0

# --regularizer value -> its class.
REGISTRY: dict[str, type["Regularizer"]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: makes the class the `--regularizer=NAME` choice."""

    def decorate(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"regularizer {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return decorate


def get(name: str) -> type["Regularizer"]:
    """The class registered as `name`.

    Raises:
      ValueError: an unknown name (one line listing the registered ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"--regularizer={name!r}: unknown; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def strength_field(name: str) -> str | None:
    """The Config field holding the strength of `--regularizer=name` (None: it has none)."""
    return get(name).strength_field


class Regularizer:
    """A `--regularizer` choice. Subclasses set the class attributes and, for a term on the
    features, `from_config` and `step_penalty`."""

    name = ""
    # The Config field holding the strength (kft.tune searches it); None: nothing to search.
    strength_field: str | None = None
    # Whether L2-SP's alpha term (backbone weights toward the pretrained ones) is on.
    pulls_weights = False

    @classmethod
    def from_config(cls, config, backbone: keras.Model, anchors: dict) -> "Regularizer | None":
        """The feature-space term the train step adds (None: weights only, or nothing)."""
        del config, backbone, anchors
        return None

    def step_penalty(self, preprocessed, feature_map, pooled) -> tf.Tensor:
        """The term's value on one batch's forward pass."""
        raise NotImplementedError


@register("l2sp")
class L2SPChoice(Regularizer):
    """L2-SP: the backbone's weights toward the pretrained ones (the penalty is kft.l2sp's)."""

    strength_field = "l2sp_alpha"
    pulls_weights = True


@register("none")
class NoRegularizer(Regularizer):
    """Plain fine-tuning (the head's --l2sp_beta still applies)."""


@register("delta")
class Delta(Regularizer):
    """DELTA: channel-weighted squared distance of the last feature map to the pretrained one."""

    strength_field = "delta_alpha"

    @classmethod
    def from_config(cls, config, backbone, anchors):
        return cls(backbone, anchors, config.delta_alpha, config.delta_weighting)

    def __init__(self, backbone: keras.Model, anchors: dict[str, np.ndarray], alpha: float, weighting: str = "plain"):
        self.alpha = float(alpha)
        self.weighting = weighting
        self.reference = keras.models.clone_model(backbone)
        for source, copy in zip(backbone.weights, self.reference.weights):
            value = anchors.get(source.path, source.numpy())
            copy.assign(value)
        self.reference.trainable = False
        # All ones is the plain form; the attention form replaces them once the head is trained
        # (set_channel_weights). A variable, so the compiled step need not be traced again.
        self.channel_weights = tf.Variable(
            tf.ones([backbone.output.shape[-1]]), trainable=False, name="delta_channel_weights"
        )
        self.attention_set = False

    def set_channel_weights(self, weights: np.ndarray) -> None:
        self.channel_weights.assign(np.asarray(weights, np.float32))
        self.attention_set = True

    def __call__(self, preprocessed, feature_map) -> tf.Tensor:
        reference = tf.stop_gradient(self.reference(preprocessed, training=False))
        diff = tf.cast(feature_map, tf.float32) - tf.cast(reference, tf.float32)
        spatial = tf.cast(tf.shape(diff)[1] * tf.shape(diff)[2], tf.float32)
        per_channel = tf.reduce_sum(tf.square(diff), axis=[1, 2]) / spatial  # [B, C]
        return self.alpha * tf.reduce_mean(tf.reduce_sum(per_channel * self.channel_weights, axis=1))

    def step_penalty(self, preprocessed, feature_map, pooled) -> tf.Tensor:
        return self(preprocessed, feature_map)

    def needs_attention(self) -> bool:
        """Whether the attention weights are still to be measured (kft.trainer does it when the
        backbone first unfreezes)."""
        return self.weighting == "attention" and not self.attention_set


def channel_attention(delta: Delta, classifier, batches) -> np.ndarray:
    """DELTA's channel weights (float32 [C], summing to C) from `loss_increase`."""
    return attention_from_increase(loss_increase(delta, classifier, batches))


def loss_increase(delta: Delta, classifier, batches, chunk: int = 64) -> np.ndarray:
    """How much zeroing each channel of the pretrained feature map raises the classifier's
    mean cross-entropy, averaged over `batches`.

    Zeroing a channel of the feature map zeroes the same channel of its global average, so
    the loss with channel c removed is the head applied to the pooled features with feature c
    set to 0: exact, and one head call per `chunk` channels instead of a backbone pass each.

    Args:
      delta: the regularizer (its `reference` is the pretrained backbone).
      classifier: a kft.model.Classifier whose head has been trained on the target data.
      batches: an iterable of (raw images, integer labels).
      chunk: channels masked per head call (bounds memory: chunk x batch x C floats).

    Returns:
      float64 [C] loss increases.
    """
    increase, count = None, 0
    for images, labels in batches:
        pooled = classifier.pool(delta.reference(classifier.preprocess(images), training=False))
        pooled = tf.cast(pooled, tf.float32)
        labels = tf.cast(labels, tf.int32)
        base = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, classifier.head(pooled)))
        channels = int(pooled.shape[-1])
        losses = []
        for start in range(0, channels, chunk):
            keep = 1.0 - tf.one_hot(tf.range(start, min(start + chunk, channels)), channels)  # [k, C]
            masked = pooled[None, :, :] * keep[:, None, :]  # [k, B, C]
            k, batch = int(keep.shape[0]), int(pooled.shape[0])
            probs = classifier.head(tf.reshape(masked, [k * batch, channels]))
            loss = keras.losses.sparse_categorical_crossentropy(tf.tile(labels, [k]), probs)
            losses.append(tf.reduce_mean(tf.reshape(loss, [k, batch]), axis=1))
        batch_increase = (tf.concat(losses, 0) - base).numpy().astype(np.float64)
        increase = batch_increase if increase is None else increase + batch_increase
        count += 1
    if not count:
        raise ValueError("DELTA attention needs at least one training batch")
    return increase / count


def attention_from_increase(increase: np.ndarray) -> np.ndarray:
    """C * softmax(standardized loss increase / temperature); uniform when all are equal."""
    std = increase.std()
    z = (increase - increase.mean()) / std if std > 0 else np.zeros_like(increase)
    e = np.exp((z - z.max()) / ATTENTION_TEMPERATURE)
    return (len(increase) * e / e.sum()).astype(np.float32)


@register("bss")
class BatchSpectralShrinkage(Regularizer):
    """BSS: the k smallest squared singular values of the batch's pooled features."""

    strength_field = "bss_eta"

    @classmethod
    def from_config(cls, config, backbone, anchors):
        return cls(config.bss_eta, config.bss_k)

    def __init__(self, eta: float, k: int = 1):
        self.eta = float(eta)
        self.k = int(k)

    def __call__(self, features) -> tf.Tensor:
        singular = tf.linalg.svd(tf.cast(features, tf.float32), compute_uv=False)  # descending
        return self.eta * tf.reduce_sum(tf.square(singular[-self.k :]))

    def step_penalty(self, preprocessed, feature_map, pooled) -> tf.Tensor:
        return self(pooled)
