"""Data sources turned into uint8 tf.data pipelines.

Every source ends in the same pipeline, built on the host CPU:

    decode (parallel) -> RGB -> resize -> uint8 -> cache -> shuffle -> batch -> prefetch

and yields `(images uint8 [B, S, S, 3], labels int32 [B])`, S = the image size. Augmentation
and the backbone's preprocessing are NOT done here: they run inside the model, on the device
(see DESIGN.md). One exception to S: a TFDS dataset whose images all share one square size
smaller than the image size (CIFAR-10's 32 px, MNIST's 28) is kept at that size, and the
model's own resize upsamples it on the device: the host never upsamples, and CIFAR-10 for a
224 px backbone stays a 150 MB cache instead of 7.5 GB decoded and upsampled every epoch.

Spec strings (`parse_spec` documents the grammar; each prefix is a registered source class,
`register_source`, so a new source is one class):

* `tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]`: a TFDS image-classification dataset with
  `image` and `label` features, e.g. `tfds:cifar10`, `tfds:oxford_flowers102`,
  `tfds:cifar10,train=train[:20%]`. Defaults: train=`train`; val=`validation` when the dataset
  has one, else the last `val_fraction` of train (TFDS split slicing); test=`test` (or
  `validation` if there is no test split). The test split is only read by `load_eval`.
  val_fraction=0 carves nothing: a source without a validation split of its own then has none.
* `folder:PATH`: one subfolder per class. If PATH has `train/`, `val/` or `test/` subfolders it
  is a split layout (each of those has one subfolder per class); otherwise the class folders
  sit directly in PATH and `load` carves a seeded, stratified validation split.
* `digits[:CLASSES]`: the real 8x8 handwritten digits that ship inside scikit-learn (1797
  images), the offline quickstart dataset. CLASSES is `A-B` or a comma list (`1,3,7`) or a mix
  (`0-2,7`); labels are remapped to 0..k-1 in ascending digit order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import re
import zlib
from collections.abc import Callable, Collection, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

AUTOTUNE = tf.data.AUTOTUNE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# The largest image file kft reads (a 100-megapixel PNG is ~300 MB uncompressed, far less as
# a file); anything bigger is skipped rather than read into memory.
MAX_IMAGE_FILE_BYTES = 256 * 1024**2


def file_problem(path: str) -> str | None:
    """Why an image file is not read, or None: only regular files (a FIFO would block the
    reader forever, a device such as /dev/zero never ends) of at most MAX_IMAGE_FILE_BYTES."""
    import stat

    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        return f"larger than {MAX_IMAGE_FILE_BYTES // 1024**2} MiB"
    return None


# Default memory for the decoded-image cache: uint8 sets (train + val) at or below it are
# cached in memory, bigger ones re-decoded every epoch (2 GiB holds ~14k images at 224 px or
# ~700k at 32 px). kft.train's --cache_gb sets it per run.
CACHE_LIMIT_BYTES = 2 * 1024**3

# Uncached training sets are shuffled through a buffer of about this many bytes.
_SHUFFLE_BUFFER_BYTES = 512 * 1024**2


_SPLIT_LAYOUT_DIRS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------
# Data sources: a registry of spec classes, one per prefix. A new source is one registered
# frozen dataclass with `form` (its syntax, for error messages), `parse`, `load` and `load_eval`.

SOURCES: dict[str, type] = {}


def register_source(prefix: str) -> Callable[[type], type]:
    """Class decorator: makes the class the source of specs `PREFIX[:...]`."""

    def decorate(cls: type) -> type:
        if prefix in SOURCES:
            raise ValueError(f"data source {prefix!r} is registered twice ({SOURCES[prefix].__name__}, {cls.__name__})")
        SOURCES[prefix] = cls
        return cls

    return decorate


def spec_forms() -> str:
    """Every registered source's syntax, for error messages."""
    return " | ".join(cls.form for cls in SOURCES.values())


