"""`--recipe=auto`: the fine-tuning recipe derived from the data, for flags the user did not give.

A schedule counted in epochs fits one size of data: `head:3,top2:3` at batch 64 is 4,700 steps
on CIFAR-10 and 6 steps on a folder of 50 images. BiT-HyperRule (Kolesnikov et al. 2020,
google-research/big_transfer) counts optimizer steps instead, by the size of the set: 500 below
20k examples, 10k below 500k, 20k above (at batch 512). kft keeps those step counts at its own,
smaller batch sizes (so small sets see fewer examples than BiT's, and a CPU can run them), and
never trains fewer than MIN_EPOCHS passes, the length of the old default schedule.

The recipe, for N training images:
  batch     64 from 1,024 images; below, the power of two nearest N/8 (at least 8), so a
            small set still gets several steps per pass
  stages    probe, then every block at once for the steps above (LP-FT, Kumar et al. 2022: the
            head starts as a linear probe, so the fine-tune does not start from a random head),
            Adam with warmup + cosine, BatchNorm frozen; peak rate BASE_LR at batch 64, larger
            for the smaller batches of small sets, by sqrt(64 / batch): 2.8e-4 at batch 8.
            Measured on a development task (digits 1,3,5,7,9, 10 per class, from backbones
            pretrained on the even digits; not a benchmark task), 3 seeds, test accuracy:
            MobileNetV2 0.757 at 1e-4, 0.824 at 3e-4; ResNet50 0.903 at 1e-4, 0.951 at 3e-4
            (one seed); 3.5e-5 was worse still. At 5 per class (EfficientNetB0, 3 seeds, mean
            test accuracy 0.832 with this recipe; the probe alone 0.555) nothing tried did
            better: --ema_decay=0.99 0.833, peak rate 1e-4 0.763 and 5.6e-4 0.802, 250 steps
            0.776, --l2sp_alpha=0.1 0.803, --label_smoothing=0.1 0.798, interpolating toward the
            probe's weights (WiSE-FT) lower at every mix; 1,000 steps 0.847, within the spread.
            No head penalty after the probe (--l2sp_beta=0) lost EfficientNetB0 5 points on
            patches of four photographs (BENCHMARKS.md), so the penalty stays
  augment   crop; flip too unless the images are not mirror-symmetric (`mirror_check`: digits,
            letters and text change meaning when mirrored); rot90 (quarter turns) where turned
            images look like their class to the pretrained backbone (`rotation_check`:
            textures, microscopy, aerial views; not digits or upright objects); mixup added from
            20k images (BiT: mixup only for large sets). Small turns (rotate) and colour jitter
            were tried for the smallest sets and not adopted (BENCHMARKS.md, session 17)
  views     below 20k images, the finished model (export, TFLite, kft.evaluate, kft.predict)
            averages its probabilities over the symmetries it trained with: the image and its
            mirror with flip, its four quarter turns with rot90, all 8 with both
            (`--test_views`; training sees one view). On a development task (patches of four
            photographs, 5 per class, 3 seeds) the 8 views gained 1.8 points on MobileNetV2 and
            2.7 on EfficientNetB0; on large sets, serving cost matters more than what is left
            to gain
  val       none carved out when the split kft would carve (--val_fraction of a source without
            one of its own) is too small to rank checkpoints (kft.schedule.MIN_RANKING_VAL):
            such a split only decides nothing, and on 5 images per class it took a fifth of
            the training set. Every image then trains and the run keeps the end of its schedule
With a hidden head layer (`--hidden_units`) the probe cannot initialize the head, and a short
head-only stage takes its place.
"""

import dataclasses
import math

import numpy as np

from kft import model, schedule

# BiT-HyperRule's schedule lengths (optimizer steps) by training-set size.
SMALL, MEDIUM = 20_000, 500_000
STEPS = {"small": 500, "medium": 10_000, "large": 20_000}
# The old default schedule (head:3,top2:3) ran 6 epochs; no recipe trains fewer.
MIN_EPOCHS = 6
# Adam's peak learning rate for fine-tuning every block at batch 64.
BASE_LR = 1e-4
BASE_BATCH = 64
MIN_BATCH = 8


# Below this many training images the finished model averages its predictions over the
# symmetries it trained with (flip, rot90). At 5 images per class averaging views gained 1-7
# points on texture patches and cost 0.7 on faces (BENCHMARKS.md); on large sets, serving cost
# matters more than what is left to gain.
TEST_VIEWS_BELOW = SMALL

