"""Layer-wise learning rates and the weight EMA do exactly what they claim."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kft import backbones, finetuner, model, schedule, trainer
from kft.config import Config


def _tuner(decay=1.0, ema_decay=0.0, optimizer="adam", seed=0, backbone="MobileNetV2"):
    keras_seed = tf.keras.utils.set_random_seed(seed)
    del keras_seed
    classifier = model.build_classifier(backbone, 32, None, model.HeadConfig(3, dropout=0.0))
    blocks = backbones.blocks(classifier.spec, classifier.backbone)
    # bn=train: a randomly initialized MobileNetV2's activations are ~1e-11 in inference mode,
    # too small for its weights to move measurably with BatchNorm frozen.
    tuner = finetuner.FineTuner(classifier, None, None, ema_decay=ema_decay)
    finetuner.prepare_stage(
        tuner,
        blocks,
        schedule.parse_stages("all:1@1e-3:bn=train")[0],
        1e-3,
        optimizer=optimizer,
        precision="none",
        jit_compile=False,
        layer_lr_decay=decay,
    )
    return tuner, blocks


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_layer_decay_scales_each_blocks_step_by_its_depth(tiny_splits, optimizer):
    images, labels = next(iter(tiny_splits.train))
    plain, blocks = _tuner(1.0, optimizer=optimizer)
    decayed, decayed_blocks = _tuner(0.5, optimizer=optimizer)
    decayed.classifier.set_weights(plain.classifier.get_weights())
    start = [w.numpy().copy() for w in plain.classifier.weights]
    plain.train_on_batch(images, labels)
    decayed.train_on_batch(images, labels)
    index = {id(w): i for i, w in enumerate(decayed.classifier.weights)}
    plain_weights = plain.classifier.weights
    checked = set()
    for depth, block in enumerate(reversed(decayed_blocks)):
        for layer in block.layers:
            for w in layer.trainable_weights:
                i = index[id(w)]
                full = plain_weights[i].numpy() - start[i]
                step = w.numpy() - start[i]
                if np.abs(full).max() > 1e-6:
                    # Steps are differences of float32 weights: exact up to a few ulps of the weights.
                    ulp = float(np.spacing(np.abs(start[i]).max()))
                    np.testing.assert_allclose(step, 0.5**depth * full, rtol=1e-3, atol=4 * ulp, err_msg=w.path)
                    checked.add(depth)
    # Adam moves every parameter by about the learning rate, so every depth is measurable;
    # SGD's steps in the deep blocks of a random-init network fall below float32 resolution.
    assert len(checked) >= (5 if optimizer == "adam" else 2), checked
    # The head moves at the stage's full rate.
    head = decayed.classifier.classify.kernel
    np.testing.assert_allclose(head.numpy(), plain.classifier.classify.kernel.numpy(), rtol=1e-5, atol=1e-7)


def test_layer_lr_scales_follow_block_order():
    classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(2))
    blocks = backbones.blocks(classifier.spec, classifier.backbone)
    scales = finetuner.layer_lr_scales(blocks, 0.8)
    top = blocks[-1].layers[0].weights[0]
    bottom = [w for layer in blocks[0].layers for w in layer.weights][0]
    assert id(top) not in scales
    assert scales[id(bottom)] == pytest.approx(0.8 ** (len(blocks) - 1))
    assert finetuner.layer_lr_scales(blocks, 1.0) == {}


def test_ema_is_the_warmed_up_average_of_the_weights(tiny_splits):
    tuner, _ = _tuner(ema_decay=0.6)
    weight = tuner.classifier.classify.kernel
    average_index = [i for i, w in enumerate(tuner.averaged) if w is weight][0]
    expected = weight.numpy().astype(np.float64)
    for step, (images, labels) in enumerate(tiny_splits.train, start=1):
        tuner.train_on_batch(images, labels)
        decay = min(0.6, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * weight.numpy()
    np.testing.assert_allclose(tuner.ema_weights[average_index].numpy(), expected, rtol=1e-5, atol=1e-7)
    raw = weight.numpy().copy()
    tuner.swap_ema()
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-5, atol=1e-7)
    tuner.swap_ema()
    np.testing.assert_array_equal(weight.numpy(), raw)


def test_ema_skips_integer_variables(tiny_splits):
    # EfficientNet's Normalization layer holds an int64 sample count: averaging it failed the
    # first train step with a dtype error.
    tuner, _ = _tuner(ema_decay=0.9, backbone="EfficientNetB0")
    integers = [w for w in tuner.classifier.weights if not keras.backend.is_float_dtype(w.dtype)]
    assert integers and not {id(w) for w in integers} & {id(w) for w in tuner.averaged}
    assert len(tuner.averaged) == len(tuner.classifier.weights) - len(integers)
    images, labels = next(iter(tiny_splits.train))
    tuner.train_on_batch(images, labels)
    kernel = tuner.classifier.classify.kernel
    raw = kernel.numpy().copy()
    tuner.swap_ema()
    assert not np.array_equal(kernel.numpy(), raw)  # the average, one step behind the weights
    tuner.swap_ema()
    np.testing.assert_array_equal(kernel.numpy(), raw)


def test_train_with_ema_and_layer_decay_saves_the_averaged_model(tmp_path, tiny_splits):
    config = Config(
        dataset="unused",
        backbone="MobileNetV2",
        weights=None,
        image_size=32,
        batch_size=8,
        stages=schedule.parse_stages("head:1@1e-2,all:2@1e-3"),
        model_dir=str(tmp_path),
        ema_decay=0.9,
        layer_lr_decay=0.7,
        verbose=0,
        l2sp_alpha=0.0,
        augment=(),
    )
    metrics = trainer.train(config, tiny_splits)
    assert [s["epochs"] for s in metrics["stages"]] == [1, 2]
    best = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    best.load_weights(str(tmp_path / "model.weights.h5"))
    labels, probs = model.predict_dataset(best, tiny_splits.val)
    assert metrics["best_model_val_accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)))


def test_cached_features_step_equals_image_step(tiny_splits):
    images, labels = next(iter(tiny_splits.train))
    on_images, blocks = _tuner(seed=1)
    on_features, _ = _tuner(seed=1)
    on_features.classifier.set_weights(on_images.classifier.get_weights())
    for tuner in (on_images, on_features):
        finetuner.prepare_stage(
            tuner,
            blocks if tuner is on_images else backbones.blocks(tuner.classifier.spec, tuner.classifier.backbone),
            schedule.parse_stages("head:1@1e-2")[0],
            1e-2,
            optimizer="adam",
            precision="none",
            jit_compile=False,
        )
    on_features.on_features = True
    features = on_features.classifier.features(images, training=False)
    on_images.train_on_batch(images, labels)
    on_features.train_on_batch(features, labels)
    for a, b in zip(on_images.classifier.weights, on_features.classifier.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_train_with_cached_features_keeps_backbone_and_trains_head(tmp_path, tiny_splits):
    config = Config(
        dataset="unused",
        backbone="MobileNetV2",
        weights=None,
        image_size=32,
        batch_size=8,
        stages=schedule.parse_stages("head:3@1e-2"),
        model_dir=str(tmp_path),
        cache_features=True,
        augment=("flip",),
        verbose=0,
    )
    tf.keras.utils.set_random_seed(config.seed)  # trainer.train builds the same initial model
    start = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    metrics = trainer.train(config, tiny_splits)
    assert metrics["stages"][0]["epochs"] == 3
    trained = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    trained.load_weights(str(tmp_path / "model.weights.h5"))
    for w, w0 in zip(trained.backbone.weights, start.backbone.weights):
        np.testing.assert_array_equal(w.numpy(), w0.numpy(), err_msg=w.path)
    assert not np.array_equal(trained.classify.kernel.numpy(), start.classify.kernel.numpy())
