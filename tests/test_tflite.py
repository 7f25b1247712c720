"""TFLite export: the files, the fixed-size uint8 signature, float32 parity, int8 numbers."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kft import tflite

SIZE = 32
CLASS_NAMES = ["a", "b", "c"]


def informative_classifier() -> keras.Model:
    """The brief's tiny kft Classifier, with BatchNorm statistics set from a batch of images.

    A randomly initialized MobileNetV2 shrinks activations by ~1e-13 over its depth, so its
    probabilities are 1/3 for every image and any export would "match". Setting each
    BatchNorm's moving statistics to those of one batch (momentum 0, training=True) keeps
    activations at unit scale, so the probabilities differ between images.
    """
    from kft import model as model_lib

    keras.utils.set_random_seed(0)
    classifier = model_lib.build_classifier("MobileNetV2", SIZE, None, model_lib.HeadConfig(len(CLASS_NAMES)))
    norms = [layer for layer in classifier.backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    calibration = np.random.default_rng(1).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    classifier.backbone(classifier.preprocess(calibration), training=True)
    return classifier


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tflite"))
    model = informative_classifier()
    check = images(16)
    labels = np.arange(16) % len(CLASS_NAMES)
    report = tflite.export_tflite(model, out, check, quantize="dynamic", check_labels=labels, class_names=CLASS_NAMES)
    return model, out, check, labels, report


def test_the_classifier_is_not_constant(exported):
    model, _, check, _, _ = exported
    probabilities = np.asarray(model(check))
    assert np.ptp(probabilities, axis=0).max() > 0.1  # Otherwise every check below passes trivially.
    assert len(set(np.argmax(probabilities, axis=-1))) > 1


def test_files_and_report(exported):
    _, out, _, labels, report = exported
    assert sorted(os.listdir(out)) == sorted(
        [tflite.FLOAT32_FILE, tflite.INT8_DYNAMIC_FILE, "labels.txt", "tflite.json"]
    )
    with open(os.path.join(out, "tflite.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(os.path.join(out, "labels.txt")) as f:
        assert f.read() == "a\nb\nc\n"
    assert report["input"] == {"name": "images", "dtype": "uint8", "shape": [None, SIZE, SIZE, 3]}
    assert report["num_check_images"] == 16
    for kind, filename in (("float32", tflite.FLOAT32_FILE), ("int8_dynamic", tflite.INT8_DYNAMIC_FILE)):
        numbers = report[kind]
        assert numbers["file"] == filename
        assert numbers["bytes"] == os.path.getsize(os.path.join(out, filename))
        assert 0.5 <= numbers["top1_agreement"] <= 1.0
        assert 0.0 <= numbers["max_abs_diff"] <= 1.0
        assert numbers["accuracy_difference"] == pytest.approx(numbers["accuracy"] - report["keras_accuracy"])
    assert report["float32"]["max_abs_diff"] <= 1e-4
    assert report["float32"]["top1_agreement"] == 1.0
    # int8 weights: about a quarter of the float file (MobileNetV2 has 2.2M parameters).
    assert report["int8_dynamic"]["bytes"] < 0.4 * report["float32"]["bytes"]
    assert report["float32"]["bytes"] > 4 * 2_000_000  # The weights are in the file, not left out.
    assert report["int8_dynamic"]["max_abs_diff"] > 0  # Quantization did change the numbers.


def test_float32_file_matches_keras_on_new_images(exported):
    """Read back from disk, through a plain interpreter, on images the export did not see."""
    model, out, _, _, _ = exported
    with open(os.path.join(out, tflite.FLOAT32_FILE), "rb") as f:
        content = f.read()
    interpreter = tflite._interpreter(content)
    (signature,) = interpreter.get_signature_list().items()
    assert signature == ("serving_default", {"inputs": ["images"], "outputs": ["probabilities"]})
    (detail,) = interpreter.get_input_details()
    assert detail["dtype"] == np.uint8
    assert list(detail["shape_signature"]) == [-1, SIZE, SIZE, 3]  # Batch free, image size fixed.
    new = images(5, seed=7)
    got = tflite.run_tflite(content, new)
    np.testing.assert_allclose(got, np.asarray(model(new)), atol=1e-4)
    one = tflite.run_tflite(content, new[:1])  # Batch of one, the usual mobile call.
    np.testing.assert_allclose(one, got[:1], atol=1e-5)


def test_test_views_are_inside_the_file(tmp_path):
    """A classifier averaging flip and rot90 views (--test_views) converts with them: the file
    gives the Keras model's averaged probabilities, the same for every turn and mirror."""
    model = informative_classifier()
    new = images(4, seed=3)
    one_view = np.asarray(model(new))
    model.test_views = ("flip", "rot90")
    tflite.export_tflite(model, str(tmp_path), images(8), quantize="none")
    with open(tmp_path / tflite.FLOAT32_FILE, "rb") as f:
        content = f.read()
    averaged = np.asarray(model(new))
    assert np.abs(averaged - one_view).max() > 1e-3
    for turned in (new, np.rot90(new, 1, axes=(1, 2)), new[:, :, ::-1]):
        np.testing.assert_allclose(tflite.run_tflite(content, np.ascontiguousarray(turned)), averaged, atol=1e-4)


