"""SavedModel export: versioning, the uint8 serving signature, class names, the reload check."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kft import export

CLASS_NAMES = ["cat", "dog", "fish"]


def tiny_model(seed: int = 0) -> keras.Model:
    """Raw 0..255 images of any size -> 3 class probabilities."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    probabilities = keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x)
    return keras.Model(images, probabilities)


def check_images(n: int = 4, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size + 3, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One model exported twice into the same base."""
    base = str(tmp_path_factory.mktemp("export"))
    model = tiny_model()
    first = export.export_saved_model(model, CLASS_NAMES, base, check_images())
    second = export.export_saved_model(model, CLASS_NAMES, base, check_images())
    return model, base, first, second


def test_versions_count_up_and_are_not_overwritten(exported):
    _, base, first, second = exported
    assert first == os.path.join(base, "1")
    assert second == os.path.join(base, "2")
    assert sorted(os.listdir(base)) == ["1", "2"]  # No temporary directory left behind.
    for version in (first, second):
        assert os.path.isfile(os.path.join(version, "saved_model.pb"))
    assert export.latest_version(base) == second


def test_outputs_match_keras_model_and_name_classes(exported):
    model, base, first, _ = exported
    images = check_images(n=5, size=20)  # Another size than the check images: it resizes.
    want = np.asarray(model(images))
    served = export.load_serving(first)
    outputs = served.outputs(images)
    np.testing.assert_allclose(outputs["probabilities"], want, atol=1e-4)
    assert outputs["probabilities"].dtype == np.float32
    assert outputs["classes"].dtype == np.int64
    np.testing.assert_array_equal(outputs["classes"], np.argmax(want, axis=-1))
    names = [name.decode() for name in outputs["class_names"]]
    assert names == [CLASS_NAMES[i] for i in outputs["classes"]]
    np.testing.assert_allclose(served(images), want, atol=1e-4)


def test_class_names_come_back_from_assets(exported):
    _, base, first, second = exported
    with open(os.path.join(first, "assets", "labels.txt")) as f:
        assert f.read() == "cat\ndog\nfish\n"
    assert export.read_class_names(base) == CLASS_NAMES
    assert export.load_serving(base).class_names == CLASS_NAMES
    assert export.load_serving(base).path == second
    # The tracked Asset resolves to the copy inside the version directory.
    loaded = tf.saved_model.load(first)
    assert loaded.labels_asset.asset_path.numpy().decode() == os.path.join(first, "assets", "labels.txt")


def test_signature_is_typed_uint8_images(exported):
    _, _, first, _ = exported
    serve = tf.saved_model.load(first).signatures["serving_default"]
    _, kwargs = serve.structured_input_signature
    assert list(kwargs) == ["images"]
    assert kwargs["images"].dtype == tf.uint8
    assert kwargs["images"].shape.as_list() == [None, None, None, 3]
    outputs = serve.structured_outputs
    assert {k: v.dtype for k, v in outputs.items()} == {
        "probabilities": tf.float32,
        "classes": tf.int64,
        "class_names": tf.string,
    }


def test_signature_rejects_wrong_dtype_and_rank(exported):
    _, _, first, _ = exported
    loaded = tf.saved_model.load(first)
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
        serve(images=tf.zeros((1, 8, 8, 3), tf.float32))
    # Without the in-graph shape check this input crashes the process inside the convolution.
    with pytest.raises(tf.errors.InvalidArgumentError, match="[Ss]hape"):
        serve(images=tf.zeros((8, 8, 3), tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="[Ss]hape"):
        serve(images=tf.zeros((1, 8, 8, 1), tf.uint8))
    served = export.load_serving(first)
    with pytest.raises(ValueError, match="uint8"):
        served(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        served(np.zeros((8, 8, 3), np.uint8))


class GraphOnlyShift(keras.layers.Layer):
    """Adds 0.5 to its input only when traced: the serving path differs from eager Keras."""

    def call(self, x):
        return x if tf.executing_eagerly() else x + 0.5


def test_mismatch_raises_and_leaves_no_version(tmp_path):
    base = str(tmp_path)
    model = tiny_model()
    export.export_saved_model(model, CLASS_NAMES, base, check_images())
    images = keras.Input((None, None, 3))
    broken = keras.Model(images, GraphOnlyShift()(model(images)))
    with pytest.raises(export.ExportMismatchError, match=r"max abs difference 0\.5"):
        export.export_saved_model(broken, CLASS_NAMES, base, check_images())
    assert sorted(os.listdir(base)) == ["1"]
    assert issubclass(export.ExportMismatchError, ValueError)


def test_leftover_temp_dir_is_not_a_version(tmp_path):
    base = str(tmp_path)
    # What a kill in the middle of an export leaves: a hidden directory, maybe complete-looking.
    partial = tmp_path / ".tmp-export-killed"
    partial.mkdir()
    (partial / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="no SavedModel version"):
        export.latest_version(base)
    version = export.export_saved_model(tiny_model(), CLASS_NAMES, base, check_images())
    assert version == os.path.join(base, "1")
    assert export.latest_version(base) == version
    assert sorted(os.listdir(base)) == [".tmp-export-killed", "1"]


def test_next_version_follows_the_largest_integer(tmp_path):
    base = str(tmp_path)
    for name in ("3", "10"):  # Numeric order, not string order; even incomplete ones count.
        (tmp_path / name).mkdir()
    (tmp_path / "notes").mkdir()
    version = export.export_saved_model(tiny_model(), CLASS_NAMES, base, check_images(n=1))
    assert version == os.path.join(base, "11")
    assert os.listdir(tmp_path / "10") == []


def test_latest_version_errors_name_the_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"{missing} does not exist"):
        export.latest_version(missing)
    with pytest.raises(ValueError, match="no SavedModel version"):
        export.load_serving(str(tmp_path))


@pytest.mark.parametrize(
    "names, images, match",
    [
        (["a", "b"], check_images(), r"outputs shape \(4, 3\).*2 class names"),
        (["a", "b", "a"], check_images(), "duplicates"),
        (["a", "b\nc", "d"], check_images(), "newlines"),
        (CLASS_NAMES, check_images().astype(np.float32), "uint8"),
        (CLASS_NAMES, check_images()[0], "uint8"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, names, images, match):
    base = tmp_path / "export"
    with pytest.raises(ValueError, match=match):
        export.export_saved_model(tiny_model(), names, str(base), images)
    assert not base.exists()


def test_exports_a_kft_classifier(tmp_path):
    """The real model: a Classifier subclass with the Preprocess layer and a keras.applications backbone."""
    from kft import model as model_lib

    keras.utils.set_random_seed(0)
    classifier = model_lib.build_classifier("MobileNetV3Small", 32, None, model_lib.HeadConfig(len(CLASS_NAMES)))
    version = export.export_saved_model(classifier, CLASS_NAMES, str(tmp_path), check_images(n=2, size=32))
    images = check_images(n=3, size=50)
    served = export.load_serving(str(tmp_path))
    np.testing.assert_allclose(served(images), np.asarray(classifier(images)), atol=1e-4)
    assert served.path == version and served.class_names == CLASS_NAMES


def test_a_bfloat16_run_exports_float32(tmp_path, tiny_splits):
    """Mixed precision trains; the reloaded classifier and its export are float32 and agree to 1e-4."""
    from kft import runfiles, schedule, trainer
    from kft.config import Config

    config = Config(
        dataset="unused",
        backbone="VGG16",
        weights=None,
        image_size=32,
        batch_size=8,
        stages=schedule.parse_stages("head:1@1e-2,top1:1@1e-3"),
        model_dir=str(tmp_path / "run"),
        mixed_precision="bfloat16",
        augment=(),
        verbose=0,
    )
    try:
        trainer.train(config, tiny_splits)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        classifier, names, _ = runfiles.load_classifier(config.model_dir)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # restored
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert {layer.compute_dtype for layer in classifier.backbone.layers} == {"float32"}
    images = next(iter(tiny_splits.val))[0].numpy()
    export.export_saved_model(classifier, names, str(tmp_path / "export"), images)  # checks 1e-4
    served = export.load_serving(str(tmp_path / "export"))
    np.testing.assert_allclose(served(images), np.asarray(classifier(images)), atol=1e-4)


class Resize(keras.layers.Layer):
    """Resizes to 16 px as kft does (`kft.data.resize_images`) or as kft's graph once did
    (bilinear without antialiasing)."""

    def __init__(self, kft_resize: bool, **kwargs):
        super().__init__(**kwargs)
        self.kft_resize = kft_resize

    def call(self, images):
        from kft import data

        if self.kft_resize:
            return data.resize_images(images, 16)
        return tf.image.resize(tf.cast(images, tf.float32), [16, 16])


def test_export_records_the_image_size_and_checks_whole_large_images(tmp_path):
    """With image_size the export also serves two large images whole and compares them with the
    Keras model on the same images resized as kft.evaluate resizes files: a graph that resizes
    otherwise (the old aliasing resize) is refused, nothing exported."""
    keras.utils.set_random_seed(0)
    for kft_resize in (False, True):
        images = keras.Input((None, None, 3))
        x = Resize(kft_resize)(images)
        x = keras.layers.Rescaling(1 / 255.0)(x)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.Flatten()(x)  # Every pixel counts: the resize shows.
        model = keras.Model(images, keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x))
        base = tmp_path / str(kft_resize)
        if not kft_resize:
            with pytest.raises(export.ExportMismatchError, match="large images served whole"):
                export.export_saved_model(model, CLASS_NAMES, str(base), check_images(size=16), image_size=16)
            assert export._versions(str(base)) == []
            continue
        version = export.export_saved_model(model, CLASS_NAMES, str(base), check_images(size=16), image_size=16)
        with open(os.path.join(version, "assets", export.INFO_FILE)) as f:
            assert json.load(f) == {"image_size": 16, "test_views": []}
        assert export.load_serving(str(base)).image_size == 16


def test_image_size_is_recorded_or_unknown(exported):
    """An export without image_size, away from a run directory, records none: kft.evaluate and
    kft.predict then ask for --image_size rather than guess."""
    _, base, first, _ = exported
    assert not os.path.exists(os.path.join(first, "assets", export.INFO_FILE))
    assert export.load_serving(base).image_size is None
    with pytest.raises(ValueError, match="does not record the image size"):
        export.choose_image_size(None, None, base)
    assert export.choose_image_size(20, None, base) == 20
    assert export.choose_image_size(None, 32, base) == 32
    with pytest.raises(ValueError, match=r"--image_size=224: the model at .* was trained at 32 px"):
        export.choose_image_size(224, 32, base)
