"""The `digits[:CLASSES]` data source: scikit-learn's 1,797 real 8x8 handwritten digits.

They ship inside scikit-learn's wheel, so the quickstart and the tests need no download. CLASSES
is `A-B`, a comma list (`1,3,7`) or a mix (`0-2,7`); labels are remapped to 0..k-1 in ascending
digit order, and the validation split is carved by `val_fraction` as for a flat folder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from kft import data

AUTOTUNE = tf.data.AUTOTUNE


@data.register_source("digits")
@dataclasses.dataclass(frozen=True)
class DigitsSpec:
    """`digits[:CLASSES]`; `classes` are the kept digits in ascending order."""

    form = "digits[:CLASSES] with CLASSES like 0-4, 5-9 or 1,3,7"
    classes: tuple[int, ...] = tuple(range(10))

    @classmethod
    def parse(cls, spec: str, rest: str) -> "DigitsSpec":
        return _parse(spec, rest)

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "data.Splits":
        return _load(self, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        splits = _load(
            self,
            image_size=image_size,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            train_limit_per_class=None,
            cache_bytes=data.CACHE_LIMIT_BYTES,
        )
        if splits.val is None:
            raise ValueError(
                f"data spec {spec!r}: val_fraction=0 holds out no digits to evaluate on "
                "(the run trained on all of them)"
            )
        return splits.val, splits.class_names, 0


def _parse(spec: str, rest: str) -> DigitsSpec:
    if not rest.strip():
        return DigitsSpec()
    classes: list[int] = []
    for item in rest.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d)(?:-(\d))?", item)
        if not match:
            raise data.spec_error(spec, f"bad class item {item!r} (digits 0-9, as A-B or A)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise data.spec_error(spec, f"empty range {item!r}")
        classes.extend(range(low, high + 1))
    if len(set(classes)) != len(classes):
        raise data.spec_error(spec, "a digit is listed twice")
    if len(classes) < 2:
        raise data.spec_error(spec, "needs at least 2 classes")
    return DigitsSpec(tuple(sorted(classes)))


def _arrays(classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8, 1] images spanning 0..255 and labels remapped to 0..k-1."""
    from sklearn.datasets import load_digits  # Ships with scikit-learn: no download.

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); stretch to 0..255.
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = np.searchsorted(np.asarray(classes), digits.target[keep]).astype(np.int32)
    return images, labels


def digits_outside_training(
    spec: str, *, val_fraction: float, seed: int, train_limit_per_class: int | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image of a `digits` spec that `load` with these arguments keeps out of training.

    That is its validation split plus the training images `train_limit_per_class` leaves out:
    a test set many times larger than the validation split, for few-shot runs on digits.

    Returns:
      `(images, labels, class_names)`: uint8 images [N, 8, 8, 1], labels indexing class_names.
    """
    parsed = data.parse_spec(spec)
    if not isinstance(parsed, DigitsSpec):
        raise ValueError(f"data spec {spec!r}: digits_outside_training takes digits[:CLASSES] only")
    images, labels, class_names, train_index, _ = _split(parsed, val_fraction, seed, train_limit_per_class)
    outside = np.setdiff1d(np.arange(len(labels)), train_index)
    return images[outside], labels[outside], class_names


def _split(parsed: DigitsSpec, val_fraction: float, seed: int, train_limit_per_class: int | None):
    """The digits of `parsed` and the seeded split `load` makes: (images, labels, class names,
    train indices, validation indices)."""
    images, labels = _arrays(parsed.classes)
    class_names = tuple(str(c) for c in parsed.classes)
    train_per_class, val_index, _ = data.split_per_class(labels, class_names, val_fraction, seed)
    return images, labels, class_names, data.limit_train(train_per_class, train_limit_per_class), val_index


def _pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int,
    cache_bytes: int,
) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = dataset.map(
        lambda image, label: (data.resize_uint8(data.to_rgb(image), image_size), label), num_parallel_calls=AUTOTUNE
    )
    return data.finish(
        dataset,
        num_examples=len(labels),
        batch_size=batch_size,
        image_size=image_size,
        training=training,
        seed=seed,
        cache=data.should_cache(len(labels), image_size, cache_bytes),
        shuffle=True,
    )


def _load(
    parsed: DigitsSpec, *, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> data.Splits:
    images, labels, class_names, train_index, val_index = _split(parsed, val_fraction, seed, train_limit_per_class)

    def build(batch_size: int) -> data.Splits:
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed, cache_bytes=cache_bytes)
        return data.Splits(
            train=_pipeline(images[train_index], labels[train_index], training=True, **common),
            val=_pipeline(images[val_index], labels[val_index], training=False, **common) if len(val_index) else None,
            class_names=class_names,
            num_train=len(train_index),
            num_val=len(val_index),
            skipped=0,
            train_in_order=_pipeline(
                images[train_index], labels[train_index], training=False, **{**common, "cache_bytes": 0}
            ),
            batch_size=batch_size,
            rebuild=build,
            val_carved=len(val_index) > 0,
        )

    return build(batch_size)
