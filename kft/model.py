"""The fine-tuning model: images 0..255 -> resize + backbone preprocessing -> backbone -> new head.

The model takes raw pixel values (uint8 or float in 0..255) of any height and width; resizing
and the backbone's own preprocessing are inside it, so the exported SavedModel takes raw images.

Fine-tuning rules written into the code (keras-io transfer-learning guide):
- The backbone is called with training=False unless the current stage says `bn=train`, so
  BatchNorm keeps its pretrained statistics and dropout inside the backbone is off.
- Changing `trainable` only takes effect after the model is compiled again.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from kft import backbones, data

# The symmetries a model may average its predictions over (--test_views).
TEST_VIEWS = ("flip", "rot90")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The new classification head.

    Attributes:
      num_classes: number of output classes.
      dropout: dropout rate before the last dense layer.
      hidden_units: width of an optional hidden dense layer (0 = none).
    """

    num_classes: int
    dropout: float = 0.2
    hidden_units: int = 0


@keras.saving.register_keras_serializable("kft")
class Preprocess(keras.layers.Layer):
    """Casts to float32, resizes to the backbone's input size with `kft.data.resize_images` (the
    resize of the data pipelines, so served full-size photos get the numbers kft.evaluate
    reports) and applies the backbone's preprocessing."""

    def __init__(self, backbone_name: str, image_size: int, **kwargs):
        super().__init__(**kwargs)
        self.backbone_name = backbone_name
        self.image_size = image_size
        self._preprocess = backbones.get(backbone_name).preprocess

    def call(self, images):
        # Preprocessing runs in float32 whatever the mixed-precision policy: pixel means and
        # scales lose precision in bfloat16.
        return self._preprocess(data.resize_images(images, self.image_size))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "backbone_name": self.backbone_name, "image_size": self.image_size}


class Classifier(keras.Model):
    """Backbone plus new head. Training logic lives in `kft.finetuner.FineTuner`, which wraps it."""

    def __init__(
        self, spec: backbones.BackboneSpec, backbone: keras.Model, head: HeadConfig, image_size: int, **kwargs
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.head_config = head
        self.image_size = image_size
        self.preprocess = Preprocess(spec.name, image_size, name="preprocess", dtype="float32")
        self.backbone = backbone
        # Set per stage by kft.finetuner.apply_stage; read when the step function is traced,
        # which is why a stage change recompiles.
        self.backbone_training = False
        # Symmetries a finished model averages its predictions over (kft.runfiles.load_classifier
        # sets them from --test_views); training and validation always see one view.
        self.test_views: tuple[str, ...] = ()
        self.pool = keras.layers.GlobalAveragePooling2D(name="head_pool")
        self.dropout = keras.layers.Dropout(head.dropout, name="head_dropout")
        self.hidden = (
            keras.layers.Dense(head.hidden_units, activation="relu", name="head_hidden") if head.hidden_units else None
        )
        # The classifier stays float32 under mixed precision so the softmax is stable.
        self.classify = keras.layers.Dense(head.num_classes, activation="softmax", dtype="float32", name="head_logits")

    @property
    def head_layers(self) -> list:
        return [layer for layer in (self.hidden, self.classify) if layer is not None]

    def feature_map(self, images, training=False):
        """The backbone's last feature map [B, h, w, C] of raw images."""
        x = self.preprocess(images)
        return self.backbone(x, training=bool(training) and self.backbone_training)

    def features(self, images, training=False):
        """Pooled backbone features of raw images."""
        return self.pool(self.feature_map(images, training=training))

    def head(self, features, training=False):
        """Class probabilities from pooled features."""
        x = self.dropout(features, training=training)
        if self.hidden is not None:
            x = self.hidden(x)
        return self.classify(x)

    def forward_parts(self, images, training=False):
        """(preprocessed images, last feature map, pooled features, probabilities)."""
        preprocessed = self.preprocess(images)
        feature_map = self.backbone(preprocessed, training=bool(training) and self.backbone_training)
        pooled = self.pool(feature_map)
        return preprocessed, feature_map, pooled, self.head(pooled, training=training)

    def call(self, images, training=False):
        if training or not self.test_views:
            return self.forward_parts(images, training=training)[-1]
        # Test-time augmentation: the mean probability over the symmetries the model trained
        # with, taken after the resize so that every view is square. One view at a time: an
        # 8x batch would need 8x the memory.
        views = _views(self.preprocess(images), self.test_views)
        total = 0.0
        for view in views:
            total += self.head(self.pool(self.backbone(view, training=False)), training=False)
        return total / len(views)


def parse_test_views(spec: str) -> tuple[str, ...]:
    """Parses --test_views: a comma list from TEST_VIEWS, or "none" (or "") for one view.

    Raises:
      ValueError: an unknown or repeated name, naming it and the allowed ones (one line).
    """
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    if names in ([], ["none"]):
        return ()
    for name in names:
        if name not in TEST_VIEWS or names.count(name) > 1:
            what = "repeats" if name in TEST_VIEWS else "has"
            raise ValueError(
                f"--test_views={spec!r} {what} {name!r}; allowed: none, or a comma list from {', '.join(TEST_VIEWS)}"
            )
    return tuple(name for name in TEST_VIEWS if name in names)


def view_count(test_views: tuple[str, ...]) -> int:
    """How many forward passes a prediction takes: 2 with flip, 4 with rot90, 8 with both."""
    return (2 if "flip" in test_views else 1) * (4 if "rot90" in test_views else 1)


def _views(images, test_views: tuple[str, ...]) -> list:
    """Square images [B, S, S, C] as the views test_views names: itself, quarter turns, mirrors."""
    views = [images]
    if "rot90" in test_views:
        views = [tf.image.rot90(images, k) for k in range(4)]
    if "flip" in test_views:
        views += [tf.reverse(view, axis=[2]) for view in views]  # [B, H, W, C]: W is axis 2.
    return views


def build_classifier(
    backbone_name: str,
    image_size: int,
    weights: str | None,
    head: HeadConfig,
) -> Classifier:
    """Builds the backbone (from ImageNet, nothing, or a kft weights file) and a new head.

    Args:
      backbone_name: a keras.applications class name.
      image_size: square input size of the backbone.
      weights: "imagenet", None (random init), or a path to `backbone.weights.h5` written by kft.
      head: the head configuration.

    Returns:
      A built Classifier.
    """
    from kft import checkpoint  # Imported here: checkpoint imports model for its checks.

    spec = backbones.get(backbone_name)
    keras_weights = "imagenet" if weights == "imagenet" else None
    backbone = backbones.build(spec, image_size, keras_weights)
    if weights not in (None, "imagenet"):
        checkpoint.load_backbone_weights(backbone, spec.name, image_size, weights)
    classifier = Classifier(spec, backbone, head, image_size, name=f"kft_{spec.name}")
    classifier(tf.zeros((1, image_size, image_size, 3), tf.uint8))
    return classifier


def predict_dataset(classifier: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over a whole (images, labels) dataset."""
    labels, probs = [], []
    for images, batch_labels in dataset:
        probs.append(np.asarray(classifier(images, training=False)))
        labels.append(np.asarray(batch_labels))
    return np.concatenate(labels), np.concatenate(probs)
