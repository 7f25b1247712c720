"""TFLite export for on-device inference: raw uint8 images in, class probabilities out.

Files written to `out_dir`:

    model_float32.tflite        the float model; must match Keras to 1e-4 (else nothing is written)
    model_int8_dynamic.tflite   dynamic-range quantization (int8 weights, float activations);
                                only with quantize="dynamic"
    labels.txt                  the class names, one per line, when `class_names` is given
    tflite.json                 the check numbers that `export_tflite` returns

Signature `serving_default` of both models:
  inputs:  images         uint8   [batch, H, W, 3]   H and W FIXED at the check images' size
  outputs: probabilities  float32 [batch, num_classes]
Resizing and the backbone's preprocessing are inside the graph, as in the SavedModel; feed
images already resized to H x W (e.g. with `kft.data.resize_uint8`). Only the batch dimension
is dynamic: a mobile runtime allocates every tensor for a fixed image size.

The model goes through a Keras `ExportArchive` SavedModel first. Converting a `tf.function`
that closes over a Keras 3 model directly (`from_concrete_functions`) leaves its weights as
uninitialized resource variables, and the TFLite model silently outputs NaN; the archive
tracks the variables so that the converter freezes them into constants.
"""

import os
import tempfile
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import checkpoint

SIGNATURE_KEY = "serving_default"
FLOAT32_FILE = "model_float32.tflite"
INT8_DYNAMIC_FILE = "model_int8_dynamic.tflite"
LABELS_FILE = "labels.txt"
REPORT_FILE = "tflite.json"
QUANTIZE_MODES = ("none", "dynamic")

# The float32 TFLite model runs the same ops with other kernels (XNNPACK): differences beyond
# this mean a conversion bug, not rounding.
FLOAT32_ATOL = 1e-4
# Dynamic-range quantization changes probabilities visibly but should rarely change the top
# class; agreeing on fewer than half the check images means the quantized model is broken.
MIN_INT8_AGREEMENT = 0.5


class TFLiteMismatchError(ValueError):
    """A converted model does not reproduce the Keras model (float32), or barely does (int8)."""


def export_tflite(
    model: keras.Model,
    out_dir: str,
    check_images: np.ndarray,
    *,
    quantize: str = "dynamic",
    check_labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Converts `model` to TFLite at the check images' size and checks the result against Keras.

    Both models are converted and checked before anything is written; each file is then
    written atomically (temporary name, rename), `tflite.json` last.

    Args:
      model: maps raw images (uint8 or float 0..255, [B, H, W, 3]) to class probabilities
        [B, C]; resizing and preprocessing are inside it (a `kft.model.Classifier`).
      out_dir: directory for the files; created if missing.
      check_images: uint8 [N, H, W, 3]. Their H and W become the TFLite input size; they are
        run through Keras and every converted model.
      quantize: "none" writes only the float32 model; "dynamic" also writes the dynamic-range
        quantized one (int8 weights, about 4x smaller, no calibration data needed).
      check_labels: optional int [N] true classes of `check_images`; adds accuracies.
      class_names: optional class names in index order; written to `labels.txt`.

    Returns:
      A JSON-able dict (also written to `tflite.json`): "input" (shape and dtype), "num_check_images",
      and per model ("float32", "int8_dynamic") its "file", "bytes", "max_abs_diff" (vs Keras
      probabilities), "top1_agreement" (fraction of images with the Keras top class) and, with
      labels, "accuracy" and "accuracy_difference" (TFLite minus Keras); "keras_accuracy" with labels.

    Raises:
      ValueError: bad arguments (named in the message).
      TFLiteMismatchError: float32 differs from Keras by more than 1e-4, or the int8 model
        agrees with Keras on the top class for fewer than half the images; nothing is written.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    check_images = np.asarray(check_images)
    if check_images.dtype != np.uint8 or check_images.ndim != 4 or check_images.shape[-1] != 3 or not len(check_images):
        raise ValueError(
            f"check_images must be uint8 [N >= 1, height, width, 3], got {check_images.dtype} {check_images.shape}"
        )
    expected = np.asarray(keras.ops.convert_to_numpy(model(check_images, training=False)), np.float32)
    if expected.ndim != 2 or len(expected) != len(check_images):
        raise ValueError(
            f"the model outputs shape {expected.shape} for {len(check_images)} images, expected [N, classes]"
        )
    names = None if class_names is None else list(class_names)
    if names is not None and (len(names) != expected.shape[1] or not all(n and "\n" not in n for n in names)):
        raise ValueError(f"class_names must be {expected.shape[1]} non-empty names without newlines, got {names!r}")
    labels = None
    if check_labels is not None:
        labels = np.asarray(check_labels).reshape(-1)
        if len(labels) != len(check_images):
            raise ValueError(f"{len(labels)} check_labels for {len(check_images)} check_images")

    height, width = check_images.shape[1:3]
    converted = {"float32": (FLOAT32_FILE, None)}
    if quantize == "dynamic":
        converted["int8_dynamic"] = (INT8_DYNAMIC_FILE, [tf.lite.Optimize.DEFAULT])
    flatbuffers = _convert(model, height, width, {kind: opt for kind, (_, opt) in converted.items()})

    report = {
        "input": {"name": "images", "dtype": "uint8", "shape": [None, int(height), int(width), 3]},
        "signature": SIGNATURE_KEY,
        "num_check_images": int(len(check_images)),
    }
    if labels is not None:
        report["keras_accuracy"] = _accuracy(expected, labels)
    for kind, (filename, _) in converted.items():
        got = run_tflite(flatbuffers[kind], check_images)
        report[kind] = _compare(got, expected, labels, filename, len(flatbuffers[kind]))
    _check(report)

    os.makedirs(out_dir, exist_ok=True)
    for kind, (filename, _) in converted.items():
        with checkpoint.atomic_path(os.path.join(out_dir, filename), suffix=".tflite") as tmp, open(tmp, "wb") as f:
            f.write(flatbuffers[kind])
    stale = os.path.join(out_dir, INT8_DYNAMIC_FILE)
    if "int8_dynamic" not in converted and os.path.exists(stale):
        # A quantized model of other weights beside this float one would be deployed by mistake.
        os.remove(stale)
        logging.info("removed %s from an earlier export (quantize=none)", stale)
    if names is not None:
        checkpoint.write_text(os.path.join(out_dir, LABELS_FILE), "".join(f"{n}\n" for n in names))
    checkpoint.write_json(os.path.join(out_dir, REPORT_FILE), report)
    logging.info("TFLite export to %s: %s", out_dir, _summary(report))
    return report


def _convert(model: keras.Model, height: int, width: int, optimizations: dict) -> dict[str, bytes]:
    """One SavedModel of `model` with a fixed-size uint8 signature, converted once per entry."""

    def serve(images):
        return {"probabilities": tf.cast(model(images, training=False), tf.float32)}

    spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")
    result = {}
    with tempfile.TemporaryDirectory(prefix="kft-tflite-") as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SIGNATURE_KEY, serve, input_signature=[spec])
        archive.write_out(saved_model_dir, verbose=False)
        for kind, optimization in optimizations.items():
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[SIGNATURE_KEY])
            # Builtin ops only: the model must run on a stock TFLite runtime without Flex ops.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            if optimization:
                converter.optimizations = optimization
            result[kind] = converter.convert()
    return result


