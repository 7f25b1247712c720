"""DELTA and BSS penalties against direct numpy computations on a tiny batch."""

import numpy as np
import pytest
import tensorflow as tf

from kft import backbones, l2sp, model, regularizers, schedule, trainer
from kft.config import Config


def _classifier():
    tf.keras.utils.set_random_seed(0)
    return model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3, dropout=0.0))


def test_bss_is_the_smallest_squared_singular_values():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 10)).astype(np.float32)
    singular = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    for k in (1, 2):
        value = regularizers.BatchSpectralShrinkage(0.3, k)(tf.constant(features))
        assert float(value) == pytest.approx(0.3 * np.sum(np.sort(singular)[:k] ** 2), rel=1e-4)


def test_delta_is_zero_at_start_and_matches_numpy_after_change(tiny_splits):
    classifier = _classifier()
    anchors = l2sp.anchor_arrays(classifier.backbone)
    delta = regularizers.Delta(classifier.backbone, anchors, alpha=0.5)
    assert not delta.reference.trainable_weights
    images = next(iter(tiny_splits.train))[0][:4]
    pre, fmap, _, _ = classifier.forward_parts(images)
    assert float(delta(pre, fmap)) == 0.0
    kernel = classifier.backbone.get_layer("Conv_1").kernel
    kernel.assign(kernel.numpy() * 1.5)
    pre, fmap, _, _ = classifier.forward_parts(images)
    reference = delta.reference(pre, training=False).numpy().astype(np.float64)
    diff = fmap.numpy().astype(np.float64) - reference
    expected = 0.5 * np.mean(np.sum(diff**2, axis=(1, 2, 3)) / (diff.shape[1] * diff.shape[2]))
    assert expected > 0
    assert float(delta(pre, fmap)) == pytest.approx(expected, rel=1e-4)
    # The reference kept the pretrained weights.
    np.testing.assert_array_equal(delta.reference.get_layer("Conv_1").kernel.numpy(), anchors[kernel.path])


@pytest.mark.parametrize("kind", ["delta", "bss"])
def test_regularizer_enters_the_training_loss(tiny_splits, kind):
    classifier = _classifier()
    config = Config(dataset="x", backbone="MobileNetV2", stages=(), model_dir="", regularizer=kind,
                    delta_alpha=0.1, bss_eta=0.1, l2sp_beta=0.0)
    penalty, feature_regularizer = trainer.make_regularizers(config, classifier, l2sp.anchor_arrays(classifier.backbone))
    assert penalty is None  # alpha of L2-SP is off when another regularizer is chosen
    blocks = backbones.blocks(classifier.spec, classifier.backbone)
    trainer.apply_stage(classifier, blocks, schedule.parse_stages("all:1@1e-2")[0])
    tuner = trainer.FineTuner(classifier, None, None, feature_regularizer=feature_regularizer)
    tuner.compile(optimizer=trainer.make_optimizer("adam", 1e-2, "none"), jit_compile=False)
    images, labels = next(iter(tiny_splits.train))
    logs = tuner.train_on_batch(images, labels, return_dict=True)
    logs = tuner.train_on_batch(images, labels, return_dict=True)
    assert logs["feature_reg"] > 0
    assert logs["loss"] > logs["feature_reg"]
