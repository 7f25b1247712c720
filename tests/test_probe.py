"""The linear probe: the fitted head equals scikit-learn's model on standardized features, C is
chosen where it should be and never above 0.1 (which bounds the head), a near-constant feature
cannot get a huge raw weight, and the binary and missing-class cases map onto a softmax head."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from kft import features, probe


def _blobs(n_per_class, num_classes, dim=16, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + rng.normal(0, spread, size=(len(y), dim))
    # Uneven feature scales and offsets, as pooled ReLU features have; one dead feature.
    x = x * rng.uniform(0.1, 10, size=dim) + rng.uniform(0, 5, size=dim)
    x[:, 0] = 0.0
    return x.astype(np.float32), y


def _record_fits(monkeypatch, measure) -> list:
    """Records measure(x, y) for every logistic-regression fit the probe makes, in order."""
    seen = []
    real = probe._fit_quietly

    def record(model, x, y):
        seen.append(measure(x, y))
        return real(model, x, y)

    monkeypatch.setattr(probe, "_fit_quietly", record)
    return seen


def _standard_deviations(x):
    """x's per-feature standard deviations as the probe divides by them: at least a tenth of
    their root mean square."""
    std = x.std(0)
    return np.maximum(std, 0.1 * np.sqrt(np.mean(std**2)))


def _scaled(x, *others):
    """x and others standardized with x's mean and standard deviations (the probe's)."""
    mean, std = x.mean(0), _standard_deviations(x)
    return [(a - mean) / std for a in (x, *others)]


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_head_reproduces_sklearn_on_scaled_features():
    x, y = _blobs(20, 4)
    fitted = probe.fit(x, y, 4, val_x=x[::2], val_y=y[::2])
    assert fitted.chosen_by == "validation" and fitted.c in probe.C_GRID
    test_x, _ = _blobs(5, 4, seed=1)
    scaled_x, scaled_test = _scaled(x, test_x)
    reference = LogisticRegression(C=fitted.c, max_iter=probe.MAX_ITER, tol=1e-4).fit(scaled_x, y)
    ours = _softmax(test_x @ fitted.kernel + fitted.bias)
    np.testing.assert_allclose(ours, reference.predict_proba(scaled_test), atol=1e-4)
    assert fitted.kernel.shape == (16, 4) and fitted.kernel.dtype == np.float32


def test_separable_classes_are_learned_with_cross_validation():
    x, y = _blobs(6, 5, spread=0.3)
    fitted = probe.fit(x, y, 5)
    assert fitted.chosen_by.startswith("3-fold cross-validation")
    assert probe.accuracy(fitted, x, y) == 1.0
    held_out_x, held_out_y = _blobs(6, 5, spread=0.3, seed=0)
    assert probe.accuracy(fitted, held_out_x, held_out_y) == 1.0


def test_validation_picks_the_c_that_scores_best_there():
    # Noisy labels in training: strong regularization generalizes, weak memorizes noise.
    x, y = _blobs(40, 3, spread=4.0, seed=3)
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.3
    noisy[flip] = rng.integers(0, 3, flip.sum())
    val_x, val_y = _blobs(200, 3, spread=4.0, seed=3)
    fitted = probe.fit(x, noisy, 3, val_x=val_x, val_y=val_y)
    best = max(probe.C_GRID, key=lambda c: _val_score(x, noisy, val_x, val_y, c))
    assert fitted.c == best


def _val_score(x, y, val_x, val_y, c):
    scaled_x, scaled_val = _scaled(x, val_x)
    model = LogisticRegression(C=c, max_iter=probe.MAX_ITER, tol=1e-4).fit(scaled_x, y)
    # Ties go to the smaller C, as probe does: subtract a tiny amount per grid position.
    return np.mean(model.predict(scaled_val) == val_y) - 1e-9 * probe.C_GRID.index(c)


def _nuisance_task(n_per_class, seed):
    """3 classes told apart only by feature 1 minus feature 2, which share a nuisance 100x larger
    than the class offsets: weak L2 (large C) buys a little accuracy with very large weights."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    nuisance = rng.normal(0, 10, size=len(y))
    x = rng.normal(0, 1, size=(len(y), 8))
    x[:, 0] = 0.0
    x[:, 1] = nuisance + 0.5 * (y - 1) + rng.normal(0, 0.1, size=len(y))
    x[:, 2] = nuisance + rng.normal(0, 0.1, size=len(y))
    return x.astype(np.float32), y


def test_c_is_capped_so_the_head_stays_bounded(monkeypatch):
    # At the optimum ||W||^2 / 2 + C * loss <= C * loss(W = 0) = C * n * log(K), so C <= 0.1
    # bounds the head's weights on the standardized features. A larger head swings its logits
    # when augmented images move a feature that barely varied on the clean ones.
    x, y = _nuisance_task(20, seed=1)
    bound = 0.1 * len(y) * np.log(3)

    def half_squared_norm(fitted):
        return 0.5 * np.sum((fitted.kernel * _standard_deviations(x)[:, None]) ** 2)

    # These data need the cap: with C up to 10, cross-validation picks a C above 0.1 whose head
    # breaks the bound.
    with monkeypatch.context() as patched:
        patched.setattr(probe, "C_GRID", probe.C_GRID + (1.0, 10.0))
        uncapped = probe.fit(x, y, 3)
    assert uncapped.c > 0.1 and half_squared_norm(uncapped) > bound
    fitted = probe.fit(x, y, 3)
    assert fitted.c <= 0.1
    assert half_squared_norm(fitted) <= bound


