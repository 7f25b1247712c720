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
An export of a kft model also records, in the asset `assets/kft.json`, the image size it was
trained at (`{"image_size": S}`): kft.evaluate and kft.predict resize files to S with
`kft.data.resize_images`, the resize inside the graph, so that they and a server fed the full
image compute the same numbers. It also lists the test-time views the graph averages its
probabilities over (`"test_views"`, from kft.train's --test_views; [] for one view).
"""

import json
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
INFO_FILE = "kft.json"
TMP_PREFIX = ".tmp-export-"


class ExportMismatchError(ValueError):
    """The reloaded SavedModel does not reproduce the Keras model's outputs."""


class _ServingModule(tf.Module):
    """What gets saved: the Keras model (its variables), the labels asset and the signature."""

    def __init__(self, model: keras.Model, class_names: Sequence[str], labels_path: str, info_path: str | None = None):
        super().__init__(name="kft_serving")
        self.model = model
        # A tracked Asset is copied into the SavedModel's assets/ and its path is rewritten to
        # the copy on load, so serving users find the label file beside the graph.
        self.labels_asset = tf.saved_model.Asset(labels_path)
        if info_path is not None:
            self.info_asset = tf.saved_model.Asset(info_path)
        self._class_names = list(class_names)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve(self, images):
        # The TensorSpec rejects a wrong dtype, but a signature called by name does not check
        # the shape before running the graph: an image of rank 3 would reach the convolution
        # (where oneDNN aborts the process). ensure_shape fails cleanly with the shapes named.
        images = tf.ensure_shape(images, [None, None, None, 3])
        tf.debugging.assert_positive(tf.shape(images)[1:3], message="images must have positive height and width")
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


def recorded_image_size(path: str, class_names: Sequence[str]) -> int | None:
    """The image size an export's model was trained at, or None when nothing records it.

    Read from the export's `assets/kft.json`; for exports written before kft recorded it there,
    from the training run's `classes.json` when the export is `MODEL_DIR/export/<version>` of
    a run with the same classes.
    """
    version_dir = resolve_version_dir(path)
    try:
        with open(os.path.join(version_dir, "assets", INFO_FILE)) as f:
            return int(json.load(f)["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(version_dir)))
    try:
        with open(os.path.join(run_dir, "classes.json")) as f:
            meta = json.load(f)
        # Only if the run is the one that was exported, not a neighbour's leftover.
        if list(meta["class_names"]) == list(class_names):
            return int(meta["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def choose_image_size(given: int | None, recorded: int | None, model_path: str) -> int:
    """The size kft.evaluate and kft.predict resize files to: the model's own.

    The model resizes whatever it gets to the size it was trained at; files resized to another
    size first would be resized twice and get other probabilities than a server fed the file.

    Args:
      given: the user's --image_size, or None.
      recorded: the model's training image size (`recorded_image_size`), or None if unknown.
      model_path: the export or run directory, for messages.

    Raises:
      ValueError: one line, if `given` differs from `recorded` or neither is known.
    """
    if recorded is None:
        if given is None:
            raise ValueError(
                f"{model_path} does not record the image size its model was trained at "
                "(an export from an older kft, away from its run directory); pass "
                "--image_size=the run's --image_size"
            )
        return given
    if given is not None and given != recorded:
        raise ValueError(
            f"--image_size={given}: the model at {model_path} was trained at {recorded} px "
            f"and resizes every image to {recorded}; files resized to {given} first would "
            "be resized twice and get other probabilities than served ones (leave "
            "--image_size out)"
        )
    return recorded


class ServingModel:
    """A reloaded export, called like the Keras model: uint8 images -> probabilities.

    Attributes:
      path: the version directory loaded.
      class_names: names from the export's labels asset, in class-index order.
      image_size: the size its model was trained at (`recorded_image_size`), or None.
    """

    def __init__(self, path: str):
        self.path = resolve_version_dir(path)
        # Keep the loaded object: its signature functions only hold weak references to it.
        self._loaded = tf.saved_model.load(self.path)
        if SIGNATURE_KEY not in self._loaded.signatures:
            raise ValueError(f"{self.path} has no '{SIGNATURE_KEY}' signature")
        self._serve = self._loaded.signatures[SIGNATURE_KEY]
        self.class_names = read_class_names(self.path)
        self.image_size = recorded_image_size(self.path, self.class_names)
        width = self._serve.structured_outputs["probabilities"].shape[-1]
        if width is not None and width != len(self.class_names):
            raise ValueError(
                f"{os.path.join(self.path, 'assets', LABELS_FILE)} names "
                f"{len(self.class_names)} classes but the model outputs {width}: the "
                "export is damaged; export it again"
            )

    def outputs(self, images) -> dict[str, np.ndarray]:
        """All signature outputs (probabilities, classes, class_names) as numpy arrays.

        Args:
          images: uint8 array or tensor [batch, height, width, 3].

        Raises:
          ValueError: if `images` is not uint8 of rank 4 with 3 channels.
        """
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8 or images.shape.rank != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [batch, height, width, 3], got {images.dtype.name} {images.shape}")
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
            raise ValueError(
                f"class name {name!r} cannot be exported (labels.txt holds one name per "
                "line): rename that class without newlines or other unprintable "
                "characters"
            )
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
    image_size: int | None = None,
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
      image_size: the size `model` resizes images to with `kft.data.resize_images` (a kft
        Classifier's `image_size`): recorded in `assets/kft.json`, and the export is also
        checked on two images larger than that, served whole, against `model` on the same
        images resized as kft.evaluate resizes files. None for other models.
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
    if image_size is not None:
        large, large_expected = _large_check_images(model, image_size)
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
            info_path = None
            if image_size is not None:
                info_path = os.path.join(labels_dir, INFO_FILE)
                with open(info_path, "w", encoding="utf-8") as f:
                    views = list(getattr(model, "test_views", ()))
                    json.dump({"image_size": int(image_size), "test_views": views}, f)
            module = _ServingModule(model, class_names, labels_path, info_path)
            tf.saved_model.save(module, tmp, signatures={SIGNATURE_KEY: module.serve})
        rundir.default_modes_under(tmp)
        served = ServingModel(tmp)
        _compare(served, check_images, expected, atol)
        if image_size is not None:
            _compare(served, large, large_expected, atol, "large images served whole (vs resized as kft.evaluate does)")
        return _rename_to_next_version(tmp, export_base)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _large_check_images(model: keras.Model, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded images larger than `image_size` (as photos are) and `model`'s probabilities
    for them resized to `image_size` first, as kft.evaluate and kft.predict feed files."""
    from kft import data

    height, width = 2 * image_size + 7, image_size + image_size // 2 + 5
    # Smooth shapes plus fine noise: shrinking without antialiasing would show in the answers.
    rows, cols = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(rows[..., None] / (3 + np.arange(3)) + cols[..., None] / 7)
    noise = np.random.default_rng(0).integers(-27, 28, (2, height, width, 3))
    large = np.clip(base[None] + noise, 0, 255).astype(np.uint8)
    resized = np.asarray(data.resize_uint8(tf.constant(large), image_size))
    expected = np.asarray(keras.ops.convert_to_numpy(model(resized, training=False)), np.float32)
    return large, expected


def _compare(
    served: ServingModel, check_images: np.ndarray, expected: np.ndarray, atol: float, what: str = "check images"
) -> None:
    got = served(np.asarray(check_images))
    difference = float(np.max(np.abs(got - expected)))
    if not difference <= atol:  # Also catches NaN.
        raise ExportMismatchError(
            f"reloaded SavedModel differs from the Keras model on {len(check_images)} {what}: "
            f"max abs difference {difference:.3g} > atol {atol:g}; nothing was exported"
        )
    logging.info("export check: max abs difference %.3g on %d %s", difference, len(check_images), what)


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
