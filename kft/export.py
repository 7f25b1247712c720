"""SavedModel export for serving: raw uint8 images in, class probabilities and names out.

Layout is TF Serving's: `EXPORT_BASE/<version>/` with integer versions; a new export takes the
next integer and never replaces an existing one. Each version is written to a hidden temporary
directory beside the versions and renamed into place only after it has been reloaded and its
outputs compared with the Keras model, so a killed or failed export never leaves a directory
that TF Serving (or `latest_version`) would take for a version.

Serving signature `serving_default`:
  inputs:  images         uint8   [batch, height, width, 3]  (any size; the model resizes)
  outputs: probabilities  float32 [batch, num_classes]
           classes        int64   [batch]   argmax of probabilities
           class_names    string  [batch]   name of the predicted class
The class names are also the asset `assets/labels.txt`, one per line, in class-index order.
"""

import os
import shutil
import tempfile
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import rundir

SIGNATURE_KEY = "serving_default"
LABELS_FILE = "labels.txt"
TMP_PREFIX = ".tmp-export-"


class ExportMismatchError(ValueError):
    """The reloaded SavedModel does not reproduce the Keras model's outputs."""


class _ServingModule(tf.Module):
    """What gets saved: the Keras model (its variables), the labels asset and the signature."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], labels_path: str):
        super().__init__(name="kft_serving")
        self.model = model
        # A tracked Asset is copied into the SavedModel's assets/ and its path is rewritten to
        # the copy on load, so serving users find the label file beside the graph.
        self.labels_asset = tf.saved_model.Asset(labels_path)
        self._class_names = list(class_names)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        # The TensorSpec rejects a wrong dtype, but a signature called by name does not check
        # the shape before running the graph: an image of rank 3 would reach the convolution
        # (where oneDNN aborts the process). ensure_shape fails cleanly with the shapes named.
        images = tf.ensure_shape(images, [None, None, None, 3])
        tf.debugging.assert_positive(
            tf.shape(images)[1:3], message="images must have positive height and width"
        )
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        classes = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        class_names = tf.gather(tf.constant(self._class_names, dtype=tf.string), classes)
        return {"probabilities": probabilities, "classes": classes, "class_names": class_names}


def _versions(export_base: str) -> list[int]:
    """Integer entry names under `export_base` (TF Serving's version directories)."""
    if not os.path.isdir(export_base):
        return []
    # ASCII digits only: "²" is a digit to str.isdigit but not to int().
    return sorted(int(name) for name in os.listdir(export_base) if name.isascii() and name.isdigit())


def latest_version(export_base: str) -> str:
    """The newest complete version directory under a TF Serving export base.

    Args:
      export_base: directory holding integer version subdirectories.

    Returns:
      The path of the highest-numbered version that holds a `saved_model.pb`.

    Raises:
      ValueError: one line naming `export_base`, if it holds no such version.
    """
    for version in reversed(_versions(export_base)):
        path = os.path.join(export_base, str(version))
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return path
    if not os.path.isdir(export_base):
        raise ValueError(f"export directory {export_base} does not exist")
    raise ValueError(
        f"no SavedModel version under {export_base}: expected integer subdirectories such as "
        f"{os.path.join(export_base, '1')} holding saved_model.pb"
    )


def resolve_version_dir(path: str) -> str:
    """Maps a version directory to itself and an export base to its latest version.

    Raises:
      ValueError: one line, if `path` is neither.
    """
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    return latest_version(path)


def read_class_names(path: str) -> list[str]:
    """Class names of an export, from its `assets/labels.txt` (base or version directory).

    Raises:
      ValueError: one line, if there is no export or it has no labels asset.
    """
    labels = os.path.join(resolve_version_dir(path), "assets", LABELS_FILE)
    if not os.path.isfile(labels):
        raise ValueError(f"{labels} does not exist: not a SavedModel exported by kft")
    with open(labels, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


class ServingModel:
    """A reloaded export, called like the Keras model: uint8 images -> probabilities.

    Attributes:
      path: the version directory loaded.
      class_names: names from the export's labels asset, in class-index order.
    """

    def __init__(self, path: str):
        self.path = resolve_version_dir(path)
        # Keep the loaded object: its signature functions only hold weak references to it.
        self._loaded = tf.saved_model.load(self.path)
        if SIGNATURE_KEY not in self._loaded.signatures:
            raise ValueError(f"{self.path} has no '{SIGNATURE_KEY}' signature")
        self._serve = self._loaded.signatures[SIGNATURE_KEY]
        self.class_names = read_class_names(self.path)
        width = self._serve.structured_outputs["probabilities"].shape[-1]
        if width is not None and width != len(self.class_names):
            raise ValueError(f"{os.path.join(self.path, 'assets', LABELS_FILE)} names "
                             f"{len(self.class_names)} classes but the model outputs {width}: the "
                             "export is damaged; export it again")

    def outputs(self, images) -> dict[str, np.ndarray]:
        """All signature outputs (probabilities, classes, class_names) as numpy arrays.

        Args:
          images: uint8 array or tensor [batch, height, width, 3].

        Raises:
          ValueError: if `images` is not uint8 of rank 4 with 3 channels.
        """
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8 or images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [batch, height, width, 3], got {images.dtype.name} {images.shape}"
            )
        return {name: value.numpy() for name, value in self._serve(images=images).items()}

    def __call__(self, images) -> np.ndarray:
        """Class probabilities [batch, num_classes] as float32 numpy."""
        return self.outputs(images)["probabilities"]


def load_serving(path: str) -> ServingModel:
    """Loads an export (a base directory, taking its latest version, or a version directory).

    Returns:
      A `ServingModel`: call it on uint8 images for probabilities; `.class_names` from assets.
    """
    return ServingModel(path)


def check_class_names(class_names: Sequence[str]) -> None:
    """Checks the class names can be exported: one per line of `labels.txt`, so each non-empty
    and printable (no line breaks), and no two alike.

    Raises:
      ValueError: one line naming the first bad class name.
    """
    names = list(class_names)
    if not names:
        raise ValueError("no class names to export")
    for name in names:
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ValueError(f"class name {name!r} cannot be exported (labels.txt holds one name per "
                             "line): rename that class without newlines or other unprintable "
                             "characters")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names!r}")


