"""One resize for training, evaluation, prediction and serving (issue 11, section 5).

A photo served whole, at full resolution, must get the probabilities that kft.evaluate and
kft.predict report for the same file: all of them resize with `kft.data.resize_images`
(bilinear, antialiased, rounded as the uint8 pipelines store pixels) to the size the model
was trained at, which the export records.

kft.evaluate and kft.predict run as subprocesses, as a user runs them.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kft import data, export
from kft import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["a", "b", "c"]
SIZE = 32  # The run's --image_size.
# (height, width, format) per class: photos far larger than SIZE, both orientations, and one
# smaller image that is upsampled.
FILES = {
    "a": [(375, 500, "jpg"), (768, 1024, "png")],
    "b": [(500, 375, "png"), (20, 24, "png")],
    "c": [(768, 1024, "jpg"), (375, 500, "png")],
}
ATOL = 1e-5


def photo(height: int, width: int, channel: int, seed: int) -> np.ndarray:
    """A colour cast, smooth shapes, and 1-pixel stripes: detail that a resize without
    antialiasing samples instead of averaging."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    image = 90 + 60 * np.sin(rows[..., None] / (15 + 5 * np.arange(3)) + cols[..., None] / 23)
    image = image + rng.integers(-20, 21, (height, width, 3))
    image[..., channel] += 60
    image[(cols % 2 == 0) & (rows % 3 != 0)] = 250  # Fine stripes over most of the image.
    return np.clip(image, 0, 255).astype(np.uint8)


def run_module(module, *args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 32 px MobileNetV3Small classifier, its export, and a test folder of large images."""
    root = tmp_path_factory.mktemp("serving")
    files = []  # (path, label) in kft.data's evaluation order: class by class, files sorted.
    for label, name in enumerate(CLASSES):
        os.makedirs(root / "test" / name)
        for i, (height, width, kind) in enumerate(FILES[name]):
            path = str(root / "test" / name / f"{i}.{kind}")
            Image.fromarray(photo(height, width, label, seed=10 * label + i)).save(path, quality=90)
            files.append((path, label))

    keras.utils.set_random_seed(0)
    classifier = model_lib.build_classifier("MobileNetV3Small", SIZE, None, model_lib.HeadConfig(len(CLASSES)))
    # Randomly initialised BatchNorm statistics (mean 0, variance 1) shrink the features to
    # ~1e-11 and every answer to 1/3, whatever the pixels. Statistics of these images, as a
    # trained network has, make the answers depend on the pixels, and so on the resize.
    batch = np.stack([data.resize_uint8(np.asarray(Image.open(path).convert("RGB")), SIZE) for path, _ in files])
    for layer in classifier.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    classifier.backbone(classifier.preprocess(batch), training=True)
    check = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    # Exported away from any run directory: the size comes from the export itself.
    version = export.export_saved_model(classifier, CLASSES, str(root / "export"), check, image_size=SIZE)
    return classifier, version, root / "test", files


def served_whole(version: str, files) -> np.ndarray:
    """The export's serving signature on each file decoded at full resolution, one at a time."""
    served = export.load_serving(version)
    rows = []
    for path, _ in files:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        rows.append(served(image[None].numpy())[0])
    return np.stack(rows)


def test_serving_predict_and_evaluate_agree_on_large_photos(setup, tmp_path):
    classifier, version, test_dir, files = setup
    labels = np.array([label for _, label in files])
    serving = served_whole(version, files)
    assert export.load_serving(version).image_size == SIZE  # Recorded in the export.

    # kft.evaluate's pipeline, in process: the Keras model on the files as kft.data loads them.
    dataset, names, skipped = data.load_eval(f"folder:{test_dir}", image_size=SIZE, batch_size=4, class_names=CLASSES)
    assert names == tuple(CLASSES) and skipped == 0
    pipeline = np.concatenate([np.asarray(classifier(images, training=False)) for images, _ in dataset])
    np.testing.assert_allclose(pipeline, serving, atol=ATOL, rtol=0)
    assert np.ptp(serving, axis=0).max() > 0.3  # The answers depend on the images.

    # kft.evaluate on the export (its --model_dir path feeds the same pipeline to the Keras
    # model, as above): the numbers of whole-image serving.
    result = run_module(
        "kft.evaluate",
        f"--export_dir={version}",
        f"--dataset=folder:{test_dir}",
        f"--output_dir={tmp_path}",
        "--batch_size=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["image_size"] == SIZE
    nll = float(np.mean(-np.log(np.clip(serving[np.arange(len(labels)), labels], 1e-12, 1))))
    assert report["log_loss"] == pytest.approx(nll, abs=ATOL)
    predicted = np.argmax(serving, axis=-1)
    assert report["confusion_matrix"] == [
        [int(np.sum((labels == t) & (predicted == p))) for p in range(3)] for t in range(3)
    ]

    # kft.predict: every class's probability, per file.
    result = run_module("kft.predict", f"--export_dir={version}", str(test_dir), "--json", "--top_k=3")
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(records) == sorted(path for path, _ in files)
    for (path, _), want in zip(files, serving):
        got = {entry["class"]: entry["probability"] for entry in records[path]["top_k"]}
        np.testing.assert_allclose([got[name] for name in CLASSES], want, atol=ATOL, rtol=0)
    assert f"at {SIZE} px" in result.stderr


def test_the_one_resize_is_antialiased_and_the_same_everywhere():
    """Eagerly, in tf.data, in a graph that does not know the image's size (the export's) and
    in an XLA-compiled step (upsampling, as for small TFDS images): the same whole numbers."""
    rng = np.random.default_rng(0)
    stripes = np.zeros((375, 500, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes: averaged, they are grey.
    small = data.resize_images(stripes, SIZE).numpy()
    assert np.abs(small - 127.5).max() <= 4
    aliased = tf.image.resize(stripes, [SIZE, SIZE], method="bilinear").numpy()
    assert np.std(aliased) > 50  # What the old in-graph resize made of them: moire.

    unknown = tf.function(
        lambda x: data.resize_images(x, SIZE),
        autograph=False,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )
    for height, width in ((375, 500), (20, 24), (SIZE, SIZE), (12, 300)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        eager = data.resize_images(image, SIZE).numpy()
        assert eager.shape == (SIZE, SIZE, 3) and np.array_equal(eager, np.round(eager))
        in_data = next(iter(tf.data.Dataset.from_tensors(image).map(lambda x: data.resize_uint8(x, SIZE))))
        np.testing.assert_array_equal(in_data.numpy(), eager)
        np.testing.assert_array_equal(unknown(image[None]).numpy()[0], eager)
    image = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    xla = tf.function(lambda x: data.resize_images(x, SIZE), jit_compile=True)
    np.testing.assert_array_equal(xla(image).numpy(), data.resize_images(image, SIZE).numpy())
