"""Tests for kft.backbones: registry, build, preprocessing and block discovery."""

import dataclasses
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kft import backbones


def _keras_application_names():
    return sorted(
        name for name in dir(keras.applications) if name[0].isupper() and callable(getattr(keras.applications, name))
    )


@functools.cache
def _built(name, size):
    spec = backbones.get(name)
    return spec, backbones.build(spec, size, weights=None)


# ---------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------


def test_registry_covers_every_keras_application():
    # Computed from Keras, so a Keras release that adds an application fails here.
    assert backbones.names() == _keras_application_names()
    assert len(backbones.names()) >= 40


@pytest.mark.parametrize("name", _keras_application_names())
def test_spec_is_consistent(name):
    spec = backbones.get(name)
    assert spec.name == name
    assert spec.constructor is getattr(keras.applications, name)
    assert spec.family
    assert 32 <= spec.min_size <= spec.default_size


def test_get_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        backbones.get("ResNet5")
    message = str(info.value)
    assert message.startswith("unknown backbone 'ResNet5'; choose one of: ConvNeXtBase, ")
    assert "\n" not in message
    for name in backbones.names():
        assert name in message


def test_register_twice_raises(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    with pytest.raises(ValueError, match="'ResNet50' is already registered"):
        backbones.register(backbones.get("ResNet50"))

    fake = dataclasses.replace(backbones.get("ResNet50"), name="MyResNet")
    assert backbones.register(fake) is fake
    assert backbones.get("MyResNet") is fake
    with pytest.raises(ValueError, match="already registered"):
        backbones.register(fake)


# ---------------------------------------------------------------------------------------
# build().
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _keras_application_names())
def test_min_size_is_the_constructors_own_limit(name):
    # One below min_size the constructor itself refuses (before building anything), so
    # min_size is not more conservative than Keras. That min_size itself builds is
    # checked for one member per family by the block tests below.
    spec = backbones.get(name)
    below = spec.min_size - 1
    with pytest.raises(ValueError, match="Input size must be at least"):
        spec.constructor(include_top=False, weights=None, input_shape=(below, below, 3))


@pytest.mark.parametrize("name,size", [("ResNet50", 31), ("InceptionV3", 74), ("Xception", 8)])
def test_build_below_min_size_raises(name, size):
    spec = backbones.get(name)
    with pytest.raises(ValueError) as info:
        backbones.build(spec, size, weights=None)
    message = str(info.value)
    assert "\n" not in message
    assert str(size) in message and name in message and str(spec.min_size) in message


def test_build_rejects_other_weights():
    with pytest.raises(ValueError, match="'imagenet' or None"):
        backbones.build(backbones.get("MobileNet"), 64, weights="imagenet21k")


@pytest.mark.parametrize("weights", ["imagenet", None])
def test_build_passes_a_headless_square_input(weights):
    # ImageNet weights cannot be downloaded here: check what the constructor receives.
    calls = []
    spec = dataclasses.replace(backbones.get("MobileNetV2"), constructor=lambda **kw: calls.append(kw) or "model")
    assert backbones.build(spec, 100, weights) == "model"
    assert calls == [dict(include_top=False, weights=weights, input_shape=(100, 100, 3), pooling=None)]


def test_build_matches_direct_construction():
    spec, model = _built("MobileNet", 40)
    direct = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(40, 40, 3))
    assert model.input_shape == direct.input_shape == (None, 40, 40, 3)
    assert model.output_shape == direct.output_shape
    assert [w.shape for w in model.weights] == [w.shape for w in direct.weights]


# ---------------------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------------------


def _keras_module(spec):
    # keras.applications.ResNet50 lives in keras.src.applications.resnet, published as
    # keras.applications.resnet.
    return getattr(keras.applications, spec.constructor.__module__.rsplit(".", 1)[1])