# The mirror check looks at up to this many training images, shrunk to this many pixels a side.
MIRROR_SAMPLE = 2_000
MIRROR_SIZE = 16
MIN_RETENTION = 1 / 3


# The rotation check turns up to this many training images (they go through the backbone four
# times). rot90 joins the recipe when the backbone's features tell the classes apart by at
# least MIN_ABOVE_CHANCE over chance and turned images keep MIN_ROTATION_RETENTION of that.
ROTATION_SAMPLE = 512
MIN_ABOVE_CHANCE = 0.1
MIN_ROTATION_RETENTION = 2 / 3


@dataclasses.dataclass(frozen=True)
class MirrorCheck:
    """Whether mirrored training images are recognized as well as the images themselves.

    A task is taken as not mirror-symmetric when mirroring loses more than `margin` of accuracy
    and keeps less than MIN_RETENTION of what the images score above chance. Near-duplicates
    (overlapping crops, bursts of photos) match each other but not each other's mirror image,
    so some loss is expected even where left and right do not matter: natural photographs
    measured here kept about half, mirror-symmetric digits (0, 1, 8) 90%, digits 5-9 none.

    Attributes:
      accuracy: leave-one-out nearest-neighbour accuracy of the images among themselves, averaged
        class by class.
      mirrored_accuracy: the same for their mirror images as queries.
      chance: 1 / the number of classes.
      margin: the loss that counts as real: two standard errors of the difference of two
        accuracies on n images, and at least 0.1.
    """

    accuracy: float
    mirrored_accuracy: float
    chance: float
    margin: float

    @property
    def retention(self) -> float:
        """The share of the images' above-chance accuracy their mirror images keep."""
        return _retention(self.accuracy, self.mirrored_accuracy, self.chance)

    @property
    def symmetric(self) -> bool:
        lost = self.accuracy - self.mirrored_accuracy
        return lost <= self.margin or self.retention >= MIN_RETENTION

    def describe(self) -> str:
        verdict = "flip kept" if self.symmetric else "no flip: mirrored images look like other classes"
        return (
            f"mirror check: nearest-neighbour accuracy {self.accuracy:.2f} on the training "
            f"images, {self.mirrored_accuracy:.2f} on their mirror images, chance "
            f"{self.chance:.2f} ({verdict})"
        )


@dataclasses.dataclass(frozen=True)
class RotationCheck:
    """Whether training images turned by quarter turns still look like their own class.

    Unlike flip, rot90 is not a usual default: it takes evidence to add it. Pixels cannot give
    that evidence on few images (patches of one texture match each other's turned images no
    better than their own at 5 per class), so this check asks the pretrained backbone, whose
    features were not trained to ignore rotation: a turned brick patch still looks like brick
    to it, a turned 6 looks like a 9. Measured on 5 to 50 images per class (backbones
    pretrained offline by tools/transfer_bench.py; BENCHMARKS.md): texture patches kept 0.8 or
    more of their above-chance accuracy with EfficientNetB0 and MobileNetV2, 0.45-0.63 with
    ResNet50 (no rot90 then); digits 5-9 kept 0.2 at most.

    Attributes:
      accuracy: leave-one-out nearest-neighbour accuracy of the images' features among
        themselves (cosine similarity, centred on their mean), averaged class by class.
      turned_accuracy: the same with the images turned by one, two and three quarter turns as
        queries, averaged over the three.
      chance: 1 / the number of classes.
    """

    accuracy: float
    turned_accuracy: float
    chance: float

    @property
    def retention(self) -> float:
        """The share of the features' above-chance accuracy the turned images keep."""
        return _retention(self.accuracy, self.turned_accuracy, self.chance)

    @property
    def invariant(self) -> bool:
        return self.accuracy - self.chance >= MIN_ABOVE_CHANCE and self.retention >= MIN_ROTATION_RETENTION

    def describe(self) -> str:
        verdict = "rot90 added" if self.invariant else "no rot90"
        return (
            f"rotation check: nearest-neighbour accuracy {self.accuracy:.2f} on the pretrained "
            f"backbone's features of the training images, {self.turned_accuracy:.2f} on their quarter "
            f"turns, chance {self.chance:.2f} ({verdict})"
        )


