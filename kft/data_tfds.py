"""The `tfds:NAME[,train=SPLIT][,val=SPLIT][,test=SPLIT]` data source: TFDS image datasets.

A dataset with `image` and `label` (ClassLabel) features, read with TFDS's own split slicing
(kft.data documents the defaults). A fixed square image size below the requested one (CIFAR-10's
32 px) is kept: the model upsamples on the device, and the cache stays small.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection

import numpy as np
import tensorflow as tf

from kft import data

AUTOTUNE = tf.data.AUTOTUNE


@data.register_source("tfds")
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
        return _parse(spec, rest)

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "data.Splits":
        return _load(self, data_dir=data_dir, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        return _load_eval(self, image_size, batch_size, data_dir)


def _parse(spec: str, rest: str) -> TfdsSpec:
    # Commas separate the options because TFDS names use ':' for versions
    # (`mnist:3.*.*`) and split slices use ':' too (`train[:90%]`).
    name, *options = [part.strip() for part in rest.split(",")]
    if not re.fullmatch(r"[\w./:*-]+", name):
        raise data.spec_error(spec, f"bad TFDS name {name!r}")
    splits: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("train", "val", "test") or not value:
            raise data.spec_error(spec, f"bad option {option!r} (use train=SPLIT, val=SPLIT or test=SPLIT)")
        if key in splits:
            raise data.spec_error(spec, f"option {key}= given twice")
        splits[key] = value
    return TfdsSpec(name=name, **splits)


def _train_val_splits(spec: TfdsSpec, available: Collection[str], val_fraction: float) -> tuple[str, str | None, bool]:
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


def _eval_split(spec: TfdsSpec, available: Collection[str]) -> str:
    if spec.test is not None:
        return spec.test
    if not available or "test" in available:
        return "test"
    if "validation" in available:
        return "validation"
    raise ValueError(
        f"tfds:{spec.name} has no test or validation split (it has {sorted(available)}); choose one with test=SPLIT"
    )


def _builder(spec: TfdsSpec, data_dir: str | None):
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


def _dataset(builder, split: str, *, shuffle_files: bool, seed: int) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    # Images stay encoded until after the per-class limit, so dropped ones are never decoded.
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )


def _limit_per_class(dataset: tf.data.Dataset, limit: int | None, num_classes: int) -> tf.data.Dataset:
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


def _stored_size(builder, image_size: int) -> int:
    """The image size the pipeline keeps: a fixed square source smaller than `image_size`
    stays at its own size (see the module docstring); anything else becomes `image_size`."""
    height, width = builder.info.features["image"].shape[:2]  # None where sizes vary
    if height and height == width and height < image_size:
        return int(height)
    return image_size


def _decoder(builder, image_size: int):
    image_feature = builder.info.features["image"]

    def decode(example):
        image = image_feature.decode_example(example["image"])
        return data.resize_uint8(data.to_rgb(image), image_size), tf.cast(example["label"], tf.int32)

    return decode


def _load(
    spec: TfdsSpec, *, data_dir, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> data.Splits:
    builder = _builder(spec, data_dir)
    class_names = tuple(builder.info.features["label"].names)
    train_split, val_split, carved = _train_val_splits(spec, set(builder.info.splits), val_fraction)
    # Counting first: it decides caching, and uncached big sets read shuffled files.
    num_train = _count(
        _limit_per_class(
            _dataset(builder, train_split, shuffle_files=False, seed=seed), train_limit_per_class, len(class_names)
        )
    )
    val = None if val_split is None else _dataset(builder, val_split, shuffle_files=False, seed=seed)
    num_val = 0 if val is None else _count(val)
    if num_train == 0 or (val is not None and num_val == 0):
        raise ValueError(
            f"tfds:{spec.name}: train split {train_split!r} has {num_train} and "
            f"validation split {val_split!r} has {num_val} examples; both need "
            "at least 1 (change val_fraction or the splits)"
        )
    image_size = _stored_size(builder, image_size)
    cache = data.should_cache(num_train + num_val, image_size, cache_bytes)
    # File-order shuffling only when the set is streamed (no cache) and has no per-class
    # limit: the limit must pick the same examples every epoch.
    train = _dataset(builder, train_split, seed=seed, shuffle_files=not cache and train_limit_per_class is None)
    train = _limit_per_class(train, train_limit_per_class, len(class_names))
    decode = _decoder(builder, image_size)
    in_order = _limit_per_class(
        _dataset(builder, train_split, shuffle_files=False, seed=seed), train_limit_per_class, len(class_names)
    )

    def build(batch_size: int) -> data.Splits:
        common = dict(batch_size=batch_size, image_size=image_size, seed=seed, cache=cache, shuffle=True)
        return data.Splits(
            train=data.finish(
                train.map(decode, num_parallel_calls=AUTOTUNE), num_examples=num_train, training=True, **common
            ),
            val=None
            if val is None
            else data.finish(
                val.map(decode, num_parallel_calls=AUTOTUNE), num_examples=num_val, training=False, **common
            ),
            class_names=class_names,
            num_train=num_train,
            num_val=num_val,
            skipped=0,
            train_in_order=data.finish(
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


def _load_eval(spec: TfdsSpec, image_size: int, batch_size: int, data_dir: str | None):
    builder = _builder(spec, data_dir)
    split = _eval_split(spec, set(builder.info.splits))
    dataset = _dataset(builder, split, shuffle_files=False, seed=0)
    num = _count(dataset)
    image_size = _stored_size(builder, image_size)
    dataset = data.finish(
        dataset.map(_decoder(builder, image_size), num_parallel_calls=AUTOTUNE),
        num_examples=num,
        batch_size=batch_size,
        image_size=image_size,
        training=False,
        seed=0,
        cache=False,
        shuffle=False,
    )
    return dataset, tuple(builder.info.features["label"].names), 0