def _interpreter(model_content: bytes):
    """The LiteRT interpreter if installed, else TF's (deprecated but still shipped in TF 2.21)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = None
    if Interpreter is not None:
        return Interpreter(model_content=model_content)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        return tf.lite.Interpreter(model_content=model_content)


def run_tflite(model_content: bytes, images: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] of a model written by `export_tflite`, run on uint8 [N, H, W, 3]."""
    runner = _interpreter(model_content).get_signature_runner(SIGNATURE_KEY)
    return np.asarray(runner(images=np.asarray(images, np.uint8))["probabilities"], np.float32)


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def _compare(got: np.ndarray, expected: np.ndarray, labels, filename: str, size: int) -> dict:
    numbers = {
        "file": filename,
        "bytes": int(size),
        "max_abs_diff": float(np.max(np.abs(got - expected))),
        "top1_agreement": float(np.mean(np.argmax(got, axis=-1) == np.argmax(expected, axis=-1))),
    }
    if labels is not None:
        numbers["accuracy"] = _accuracy(got, labels)
        numbers["accuracy_difference"] = numbers["accuracy"] - _accuracy(expected, labels)
    return numbers


def _check(report: dict) -> None:
    n = report["num_check_images"]
    difference = report["float32"]["max_abs_diff"]
    if not difference <= FLOAT32_ATOL:  # Also catches NaN.
        raise TFLiteMismatchError(
            f"float32 TFLite model differs from the Keras model on {n} check images: max abs "
            f"difference {difference:.3g} > {FLOAT32_ATOL:g}; nothing was written"
        )
    if "int8_dynamic" in report:
        agreement = report["int8_dynamic"]["top1_agreement"]
        if not agreement >= MIN_INT8_AGREEMENT:
            raise TFLiteMismatchError(
                f"dynamic-range quantized TFLite model agrees with the Keras model's top class on "
                f"only {agreement:.0%} of {n} check images (< {MIN_INT8_AGREEMENT:.0%}); nothing was written"
            )


def _summary(report: dict) -> str:
    parts = []
    for kind in ("float32", "int8_dynamic"):
        if kind in report:
            r = report[kind]
            parts.append(
                f"{kind} {r['bytes'] / 1e6:.2f} MB, max abs diff {r['max_abs_diff']:.2g}, "
                f"top-1 agreement {r['top1_agreement']:.1%}"
            )
    return "; ".join(parts)
