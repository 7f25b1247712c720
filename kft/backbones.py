"""Registry of keras.applications backbones: constructor, preprocessing, sizes, blocks.

Every classifier that `keras.applications` exports is registered under its class name
(`"ResNet50"`, `"EfficientNetV2B0"`, ...), one small table entry per family.

Preprocessing rule: every backbone that `build` returns is fed RGB float32 in 0..255
after `spec.preprocess`, so `preprocess(x)` then `backbone(...)` is the whole pipeline.

* Families whose Keras model already contains its own normalization (EfficientNet,
  EfficientNetV2, ConvNeXt, MobileNetV3) keep it, and their `preprocess` is the
  identity. Keeping it is the only rule that works for all four: EfficientNet (V1) has
  no `include_preprocessing` switch, and the pretrained weights were fitted with the
  built-in layers in place.
* All other families get the transform of their `keras.applications.<module>.
  preprocess_input`, rewritten with `keras.ops` so it runs on symbolic tensors inside a
  model and compiles with XLA: "caffe" (RGB->BGR, minus the ImageNet mean) for ResNet
  and VGG, "torch" (0..1, minus mean, over std) for DenseNet, "tf" (-1..1) for the rest.

Blocks: `blocks(spec, backbone)` splits a built backbone into the architecture's own
units (ResNet `conv4_block2`, EfficientNet `block6c`, Inception `mixed7`, ...), found by
layer name, never by layer count, so that a staged unfreeze opens whole residual blocks.
Layers with Keras's generic names (`conv2d_7`, `activation_12`: the Inception branches,
Xception's shortcuts) are placed by walking the graph; see `blocks`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable

import keras
from keras import ops

# ---------------------------------------------------------------------------------------
# Preprocessing: (B, H, W, 3) RGB float in 0..255 -> what the backbone was trained on.
# ---------------------------------------------------------------------------------------

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


def identity(x: Any) -> Any:
    """Returns `x`: the backbone normalizes inside its own first layers."""
    return x


def caffe_mode(x: Any) -> Any:
    """RGB -> BGR, then subtract the ImageNet per-channel mean (no scaling)."""
    x = ops.flip(ops.cast(x, "float32"), axis=-1)
    return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")


def torch_mode(x: Any) -> Any:
    """Scale to 0..1, then normalize each channel with the ImageNet mean and std."""
    x = ops.cast(x, "float32") / 255.0
    mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype="float32")
    std = ops.convert_to_tensor(_TORCH_STD_RGB, dtype="float32")
    return (x - mean) / std


def tf_mode(x: Any) -> Any:
    """Scale 0..255 to -1..1."""
    return ops.cast(x, "float32") / 127.5 - 1.0


# ---------------------------------------------------------------------------------------
# Specs and the registry.
# ---------------------------------------------------------------------------------------

# (compiled regex, block-name template): the first rule whose regex matches a layer name
# names that layer's block via `match.expand(template)`. Layers no rule matches are
# "unnamed" and placed by `blocks` from the graph.
BlockRule = tuple[tuple[re.Pattern, str], ...]

STEM = "stem"
TOP = "top"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and split one keras.applications backbone.

    Attributes:
      name: keras.applications class name, e.g. "ResNet50".
      family: family key shared by related members, e.g. "resnet".
      constructor: the keras.applications constructor.
      preprocess: RGB float 0..255 tensor -> the backbone's input; keras.ops only.
      default_size: the ImageNet training resolution.
      min_size: smallest square input the constructor builds with include_top=False.
      block_rule: ordered (regex, template) pairs naming a layer's block from its name.
    """

    name: str
    family: str
    constructor: Callable[..., keras.Model]
    preprocess: Callable[[Any], Any]
    default_size: int
    min_size: int
    block_rule: BlockRule

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer name belongs to, or None for generic Keras names."""
        for pattern, template in self.block_rule:
            match = pattern.match(layer_name)
            if match:
                return match.expand(template)
        return None


@dataclasses.dataclass(frozen=True)
class Block:
    """One unit of a backbone, unfrozen as a whole: a name and its layers."""

    name: str
    layers: tuple[keras.layers.Layer, ...]


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Adds `spec` to the registry under `spec.name`.

    Raises:
      ValueError: a backbone with that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """All registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> BackboneSpec:
    """The spec registered as `name`.

    Raises:
      ValueError: unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(names())}") from None


# ---------------------------------------------------------------------------------------
# The families. Sizes: Keras's own defaults; min sizes: the smallest the constructors
# accept with include_top=False, each checked by building every member there and every
# family's smallest member at the 50 sizes above it.
# ---------------------------------------------------------------------------------------


def _rule(*pairs: tuple[str, str]) -> BlockRule:
    return tuple((re.compile(pattern), template) for pattern, template in pairs)


@dataclasses.dataclass(frozen=True)
class _Family:
    family: str
    members: dict[str, int]  # constructor name -> default (ImageNet) size
    preprocess: Callable[[Any], Any]
    min_size: int
    block_rule: BlockRule


_FAMILIES = (
    _Family(
        "resnet",
        {"ResNet50": 224, "ResNet101": 224, "ResNet152": 224},
        caffe_mode,
        32,
        _rule((r"^(conv1|pool1)_", STEM), (r"^(conv\d_block\d+)_", r"\1")),
    ),
    _Family(
        # Pre-activation: the final BatchNorm (post_bn) normalizes the last block's sum.
        "resnet_v2",
        {"ResNet50V2": 224, "ResNet101V2": 224, "ResNet152V2": 224},
        tf_mode,
        32,
        _rule(
            (r"^(conv1|pool1)_", STEM),
            (r"^(conv\d_block\d+)_", r"\1"),
            (r"^post_", TOP),
        ),
    ),
    _Family(
        # Dense blocks conv{2..5}_block{i}; pool{2,3,4} are the transition layers.
        "densenet",
        {"DenseNet121": 224, "DenseNet169": 224, "DenseNet201": 224},
        torch_mode,
        32,
        _rule(
            (r"^(conv1_|pool1$)", STEM),
            (r"^(conv\d_block\d+)_", r"\1"),
            (r"^(pool\d)_", r"\1"),
            (r"^(bn|relu)$", TOP),
        ),
    ),
    _Family(
        "vgg",
        {"VGG16": 224, "VGG19": 224},
        caffe_mode,
        32,
        _rule((r"^(block\d)_", r"\1")),
    ),
    _Family(
        # block1 (two plain convs) is Xception's stem; shortcut convs are unnamed.
        "xception",
        {"Xception": 299},
        tf_mode,
        71,
        _rule((r"^(block\d+)_", r"\1")),
    ),
    _Family(
        # Only the concatenations mixed0..mixed10 are named; everything between them is
        # conv2d_N/batch_normalization_N. mixed9_0 and mixed9_1 are inner concatenations
        # of mixed9 and mixed10 (sic), hence the anchored pattern.
        "inception_v3",
        {"InceptionV3": 299},
        tf_mode,
        75,
        _rule((r"^(mixed\d+)$", r"\1")),
    ),
    _Family(
        "inception_resnet_v2",
        {"InceptionResNetV2": 299},
        tf_mode,
        75,
        _rule(
            (r"^(mixed_\d[a-z])$", r"\1"),
            (r"^(block(?:35|17|8)_\d+)_", r"\1"),
            (r"^conv_7b", TOP),
        ),
    ),
    _Family(
        # Cells are suffixed with their id: _stem_1, _stem_2, _0, _1, ..., _reduce_4, ...
        "nasnet",
        {"NASNetMobile": 224, "NASNetLarge": 331},
        tf_mode,
        32,
        _rule(
            (r"^stem_(conv|bn)1$", STEM),
            (
                r"^(?:normal|reduction|adjust|separable_conv)_.*?_"
                r"(stem_\d+|reduce_\d+|\d+)$",
                r"cell_\1",
            ),
        ),
    ),
    _Family(
        # conv_dw_N and conv_pw_N form one depthwise-separable block.
        "mobilenet",
        {"MobileNet": 224},
        tf_mode,
        32,
        _rule((r"^conv1", STEM), (r"^conv_(?:dw|pw|pad)_(\d+)", r"block_\1")),
    ),
    _Family(
        "mobilenet_v2",
        {"MobileNetV2": 224},
        tf_mode,
        32,
        _rule(
            (r"^(Conv1|bn_Conv1)", STEM),
            (r"^(expanded_conv|block_\d+)_", r"\1"),
            (r"^(Conv_1|out_relu)", TOP),
        ),
    ),
    _Family(
        "mobilenet_v3",
        {"MobileNetV3Small": 224, "MobileNetV3Large": 224},
        identity,
        32,
        _rule(
            (r"^conv(_bn)?$", STEM),
            (r"^(expanded_conv(?:_\d+)?)_", r"\1"),
            (r"^conv_1", TOP),
        ),
    ),
    _Family(
        "efficientnet",
        {f"EfficientNetB{i}": s for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600))},
        identity,
        32,
        _rule(
            (r"^stem_", STEM),
            (r"^(block\d+[a-z])_", r"\1"),
            (r"^top_", TOP),
        ),
    ),
    _Family(
        "efficientnet_v2",
        {
            "EfficientNetV2B0": 224,
            "EfficientNetV2B1": 240,
            "EfficientNetV2B2": 260,
            "EfficientNetV2B3": 300,
            "EfficientNetV2S": 384,
            "EfficientNetV2M": 480,
            "EfficientNetV2L": 480,
        },
        identity,
        32,
        _rule(
            (r"^stem_", STEM),
            (r"^(block\d+[a-z])_", r"\1"),
            (r"^top_", TOP),
        ),
    ),
    _Family(
        # Layer names carry the model name: convnext_tiny_stage_2_block_3_layernorm.
        "convnext",
        {f"ConvNeXt{size}": 224 for size in ("Tiny", "Small", "Base", "Large", "XLarge")},
        identity,
        32,
        _rule(
            (r"^convnext_[a-z]+_(prestem_normalization|stem)$", STEM),
            (r"^convnext_[a-z]+_(stage_\d+_block_\d+)_", r"\1"),
            (r"^convnext_[a-z]+_(downsampling_block_\d+)$", r"\1"),
        ),
    ),
)

for _family in _FAMILIES:
    for _name, _size in _family.members.items():
        register(
            BackboneSpec(
                name=_name,
                family=_family.family,
                constructor=getattr(keras.applications, _name),
                preprocess=_family.preprocess,
                default_size=_size,
                min_size=_family.min_size,
                block_rule=_family.block_rule,
            )
        )
del _family, _name, _size


# ---------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------


def build(spec: BackboneSpec, image_size: int, weights: str | None) -> keras.Model:
    """Builds the headless backbone for square `image_size` inputs.

    The result takes `spec.preprocess(rgb_0_255)` and returns the last feature map
    (include_top=False, pooling=None).

    Args:
      spec: which backbone.
      image_size: input height and width in pixels, at least `spec.min_size`.
      weights: "imagenet" for the pretrained weights, or None for random init.

    Returns:
      The keras.applications functional model.

    Raises:
      ValueError: `image_size` below the minimum, or `weights` not "imagenet"/None.
      WeightsUnavailableError: the ImageNet weights are not cached and cannot be downloaded.
    """
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    if image_size < spec.min_size:
        raise ValueError(f"image_size {image_size} is too small for {spec.name}; the minimum is {spec.min_size}")
    with warnings.catch_warnings():
        # The MobileNets (V1, V2, V3) publish weights for a few sizes and fall back to the
        # 224 ones with a warning. Without the classifier the conv weights do not depend
        # on the input size, so the fallback is exactly what we want.
        warnings.filterwarnings("ignore", message=r".*will be loaded as the default")
        try:
            return spec.constructor(
                include_top=False,
                weights=weights,
                input_shape=(image_size, image_size, 3),
                pooling=None,
            )
        except Exception as e:  # Keras's get_file raises a bare Exception when a download fails.
            if weights == "imagenet" and str(e).startswith(_FETCH_FAILURE):
                raise WeightsUnavailableError(_unavailable_message(spec.name, str(e))) from None
            raise


# How keras.utils.get_file's message starts when a download fails: "URL fetch failure on
# URL: CODE -- REASON".
_FETCH_FAILURE = "URL fetch failure on "


class WeightsUnavailableError(ValueError):
    """The ImageNet weights are neither in Keras's cache nor downloadable from here."""