@pytest.mark.parametrize("name", _keras_application_names())
def test_preprocess_matches_keras(name):
    spec = backbones.get(name)
    images = np.random.default_rng(0).uniform(0, 255, size=(2, 5, 5, 3)).astype("float32")
    expected = _keras_module(spec).preprocess_input(images.copy())
    actual = keras.ops.convert_to_numpy(spec.preprocess(images))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_ranges():
    images = np.array([[[[0.0, 0.0, 0.0], [255.0, 0.0, 0.0]]]], dtype="float32")

    tf_mode = keras.ops.convert_to_numpy(backbones.get("MobileNet").preprocess(images))
    np.testing.assert_allclose(tf_mode[0, 0], [[-1, -1, -1], [1, -1, -1]], atol=1e-6)

    caffe = keras.ops.convert_to_numpy(backbones.get("ResNet50").preprocess(images))
    # BGR order, mean subtracted, no scaling: pure red ends up in the last channel.
    np.testing.assert_allclose(caffe[0, 0, 1], [-103.939, -116.779, 255 - 123.68], atol=1e-3)

    torch_mode = keras.ops.convert_to_numpy(backbones.get("DenseNet121").preprocess(images))
    np.testing.assert_allclose(torch_mode[0, 0, 1, 0], (1 - 0.485) / 0.229, atol=1e-5)

    assert backbones.get("EfficientNetB0").preprocess(images) is images