def rotation_check(features_of, images: np.ndarray, labels: np.ndarray) -> RotationCheck | None:
    """Tests whether a task's classes survive quarter turns, from the pretrained backbone's view.

    Args:
      features_of: uint8 images [n, S, S, 3] -> their pooled backbone features [n, D].
      images: uint8 [N, S, S, 3] training images (a sample of at most ROTATION_SAMPLE).
      labels: int [N].

    Returns:
      The check, or None for images that are not square (a quarter turn changes their shape).
    """
    if images.shape[1] != images.shape[2]:
        return None
    upright = np.asarray(features_of(images), np.float64)
    centre = upright.mean(axis=0, keepdims=True)

    def unit(features):
        centred = np.asarray(features, np.float64) - centre
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)

    database = unit(upright)
    accuracy = _nearest_neighbour_accuracy(database, database, labels)
    turned = [
        _nearest_neighbour_accuracy(
            unit(features_of(np.ascontiguousarray(np.rot90(images, k, axes=(1, 2))))), database, labels
        )
        for k in (1, 2, 3)
    ]
    return RotationCheck(accuracy, float(np.mean(turned)), _chance(labels))


def _chance(labels: np.ndarray) -> float:
    return 1.0 / max(1, len(np.unique(labels)))


def _retention(accuracy: float, transformed_accuracy: float, chance: float) -> float:
    """The share of the above-chance accuracy that transformed queries keep."""
    return (transformed_accuracy - chance) / max(1e-9, accuracy - chance)


def _nearest_neighbour_accuracy(queries: np.ndarray, database: np.ndarray, labels: np.ndarray) -> float:
    """How often query i's most similar database row other than row i has label i (unit rows),
    averaged class by class. On a long-tailed set the plain rate counts the big classes' queries
    most, which find their own class among its many images whatever a turn or mirror did to
    them: 40 of 77 digits in one class scored turned digits 0.42 against 0.45 upright (chance
    0.2), and the check added rot90 to digits. Class by class, a matcher that ignores the image
    scores 1 / classes however the classes are sized; on balanced sets nothing changes."""
    similarity = queries @ database.T
    np.fill_diagonal(similarity, -np.inf)  # Leave one out: not the image itself, turned or not.
    hits = labels[similarity.argmax(1)] == labels
    return float(np.mean([hits[labels == label].mean() for label in np.unique(labels)]))


def mirror_check(images: np.ndarray, labels: np.ndarray) -> MirrorCheck:
    """Tests whether a task is mirror-symmetric, from its training images alone.

    Each image is matched (cosine similarity in pixel space, images shrunk to MIRROR_SIZE and
    normalized) to its nearest other training image. If the task does not care about left and
    right, a mirrored image finds a neighbour of its own class about as often as the image
    does; where mirroring changes the class evidence (digits, letters), it finds one less
    often. Natural photographs are hard to match in pixel space either way, so the check then
    keeps flip, the usual default.

    Args:
      images: uint8 [N, H, W, 3] training images (a sample of at most MIRROR_SAMPLE is enough).
      labels: int [N].
    """
    x = _pixels(images)
    accuracy = _nearest_neighbour_accuracy(x, x, labels)
    mirrored_accuracy = _nearest_neighbour_accuracy(_pixels(images[:, :, ::-1]), x, labels)
    n = max(1, len(labels))
    standard_error = math.sqrt((accuracy * (1 - accuracy) + mirrored_accuracy * (1 - mirrored_accuracy)) / n)
    return MirrorCheck(accuracy, mirrored_accuracy, _chance(labels), max(0.1, 2 * standard_error))