def _unavailable_message(name: str, keras_message: str) -> str:
    reason = keras_message.rpartition(" -- ")[2].strip() or "no reason given"
    return (
        f"--weights=imagenet: the ImageNet weights of {name} are not in Keras's cache "
        f"(~/.keras/models, or $KERAS_HOME/models) and could not be downloaded ({reason}); "
        "give --weights=PATH (a backbone.weights.h5 a kft run wrote) or --weights=none, "
        "or copy Keras's weights file into that cache from a machine with network"
    )


# ---------------------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------------------


def blocks(spec: BackboneSpec, backbone: keras.Model) -> list[Block]:
    """Splits `backbone` into its architecture's blocks, input side first.

    Layers whose names match `spec.block_rule` go to the block it names. The others
    (Keras's generic names) are placed from the graph, in this order:

    1. On the linear chain from the input, before the first fork: the block of the
       previous named layer, else "stem" (the Inception stems are all generic).
    2. A merge (add, multiply, concatenate) with named inputs: the latest of their
       blocks; it closes that block (Xception's residual adds, IRv2's scaled sums).
    3. Anything else: the earliest block among the layers it feeds (Inception branch
       convs feed their "mixed" concatenation, Xception shortcuts feed their add).
    4. Feeding nothing (the output tail): "top".

    A block left without any weights (e.g. NASNet's final ReLU as "top") is merged into
    the block before it, so that unfreezing a block always unfreezes something.

    Args:
      spec: the spec `backbone` was built from.
      backbone: a model returned by `build(spec, ...)`.

    Returns:
      Blocks ordered from the input to the output; every layer except the InputLayer is
      in exactly one block, and no layer reads from a later block.
    """
    operations = [op for op in backbone.operations if not isinstance(op, keras.layers.InputLayer)]
    parents, children = _graph(backbone)

    named = {id(op): spec.block_of(op.name) for op in operations}
    # Rank named blocks by where their first layer appears (operations are in
    # topological order); "stem" comes before and "top" after everything.
    rank = {STEM: -1}
    for op in operations:
        block = named[id(op)]
        if block is not None and block not in rank and block != TOP:
            rank[block] = len(rank)
    rank[TOP] = len(rank)

    assigned = {key: block for key, block in named.items() if block is not None}
    on_chain = {id(op) for op in backbone.operations if isinstance(op, keras.layers.InputLayer)}
    for op in operations:  # Forward: rules 1 and 2.
        ps = parents[id(op)]
        if len(ps) == 1 and id(ps[0]) in on_chain and len(children[id(ps[0])]) == 1:
            on_chain.add(id(op))
        if id(op) in assigned:
            continue
        if id(op) in on_chain:
            assigned[id(op)] = assigned.get(id(ps[0]), STEM)
        elif len(ps) > 1:
            known = [assigned[id(p)] for p in ps if id(p) in assigned]
            if known:
                assigned[id(op)] = max(known, key=rank.__getitem__)
    for op in reversed(operations):  # Backward: rules 3 and 4.
        if id(op) not in assigned:
            fed = [assigned[id(c)] for c in children[id(op)]]
            assigned[id(op)] = min(fed, key=rank.__getitem__) if fed else TOP

    grouped: dict[str, list[keras.layers.Layer]] = {}
    for op in operations:
        if isinstance(op, keras.layers.Layer):
            grouped.setdefault(assigned[id(op)], []).append(op)
    ordered = sorted(grouped.items(), key=lambda item: rank[item[0]])

    result: list[Block] = []
    for name, layers in ordered:
        if result and not any(layer.weights for layer in layers):
            result[-1] = Block(result[-1].name, result[-1].layers + tuple(layers))
        else:
            result.append(Block(name, tuple(layers)))
    if len(result) > 1 and not any(layer.weights for layer in result[0].layers):
        first, second = result[0], result[1]
        result[:2] = [Block(second.name, first.layers + second.layers)]
    return result


def block_names(spec: BackboneSpec, backbone: keras.Model) -> list[str]:
    """Names of `blocks(spec, backbone)`, input side first."""
    return [block.name for block in blocks(spec, backbone)]


def _graph(model: keras.Model) -> tuple[dict[int, list], dict[int, list]]:
    """Parents and children of every operation of a functional model, keyed by id()."""
    producer = {}
    for op in model.operations:
        for tensor in keras.tree.flatten(op.output):
            producer[id(tensor)] = op
    parents = {id(op): [] for op in model.operations}
    children = {id(op): [] for op in model.operations}
    for op in model.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        for tensor in keras.tree.flatten(op.input):
            parent = producer.get(id(tensor))
            if parent is not None and all(parent is not p for p in parents[id(op)]):
                parents[id(op)].append(parent)
                children[id(parent)].append(op)
    return parents, children
