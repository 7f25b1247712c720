"""Data sources turned into uint8 tf.data pipelines.

Every source ends in the same pipeline, built on the host CPU:

    decode (parallel) -> RGB -> resize -> uint8 -> cache -> shuffle -> batch -> prefetch

and yields `(images uint8 [B, S, S, 3], labels int32 [B])`, S = the image size. Augmentation
and the backbone's preprocessing are NOT done here: they run inside the model, on the device
(see DESIGN.md). One exception to S: a TFDS dataset whose images all share one square size
smaller than the image size (CIFAR-10's 32 px, MNIST's 28) is kept at that size, and the
model's own resize upsamples it on the device: the host never upsamples, and CIFAR-10 for a
224 px backbone stays a 150 MB cache instead of 7.5 GB decoded and upsampled every epoch.

Spec strings (`parse_spec` documents the grammar). Each prefix is a source class registered with
`register_source`, one module each (kft.data_tfds, kft.data_folder, kft.data_digits), so a new
source is one registered class; this module holds what they share: the registry, `Splits`,
`load` and `load_eval`, the pipeline's last steps and the stratified split.

* `tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]`: a TFDS image-classification dataset with
  `image` and `label` features, e.g. `tfds:cifar10`, `tfds:oxford_flowers102`,
  `tfds:cifar10,train=train[:20%]`. Defaults: train=`train`; val=`validation` when the dataset
  has one, else the last `val_fraction` of train (TFDS split slicing); test=`test` (or
  `validation` if there is no test split). The test split is only read by `load_eval`.
  val_fraction=0 carves nothing: a source without a validation split of its own then has none.
* `folder:PATH`: one subfolder per class. If PATH has `train/`, `val/` (or `valid/`,
  `validation/`) or `test/` subfolders it is a split layout (each of those has one subfolder per
  class); otherwise the class folders sit directly in PATH and `load` carves a seeded,
  stratified validation split.
* `digits[:CLASSES]`: the real 8x8 handwritten digits that ship inside scikit-learn (1797
  images), the offline quickstart dataset. CLASSES is `A-B` or a comma list (`1,3,7`) or a mix
  (`0-2,7`); labels are remapped to 0..k-1 in ascending digit order.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import numpy as np
import tensorflow as tf
from absl import logging

AUTOTUNE = tf.data.AUTOTUNE


# Default memory for the decoded-image cache: uint8 sets (train + val) at or below it are
# cached in memory, bigger ones re-decoded every epoch (2 GiB holds ~14k images at 224 px or
# ~700k at 32 px). kft.train's --cache_gb sets it per run.
CACHE_LIMIT_BYTES = 2 * 1024**3

# Uncached training sets are shuffled through a buffer of about this many bytes.
_SHUFFLE_BUFFER_BYTES = 512 * 1024**2


# ----------------------------------------------------------------------------------------------
# Data sources: a registry of spec classes, one per prefix.


class Source(Protocol):
    """A registered spec class: a frozen dataclass of one parsed spec string."""

    form: ClassVar[str]  # its syntax, for error messages

    @classmethod
    def parse(cls, spec: str, rest: str) -> Source:
        """The spec `PREFIX:rest` (`spec` is the whole string, for messages); syntax only."""

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> Splits:
        """`load`'s train and validation pipelines (kwargs: `load`'s other arguments)."""

    def load_eval(
        self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed
    ) -> tuple[tf.data.Dataset, tuple[str, ...], int]:
        """`load_eval`'s (dataset, class names, skipped files)."""


SOURCES: dict[str, type] = {}
# The built-in sources, in the order messages list them: each registers itself when its module
# is imported, and which is imported first depends on the caller.
BUILT_IN_SOURCES = ("tfds", "folder", "digits")


def register_source(prefix: str) -> Callable[[type], type]:
    """Class decorator: makes the class the source of specs `PREFIX[:...]`."""

    def decorate(cls: type) -> type:
        if prefix in SOURCES:
            raise ValueError(f"data source {prefix!r} is registered twice ({SOURCES[prefix].__name__}, {cls.__name__})")
        SOURCES[prefix] = cls
        # Built-ins first in their order, then the others as registered (sorted is stable).
        order = sorted(SOURCES.items(), key=lambda item: _built_in_rank(item[0]))
        SOURCES.clear()
        SOURCES.update(order)
        return cls

    return decorate


def _built_in_rank(prefix: str) -> int:
    return BUILT_IN_SOURCES.index(prefix) if prefix in BUILT_IN_SOURCES else len(BUILT_IN_SOURCES)


