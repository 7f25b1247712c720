"""DELTA and BSS penalties against direct numpy computations on a tiny batch."""

import numpy as np
import pytest
import tensorflow as tf

from kft import backbones, finetuner, l2sp, model, regularizers, schedule, trainer
from kft.config import Config


def _classifier(backbone="MobileNetV2"):
    tf.keras.utils.set_random_seed(0)
    return model.build_classifier(backbone, 32, None, model.HeadConfig(3, dropout=0.0))


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
    config = Config(
        dataset="x",
        backbone="MobileNetV2",
        stages=(),
        model_dir="",
        regularizer=kind,
        delta_alpha=0.1,
        bss_eta=0.1,
        l2sp_beta=0.0,
    )
    penalty, feature_regularizer = finetuner.make_regularizers(
        config, classifier, l2sp.anchor_arrays(classifier.backbone)
    )
    assert penalty is None  # alpha of L2-SP is off when another regularizer is chosen
    blocks = backbones.blocks(classifier.spec, classifier.backbone)
    tuner = finetuner.FineTuner(classifier, None, None, feature_regularizer=feature_regularizer)
    stage = schedule.parse_stages("all:1@1e-2")[0]
    finetuner.prepare_stage(tuner, blocks, stage, 1e-2, optimizer="adam", precision="none", jit_compile=False)
    images, labels = next(iter(tiny_splits.train))
    logs = tuner.train_on_batch(images, labels, return_dict=True)
    logs = tuner.train_on_batch(images, labels, return_dict=True)
    assert logs["feature_reg"] > 0
    assert logs["loss"] > logs["feature_reg"]


def test_delta_channel_weights_weight_each_channel_as_numpy(tiny_splits):
    classifier = _classifier("VGG16")  # randomly initialized MobileNetV2 features are ~1e-11
    anchors = l2sp.anchor_arrays(classifier.backbone)
    delta = regularizers.Delta(classifier.backbone, anchors, alpha=0.5, weighting="attention")
    kernel = classifier.backbone.get_layer("block5_conv3").kernel
    kernel.assign(kernel.numpy() * 1.5)
    images = next(iter(tiny_splits.train))[0][:4]
    pre, fmap, _, _ = classifier.forward_parts(images)
    diff = fmap.numpy().astype(np.float64) - delta.reference(pre, training=False).numpy().astype(np.float64)
    plain = float(delta(pre, fmap))
    weights = np.random.default_rng(0).uniform(0.0, 2.0, size=diff.shape[-1]).astype(np.float32)
    delta.set_channel_weights(weights)
    per_channel = np.sum(diff**2, axis=(1, 2)) / (diff.shape[1] * diff.shape[2])  # [B, C]
    expected = 0.5 * np.mean(np.sum(per_channel * weights, axis=1))
    assert float(delta(pre, fmap)) == pytest.approx(expected, rel=1e-4)
    assert expected != pytest.approx(plain, rel=1e-2)
    # Uniform attention is the plain form.
    delta.set_channel_weights(regularizers.attention_from_increase(np.full(diff.shape[-1], 0.3)))
    assert float(delta(pre, fmap)) == pytest.approx(plain, rel=1e-5)


def test_attention_is_c_times_softmax_of_standardized_increase():
    increase = np.array([0.0, 0.1, 0.4, -0.2, 0.1])
    z = (increase - increase.mean()) / increase.std()
    expected = 5 * np.exp(z / 5) / np.exp(z / 5).sum()
    weights = regularizers.attention_from_increase(increase)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.sum() == pytest.approx(5.0)
    assert np.argmax(weights) == 2  # the channel whose removal hurts most is held closest


def test_loss_increase_matches_zeroing_each_feature_map_channel(tiny_splits):
    classifier = _classifier("VGG16")  # randomly initialized MobileNetV2 features are ~1e-11
    delta = regularizers.Delta(classifier.backbone, l2sp.anchor_arrays(classifier.backbone), 1.0, "attention")
    # The classifier's own backbone drifts away: attention must use the pretrained one.
    kernel = classifier.backbone.get_layer("block5_conv3").kernel
    kernel.assign(kernel.numpy() * 3.0)
    batches = list(tiny_splits.train.take(2))
    increase = regularizers.loss_increase(delta, classifier, batches, chunk=100)
    assert increase.shape == (512,)

    def loss(fmap, labels):
        probs = classifier.head(classifier.pool(fmap)).numpy().astype(np.float64)
        return -np.mean(np.log(probs[np.arange(len(labels)), labels]))

    rng = np.random.default_rng(0)
    for channel in rng.choice(512, size=6, replace=False):
        per_batch = []
        for images, labels in batches:
            fmap = delta.reference(classifier.preprocess(images), training=False).numpy()
            zeroed = fmap.copy()
            zeroed[..., channel] = 0.0
            per_batch.append(loss(zeroed, labels.numpy()) - loss(fmap, labels.numpy()))
        assert increase[channel] == pytest.approx(np.mean(per_batch), abs=1e-6, rel=1e-3)
    assert np.std(increase) > 0


def _delta_config(model_dir):
    return Config(
        dataset="unused",
        backbone="VGG16",
        weights=None,
        image_size=32,
        batch_size=8,
        stages=schedule.parse_stages("head:1@1e-2,all:1@1e-4"),
        model_dir=str(model_dir),
        regularizer="delta",
        delta_alpha=1.0,
        delta_attention_batches=2,
        augment=(),
        verbose=0,
    )