@pytest.mark.parametrize(
    "preprocess",
    [backbones.caffe_mode, backbones.torch_mode, backbones.tf_mode, backbones.identity],
)
def test_preprocess_runs_in_a_model_and_under_xla(preprocess):
    images = np.random.default_rng(1).uniform(0, 255, size=(2, 4, 4, 3)).astype("float32")
    eager = keras.ops.convert_to_numpy(preprocess(images))

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, preprocess(inputs))
    np.testing.assert_allclose(model(images).numpy(), eager, rtol=1e-6)

    compiled = tf.function(preprocess, jit_compile=True)
    np.testing.assert_allclose(compiled(tf.constant(images)).numpy(), eager, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# blocks(): one small member per family, built near min_size.
# ---------------------------------------------------------------------------------------

# name -> (image size, first block, last block, names that must appear in order)
_FAMILY_CASES = {
    "ResNet50": (32, "stem", "conv5_block3", ["conv2_block1", "conv4_block2", "conv4_block6"]),
    "ResNet50V2": (33, "stem", "top", ["conv4_block2", "conv5_block3"]),
    "DenseNet121": (
        32,
        "stem",
        "top",
        ["conv2_block6", "pool2", "conv3_block5", "pool3", "pool4", "conv5_block16"],
    ),
    "VGG16": (32, "block1", "block5", ["block2", "block3", "block4"]),
    "Xception": (71, "block1", "block14", ["block2", "block13"]),
    "InceptionV3": (75, "stem", "mixed10", ["mixed0", "mixed5", "mixed9"]),
    "InceptionResNetV2": (
        75,
        "stem",
        "top",
        ["mixed_5b", "block35_10", "mixed_6a", "block17_5", "mixed_7a", "block8_10"],
    ),
    "NASNetMobile": (32, "stem", "cell_12", ["cell_stem_1", "cell_stem_2", "cell_0", "cell_reduce_4"]),
    "MobileNet": (33, "stem", "block_13", ["block_1", "block_7"]),
    "MobileNetV2": (32, "stem", "top", ["expanded_conv", "block_1", "block_12", "block_16"]),
    "MobileNetV3Small": (32, "stem", "top", ["expanded_conv", "expanded_conv_5"]),
    "EfficientNetB0": (32, "stem", "top", ["block1a", "block6c", "block7a"]),
    "EfficientNetV2B0": (32, "stem", "top", ["block1a", "block6h"]),
    "ConvNeXtTiny": (
        32,
        "stem",
        "top",
        ["stage_0_block_0", "downsampling_block_0", "stage_2_block_3", "stage_3_block_2"],
    ),
}


def _block_index_of_every_operation(backbone, blocks):
    """Block index per operation; non-layer ops (x + y) take their latest input's."""
    index = {id(layer): i for i, block in enumerate(blocks) for layer in block.layers}
    for op in backbone.operations:
        if id(op) not in index:
            inputs = [] if isinstance(op, keras.layers.InputLayer) else _parents(op)
            index[id(op)] = max((index[id(p)] for p in inputs), default=-1)
    return index


def _parents(op):
    return [t._keras_history.operation for t in keras.tree.flatten(op.input)]


@pytest.mark.parametrize("name", sorted(_FAMILY_CASES))
def test_blocks_partition_the_backbone_in_depth_order(name):
    size, first, last, inside = _FAMILY_CASES[name]
    spec, backbone = _built(name, size)
    blocks = backbones.blocks(spec, backbone)
    names = [block.name for block in blocks]

    assert len(blocks) >= 4
    assert len(set(names)) == len(names)
    assert names == backbones.block_names(spec, backbone)
    assert (names[0], names[-1]) == (first, last)
    assert [n for n in names if n in inside] == inside

    # Every layer but the input is in exactly one block, so every weight is too.
    in_blocks = [id(layer) for block in blocks for layer in block.layers]
    expected = [id(layer) for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert sorted(in_blocks) == sorted(expected)
    weighted = {id(layer) for layer in backbone.layers if layer.weights}
    assert weighted <= set(in_blocks)
    assert all(any(layer.weights for layer in block.layers) for block in blocks)

    # Depth order: no layer reads from a later block.
    index = _block_index_of_every_operation(backbone, blocks)
    for block_number, block in enumerate(blocks):
        for layer in block.layers:
            for parent in _parents(layer):
                assert index[id(parent)] <= block_number, (layer.name, parent.name)

    # The rule's own name for a layer is never overridden by the graph walk.
    for block in blocks:
        for layer in block.layers:
            assert spec.block_of(layer.name) in (None, block.name), layer.name


def test_inception_generic_layers_follow_the_graph():
    spec, backbone = _built("InceptionV3", 75)
    blocks = {block.name: block for block in backbones.blocks(spec, backbone)}
    conv = keras.layers.Conv2D
    # The stem is 5 conv2d_bn units; mixed0 has 7 convs in 4 branches; mixed9 has 9.
    assert sum(isinstance(layer, conv) for layer in blocks["stem"].layers) == 5
    assert sum(isinstance(layer, conv) for layer in blocks["mixed0"].layers) == 7
    assert sum(isinstance(layer, conv) for layer in blocks["mixed9"].layers) == 9
    # mixed9_1 (sic) is an inner concatenation of mixed10.
    assert "mixed9_1" in [layer.name for layer in blocks["mixed10"].layers]


def test_xception_shortcut_belongs_to_the_block_it_closes():
    spec, backbone = _built("Xception", 71)
    for block in backbones.blocks(spec, backbone):
        shortcuts = [
            layer for layer in block.layers if type(layer) is keras.layers.Conv2D and spec.block_of(layer.name) is None
        ]
        # Strided 1x1 shortcuts sit in the entry flow (2-4) and the exit flow (13).
        expected = 1 if block.name in {"block2", "block3", "block4", "block13"} else 0
        assert len(shortcuts) == expected, block.name


def test_blocks_do_not_depend_on_generic_layer_names():
    # Keras numbers generic names per session (conv2d, conv2d_57, ...); a second build
    # gets different ones and must split the same way.
    spec, first = _built("InceptionV3", 75)
    second = backbones.build(spec, 75, weights=None)
    assert [layer.name for layer in first.layers] != [layer.name for layer in second.layers]

    def split(model):
        return [(block.name, len(block.layers)) for block in backbones.blocks(spec, model)]

    assert split(first) == split(second)


@pytest.mark.parametrize("name", sorted(_FAMILY_CASES))
def test_whole_model_takes_rgb_0_255(name):
    # Identity-preprocess families normalize in their own first layers; the others must
    # not, or kft would normalize twice.
    spec, backbone = _built(name, _FAMILY_CASES[name][0])
    normalizing = (keras.layers.Rescaling, keras.layers.Normalization)
    has_own = any(isinstance(layer, normalizing) for layer in backbone.layers)
    assert has_own == (spec.preprocess is backbones.identity)