def test_int8_numbers_are_what_the_file_gives(exported):
    model, out, check, labels, report = exported
    with open(os.path.join(out, tflite.INT8_DYNAMIC_FILE), "rb") as f:
        got = tflite.run_tflite(f.read(), check)
    want = np.asarray(model(check))
    assert report["int8_dynamic"]["max_abs_diff"] == pytest.approx(float(np.max(np.abs(got - want))), rel=1e-5)
    agreement = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
    assert report["int8_dynamic"]["top1_agreement"] == pytest.approx(agreement)
    assert report["int8_dynamic"]["accuracy"] == pytest.approx(float(np.mean(np.argmax(got, -1) == labels)))


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


class GraphOnlyShift(keras.layers.Layer):
    """Adds 0.5 only when traced: the converted graph differs from eager Keras."""

    def call(self, x):
        return x if tf.executing_eagerly() else x + 0.5


def test_float32_mismatch_raises_and_writes_nothing(tmp_path):
    inputs = keras.Input((None, None, 3))
    broken = keras.Model(inputs, GraphOnlyShift()(tiny_model()(inputs)))
    with pytest.raises(tflite.TFLiteMismatchError, match=r"max abs difference 0\.5"):
        tflite.export_tflite(broken, str(tmp_path / "out"), images(2, size=8), quantize="none")
    assert not (tmp_path / "out").exists()


def test_quantize_none_writes_float_only_and_drops_a_stale_int8(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / tflite.INT8_DYNAMIC_FILE).write_bytes(b"from another model")
    report = tflite.export_tflite(tiny_model(), str(out), images(3, size=12), quantize="none")
    assert sorted(os.listdir(out)) == [tflite.FLOAT32_FILE, "tflite.json"]
    assert "int8_dynamic" not in report and "keras_accuracy" not in report
    assert report["input"]["shape"] == [None, 12, 12, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantize": "int4"}, "quantize='int4'.*none, dynamic"),
        ({"check_images": images(2).astype(np.float32)}, "uint8"),
        ({"check_images": images(0)}, "N >= 1"),
        ({"check_labels": np.zeros(5)}, "5 check_labels for 2"),
        ({"class_names": ["a", "b"]}, "3 non-empty names"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, match):
    arguments = {"check_images": images(2), "quantize": "dynamic", **kwargs}
    with pytest.raises(ValueError, match=match):
        tflite.export_tflite(tiny_model(), str(tmp_path / "out"), **arguments)
    assert not (tmp_path / "out").exists()


def test_int8_agreement_floor_raises_and_writes_nothing(tmp_path, monkeypatch):
    # No real model quantizes this badly; raising the floor above 100% exercises the check.
    monkeypatch.setattr(tflite, "MIN_INT8_AGREEMENT", 1.01)
    with pytest.raises(tflite.TFLiteMismatchError, match="agrees with the Keras model's top class on only 100%"):
        tflite.export_tflite(tiny_model(), str(tmp_path / "out"), images(2, size=8), quantize="dynamic")
    assert not (tmp_path / "out").exists()