def _near_constant_feature_task(seed=0):
    """2 classes, 5 images each, with ordinary features that barely tell them apart and one
    feature that tells them apart perfectly while varying a thousandth as much as the others."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(2), 5)
    x = rng.normal(0, 1, size=(len(y), 32)) + 0.3 * y[:, None]
    x[:, 0] = 1e-3 * (y - 0.5) + rng.normal(0, 1e-4, size=len(y))
    return x.astype(np.float32), y


def test_a_near_constant_feature_cannot_get_a_huge_raw_weight(monkeypatch):
    # The cap bounds the weights on standardized features; the fine-tune sees the raw ones,
    # weight / scale. Flooring each feature's scale at a tenth of the RMS standard deviation
    # bounds a raw weight at 10 / RMS times its standardized weight.
    x, y = _near_constant_feature_task()
    rms = np.sqrt(np.mean(x.std(0) ** 2))
    bound = 10 / rms * np.sqrt(2 * 0.1 * len(y) * np.log(2))
    # The premise: dividing by the feature's own spread puts a huge raw weight on it.
    with monkeypatch.context() as patched:
        patched.setattr(probe, "MIN_SCALE_OF_RMS", 0.0)
        unfloored = probe.fit(x, y, 2)
    assert np.abs(unfloored.kernel[0]).max() > 10 * bound
    fitted = probe.fit(x, y, 2)
    assert np.abs(fitted.kernel).max() <= bound
    assert probe.accuracy(fitted, x, y) == 1.0


def test_binary_and_missing_classes_map_onto_a_softmax_head():
    x, y = _blobs(10, 2)
    y = np.where(y == 1, 2, 0)  # Classes 0 and 2 of 3; class 1 has no training image.
    fitted = probe.fit(x, y, 3)
    probs = _softmax(x @ fitted.kernel + fitted.bias)
    assert probs[:, 1].max() < 1e-6
    (scaled_x,) = _scaled(x)
    reference = LogisticRegression(C=fitted.c, max_iter=probe.MAX_ITER, tol=1e-4).fit(scaled_x, y)
    np.testing.assert_allclose(probs[:, [0, 2]], reference.predict_proba(scaled_x), atol=1e-4)


def test_one_image_per_class_falls_back_to_a_fixed_c():
    x, y = _blobs(1, 4)
    fitted = probe.fit(x, y, 4)
    assert fitted.c == max(probe.C_GRID) and fitted.chosen_by.startswith("default")
    assert probe.accuracy(fitted, x, y) == 1.0


@pytest.mark.parametrize("limit", [30])
def test_selection_subsamples_big_sets(monkeypatch, limit):
    monkeypatch.setattr(probe, "SELECTION_SUBSAMPLE", limit)
    seen = _record_fits(monkeypatch, lambda x, y: len(y))
    x, y = _blobs(25, 4)
    fitted = probe.fit(x, y, 4, val_x=x, val_y=y)
    # Selection on the subsample; the final fit on every image, from the subsample's fit for C.
    assert seen == [limit] * (len(probe.C_GRID) + 1) + [len(y)]
    reference = LogisticRegression(C=fitted.c, max_iter=probe.MAX_ITER, tol=1e-4)
    (scaled_x,) = _scaled(x)
    reference.fit(scaled_x, y)
    np.testing.assert_allclose(_softmax(x @ fitted.kernel + fitted.bias), reference.predict_proba(scaled_x), atol=0.02)


def test_a_subsample_without_every_class_gives_a_final_fit_from_zero(monkeypatch):
    monkeypatch.setattr(probe, "SELECTION_SUBSAMPLE", 10)
    x, y = _blobs(30, 3)
    x, y = np.concatenate([x, x[:1] + 5 * x.std(0)]), np.concatenate([y, [3]])  # Class 3: one image.
    assert 3 not in probe._subsample(x, y, 10, seed=0)[1]
    seen = _record_fits(monkeypatch, lambda x, y: len(y))
    fitted = probe.fit(x, y, 4, val_x=x, val_y=y)
    assert seen == [10] * len(probe.C_GRID) + [len(y)]
    assert probe.accuracy(fitted, x[-1:], y[-1:]) == 1.0


def test_every_fit_runs_on_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads(x, y):
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    seen = _record_fits(monkeypatch, blas_threads)
    x, y = _blobs(6, 3)
    probe.fit(x, y, 3)
    assert len(seen) == 3 * len(probe.C_GRID) + 1 and all(threads == {1} for threads in seen)


@pytest.mark.parametrize("image_size, expected", [(224, 64), (32, 512), (96, 256), (512, 8), (2048, 8)])
def test_feature_batch_keeps_the_pixels_of_64_images_at_224(image_size, expected):
    assert features.feature_batch_size(image_size) == expected


def test_rebatched_feature_pass_gives_the_same_features_in_the_same_order():
    import tensorflow as tf

    class Pool:  # Stands in for the classifier: features are each image's channel means.
        def features(self, images, training=False):
            return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])

    images = np.random.default_rng(0).integers(0, 255, size=(21, 4, 4, 3)).astype(np.uint8)
    labels = np.arange(21) % 3
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    as_batched = features.features_of(Pool(), dataset)
    rebatched = features.features_of(Pool(), dataset, batch_size=16)
    np.testing.assert_allclose(rebatched[0], as_batched[0], rtol=1e-6)
    np.testing.assert_array_equal(rebatched[1], labels)
