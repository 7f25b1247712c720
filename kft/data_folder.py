"""The `folder:PATH` data source: a user's images, one subfolder per class.

PATH holds the class folders directly (a flat layout: kft.data carves a seeded, stratified
validation split), or `train/`, `val/` and `test/` folders that each hold them (a split layout;
the validation folder may also be named `valid/`, as Roboflow exports it, or `validation/`).
Every file is decoded once up front with the decoder the pipeline uses, so a file that cannot be
read is skipped and counted before training, never discovered mid-epoch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from kft import data

AUTOTUNE = tf.data.AUTOTUNE

# TF decodes JPEG, PNG, GIF and BMP; the rest (WebP, common in images gathered from the web,
# and TIFF, from scanners and microscopes) go to PIL like any file TF rejects.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

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


# A split layout's folders. Dataset exports name the validation folder differently (Roboflow:
# valid/); a user's own validation images are never to be ignored for want of a name.
_VAL_DIRS = ("val", "valid", "validation")
_SPLIT_LAYOUT_DIRS = ("train", *_VAL_DIRS, "test")

# How often the up-front check of a folder's files reports its progress.
PROGRESS_SECONDS = 15


def _val_dir(spec: str, root: str) -> str | None:
    """The name of the validation folder under `root` (one of _VAL_DIRS), or None."""
    present = [name for name in _VAL_DIRS if os.path.isdir(os.path.join(root, name))]
    if len(present) > 1:
        folders = " and ".join(f"{name}/" for name in present)
        raise ValueError(f"data spec {spec!r}: {root!r} has {folders}; keep one validation folder")
    return present[0] if present else None


@data.register_source("folder")
@dataclasses.dataclass(frozen=True)
class FolderSpec:
    """`folder:PATH`."""

    form = "folder:PATH"
    path: str

    @classmethod
    def parse(cls, spec: str, rest: str) -> "FolderSpec":
        if not rest.strip():
            raise data.spec_error(spec, "folder: needs a PATH")
        return cls(os.path.expanduser(rest.strip()))

    def load(self, spec: str, *, data_dir: str | None, **kwargs) -> "data.Splits":
        return _load(spec, self, **kwargs)

    def load_eval(self, spec: str, *, image_size, batch_size, data_dir, expected, val_fraction, seed):
        return _load_eval(spec, self, image_size, batch_size, expected)


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
    parsed = data.parse_spec(spec)
    if not isinstance(parsed, FolderSpec) or not os.path.isdir(parsed.path):
        return None
    digest, count = hashlib.sha256(), 0
    for path in image_files(parsed.path)[0]:
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


def walk_files(top: str):
    """Yields (folder, its file names) under `top`, folders and names sorted, hidden ones (.DS_Store,
    macOS's ._ twins, .git) left out. Linked folders are walked like folders (datasets are often
    assembled from links), each real folder once, so a link back up the tree ends the descent."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, sorted(f for f in filenames if not f.startswith("."))


def image_files(top: str) -> tuple[list[str], list[str]]:
    """The image files under `top` in `walk_files` order, and the other files there."""
    found, other = [], []
    for dirpath, filenames in walk_files(top):
        for name in filenames:
            (found if name.lower().endswith(IMAGE_EXTENSIONS) else other).append(os.path.join(dirpath, name))
    return found, other


