"""The linear probe: the new head fitted on the frozen backbone's features (LP-FT's first step).

Kumar et al. (ICLR 2022) fit the head as a linear probe and fine-tune from it: a random head's
large early gradients distort the pretrained features before the head has learned anything.
kft fits a multinomial logistic regression (scikit-learn, L-BFGS, full batch) on the pooled
features of every training image, computed once in inference mode, and writes it into the
head's last dense layer. The features are standardized feature by feature, each feature's scale
floored at a tenth of the features' RMS standard deviation, and C (inverse L2 strength) is at
most 0.1. The fine-tune sees the raw features, and a weight w on a standardized feature is w /
scale on the raw one: an uncapped C, or a feature that barely varies over a few clean training
images, gives raw weights in the hundreds, which the fine-tune's cropped and flipped images then
swing. One fine-tune from a C = 10 head diverged (faces, 10 per class, EfficientNetB0: test
accuracy 0.72; 0.89 with C at most 0.1). With the cap but no floor, the three largest heads of
38 benchmark runs were each the lowest draw of their cell (textures, 10 per class, ResNet50:
0.807 against 0.95; 0.893 with the floor). Dividing all features by one scalar instead bounds
the head too, but cost faces / 5 per class / ResNet50 3.4 points over 5 draws (BENCHMARKS.md,
"The probe's scale" and the two sections after it). C is chosen from `C_GRID` on the validation
split when that split can rank models (`rankable`), else by stratified k-fold cross-validation
on the training features: a handful of validation images cannot tell one C from another.
"""

import dataclasses
import time

import numpy as np
from absl import logging

# Candidates for logistic regression's C (inverse L2 strength on standardized features); the
# largest is also the C where a class has a single training image and nothing can choose.
C_GRID = (0.001, 0.01, 0.1)
# A feature's scale is at least this fraction of the features' RMS standard deviation: a feature
# that barely varies over a few clean training images would otherwise get a raw weight of many
# times 1/std, which the fine-tune's augmented images then blow up.
MIN_SCALE_OF_RMS = 0.1
# Cross-validation folds at most (fewer where a class has fewer training images).
MAX_FOLDS = 3
# C is chosen on at most this many training features; the final fit uses all of them.
SELECTION_SUBSAMPLE = 5_000
MAX_ITER = 500
# Beyond SELECTION_SUBSAMPLE the final fit starts from the subsample's solution and runs this
# many iterations: from zero, 45,000 MobileNetV2 features (1,280 each, 10 classes) took all
# MAX_ITER iterations and 59 s, as long as choosing C; from the subsample, 100 took 12 s and
# reached validation accuracy 0.660 (0.665 from zero, 0.638 on the subsample alone).
WARM_ITER = 100


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted probe as the head's dense layer: logits = features @ kernel + bias.

    Attributes:
      kernel: float32 [D, K].
      bias: float32 [K].
      c: the chosen C.
      chosen_by: "validation", "cross-validation (k folds)" or "default (too few images per class)".
      seconds: wall time of the fit, selection included.
    """

    kernel: np.ndarray
    bias: np.ndarray
    c: float
    chosen_by: str
    seconds: float


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    num_classes: int,
    *,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    seed: int = 0,
) -> Probe:
    """Fits the probe; C is chosen on (val_x, val_y) when given, else by cross-validation.

    Args:
      train_x, train_y: training features [N, D] and labels in 0..num_classes-1.
      num_classes: K, the head's width (classes absent from train_y get a large negative bias).
      val_x, val_y: validation features and labels to choose C on, or None.
      seed: seeds the cross-validation folds and the subsample.

    Returns:
      The probe, with the standardization folded into its kernel and bias.
    """
    started = time.time()
    mean = train_x.mean(axis=0)
    scale = _feature_scale(train_x)
    standard = (train_x - mean) / scale
    with _one_blas_thread():
        if val_x is not None:
            c, chosen_by = _choose_on_validation(standard, train_y, (val_x - mean) / scale, val_y)
        else:
            c, chosen_by = _choose_by_cross_validation(standard, train_y, seed)
        model = _fit_all(c, standard, train_y, seed)
    weights, bias = _as_dense(model, num_classes, train_x.shape[1])
    # logits = ((x - mean) / scale) @ W + b = x @ (W / scale) + (b - (mean / scale) @ W)
    kernel = weights / scale[:, None]
    bias = bias - (mean / scale) @ weights
    return Probe(kernel.astype(np.float32), bias.astype(np.float32), c, chosen_by, time.time() - started)


def _feature_scale(train_x: np.ndarray) -> np.ndarray:
    """Each feature's standard deviation over the training images, floored at MIN_SCALE_OF_RMS
    times their RMS (1 where every feature is constant)."""
    std = train_x.std(axis=0)
    rms = float(np.sqrt(np.mean(std**2)))
    return np.maximum(std, MIN_SCALE_OF_RMS * rms) if rms > 0 else np.ones_like(std)


def _one_blas_thread():
    """The fits' products are skinny ([N, D] x [D, K] for a few classes K), where OpenBLAS's
    threads only wait on each other: on 2 cores a 250 x 1280 fit took 2.1 s with 2 threads and
    0.16 s with one (10,000 x 1280: 3.3 s and 1.6 s), and beside another job the probe stage
    took a third of a 50-per-class run."""
    import sklearn.linear_model  # noqa: F401  Loads scikit-learn's BLAS, so the limit reaches it.
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency.

    return threadpool_limits(limits=1, user_api="blas")


def accuracy(probe: Probe, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ probe.kernel + probe.bias, axis=1) == y))


def _logistic(c: float, max_iter: int = MAX_ITER, start=None):
    """The logistic regression for C; `start`: a fitted one whose weights it starts from."""
    from sklearn.linear_model import LogisticRegression  # Imported when a probe is fitted.

    model = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4, warm_start=start is not None)
    if start is not None:
        model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
    return model


def _fit_all(c: float, x, y, seed: int):
    """The final fit on every training feature: from zero up to SELECTION_SUBSAMPLE images, else
    from the subsample's solution for WARM_ITER iterations (when it has every class)."""
    if len(y) <= SELECTION_SUBSAMPLE:
        return _fit_quietly(_logistic(c), x, y)
    sub_x, sub_y = _subsample(x, y, SELECTION_SUBSAMPLE, seed)
    if len(np.unique(sub_y)) < len(np.unique(y)):
        return _fit_quietly(_logistic(c), x, y)
    start = _fit_quietly(_logistic(c), sub_x, sub_y)
    return _fit_quietly(_logistic(c, WARM_ITER, start), x, y)