def spec_forms() -> str:
    """Every registered source's syntax, for error messages."""
    return " | ".join(cls.form for cls in SOURCES.values())


def spec_error(spec: str, why: str) -> ValueError:
    """A source's one-line error for a malformed spec."""
    return ValueError(f"data spec {spec!r}: {why}; expected {spec_forms()}")


def parse_spec(spec: str) -> Source:
    """Parses a data spec string, checking syntax only (not that paths or datasets exist).

    Suitable for flag validators: every error is one line naming the value and the allowed
    forms.

    Args:
      spec: `tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]`, `folder:PATH` or
        `digits[:CLASSES]` (CLASSES: `A-B`, `1,3,7` or a mix such as `0-2,7`).

    Returns:
      The registered source's spec (e.g. kft.data_folder.FolderSpec for `folder:`).

    Raises:
      ValueError: the spec is malformed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise spec_error(str(spec), "empty spec")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind not in SOURCES:
        raise spec_error(spec, f"unknown source {kind!r}")
    return SOURCES[kind].parse(spec, rest)


# ----------------------------------------------------------------------------------------------
# Public API.


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train and validation pipelines of one data source.

    Attributes:
      train: batches `(uint8 [B, S, S, 3], int32 [B])`, shuffled with a seed and reshuffled
        every epoch; one finite pass per epoch (not repeated). Drops the last partial batch
        unless the whole set is smaller than one batch.
      val: the same, in a fixed order, with the partial last batch kept; None when there is
        no validation split (val_fraction=0 on a source without one of its own).
      class_names: label i is `class_names[i]`.
      num_train: examples in one pass of `train` (before dropping the partial batch).
      num_val: examples in one pass of `val`.
      skipped: files of a folder source that could not be decoded; 0 for other sources.
      train_in_order: every training example once, in a fixed order, unaugmented, partial
        last batch kept (the linear probe's feature pass, the recipe's checks on its first
        images); a folder's classes interleaved (`spread_order`); None where the source lacks it.
      batch_size: the batch size of the pipelines (0 if unknown).
      rebuild: `rebuild(batch_size)` -> the same Splits batched differently, without reading
        the source again (see `with_batch_size`).
      val_carved: the validation split was carved out of the training images by
        `val_fraction` (else it is the source's own, or there is none).
      classes_not_in_val: classes too small for `val_fraction` to hold any image out of
        (`split_per_class`): all of their images train, and validation has none of them.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    class_names: tuple[str, ...]
    num_train: int
    num_val: int
    skipped: int
    train_in_order: tf.data.Dataset | None = None
    batch_size: int = 0
    rebuild: Callable[[int], "Splits"] | None = dataclasses.field(default=None, repr=False, compare=False)
    val_carved: bool = False
    classes_not_in_val: tuple[str, ...] = ()

    def with_batch_size(self, batch_size: int) -> "Splits":
        """These splits in batches of `batch_size` (a folder is not scanned again)."""
        if batch_size == self.batch_size:
            return self
        if self.rebuild is None:
            raise ValueError("these splits cannot be rebatched (built without a rebuild function)")
        return self.rebuild(batch_size)


def load(
    spec: str,
    *,
    image_size: int,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
    train_limit_per_class: int | None = None,
    cache_bytes: int | None = None,
) -> Splits:
    """Builds the train and validation pipelines of a data source.

    Args:
      spec: data spec, see `parse_spec`.
      image_size: side S of the square uint8 images produced (aspect ratio is not kept).
      batch_size: examples per batch.
      val_fraction: share of each class held out for validation when the source has no
        validation split of its own (stratified for folder and digits); 0 holds out nothing.
      seed: seeds the validation carve-out, `train_limit_per_class` and the shuffling.
      data_dir: TFDS data directory (TFDS sources only).
      train_limit_per_class: keep at most this many training examples per class (few-shot
        target tasks). Folder and digits keep a seeded random subset; TFDS keeps the first
        ones in the dataset's stored order (TFDS shuffles examples when preparing a dataset).
        Validation is never limited.
      cache_bytes: memory the decoded train + val images may take to be cached (decoded once);
        None: CACHE_LIMIT_BYTES. Bigger sets are decoded again every epoch.

    Returns:
      A `Splits`.

    Raises:
      ValueError: bad arguments, or a source that cannot make a train/validation split (each
        message is one line naming the bad value).
    """
    parsed = parse_spec(spec)
    _check_sizes(image_size, batch_size)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}: must be in [0, 1) (0: no validation split)")
    if train_limit_per_class is not None and train_limit_per_class < 1:
        raise ValueError(f"train_limit_per_class={train_limit_per_class!r}: must be >= 1 or None")
    kwargs = dict(
        image_size=image_size,
        batch_size=batch_size,
        val_fraction=val_fraction,
        seed=seed,
        train_limit_per_class=train_limit_per_class,
        cache_bytes=CACHE_LIMIT_BYTES if cache_bytes is None else cache_bytes,
    )
    splits = parsed.load(spec, data_dir=data_dir, **kwargs)
    stored = splits.train.element_spec[0].shape[1]  # below image_size for small TFDS images
    logging.info(
        "data %s: %d classes, %d train, %d val, %d skipped, %dx%d px",
        spec,
        len(splits.class_names),
        splits.num_train,
        splits.num_val,
        splits.skipped,
        stored,
        stored,
    )
    limit = kwargs["cache_bytes"]
    if limit and not should_cache(splits.num_train + splits.num_val, stored, limit):
        # Nothing else tells the user why every epoch is slow: a folder of large photos is
        # decoded again each time.
        logging.warning(
            "data %s: its decoded images (%.1f GiB at %d px) exceed the cache limit (%.1f GiB, "
            "kft.train's --cache_gb), so they are decoded again every epoch",
            spec,
            (splits.num_train + splits.num_val) * stored * stored * 3 / 1024**3,
            stored,
            limit / 1024**3,
        )
    return splits


def load_eval(
    spec: str,
    *,
    image_size: int,
    batch_size: int,
    data_dir: str | None = None,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[tf.data.Dataset, tuple[str, ...], int]:
    """Builds the evaluation pipeline of a data source (fixed order, partial batch kept).

    Which examples: TFDS -> the test split (`test=` override, else `test`, else `validation`);
    folder in split layout -> PATH/test, else PATH/val; folder in flat layout -> every image
    under PATH (class = subfolder); digits -> the held-out validation split of `load` with the
    same `val_fraction` and `seed`.

    Args:
      spec: data spec, see `parse_spec`.
      image_size: side S of the square uint8 images produced.
      batch_size: examples per batch.
      data_dir: TFDS data directory (TFDS sources only).
      class_names: the classes the model was trained on (e.g. read from its export). When
        given, labels index this list: a folder class not in it is an error, and for TFDS and
        digits the source's class names must equal it. Without it a folder's labels follow its
        own sorted class folders (PATH/train's in split layout), which only matches the model
        if the same classes are present.
      val_fraction: digits only, must match training.
      seed: digits only, must match training.

    Returns:
      `(dataset, class_names, skipped)`.

    Raises:
      ValueError: bad arguments or an unusable source (one line naming the value).
    """
    parsed = parse_spec(spec)
    _check_sizes(image_size, batch_size)
    expected = tuple(class_names) if class_names is not None else None
    dataset, names, skipped = parsed.load_eval(
        spec,
        image_size=image_size,
        batch_size=batch_size,
        data_dir=data_dir,
        expected=expected,
        val_fraction=val_fraction,
        seed=seed,
    )
    if expected is not None and names != expected:
        raise ValueError(f"data spec {spec!r} has classes {list(names)}, but the model was trained on {list(expected)}")
    return dataset, names, skipped


def _check_sizes(image_size: int, batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}: must be an integer >= 8")


# ----------------------------------------------------------------------------------------------
# Shared image ops (each works eagerly and inside tf.data).


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """[H, W, C] with C in 1..4 -> [H, W, 3]: gray is repeated, alpha is dropped."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels is not None:
        return tf.tile(image[..., :1], [1, 1, 3]) if channels < 3 else image[..., :3]
    image = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def resize_images(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """kft's one resize: [..., H, W, C] pixels 0..255 (any dtype) -> float32 [..., S, S, C].

    The data pipelines (training, validation, kft.evaluate), kft.predict and the model itself
    (so the exported SavedModel, for images of any size) all resize with this function, so a
    photo served at full resolution gets the probabilities kft.evaluate reports for the same
    file. Bilinear with antialiasing (a shrunk image averages each output pixel's footprint
    instead of sampling 4 input pixels, which aliases fine detail), rounded to whole values as
    the uint8 pipelines store them. Eagerly, inside tf.data and inside a model.

    An input whose static shape is already S x S is returned unchanged (cast to float32): the
    model then adds nothing to what the pipeline did, and augmented (non-integer) training
    images are not rounded.

    Args:
      images: [H, W, C] or [B, H, W, C].
      image_size: S.

    Returns:
      float32 [..., S, S, C] holding whole numbers in 0..255 (unless returned unchanged).
    """
    images = tf.cast(images, tf.float32)
    height, width = images.shape[-3], images.shape[-2]
    if height == image_size and width == image_size:
        return images

    def bilinear(antialias: bool) -> tf.Tensor:
        return tf.image.resize(images, [image_size, image_size], method="bilinear", antialias=antialias)

    # Antialiasing only changes shrinking. Where no side shrinks the plain bilinear kernel is
    # used: it computes the same numbers (bar float rounding), and unlike the antialiased one
    # (ScaleAndTranslate) it compiles with XLA and converts to TFLite, which the train step of
    # a small TFDS set upsampled on the device and TFLite models need. The choice is made the
    # same way whether the shape is known when tracing (in Python) or only when running (tf.cond),
    # so the pipelines and the served graph pick the same kernel for the same image.
    if height is not None and width is not None:
        resized = bilinear(antialias=not (height <= image_size and width <= image_size))
    else:
        shape = tf.shape(images)
        grows = tf.logical_and(shape[-3] <= image_size, shape[-2] <= image_size)
        resized = tf.cond(grows, lambda: bilinear(False), lambda: bilinear(True))
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """`resize_images` as uint8: [H, W, C] (or batched) -> [S, S, C] uint8."""
    return tf.cast(resize_images(image, image_size), tf.uint8)


def finish(
    dataset: tf.data.Dataset,
    *,
    num_examples: int,
    batch_size: int,
    image_size: int,
    training: bool,
    seed: int,
    cache: bool,
    shuffle: bool,
) -> tf.data.Dataset:
    """Unbatched (uint8 image, int32 label) -> cached, shuffled, batched, prefetched."""
    # Tells Keras and len() how many examples a pass has, and fails loudly if that's wrong.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
    if cache:
        dataset = dataset.cache()
    if training and shuffle:
        buffer = num_examples if cache else max(1000, _SHUFFLE_BUFFER_BYTES // (image_size * image_size * 3))
        dataset = dataset.shuffle(min(buffer, max(num_examples, 1)), seed=seed, reshuffle_each_iteration=True)
    # Training drops the ragged last batch (steady step shapes, no recompiles) unless the
    # whole set is smaller than one batch, which would leave an empty epoch.
    drop_remainder = training and num_examples >= batch_size
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.prefetch(AUTOTUNE)
    options = tf.data.Options()
    # Ordered parallel map: a seeded shuffle only reproduces if its input order does, and
    # validation must be in a fixed order. Decode costs are uniform, so little is lost.
    options.deterministic = True
    return dataset.with_options(options)


def should_cache(num_examples: int, image_size: int, cache_bytes: int) -> bool:
    return num_examples * image_size * image_size * 3 <= cache_bytes


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------
# Splitting a list of labelled images (folder and digits).


def split_per_class(
    labels: np.ndarray, class_names: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
    """Seeded stratified split: (train order per class, val indices in ascending order, the
    classes the validation split has no image of).

    Each class is permuted by its own generator, seeded from (seed, class name), so a class
    gets the same split whatever other classes are present (digits:0-4 vs digits).
    The train indices keep the permuted order, so "the first N" is a seeded random subset.
    A class holds out round(n * val_fraction) of its n images but never its last one: a class
    too small to hold one out (under 1 / (2 * val_fraction) images, or a single image) trains
    on all of its images, as users' folders with a few examples of a rare class need.
    val_fraction=0 holds out nothing.
    """
    train, val, not_in_val = [], [], []
    for index, name in enumerate(class_names):
        members = np.flatnonzero(labels == index)
        rng = np.random.default_rng([seed % 2**32, zlib.crc32(name.encode())])
        members = rng.permutation(members)
        num_val = max(0, min(_round_half_up(len(members) * val_fraction), len(members) - 1))
        if num_val == 0 and val_fraction > 0:
            not_in_val.append(name)
        val.append(members[:num_val])
        train.append(members[num_val:])
    return train, np.sort(np.concatenate(val)), tuple(not_in_val)


def limit_train(train_per_class: list[np.ndarray], limit: int | None) -> np.ndarray:
    return np.sort(np.concatenate([t[:limit] if limit else t for t in train_per_class]))


def spread_order(labels: np.ndarray) -> np.ndarray:
    """A permutation that interleaves the classes, each at its share of the whole: any first n
    examples hold every class in proportion (the recipe's checks read a first n of a folder
    listed class by class). Each class keeps its own order, so the probe's stratified folds,
    which follow the order within a class, are those of the listing."""
    position = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((labels, position))


# The built-in sources. Imported last: each module registers its spec class with
# `register_source`, and builds on the pipeline above.
from kft import data_tfds, data_folder, data_digits  # noqa: E402,F401,I001