@register_source("tfds")
@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """`tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]`; None means the default split."""

    form = "tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]"
    name: str
    train: str = "train"
    val: str | None = None
    test: str | None = None

    @classmethod
    def parse(cls, spec: str, rest: str) -> "TfdsSpec":
        return _parse_tfds(spec, rest)

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "Splits":
        return _load_tfds(self, data_dir=data_dir, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        return _load_tfds_eval(self, image_size, batch_size, data_dir)


@register_source("folder")
@dataclasses.dataclass(frozen=True)
class FolderSpec:
    """`folder:PATH`."""

    form = "folder:PATH"
    path: str

    @classmethod
    def parse(cls, spec: str, rest: str) -> "FolderSpec":
        if not rest.strip():
            raise _spec_error(spec, "folder: needs a PATH")
        return cls(os.path.expanduser(rest.strip()))

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "Splits":
        return _load_folder(spec, self, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        return _load_folder_eval(spec, self, image_size, batch_size, expected)


@register_source("digits")
@dataclasses.dataclass(frozen=True)
class DigitsSpec:
    """`digits[:CLASSES]`; `classes` are the kept digits in ascending order."""

    form = "digits[:CLASSES] with CLASSES like 0-4, 5-9 or 1,3,7"
    classes: tuple[int, ...] = tuple(range(10))

    @classmethod
    def parse(cls, spec: str, rest: str) -> "DigitsSpec":
        return _parse_digits(spec, rest)

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "Splits":
        return _load_digits(self, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        splits = _load_digits(
            self,
            image_size=image_size,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            train_limit_per_class=None,
            cache_bytes=CACHE_LIMIT_BYTES,
        )
        if splits.val is None:
            raise ValueError(
                f"data spec {spec!r}: val_fraction=0 holds out no digits to evaluate on "
                "(the run trained on all of them)"
            )
        return splits.val, splits.class_names, 0


Spec = TfdsSpec | FolderSpec | DigitsSpec


def _spec_error(spec: str, why: str) -> ValueError:
    return ValueError(f"data spec {spec!r}: {why}; expected {spec_forms()}")


def parse_spec(spec: str) -> Spec:
    """Parses a data spec string, checking syntax only (not that paths or datasets exist).

    Suitable for flag validators: every error is one line naming the value and the allowed
    forms.

    Args:
      spec: `tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]`, `folder:PATH` or
        `digits[:CLASSES]` (CLASSES: `A-B`, `1,3,7` or a mix such as `0-2,7`).

    Returns:
      A `TfdsSpec`, `FolderSpec` or `DigitsSpec`.

    Raises:
      ValueError: the spec is malformed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "empty spec")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind not in SOURCES:
        raise _spec_error(spec, f"unknown source {kind!r}")
    return SOURCES[kind].parse(spec, rest)


def _parse_tfds(spec: str, rest: str) -> TfdsSpec:
    # Commas separate the options because TFDS names use ':' for versions
    # (`mnist:3.*.*`) and split slices use ':' too (`train[:90%]`).
    name, *options = [part.strip() for part in rest.split(",")]
    if not re.fullmatch(r"[\w./:*-]+", name):
        raise _spec_error(spec, f"bad TFDS name {name!r}")
    splits: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("train", "val", "test") or not value:
            raise _spec_error(spec, f"bad option {option!r} (use train=SPLIT, val=SPLIT or test=SPLIT)")
        if key in splits:
            raise _spec_error(spec, f"option {key}= given twice")
        splits[key] = value
    return TfdsSpec(name=name, **splits)


def _parse_digits(spec: str, rest: str) -> DigitsSpec:
    if not rest.strip():
        return DigitsSpec()
    classes: list[int] = []
    for item in rest.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d)(?:-(\d))?", item)
        if not match:
            raise _spec_error(spec, f"bad class item {item!r} (digits 0-9, as A-B or A)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise _spec_error(spec, f"empty range {item!r}")
        classes.extend(range(low, high + 1))
    if len(set(classes)) != len(classes):
        raise _spec_error(spec, "a digit is listed twice")
    if len(classes) < 2:
        raise _spec_error(spec, "needs at least 2 classes")
    return DigitsSpec(tuple(sorted(classes)))


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
        last batch kept (the linear probe's feature pass); None where the source lacks it.
      batch_size: the batch size of the pipelines (0 if unknown).
      rebuild: `rebuild(batch_size)` -> the same Splits batched differently, without reading
        the source again (see `with_batch_size`).
      val_carved: the validation split was carved out of the training images by
        `val_fraction` (else it is the source's own, or there is none).
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


def _finish(
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


def _should_cache(num_examples: int, image_size: int, cache_bytes: int) -> bool:
    return num_examples * image_size * image_size * 3 <= cache_bytes


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------
# TFDS.


def _tfds_train_val_splits(
    spec: TfdsSpec, available: Collection[str], val_fraction: float
) -> tuple[str, str | None, bool]:
    """The TFDS split strings for train and validation (None: no validation split) and whether
    validation is carved out of train; never the test split by default.

    `available` is empty when TFDS does not know the splits (e.g. under
    `tfds.testing.mock_data` without metadata files).
    """
    if available and re.fullmatch(r"[\w-]+", spec.train) and spec.train not in available:
        raise ValueError(
            f"tfds:{spec.name} has no split {spec.train!r}; it has {sorted(available)} (choose with train=SPLIT)"
        )
    if spec.val is not None:
        return spec.train, spec.val, False
    if "validation" in available:
        return spec.train, "validation", False
    if val_fraction == 0:
        return spec.train, None, False
    if not re.fullmatch(r"[\w-]+", spec.train):
        raise ValueError(
            f"tfds:{spec.name} has no validation split and train={spec.train!r} "
            "is not a plain split name to carve one from; add val=SPLIT"
        )
    # Both halves use the same boundary string, so TFDS rounds them into an exact partition.
    boundary = f"{round(100.0 * (1.0 - val_fraction), 6):g}"
    return f"{spec.train}[:{boundary}%]", f"{spec.train}[{boundary}%:]", True


def _tfds_eval_split(spec: TfdsSpec, available: Collection[str]) -> str:
    if spec.test is not None:
        return spec.test
    if not available or "test" in available:
        return "test"
    if "validation" in available:
        return "validation"
    raise ValueError(
        f"tfds:{spec.name} has no test or validation split (it has {sorted(available)}); choose one with test=SPLIT"
    )


def _tfds_builder(spec: TfdsSpec, data_dir: str | None):
    import tensorflow_datasets as tfds  # Slow import; only TFDS sources need it.

    try:
        builder = tfds.builder(spec.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"tfds:{spec.name}: no TFDS dataset of that name (names as in "
            "https://www.tensorflow.org/datasets/catalog, e.g. tfds:cifar10)"
        ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
        raise ValueError(
            f"tfds:{spec.name} needs 'image' and 'label' (ClassLabel) features; it has {sorted(features.keys())}"
        )
    if not builder.is_prepared() and _downloads_for_real():
        where = data_dir or "~/tensorflow_datasets"
        offline = _no_network()
        how = (
            f"download it where there is network (tfds.builder({spec.name!r}).download_and_prepare()) "
            f"and pass that data directory as --data_dir"
        )
        if offline:
            raise ValueError(f"tfds:{spec.name} is not prepared in {where} and cannot be downloaded ({offline}); {how}")
        try:
            builder.download_and_prepare()
        except Exception as e:  # Network, disk and checksum failures, all worded by TFDS.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"tfds:{spec.name} could not be downloaded into {where} ({reason}); {how}") from None
    return builder


# A host every TFDS download goes through first (its GCS mirror), to find out in seconds
# whether a download can happen at all.
_TFDS_HOST = ("storage.googleapis.com", 443)


def _no_network(timeout: float = 3.0) -> str | None:
    """Why TFDS's servers cannot be reached, or None if they can."""
    import socket

    try:
        socket.create_connection(_TFDS_HOST, timeout=timeout).close()
    except OSError as e:
        return f"no network: {_TFDS_HOST[0]} unreachable, {e.strerror or e}"
    return None


def _downloads_for_real() -> bool:
    """False under tfds.testing.mock_data, which replaces the download with a no-op."""
    from tensorflow_datasets.core import dataset_builder

    method = dataset_builder.DatasetBuilder.download_and_prepare
    return getattr(method, "__module__", "") == dataset_builder.__name__


def _tfds_dataset(builder, split: str, *, shuffle_files: bool, seed: int) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    # Images stay encoded until after the per-class limit, so dropped ones are never decoded.
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )


def _tfds_limit(dataset: tf.data.Dataset, limit: int | None, num_classes: int) -> tf.data.Dataset:
    """Keeps the first `limit` examples of each class, in stream order."""
    if limit is None:
        return dataset

    def step(counts, example):
        label = tf.cast(example["label"], tf.int32)
        keep = counts[label] < limit
        return tf.tensor_scatter_nd_add(counts, [[label]], [1]), (example, keep)

    def kept(example, keep):
        del example
        return keep

    def drop_flag(example, keep):
        del keep
        return example

    dataset = dataset.scan(tf.zeros([num_classes], tf.int32), step)
    return dataset.filter(kept).map(drop_flag)


def _count(dataset: tf.data.Dataset) -> int:
    known = int(dataset.cardinality())
    if known >= 0:
        return known
    labels_only = dataset.map(lambda example: example["label"])
    return int(labels_only.reduce(np.int64(0), lambda n, _: n + 1))


def _tfds_stored_size(builder, image_size: int) -> int:
    """The image size the pipeline keeps: a fixed square source smaller than `image_size`
    stays at its own size (see the module docstring); anything else becomes `image_size`."""
    height, width = builder.info.features["image"].shape[:2]  # None where sizes vary
    if height and height == width and height < image_size:
        return int(height)
    return image_size


def _tfds_decode(builder, image_size: int):
    image_feature = builder.info.features["image"]

    def decode(example):
        image = image_feature.decode_example(example["image"])
        return resize_uint8(to_rgb(image), image_size), tf.cast(example["label"], tf.int32)

    return decode


def _load_tfds(
    spec: TfdsSpec, *, data_dir, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> Splits:
    builder = _tfds_builder(spec, data_dir)
    class_names = tuple(builder.info.features["label"].names)
    train_split, val_split, carved = _tfds_train_val_splits(spec, set(builder.info.splits), val_fraction)
    # Counting first: it decides caching, and uncached big sets read shuffled files.
    num_train = _count(
        _tfds_limit(
            _tfds_dataset(builder, train_split, shuffle_files=False, seed=seed), train_limit_per_class, len(class_names)
        )
    )
    val = None if val_split is None else _tfds_dataset(builder, val_split, shuffle_files=False, seed=seed)
    num_val = 0 if val is None else _count(val)
    if num_train == 0 or (val is not None and num_val == 0):
        raise ValueError(
            f"tfds:{spec.name}: train split {train_split!r} has {num_train} and "
            f"validation split {val_split!r} has {num_val} examples; both need "
            "at least 1 (change val_fraction or the splits)"
        )
    image_size = _tfds_stored_size(builder, image_size)
    cache = _should_cache(num_train + num_val, image_size, cache_bytes)
    # File-order shuffling only when the set is streamed (no cache) and has no per-class
    # limit: the limit must pick the same examples every epoch.
    train = _tfds_dataset(builder, train_split, seed=seed, shuffle_files=not cache and train_limit_per_class is None)
    train = _tfds_limit(train, train_limit_per_class, len(class_names))
    decode = _tfds_decode(builder, image_size)
    in_order = _tfds_limit(
        _tfds_dataset(builder, train_split, shuffle_files=False, seed=seed), train_limit_per_class, len(class_names)
    )

    def build(batch_size: int) -> Splits:
        common = dict(batch_size=batch_size, image_size=image_size, seed=seed, cache=cache, shuffle=True)
        return Splits(
            train=_finish(
                train.map(decode, num_parallel_calls=AUTOTUNE), num_examples=num_train, training=True, **common
            ),
            val=None
            if val is None
            else _finish(val.map(decode, num_parallel_calls=AUTOTUNE), num_examples=num_val, training=False, **common),
            class_names=class_names,
            num_train=num_train,
            num_val=num_val,
            skipped=0,
            train_in_order=_finish(
                in_order.map(decode, num_parallel_calls=AUTOTUNE),
                num_examples=num_train,
                training=False,
                **{**common, "cache": False, "shuffle": False},
            ),
            batch_size=batch_size,
            rebuild=build,
            val_carved=carved,
        )

    return build(batch_size)


def _load_tfds_eval(spec: TfdsSpec, image_size: int, batch_size: int, data_dir: str | None):
    builder = _tfds_builder(spec, data_dir)
    split = _tfds_eval_split(spec, set(builder.info.splits))
    dataset = _tfds_dataset(builder, split, shuffle_files=False, seed=0)
    num = _count(dataset)
    image_size = _tfds_stored_size(builder, image_size)
    dataset = _finish(
        dataset.map(_tfds_decode(builder, image_size), num_parallel_calls=AUTOTUNE),
        num_examples=num,
        batch_size=batch_size,
        image_size=image_size,
        training=False,
        seed=0,
        cache=False,
        shuffle=False,
    )
    return dataset, tuple(builder.info.features["label"].names), 0


# ----------------------------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True)
class _Files:
    """Decodable image files of one folder split."""

    paths: np.ndarray  # str
    labels: np.ndarray  # int32
    use_pil: np.ndarray  # bool: decoded with PIL rather than TF (see `_route_files`)


def folder_identity(spec: str) -> str | None:
    """What a `folder:` dataset holds, wherever it lies: a digest of every image file's path
    relative to the folder (class folders and train/val/test included) and size, and the count.

    A resume compares it when the folder's path changed (the folder was moved or copied), so
    that the same files are the same data. Files are listed, not read: cheap next to decoding.

    Returns:
      `sha256:<16 hex digits>/<N>files`, or None for other specs and a folder that is not there.
    """
    parsed = parse_spec(spec)
    if not isinstance(parsed, FolderSpec) or not os.path.isdir(parsed.path):
        return None
    digest, count = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(parsed.path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # As the loader walks.
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(dirpath, name)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
                digest.update(f"{os.path.relpath(path, parsed.path)}\0{size}\n".encode())
                count += 1
    return f"sha256:{digest.hexdigest()[:16]}/{count}files"


def _class_dirs(spec: str, root: str) -> list[str]:
    if not os.path.isdir(root):
        raise ValueError(f"data spec {spec!r}: {root!r} does not exist or is not a directory")
    names = sorted(
        name for name in os.listdir(root) if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
    )
    if not names:
        raise ValueError(
            f"data spec {spec!r}: {root!r} has no class subfolders (expected one subfolder of images per class)"
        )
    return names


def _image_files(class_dir: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _tf_decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _pil_decode_file(path) -> np.ndarray:
    from PIL import Image

    if isinstance(path, bytes):
        path = path.decode()
    elif not isinstance(path, str):  # An EagerTensor inside tf.py_function.
        path = path.numpy().decode()
    with Image.open(path) as image:
        image.seek(0)  # First frame of an animated GIF.
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _route_files(paths: Sequence[str]) -> np.ndarray:
    """Decodes every file once; returns per file 0 = unusable, 1 = TF decodes it, 2 = PIL.

    TF's decoder is used where it works (parallel, no GIL). BMPs always go to PIL: TF
    rejects 1-bit BMPs and silently ignores the palette of 8-bit ones. Files TF rejects get
    a second chance with PIL. Decoding up front, with the same code the pipeline uses, is
    what guarantees that no file fails mid-epoch and that `skipped` is exact.
    """
    routes = np.zeros(len(paths), np.int8)
    # FIFOs, devices and huge files are never opened: they stay 0 (skipped and counted).
    eligible = np.asarray([i for i, p in enumerate(paths) if file_problem(p) is None], np.int64)
    if not len(eligible):
        return routes

    def try_tf(index, path):
        contents = tf.io.read_file(path)
        is_bmp = tf.strings.substr(contents, 0, 2) == "BM"
        ok = tf.cond(
            is_bmp,
            lambda: tf.constant(False),
            lambda: tf.greater_equal(tf.size(tf.io.decode_image(contents, channels=3, expand_animations=False)), 0),
        )
        return index, ok

    probe = tf.data.Dataset.from_tensor_slices((eligible, [paths[i] for i in eligible]))
    # Unreadable or undecodable files raise inside map; ignore_errors drops exactly those.
    probe = probe.map(try_tf, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    for index, ok in probe.batch(4096).as_numpy_iterator():
        routes[index[ok]] = 1

    def try_pil(path):
        try:
            _pil_decode_file(path)
            return True
        except Exception:  # Any failure (truncated, not an image, decompression bomb) skips.
            return False

    rest = eligible[routes[eligible] == 0]
    workers = min(16, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for index, ok in zip(rest, pool.map(try_pil, [paths[i] for i in rest])):
            routes[index] = 2 if ok else 0
    return routes


def _scan_folder(
    spec: str, root: str, class_names: Sequence[str], allowed: Sequence[str] | None = None
) -> tuple[_Files, list[str]]:
    """Lists, probes and labels the images of `root`/CLASS for CLASS in `class_names`.

    Args:
      spec: the spec string, for messages.
      root: folder holding the class subfolders.
      class_names: the subfolders to read.
      allowed: label space; labels index this (defaults to `class_names`).

    Returns:
      The usable files and the paths that could not be decoded.
    """
    allowed = list(allowed if allowed is not None else class_names)
    unknown = [name for name in class_names if name not in allowed]
    if unknown:
        raise ValueError(
            f"data spec {spec!r}: classes {unknown} in {root!r} are not among the training classes {allowed}"
        )
    paths, labels = [], []
    for name in class_names:
        found = _image_files(os.path.join(root, name))
        paths.extend(found)
        labels.extend([allowed.index(name)] * len(found))
    routes = _route_files(paths)
    bad = [p for p, r in zip(paths, routes) if r == 0]
    good = routes > 0
    files = _Files(
        paths=np.asarray(paths, dtype=object)[good],
        labels=np.asarray(labels, np.int32)[good],
        use_pil=routes[good] == 2,
    )
    for name in class_names:
        if not np.any(files.labels == allowed.index(name)):
            raise ValueError(
                f"data spec {spec!r}: class folder {os.path.join(root, name)!r} has "
                f"no usable images (extensions {', '.join(IMAGE_EXTENSIONS)}, "
                "case-insensitive)"
            )
    return files, bad


def _log_skipped(spec: str, bad: Sequence[str], total: int) -> None:
    if bad:
        examples = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        logging.warning(
            "data %s: skipped %d of %d image files that could not be decoded: %s", spec, len(bad), total, examples
        )


def _split_per_class(
    labels: np.ndarray, class_names: Sequence[str], val_fraction: float, seed: int, what: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Seeded stratified split; returns (train order, val indices in ascending order).

    Each class is permuted by its own generator, seeded from (seed, class name), so a class
    gets the same split whatever other classes are present (digits:0-4 vs digits).
    The train indices keep the permuted order, so "the first N" is a seeded random subset.
    val_fraction=0 holds out nothing.
    """
    train, val = [], []
    for index, name in enumerate(class_names):
        members = np.flatnonzero(labels == index)
        rng = np.random.default_rng([seed % 2**32, zlib.crc32(name.encode())])
        members = rng.permutation(members)
        num_val = _round_half_up(len(members) * val_fraction)
        if (num_val == 0 and val_fraction > 0) or num_val == len(members):
            raise ValueError(
                f"{what}: val_fraction={val_fraction} leaves class {name!r} ({len(members)} "
                f"images) with {len(members) - num_val} train and {num_val} val images; "
                "both need at least 1"
            )
        val.append(members[:num_val])
        train.append(members[num_val:])
    return train, np.sort(np.concatenate(val))


def _limit_train(train_per_class: list[np.ndarray], limit: int | None) -> np.ndarray:
    return np.sort(np.concatenate([t[:limit] if limit else t for t in train_per_class]))


def _subset(files: _Files, index: np.ndarray) -> _Files:
    return _Files(files.paths[index], files.labels[index], files.use_pil[index])


def _folder_pipeline(
    files: _Files, *, image_size: int, batch_size: int, training: bool, seed: int, cache: bool
) -> tf.data.Dataset:
    any_pil = bool(files.use_pil.any())

    def decode(path, use_pil, label):
        if any_pil:
            image = tf.cond(
                use_pil, lambda: tf.py_function(_pil_decode_file, [path], tf.uint8), lambda: _tf_decode_file(path)
            )
            image.set_shape([None, None, 3])
        else:  # Pure TF graph: no Python, no GIL.
            image = _tf_decode_file(path)
        return resize_uint8(image, image_size), label

    dataset = tf.data.Dataset.from_tensor_slices((files.paths.astype(str), files.use_pil, files.labels))
    if training and not cache:
        # Streaming: shuffle the cheap file names before decoding, not decoded images.
        dataset = dataset.shuffle(len(files.labels), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(decode, num_parallel_calls=AUTOTUNE)
    return _finish(
        dataset,
        num_examples=len(files.labels),
        batch_size=batch_size,
        image_size=image_size,
        training=training,
        seed=seed,
        cache=cache,
        shuffle=cache,
    )


def _load_folder(
    spec: str, parsed: FolderSpec, *, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> Splits:
    root = parsed.path
    split_layout = os.path.isdir(root) and any(os.path.isdir(os.path.join(root, d)) for d in _SPLIT_LAYOUT_DIRS)
    train_root = os.path.join(root, "train") if split_layout else root
    if split_layout and not os.path.isdir(train_root):
        raise ValueError(f"data spec {spec!r}: {root!r} has val/ or test/ but no train/ subfolder")
    class_names = _class_dirs(spec, train_root)
    if len(class_names) < 2:
        raise ValueError(
            f"data spec {spec!r}: {train_root!r} has only one class folder "
            f"({class_names[0]!r}); classification needs at least 2"
        )
    files, bad = _scan_folder(spec, train_root, class_names)
    total = len(files.labels) + len(bad)
    val_root = os.path.join(root, "val")
    carved = not (split_layout and os.path.isdir(val_root))
    if not carved:
        val_classes = _class_dirs(spec, val_root)
        val_files, val_bad = _scan_folder(spec, val_root, val_classes, allowed=class_names)
        missing = sorted(set(class_names) - set(val_classes))
        if missing:
            logging.warning("data %s: val/ has no folder for classes %s", spec, missing)
        train_per_class = [
            np.random.default_rng([seed % 2**32, zlib.crc32(n.encode())]).permutation(np.flatnonzero(files.labels == i))
            for i, n in enumerate(class_names)
        ]
        train_files = _subset(files, _limit_train(train_per_class, train_limit_per_class))
        bad, total = bad + val_bad, total + len(val_files.labels) + len(val_bad)
    else:
        train_per_class, val_index = _split_per_class(
            files.labels, class_names, val_fraction, seed, f"data spec {spec!r}"
        )
        train_files = _subset(files, _limit_train(train_per_class, train_limit_per_class))
        val_files = _subset(files, val_index)
    _log_skipped(spec, bad, total)
    num_train, num_val = len(train_files.labels), len(val_files.labels)
    cache = _should_cache(num_train + num_val, image_size, cache_bytes)

    def build(batch_size: int) -> Splits:
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed, cache=cache)
        return Splits(
            train=_folder_pipeline(train_files, training=True, **common),
            val=_folder_pipeline(val_files, training=False, **common) if num_val else None,
            class_names=tuple(class_names),
            num_train=num_train,
            num_val=num_val,
            skipped=len(bad),
            train_in_order=_folder_pipeline(train_files, training=False, **{**common, "cache": False}),
            batch_size=batch_size,
            rebuild=build,
            val_carved=carved and num_val > 0,
        )

    return build(batch_size)


def _load_folder_eval(
    spec: str, parsed: FolderSpec, image_size: int, batch_size: int, expected: tuple[str, ...] | None
):
    root = parsed.path
    if not os.path.isdir(root):
        raise ValueError(f"data spec {spec!r}: {root!r} does not exist or is not a directory")
    present = [d for d in _SPLIT_LAYOUT_DIRS if os.path.isdir(os.path.join(root, d))]
    if present:
        eval_dir = "test" if "test" in present else "val" if "val" in present else None
        if eval_dir is None:
            raise ValueError(f"data spec {spec!r}: {root!r} has train/ but no test/ or val/ subfolder to evaluate on")
        eval_root = os.path.join(root, eval_dir)
        if expected is None and "train" in present:
            expected_names = tuple(_class_dirs(spec, os.path.join(root, "train")))
        else:
            expected_names = expected
    else:
        eval_root, expected_names = root, expected
    classes = _class_dirs(spec, eval_root)
    names = expected_names if expected_names is not None else tuple(classes)
    files, bad = _scan_folder(spec, eval_root, classes, allowed=names)
    _log_skipped(spec, bad, len(files.labels) + len(bad))
    order = np.argsort(files.labels, kind="stable")  # Class by class, files sorted within.
    files = _subset(files, order)
    dataset = _folder_pipeline(files, image_size=image_size, batch_size=batch_size, training=False, seed=0, cache=False)
    return dataset, tuple(names), len(bad)


# ----------------------------------------------------------------------------------------------
# The built-in offline dataset: scikit-learn's 8x8 digits.


def _digits_arrays(classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
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
    parsed = parse_spec(spec)
    if not isinstance(parsed, DigitsSpec):
        raise ValueError(f"data spec {spec!r}: digits_outside_training takes digits[:CLASSES] only")
    images, labels, class_names, train_index, _ = _digits_split(parsed, val_fraction, seed, train_limit_per_class)
    outside = np.setdiff1d(np.arange(len(labels)), train_index)
    return images[outside], labels[outside], class_names


def _digits_split(parsed: DigitsSpec, val_fraction: float, seed: int, train_limit_per_class: int | None):
    """The digits of `parsed` and the seeded split `load` makes: (images, labels, class names,
    train indices, validation indices)."""
    images, labels = _digits_arrays(parsed.classes)
    class_names = tuple(str(c) for c in parsed.classes)
    train_per_class, val_index = _split_per_class(labels, class_names, val_fraction, seed, "digits")
    return images, labels, class_names, _limit_train(train_per_class, train_limit_per_class), val_index


def _digits_pipeline(
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
        lambda image, label: (resize_uint8(to_rgb(image), image_size), label), num_parallel_calls=AUTOTUNE
    )
    return _finish(
        dataset,
        num_examples=len(labels),
        batch_size=batch_size,
        image_size=image_size,
        training=training,
        seed=seed,
        cache=_should_cache(len(labels), image_size, cache_bytes),
        shuffle=True,
    )


def _load_digits(
    parsed: DigitsSpec, *, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> Splits:
    images, labels, class_names, train_index, val_index = _digits_split(
        parsed, val_fraction, seed, train_limit_per_class
    )

    def build(batch_size: int) -> Splits:
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed, cache_bytes=cache_bytes)
        return Splits(
            train=_digits_pipeline(images[train_index], labels[train_index], training=True, **common),
            val=_digits_pipeline(images[val_index], labels[val_index], training=False, **common)
            if len(val_index)
            else None,
            class_names=class_names,
            num_train=len(train_index),
            num_val=len(val_index),
            skipped=0,
            train_in_order=_digits_pipeline(
                images[train_index], labels[train_index], training=False, **{**common, "cache_bytes": 0}
            ),
            batch_size=batch_size,
            rebuild=build,
            val_carved=len(val_index) > 0,
        )

    return build(batch_size)