def _pixels(images: np.ndarray) -> np.ndarray:
    """Images as unit vectors of their MIRROR_SIZE x MIRROR_SIZE pixels minus their mean."""
    import tensorflow as tf  # Resizing only; the module's other functions are pure Python.

    small = tf.image.resize(tf.cast(images, tf.float32), (MIRROR_SIZE, MIRROR_SIZE), antialias=True)
    flat = np.asarray(small).reshape(len(images), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The flags a recipe sets, as `--name=value` strings would give them, and why."""

    batch_size: int
    stages: str
    augment: str
    test_views: str
    reasons: tuple[str, ...]
    val_fraction: float | None = None  # None: the flag's value stands

    def flags(self) -> dict[str, object]:
        flags = {
            "batch_size": self.batch_size,
            "stages": self.stages,
            "augment": self.augment,
            "test_views": self.test_views,
        }
        if self.val_fraction is not None:
            flags["val_fraction"] = self.val_fraction
        return flags


def batch_size_for(num_train: int) -> int:
    if num_train >= 16 * BASE_BATCH:
        return BASE_BATCH
    nearest = 2 ** round(math.log2(max(1.0, num_train / 8)))
    return int(min(BASE_BATCH, max(MIN_BATCH, nearest)))


def steps_for(num_train: int, batch_size: int) -> int:
    band = "small" if num_train < SMALL else "medium" if num_train < MEDIUM else "large"
    steps_per_epoch = max(1, num_train // batch_size)
    return max(STEPS[band], MIN_EPOCHS * steps_per_epoch)


def derive(
    num_train: int,
    num_classes: int,
    *,
    hidden_units: int = 0,
    batch_size: int | None = None,
    augment: tuple[str, ...] | None = None,
    mirror: MirrorCheck | None = None,
    rotation: RotationCheck | None = None,
    unused_val: int = 0,
) -> Recipe:
    """The recipe for a training set of `num_train` images in `num_classes` classes.

    Args:
      num_train, num_classes: the training split's size and classes.
      hidden_units: the head's hidden layer width (0 = none; the probe needs none).
      batch_size: the user's batch size, which the schedule is then counted in; None: derived.
      augment: the user's --augment ops, whose symmetries the test views then follow; None:
        derived.
      mirror: the training images' mirror check; None: assume mirror-symmetric (flip).
      rotation: their rotation check; None (no pretrained backbone to ask yet): no rot90.
      unused_val: the size of a carved validation split too small to rank checkpoints, whose
        images `num_train` includes (0: the validation split stands).
    """
    batch = batch_size or batch_size_for(num_train)
    steps = steps_for(num_train, batch)
    lr = BASE_LR * math.sqrt(BASE_BATCH / batch)
    first = "probe" if not hidden_units else "head:%dsteps@1e-3" % max(50, steps // 10)
    stages = f"{first},all:{steps}steps@{lr:.2g}"
    flip = mirror is None or mirror.symmetric
    turn = rotation is not None and rotation.invariant
    ops = (
        "crop",
        *(["flip"] if flip else []),
        *(["rot90"] if turn else []),
        *(["mixup"] if num_train >= SMALL else []),
    )
    trained = ops if augment is None else augment  # The views are the symmetries the run trains with.
    views = [op for op in trained if op in model.TEST_VIEWS] if num_train < TEST_VIEWS_BELOW else []
    epochs = steps * batch / max(1, num_train)
    per_pass = max(1, num_train // batch)
    reasons = (
        f"{num_train} training images in {num_classes} classes",
        f"batch {batch}: {per_pass} step{'s' if per_pass > 1 else ''} per pass over the training set",
        f"{steps} fine-tuning steps (BiT-HyperRule for {'<20k' if num_train < SMALL else '<500k' if num_train < MEDIUM else '>=500k'} "
        f"images, at least {MIN_EPOCHS} passes): about {epochs:.0f} passes",
        (
            "the head starts as a linear probe on the frozen features (LP-FT)"
            if not hidden_units
            else "a head-only stage first (--hidden_units rules out the closed-form probe)"
        ),
        f"then every block at peak rate {lr:.2g} (Adam, warmup + cosine, BatchNorm frozen)",
        *([mirror.describe()] if mirror else []),
        *([rotation.describe()] if rotation else []),
        f"augmentation {','.join(ops)}" + (" (mixup from 20k images)" if num_train >= SMALL else ""),
        _describe_views(views, num_train),
        *(
            [
                f"no validation split: the {unused_val} images --val_fraction would hold out are too few "
                f"to rank checkpoints (kft ranks from {schedule.MIN_RANKING_VAL}), so they train too and the "
                "run keeps the end of its schedule"
            ]
            if unused_val
            else []
        ),
    )
    return Recipe(batch, stages, ",".join(ops), ",".join(views) or "none", reasons, 0.0 if unused_val else None)


def _describe_views(views: list[str], num_train: int) -> str:
    if num_train >= TEST_VIEWS_BELOW:
        return f"one view per prediction (test-time views only below {TEST_VIEWS_BELOW:,} images)"
    if not views:
        return "one view per prediction (the augmentation has no flip or rot90 to average over)"
    count = model.view_count(tuple(views))
    return (
        f"the finished model averages {count} views ({'+'.join(views)}), the symmetries it trained with: "
        f"{count} backbone passes per prediction (--test_views=none for one)"
    )


def describe(recipe: Recipe, overridden: dict[str, object]) -> str:
    """The resolved recipe as one readable block: what it set, what the user's flags kept."""
    lines = ["recipe (--recipe=auto; any flag you give wins):"]
    lines += [f"  {reason}" for reason in recipe.reasons]
    for name, value in recipe.flags().items():
        if name in overridden:
            lines.append(f"  --{name}={overridden[name]}  (yours; the recipe's: {value})")
        else:
            lines.append(f"  --{name}={value}")
    return "\n".join(lines)