def _fit_quietly(model, x, y):
    """Fits, ignoring non-convergence warnings: a C that needs more iterations than MAX_ITER is
    a strongly under-regularized one, and selection judges it by its accuracy anyway."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _choose_on_validation(x, y, val_x, val_y) -> tuple[float, str]:
    x, y = _subsample(x, y, SELECTION_SUBSAMPLE, seed=0)
    scores = [float(np.mean(_fit_quietly(_logistic(c), x, y).predict(val_x) == val_y)) for c in C_GRID]
    # Ties go to the strongest regularization: the same validation score with smaller weights.
    return C_GRID[int(np.argmax(scores))], "validation"


def _choose_by_cross_validation(x, y, seed: int) -> tuple[float, str]:
    from sklearn.model_selection import StratifiedKFold

    x, y = _subsample(x, y, SELECTION_SUBSAMPLE, seed)
    present = np.bincount(y)
    smallest_class = int(present[present > 0].min())
    folds = min(MAX_FOLDS, smallest_class)
    if folds < 2:
        return C_GRID[-1], "default (a class has a single training image)"
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # Ties go to the strongest regularization (np.argmax takes the first, smallest C).
    scores = np.zeros(len(C_GRID))
    for train_index, test_index in splitter.split(x, y):
        for i, c in enumerate(C_GRID):
            model = _fit_quietly(_logistic(c), x[train_index], y[train_index])
            scores[i] += np.mean(model.predict(x[test_index]) == y[test_index])
    return C_GRID[int(np.argmax(scores))], f"{folds}-fold cross-validation on the training images"


def _subsample(x, y, limit: int, seed: int):
    if len(y) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), limit, replace=False))
    return x[keep], y[keep]


def _as_dense(model, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients as a softmax dense layer's [D, K] kernel and [K] bias."""
    weights = np.zeros((dim, num_classes))
    # A class the training data lacks can never be predicted.
    bias = np.full(num_classes, -30.0)
    classes = model.classes_
    if len(classes) == 2:
        # Binary: one logit z for classes_[1]; softmax over (0, z) is sigmoid(z).
        weights[:, classes[1]] = model.coef_[0]
        bias[classes[0]], bias[classes[1]] = 0.0, model.intercept_[0]
    else:
        weights[:, classes] = model.coef_.T
        bias[classes] = model.intercept_
    return weights, bias


def log(probe: Probe, num_train: int, val_accuracy: float | None) -> None:
    """One line: the fit, its validation accuracy (None: no validation split) and its time."""
    logging.info(
        "linear probe on %d training images: C=%g (chosen by %s), val accuracy %s, %.1fs",
        num_train,
        probe.c,
        probe.chosen_by,
        "n/a" if val_accuracy is None else f"{val_accuracy:.4f}",
        probe.seconds,
    )