def test_train_computes_delta_attention_when_the_backbone_unfreezes(tmp_path, tiny_splits, monkeypatch):
    seen = {}
    original = regularizers.loss_increase

    def spy(delta, classifier, batches, **kwargs):
        # The head has trained for one stage; the backbone is still the pretrained one.
        seen["head"] = classifier.classify.kernel.numpy().copy()
        return original(delta, classifier, batches, **kwargs)

    monkeypatch.setattr(regularizers, "loss_increase", spy)
    tf.keras.utils.set_random_seed(0)
    initial_head = model.build_classifier("VGG16", 32, None, model.HeadConfig(3)).classify.kernel.numpy()
    metrics = trainer.train(_delta_config(tmp_path), tiny_splits)
    assert not np.array_equal(seen["head"], initial_head)
    weights = np.load(tmp_path / "delta_attention.npz")["channel_weights"]
    assert weights.shape == (512,) and weights.sum() == pytest.approx(512, rel=1e-4)
    assert weights.std() > 0
    assert [s["epochs"] for s in metrics["stages"]] == [1, 1]


def test_resumed_run_reads_delta_attention_back(tmp_path, tiny_splits, monkeypatch):
    weights = np.linspace(0.5, 1.5, 512).astype(np.float32)
    np.savez(tmp_path / "delta_attention.npz", channel_weights=weights)

    def fail(*args, **kwargs):
        raise AssertionError("attention was recomputed")

    monkeypatch.setattr(regularizers, "loss_increase", fail)
    trainer.train(_delta_config(tmp_path), tiny_splits)
    np.testing.assert_array_equal(np.load(tmp_path / "delta_attention.npz")["channel_weights"], weights)


@pytest.mark.parametrize("kind", ["l2sp", "delta", "bss"])
def test_source_task_and_scratch_baseline_train_unregularized(kind):
    """Neither has a pretrained start to stay close to: with any --regularizer, neither the
    L2-SP alpha term nor a feature regularizer pulls them toward their own random init."""
    from kft import experiment

    config = Config(
        dataset="folder:/t",
        backbone="MobileNetV2",
        stages=schedule.parse_stages("all:1@1e-3"),
        model_dir="/run",
        regularizer=kind,
        l2sp_alpha=0.5,
        delta_alpha=0.1,
        bss_eta=0.1,
        l2sp_beta=0.0,
        pretrain_dataset="folder:/s",
        pretrain_stages=schedule.parse_stages("all:2@1e-3:bn=train"),
        compare_scratch=True,
    )
    classifier = _classifier()
    anchors = l2sp.anchor_arrays(classifier.backbone)
    assert finetuner.make_regularizers(config, classifier, anchors) != (None, None)  # the fine-tune is
    for derived in (experiment.source_config(config, "/run/pretrain"), experiment.scratch_config(config)):
        assert finetuner.make_regularizers(derived, classifier, anchors) == (None, None)
    assert experiment.scratch_config(config).model_dir == "/run/scratch"
    assert experiment.scratch_config(config).weights is None


# ----------------------------------------------------------------------------------------------
# The registry of --regularizer choices.


def test_every_regularizer_flag_value_is_a_registered_class_with_its_strength():
    assert list(regularizers.REGISTRY) == ["l2sp", "none", "delta", "bss"]
    assert {name: regularizers.strength_field(name) for name in regularizers.REGISTRY} == {
        "l2sp": "l2sp_alpha",
        "none": None,
        "delta": "delta_alpha",
        "bss": "bss_eta",
    }
    for name, choice in regularizers.REGISTRY.items():
        assert choice.name == name
        if choice.strength_field:
            assert hasattr(Config, choice.strength_field)  # a Config field kft.tune can set
    with pytest.raises(ValueError, match=r"--regularizer='l3sp': unknown; choose from bss, delta, l2sp, none"):
        regularizers.get("l3sp")


def test_registering_a_name_twice_raises_and_keeps_the_first():
    with pytest.raises(ValueError, match="'bss' is registered twice"):

        @regularizers.register("bss")
        class Another(regularizers.Regularizer):
            pass

    assert regularizers.get("bss") is regularizers.BatchSpectralShrinkage


def test_a_new_regularizer_is_one_registered_class(tiny_splits):
    """Registered, it is a --regularizer value whose term the train step adds."""

    class MeanSquare(regularizers.Regularizer):
        strength_field = "bss_eta"

        @classmethod
        def from_config(cls, config, backbone, anchors):
            return cls()

        def step_penalty(self, preprocessed, feature_map, pooled):
            return 1e-3 * tf.reduce_mean(tf.square(tf.cast(pooled, tf.float32)))

    regularizers.register("mean_square")(MeanSquare)
    try:
        classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
        config = Config(dataset="", backbone="MobileNetV2", stages=(), model_dir="", regularizer="mean_square")
        tuner = finetuner.make_finetuner(config, classifier, l2sp.anchor_arrays(classifier.backbone))
        blocks = backbones.blocks(classifier.spec, classifier.backbone)
        stage = schedule.parse_stages("all:1@1e-2")[0]
        finetuner.prepare_stage(tuner, blocks, stage, 1e-2, optimizer="adam", precision="none", jit_compile=False)
        images, labels = next(iter(tiny_splits.train))
        logs = tuner.train_on_batch(images, labels, return_dict=True)
        assert isinstance(tuner.feature_regularizer, MeanSquare) and logs["feature_reg"] > 0
        assert tuner.penalty.alpha == 0.0  # L2-SP's weight term is off: it does not pull weights
    finally:
        del regularizers.REGISTRY["mean_square"]