def _tf_decode_file(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_with_pil(path) -> np.ndarray:
    from PIL import Image

    if isinstance(path, bytes):
        path = path.decode()
    elif not isinstance(path, str):  # An EagerTensor inside tf.py_function.
        path = path.numpy().decode()
    with Image.open(path) as image:
        image.seek(0)  # First frame of an animated GIF.
        if image.mode.startswith("I;16"):
            # 16-bit grayscale (TIFF): PIL's convert would clip it at 255; keep the top 8 bits,
            # as TF's decoder does for 16-bit PNGs.
            gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class _Progress:
    """Logs how many of `total` image files have been checked, every PROGRESS_SECONDS: decoding
    50,000 camera photos once takes many minutes on a few cores."""

    def __init__(self, total: int, how: str = ""):
        self.total, self.how = total, f" {how}" if how else ""
        self.started = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS and done < self.total:
            self.last = now
            logging.info("checking image files%s: %d of %d (%.0f s)", self.how, done, self.total, now - self.started)


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

    probe = tf.data.Dataset.from_tensor_slices((eligible, np.arange(len(eligible)), [paths[i] for i in eligible]))
    # Unreadable or undecodable files raise inside map; ignore_errors drops exactly those, so
    # the position of the last file seen, not a count, says how far the check has come.
    probe = probe.map(
        lambda index, position, path: (*try_tf(index, path), position),
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    ).ignore_errors()
    progress = _Progress(len(eligible))
    for index, ok, position in probe.batch(256).as_numpy_iterator():
        routes[index[ok]] = 1
        progress.update(int(position.max()) + 1)

    def try_pil(path):
        try:
            decode_with_pil(path)
            return True
        except Exception:  # Any failure (truncated, not an image, decompression bomb) skips.
            return False

    rest = eligible[routes[eligible] == 0]
    workers = min(16, 4 * (os.cpu_count() or 1))
    progress = _Progress(len(rest), "with PIL")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (index, ok) in enumerate(zip(rest, pool.map(try_pil, [paths[i] for i in rest])), 1):
            routes[index] = 2 if ok else 0
            progress.update(done)
    return routes


def _scan(
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
    paths, labels, other = [], [], []
    for name in class_names:
        found, not_images = image_files(os.path.join(root, name))
        paths.extend(found)
        labels.extend([allowed.index(name)] * len(found))
        other.extend(not_images)
    _log_ignored(spec, root, other)
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


# The skips already logged: the recipe may load a small folder twice (with and without its
# validation split), and the same files need saying once.
_LOGGED_SKIPS: set[tuple] = set()


def _log_ignored(spec: str, root: str, other: Sequence[str]) -> None:
    """Says once which files of the class folders are not read, by extension (e.g. HEIC photos
    to convert), so that no image is left out unnoticed."""
    key = (spec, root, tuple(other))
    if other and key not in _LOGGED_SKIPS:
        _LOGGED_SKIPS.add(key)
        extensions = collections.Counter(os.path.splitext(path)[1].lower() or "(none)" for path in other)
        counts = ", ".join(f"{extension} {count}" for extension, count in extensions.most_common())
        files = f"{len(other)} file" + ("s" if len(other) > 1 else "")
        logging.warning(
            "data %s: ignored %s in %s's class folders that kft does not read as images (%s; it reads %s)",
            spec,
            files,
            root,
            counts,
            " ".join(IMAGE_EXTENSIONS),
        )


def _log_skipped(spec: str, bad: Sequence[str], total: int) -> None:
    key = (spec, total, tuple(bad))
    if bad and key not in _LOGGED_SKIPS:
        _LOGGED_SKIPS.add(key)
        examples = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        logging.warning(
            "data %s: skipped %d of %d image files that could not be decoded: %s", spec, len(bad), total, examples
        )


def _subset(files: _Files, index: np.ndarray) -> _Files:
    return _Files(files.paths[index], files.labels[index], files.use_pil[index])


def _pipeline(
    files: _Files, *, image_size: int, batch_size: int, training: bool, seed: int, cache: bool
) -> tf.data.Dataset:
    any_pil = bool(files.use_pil.any())

    def decode(path, use_pil, label):
        if any_pil:
            image = tf.cond(
                use_pil, lambda: tf.py_function(decode_with_pil, [path], tf.uint8), lambda: _tf_decode_file(path)
            )
            image.set_shape([None, None, 3])
        else:  # Pure TF graph: no Python, no GIL.
            image = _tf_decode_file(path)
        return data.resize_uint8(image, image_size), label

    dataset = tf.data.Dataset.from_tensor_slices((files.paths.astype(str), files.use_pil, files.labels))
    if training and not cache:
        # Streaming: shuffle the cheap file names before decoding, not decoded images.
        dataset = dataset.shuffle(len(files.labels), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(decode, num_parallel_calls=AUTOTUNE)
    return data.finish(
        dataset,
        num_examples=len(files.labels),
        batch_size=batch_size,
        image_size=image_size,
        training=training,
        seed=seed,
        cache=cache,
        shuffle=cache,
    )


def _load(
    spec: str, parsed: FolderSpec, *, image_size, batch_size, val_fraction, seed, train_limit_per_class, cache_bytes
) -> data.Splits:
    root = parsed.path
    split_layout = os.path.isdir(root) and any(os.path.isdir(os.path.join(root, d)) for d in _SPLIT_LAYOUT_DIRS)
    train_root = os.path.join(root, "train") if split_layout else root
    if split_layout and not os.path.isdir(train_root):
        raise ValueError(f"data spec {spec!r}: {root!r} has a validation or test/ folder but no train/ subfolder")
    class_names = _class_dirs(spec, train_root)
    if len(class_names) < 2:
        raise ValueError(
            f"data spec {spec!r}: {train_root!r} has only one class folder "
            f"({class_names[0]!r}); classification needs at least 2"
        )
    files, bad = _scan(spec, train_root, class_names)
    total = len(files.labels) + len(bad)
    val_name = _val_dir(spec, root) if split_layout else None
    carved = val_name is None
    not_in_val = ()  # A val/ folder's missing classes are warned about below.
    if not carved:
        val_root = os.path.join(root, val_name)
        val_classes = _class_dirs(spec, val_root)
        val_files, val_bad = _scan(spec, val_root, val_classes, allowed=class_names)
        missing = sorted(set(class_names) - set(val_classes))
        if missing:
            logging.warning("data %s: %s/ has no folder for classes %s", spec, val_name, missing)
        train_per_class = data.split_per_class(files.labels, class_names, 0.0, seed)[0]  # Each class seeded, all train.
        train_files = _subset(files, data.limit_train(train_per_class, train_limit_per_class))
        bad, total = bad + val_bad, total + len(val_files.labels) + len(val_bad)
    else:
        train_per_class, val_index, not_in_val = data.split_per_class(files.labels, class_names, val_fraction, seed)
        train_files = _subset(files, data.limit_train(train_per_class, train_limit_per_class))
        val_files = _subset(files, val_index)
    _log_skipped(spec, bad, total)
    num_train, num_val = len(train_files.labels), len(val_files.labels)
    cache = data.should_cache(num_train + num_val, image_size, cache_bytes)

    def build(batch_size: int) -> data.Splits:
        common = dict(image_size=image_size, batch_size=batch_size, seed=seed, cache=cache)
        return data.Splits(
            train=_pipeline(train_files, training=True, **common),
            val=_pipeline(val_files, training=False, **common) if num_val else None,
            class_names=tuple(class_names),
            num_train=num_train,
            num_val=num_val,
            skipped=len(bad),
            train_in_order=_pipeline(
                _subset(train_files, data.spread_order(train_files.labels)),
                training=False,
                **{**common, "cache": False},
            ),
            batch_size=batch_size,
            rebuild=build,
            val_carved=carved and num_val > 0,
            classes_not_in_val=not_in_val,
        )

    return build(batch_size)


def _load_eval(spec: str, parsed: FolderSpec, image_size: int, batch_size: int, expected: tuple[str, ...] | None):
    root = parsed.path
    if not os.path.isdir(root):
        raise ValueError(f"data spec {spec!r}: {root!r} does not exist or is not a directory")
    present = [d for d in _SPLIT_LAYOUT_DIRS if os.path.isdir(os.path.join(root, d))]
    if present:
        eval_dir = "test" if "test" in present else _val_dir(spec, root)
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
    files, bad = _scan(spec, eval_root, classes, allowed=names)
    _log_skipped(spec, bad, len(files.labels) + len(bad))
    order = np.argsort(files.labels, kind="stable")  # Class by class, files sorted within.
    files = _subset(files, order)
    dataset = _pipeline(files, image_size=image_size, batch_size=batch_size, training=False, seed=0, cache=False)
    return dataset, tuple(names), len(bad)