def _check_inputs(model: keras.Model, class_names: Sequence[str], check_images: np.ndarray) -> np.ndarray:
    """Validates the arguments of `export_saved_model`; returns the Keras model's outputs."""
    names = list(class_names)
    check_class_names(names)
    check_images = np.asarray(check_images)
    if check_images.dtype != np.uint8 or check_images.ndim != 4 or check_images.shape[-1] != 3:
        raise ValueError(
            f"check_images must be uint8 [batch, height, width, 3], got {check_images.dtype} {check_images.shape}"
        )
    if len(check_images) == 0:
        raise ValueError("check_images is empty: at least one image is needed to check the export")
    expected = np.asarray(keras.ops.convert_to_numpy(model(check_images, training=False)), np.float32)
    if expected.shape != (len(check_images), len(names)):
        raise ValueError(
            f"the model outputs shape {expected.shape} for {len(check_images)} images, but "
            f"{len(names)} class names were given"
        )
    return expected


def export_saved_model(
    model: keras.Model,
    class_names: Sequence[str],
    export_base: str,
    check_images: np.ndarray,
    *,
    atol: float = 1e-4,
) -> str:
    """Writes the next SavedModel version under `export_base`, checked against the Keras model.

    Args:
      model: maps raw images (uint8 or float 0..255, [B, H, W, 3], any H and W) to float
        class probabilities [B, C]; resizing and preprocessing are inside it.
      class_names: the C class names, in class-index order.
      export_base: the TF Serving base directory; created if missing.
      check_images: uint8 [N, H, W, 3] images run through both the reloaded SavedModel and
        `model`; a handful is enough.
      atol: the largest allowed absolute difference between the two sets of probabilities.

    Returns:
      The new version directory, `export_base/<version>`.

    Raises:
      ValueError: bad arguments (named in the message).
      ExportMismatchError: the reloaded export's probabilities differ from the model's by
        more than `atol`; the new version is removed first.
    """
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    expected = _check_inputs(model, class_names, check_images)
    os.makedirs(export_base, exist_ok=True)
    stale = [n for n in os.listdir(export_base) if n.startswith(TMP_PREFIX)]
    if stale:
        logging.warning("ignoring leftover partial exports (safe to delete): %s", ", ".join(stale))

    tmp = tempfile.mkdtemp(dir=export_base, prefix=TMP_PREFIX)
    try:
        rundir.default_mode(tmp)  # mkdtemp made it 0700: TF Serving may run as another user.
        with tempfile.TemporaryDirectory() as labels_dir:
            labels_path = os.path.join(labels_dir, LABELS_FILE)
            with open(labels_path, "w", encoding="utf-8") as f:
                f.write("".join(f"{name}\n" for name in class_names))
            module = _ServingModule(model, class_names, labels_path)
            tf.saved_model.save(module, tmp, signatures={SIGNATURE_KEY: module.serve})
        rundir.default_modes_under(tmp)
        _compare(ServingModel(tmp), check_images, expected, atol)
        return _rename_to_next_version(tmp, export_base)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _compare(served: ServingModel, check_images: np.ndarray, expected: np.ndarray, atol: float) -> None:
    got = served(np.asarray(check_images))
    difference = float(np.max(np.abs(got - expected)))
    if not difference <= atol:  # Also catches NaN.
        raise ExportMismatchError(
            f"reloaded SavedModel differs from the Keras model on {len(check_images)} check images: "
            f"max abs difference {difference:.3g} > atol {atol:g}; nothing was exported"
        )
    logging.info("export check: max abs difference %.3g on %d images", difference, len(check_images))


def _rename_to_next_version(tmp: str, export_base: str) -> str:
    """Renames the finished export to the next free version; never replaces an existing one."""
    for _ in range(100):
        version = max(_versions(export_base), default=0) + 1
        final = os.path.join(export_base, str(version))
        if os.path.exists(final):  # Created by a concurrent export since we listed.
            continue
        try:
            # rename(2) replaces an empty directory; the check above rules out an existing one
            # apart from a race, where a non-empty target makes rename fail and we retry.
            os.rename(tmp, final)
        except OSError:
            continue
        return final
    raise RuntimeError(f"could not find a free version number under {export_base}")
