"""`python -m kft.evaluate` end to end, as a user runs it: a subprocess on an export or a run dir;
and its library function `kft.evaluate.evaluate` in this process, beside kft.train's flags (the
entry point defines its flags only when run, so the two do not clash).
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import colour_model
from PIL import Image

from kft import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["blue", "green", "red"]  # Sorted, as the folder loader orders class folders.
SIZE = 16
# TensorFlow's C++ start-up lines, which TF_CPP_MIN_LOG_LEVEL no longer silences (TF 2.21).
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} |To enable the following)")


def write_folder(root, contents: dict[str, list[int]]) -> dict[str, list[str]]:
    """contents: class folder -> list of channel indices of the images' dominant colour."""
    rng = np.random.default_rng(0)
    paths = {}
    for name, channels in contents.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        paths[name] = []
        for i, channel in enumerate(channels):
            image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
            image[..., channel] += 150
            path = os.path.join(root, name, f"{i}.png")
            Image.fromarray(image).save(path)
            paths[name].append(path)
    return paths


def run_evaluate(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "kft.evaluate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _TF_NOISE.match(line)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("export"))
    model = colour_model(logit_scale=10.0)
    check = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    version = export.export_saved_model(model, CLASSES, base, check)
    return model, base, version


def test_evaluates_a_flat_folder_with_an_export(exported, tmp_path):
    model, base, version = exported
    # RGB channels 0 red, 1 green, 2 blue; two images sit in the wrong folder.
    paths = write_folder(tmp_path / "data", {"blue": [2, 2, 2], "green": [1, 1, 0], "red": [0, 0, 0, 2]})
    (tmp_path / "data" / "red" / "broken.png").write_bytes(b"not a png")  # Skipped and counted.
    result = run_evaluate(
        f"--export_dir={base}", f"--dataset=folder:{tmp_path / 'data'}", f"--image_size={SIZE}", "--batch_size=4"
    )
    assert result.returncode == 0, result.stderr

    # Direct computation: the Keras model on the same files.
    labels, images = [], []
    for index, name in enumerate(CLASSES):
        for path in paths[name]:
            labels.append(index)
            images.append(np.asarray(Image.open(path)))
    predicted = np.argmax(np.asarray(model(np.stack(images))), axis=-1)
    want = float(np.mean(predicted == np.array(labels)))
    assert want == pytest.approx(8 / 10)  # The test data is what it says.

    out = os.path.join(version, "eval")  # Default: beside the model.
    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    assert report["accuracy"] == pytest.approx(want)
    assert report["num_examples"] == 10
    assert report["skipped"] == 1
    assert report["image_size"] == SIZE
    assert report["tta"] == "none"
    assert report["dataset"] == f"folder:{tmp_path / 'data'}"
    assert report["model"] == os.path.abspath(version)
    assert [row["class"] for row in report["per_class"]] == CLASSES
    assert [row["support"] for row in report["per_class"]] == [3, 3, 4]
    with open(os.path.join(out, "confusion_matrix.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in result.stdout and "0.8000" in result.stdout


def test_the_library_evaluates_in_process_beside_kft_train_flags(exported, tmp_path):
    from kft import cli, evaluate
    from kft import flags as kft_flags  # noqa: F401  (defines --dataset, --model_dir, ... too)

    _, base, _ = exported
    write_folder(tmp_path / "data", {"blue": [2, 2], "green": [1, 0], "red": [0]})
    out = tmp_path / "out"
    report = evaluate.evaluate(
        export_dir=base, dataset=f"folder:{tmp_path / 'data'}", image_size=SIZE, output_dir=str(out)
    )
    assert report["accuracy"] == pytest.approx(4 / 5) and report["num_examples"] == 5
    assert json.loads((out / "eval.json").read_text())["accuracy"] == report["accuracy"]
    with pytest.raises(cli.UsageError, match="exactly one of --export_dir and --model_dir"):
        evaluate.evaluate(dataset="digits")


def assert_usage_error(result, *expected):
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "error: " in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


def test_output_files_kft_did_not_write_are_never_replaced(exported, tmp_path):
    """An eval.json or confusion_matrix.png of the user's in --output_dir stops the run in one line
    before any image is read, and stays as it was; a report kft.evaluate wrote is replaced."""
    from kft import cli, evaluate
    from kft import flags as kft_flags  # noqa: F401  (defines --dataset, --model_dir, ... too)

    _, base, _ = exported
    write_folder(tmp_path / "data", {"blue": [2], "green": [1], "red": [0]})
    dataset = f"folder:{tmp_path / 'data'}"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.json").write_text('{"accuracy": 0.99, "notes": "my own numbers"}')
    result = run_evaluate(f"--export_dir={base}", f"--dataset={dataset}", f"--output_dir={mine}")
    assert_usage_error(result, str(mine / "eval.json"), "not a report kft.evaluate wrote")
    assert sorted(os.listdir(mine)) == ["eval.json"]
    assert (mine / "eval.json").read_text() == '{"accuracy": 0.99, "notes": "my own numbers"}'

    picture = tmp_path / "picture"
    picture.mkdir()
    (picture / "confusion_matrix.png").write_bytes(b"my picture")
    with pytest.raises(cli.UsageError, match="confusion_matrix.png exists beside no report"):
        evaluate.evaluate(export_dir=base, dataset=dataset, image_size=SIZE, output_dir=str(picture))
    assert sorted(os.listdir(picture)) == ["confusion_matrix.png"]
    assert (picture / "confusion_matrix.png").read_bytes() == b"my picture"

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(cli.UsageError, match="is a file, not a directory"):
        evaluate.evaluate(export_dir=base, dataset=dataset, image_size=SIZE, output_dir=str(tmp_path / "a_file"))

    # kft.evaluate's own report is replaced by the next one, here on another test folder.
    ours = tmp_path / "ours"
    write_folder(tmp_path / "more", {"blue": [2, 2], "green": [1, 1], "red": [0]})
    first = evaluate.evaluate(export_dir=base, dataset=dataset, image_size=SIZE, output_dir=str(ours))
    second = evaluate.evaluate(
        export_dir=base, dataset=f"folder:{tmp_path / 'more'}", image_size=SIZE, output_dir=str(ours)
    )
    assert (first["num_examples"], second["num_examples"]) == (3, 5)
    assert json.loads((ours / "eval.json").read_text())["num_examples"] == 5


def test_neither_or_both_model_flags(tmp_path):
    assert_usage_error(run_evaluate("--dataset=digits"), "--export_dir", "--model_dir", "export_dir=None")
    both = run_evaluate(f"--export_dir={tmp_path}", f"--model_dir={tmp_path}", "--dataset=digits")
    assert_usage_error(both, "exactly one of --export_dir and --model_dir", f"model_dir={tmp_path}")


def test_missing_export_dir(tmp_path):
    missing = str(tmp_path / "nope")
    assert_usage_error(run_evaluate(f"--export_dir={missing}", "--dataset=digits"), f"--export_dir={missing}")


def test_export_dir_without_versions(tmp_path):
    assert_usage_error(
        run_evaluate(f"--export_dir={tmp_path}", "--dataset=digits"),
        f"--export_dir={tmp_path}",
        "no SavedModel version",
    )


def test_class_name_mismatch(exported, tmp_path):
    _, base, _ = exported
    write_folder(tmp_path / "data", {"blue": [2], "green": [1], "zebra": [0]})
    result = run_evaluate(f"--export_dir={base}", f"--dataset=folder:{tmp_path / 'data'}", f"--image_size={SIZE}")
    assert_usage_error(result, "zebra", "'blue', 'green', 'red'")


def test_bad_batch_size(tmp_path):
    assert_usage_error(
        run_evaluate(f"--export_dir={tmp_path}", "--dataset=digits", "--batch_size=0"), "batch_size", "0"
    )


def test_evaluates_a_training_run_dir(tmp_path):
    """--model_dir: the files kft.train leaves (classes.json, model.weights.h5, and metrics.json
    once it has finished)."""
    from kft import checkpoint
    from kft import model as model_lib

    keras.utils.set_random_seed(0)
    classifier = model_lib.build_classifier("MobileNetV3Small", 32, None, model_lib.HeadConfig(len(CLASSES)))
    run = tmp_path / "run"
    checkpoint.save_model_weights(classifier, str(run / "model.weights.h5"))
    checkpoint.write_json(
        str(run / "classes.json"), {"class_names": CLASSES, "backbone": "MobileNetV3Small", "image_size": 32}
    )
    checkpoint.write_json(str(run / "metrics.json"), {})
    paths = write_folder(tmp_path / "data", {"blue": [2, 2], "green": [1], "red": [0, 0]})
    out = tmp_path / "out"
    result = run_evaluate(f"--model_dir={run}", f"--dataset=folder:{tmp_path / 'data'}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert (out / "confusion_matrix.png").exists()
    assert not (run / "eval").exists()  # --output_dir replaces the default beside the model.
    assert report["image_size"] == 32 and report["model"] == str(run)

    # Direct computation on the same images, resized as the loader does (16 -> 32 px).
    import tensorflow as tf

    from kft import data

    labels, images = [], []
    for index, name in enumerate(CLASSES):
        for path in paths[name]:
            labels.append(index)
            images.append(data.resize_uint8(tf.constant(np.asarray(Image.open(path))), 32))
    predicted = np.argmax(np.asarray(classifier(tf.stack(images))), axis=-1)
    labels = np.array(labels)
    assert report["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))
    assert report["confusion_matrix"] == [
        [int(np.sum((labels == t) & (predicted == p))) for p in range(3)] for t in range(3)
    ]


def test_a_run_with_test_views_is_evaluated_and_exported_as_their_average(tmp_path):
    """A run recorded with --test_views=flip,rot90 (run.json): kft.evaluate and the export give
    the mean probability over the 8 mirrors and quarter turns of each image, which no turn or
    mirror of the image changes; one view of the same weights is not so invariant."""
    import dataclasses

    import tensorflow as tf

    from kft import checkpoint, data, runfiles, schedule
    from kft import model as model_lib
    from kft.config import Config

    keras.utils.set_random_seed(0)
    classifier = model_lib.build_classifier("VGG16", 32, None, model_lib.HeadConfig(len(CLASSES)))
    kernel, bias = classifier.classify.get_weights()  # A zero head: uniform from every view.
    classifier.classify.set_weights([np.random.default_rng(0).normal(0, 0.3, kernel.shape), bias])
    run = tmp_path / "run"
    checkpoint.save_model_weights(classifier, str(run / "model.weights.h5"))
    checkpoint.write_json(str(run / "classes.json"), {"class_names": CLASSES, "backbone": "VGG16", "image_size": 32})
    config = Config(
        dataset="unused",
        backbone="VGG16",
        stages=schedule.parse_stages("probe"),
        model_dir=str(run),
        weights=None,
        image_size=32,
        test_views=("flip", "rot90"),
    )
    runfiles.write_config(config)
    checkpoint.write_json(str(run / "metrics.json"), {})
    paths = write_folder(tmp_path / "data", {"blue": [2, 2], "green": [1], "red": [0, 0]})
    result = run_evaluate(f"--model_dir={run}", f"--dataset=folder:{tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())

    images, labels = [], []
    for index, name in enumerate(CLASSES):
        for path in paths[name]:
            images.append(data.resize_uint8(tf.constant(np.asarray(Image.open(path))), 32).numpy())
            labels.append(index)
    images, labels = np.stack(images), np.array(labels)
    views = [np.rot90(x, k, axes=(1, 2)) for x in (images, images[:, :, ::-1]) for k in range(4)]
    single = [np.asarray(classifier(np.ascontiguousarray(view))) for view in views]
    averaged = np.mean(single, axis=0)
    assert np.abs(single[0] - single[5]).max() > 1e-4  # one view: a mirror turned changes it

    def log_loss(probabilities):
        return float(np.mean(-np.log(probabilities[np.arange(len(labels)), labels])))

    assert report["log_loss"] == pytest.approx(log_loss(averaged), abs=1e-5)
    assert abs(report["log_loss"] - log_loss(single[0])) > 1e-5

    loaded, _, _ = runfiles.load_classifier(str(run))
    assert tuple(loaded.test_views) == ("flip", "rot90")
    version = export.export_saved_model(loaded, CLASSES, str(tmp_path / "export"), images, image_size=32)
    with open(os.path.join(version, "assets", export.INFO_FILE)) as f:
        assert json.load(f)["test_views"] == ["flip", "rot90"]
    served = export.load_serving(str(tmp_path / "export"))
    for view in views:
        np.testing.assert_allclose(served(np.ascontiguousarray(view)), averaged, atol=1e-5)
    # A run recorded without test views (run.json from before them) keeps one view.
    runfiles.write_config(dataclasses.replace(config, test_views=()))
    assert runfiles.load_classifier(str(run))[0].test_views == ()


ORIENTATION_CLASSES = ["left", "middle", "right"]


class HalfMeans(keras.layers.Layer):
    """Mean brightness (0..1) of the left and of the right half of each image: [B, 2]."""

    def call(self, images):
        import tensorflow as tf

        x = tf.cast(images, tf.float32) / 255.0
        half = tf.shape(x)[2] // 2
        left = tf.reduce_mean(x[:, :, :half], axis=[1, 2, 3])
        right = tf.reduce_mean(x[:, :, tf.shape(x)[2] - half :], axis=[1, 2, 3])
        return tf.stack([left, right], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)


def orientation_model() -> keras.Model:
    """Logits [4d, 1, -3d] with d = left minus right brightness: mirroring an image changes them."""
    images = keras.Input((None, None, 3))
    dense = keras.layers.Dense(3, activation="softmax")
    probabilities = dense(HalfMeans()(images))
    dense.set_weights(
        [np.array([[4.0, 0.0, -3.0], [-4.0, 0.0, 3.0]], np.float32), np.array([0.0, 1.0, 0.0], np.float32)]
    )
    return keras.Model(images, probabilities)


def test_tta_flip_averages_the_image_and_its_mirror(tmp_path):
    model = orientation_model()
    base = str(tmp_path / "export")
    export.export_saved_model(model, ORIENTATION_CLASSES, base, np.zeros((1, SIZE, SIZE, 3), np.uint8))
    # Per class, left-minus-right brightness differences (x 255) of its images.
    contents = {"left": [102, 128, 204], "middle": [102, -102, 26], "right": [-153, -26, 0]}
    labels, images = [], []
    for index, name in enumerate(ORIENTATION_CLASSES):
        os.makedirs(tmp_path / "data" / name)
        for i, d in enumerate(contents[name]):
            image = np.full((SIZE, SIZE, 3), 60, np.uint8)
            image[:, : SIZE // 2] += max(d, 0)
            image[:, SIZE // 2 :] += max(-d, 0)
            Image.fromarray(image).save(tmp_path / "data" / name / f"{i}.png")
            labels.append(index)
            images.append(image)
    labels, images = np.array(labels), np.stack(images)

    direct = np.asarray(model(images))
    mirrored = np.asarray(model(images[:, :, ::-1]))
    averaged = (direct + mirrored) / 2

    def confusion(probabilities):
        predicted = np.argmax(probabilities, axis=-1)
        return [[int(np.sum((labels == t) & (predicted == p))) for p in range(3)] for t in range(3)]

    # The data tells the three apart: averaging is neither the direct nor the mirrored prediction.
    assert confusion(averaged) != confusion(direct) and confusion(averaged) != confusion(mirrored)
    assert np.any(np.abs(direct - mirrored) > 0.3)

    out = tmp_path / "eval"
    flags = [
        f"--export_dir={base}",
        f"--dataset=folder:{tmp_path / 'data'}",
        f"--image_size={SIZE}",
        "--batch_size=4",
        f"--output_dir={out}",
    ]
    result = run_evaluate(*flags, "--tta=flip")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["tta"] == "flip"  # The default, none, is checked in test_evaluates_a_flat_folder_with_an_export.
    assert report["confusion_matrix"] == confusion(averaged)
    assert report["accuracy"] == pytest.approx(float(np.mean(np.argmax(averaged, -1) == labels)))
