"""L2-SP penalty mechanics: zero at the start, equal to numpy after a step, pulls toward theta0."""

import numpy as np
import pytest
import tensorflow as tf

from kft import finetuner, l2sp, model, schedule


# bn=train: a randomly initialized MobileNetV2's activations are ~1e-11 in inference mode, so
# with BatchNorm frozen its weights would barely move.
def _tuner(alpha, beta=0.0, stage="all:1@1e-2:bn=train"):
    keras_model = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3, dropout=0.0))
    anchors = l2sp.anchor_arrays(keras_model.backbone)
    penalty = l2sp.L2SP(keras_model.backbone, [keras_model.classify.kernel], anchors, alpha, beta)
    from kft import backbones

    blocks = backbones.blocks(keras_model.spec, keras_model.backbone)
    tuner = finetuner.FineTuner(keras_model, None, penalty)
    stage = schedule.parse_stages(stage)[0]
    finetuner.prepare_stage(tuner, blocks, stage, 1e-2, optimizer="sgd", precision="none", jit_compile=False)
    return tuner, anchors


def _numpy_penalty(tuner, anchors, alpha, beta):
    trainable = {id(v) for v in tuner.trainable_variables}
    sp = sum(
        np.sum((np.asarray(w.numpy(), np.float64) - anchors[w.path]) ** 2)
        for w in l2sp.backbone_parameters(tuner.classifier.backbone)
        if id(w) in trainable
    )
    head = np.sum(np.asarray(tuner.classifier.classify.kernel.numpy(), np.float64) ** 2)
    return alpha * sp, beta * head


def test_penalty_zero_at_start_and_matches_numpy_after_steps(tiny_splits):
    alpha, beta = 0.05, 0.01
    tuner, anchors = _tuner(alpha, beta)
    sp, head = tuner.penalty.penalty(tuner.trainable_variables)
    assert float(sp) == 0.0
    assert float(head) == pytest.approx(_numpy_penalty(tuner, anchors, alpha, beta)[1], rel=1e-5)
    tuner.fit(tiny_splits.train.take(2), epochs=1, verbose=0)
    sp, head = tuner.penalty.penalty(tuner.trainable_variables)
    expected_sp, expected_head = _numpy_penalty(tuner, anchors, alpha, beta)
    assert expected_sp > 0
    assert float(sp) == pytest.approx(expected_sp, rel=1e-4)
    assert float(head) == pytest.approx(expected_head, rel=1e-4)


def test_penalty_ignores_frozen_blocks(tiny_splits):
    tuner, anchors = _tuner(1.0, stage="top1:1@1e-2")
    trainable = {id(v) for v in tuner.trainable_variables}
    counted = [w for w in l2sp.backbone_parameters(tuner.classifier.backbone) if id(w) in trainable]
    assert 0 < len(counted) < len(l2sp.backbone_parameters(tuner.classifier.backbone))
    tuner.fit(tiny_splits.train.take(2), epochs=1, verbose=0)
    expected, _ = _numpy_penalty(tuner, anchors, 1.0, 0.0)
    assert float(tuner.penalty.penalty(tuner.trainable_variables)[0]) == pytest.approx(expected, rel=1e-4)


def test_large_alpha_keeps_weights_closer_to_theta0(tiny_splits):
    drifts = {}
    for alpha in (0.0, 20.0):
        tf.keras.utils.set_random_seed(0)
        tuner, anchors = _tuner(alpha)
        tuner.fit(tiny_splits.train.repeat(3), epochs=1, verbose=0)
        backbone = tuner.classifier.backbone
        drifts[alpha] = l2sp.drift(backbone, anchors, {w.path: "all" for w in l2sp.backbone_parameters(backbone)})[
            "all"
        ]
    assert drifts[0.0] > 0
    assert drifts[20.0] < 0.7 * drifts[0.0], drifts


def test_anchors_must_cover_the_backbone():
    keras_model = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(2))
    anchors = l2sp.anchor_arrays(keras_model.backbone)
    anchors.pop(next(iter(anchors)))
    with pytest.raises(ValueError, match="anchors lack 1 backbone variables"):
        l2sp.L2SP(keras_model.backbone, [], anchors, 0.1, 0.0)
