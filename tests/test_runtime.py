"""tf.distribute, mixed precision and the XLA choice."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kft import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, "tests")
    from conftest import make_splits
    from kft import runtime, schedule, trainer
    from kft.config import Config
    strategy = runtime.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    config = Config(dataset="unused", backbone="MobileNetV2", weights=None, image_size=32, batch_size=8,
                    stages=schedule.parse_stages("head:1@1e-2,top1:1@1e-3"), model_dir=sys.argv[1],
                    strategy="mirrored", augment=("crop", "flip", "mixup"), verbose=0,
                    mixed_precision=sys.argv[2])
    metrics = trainer.train(config, make_splits())
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "metrics": metrics}))
    """
)


@pytest.mark.parametrize("precision", ["none", "bfloat16"])
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, precision):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(tmp_path), precision],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["replicas"] == 2
    assert [s["epochs"] for s in output["metrics"]["stages"]] == [1, 1]
    assert 0.0 <= output["metrics"]["best_val_accuracy"] <= 1.0


def test_mixed_precision_keeps_the_head_in_float32():
    import keras

    from kft import model

    runtime.set_precision("bfloat16")
    try:
        classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
        assert classifier.backbone.layers[2].compute_dtype == "bfloat16"
        assert classifier.classify.compute_dtype == "float32"
        import numpy as np

        probs = classifier(np.zeros((2, 32, 32, 3), np.uint8))
        assert probs.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_jit_compile_auto_is_off_without_an_accelerator():
    assert runtime.resolve_jit_compile("auto") is runtime.has_accelerator()
    assert runtime.resolve_jit_compile("true") is True
    assert runtime.resolve_jit_compile("false") is False


@pytest.mark.parametrize(
    "capability,expected",
    [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float16"), ((7, 0), "float16"), ((6, 1), "none")],
)
def test_auto_precision_on_a_gpu_follows_compute_capability(monkeypatch, capability, expected):
    gpu = object()
    monkeypatch.setattr(runtime.tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(
        runtime.tf.config.experimental, "get_device_details", lambda device: {"compute_capability": capability}
    )
    decision = runtime.precision_decision("auto", "MobileNetV2", 224)
    assert decision.precision == expected
    assert f"{capability[0]}.{capability[1]}" in decision.reason
    assert runtime.resolve_precision("auto", "ResNet50") == expected


def test_auto_precision_on_cpu_without_calibration_is_float32(monkeypatch):
    # conftest sets KFT_CALIBRATE_PRECISION=0; tests/test_calibration.py tests the measurement.
    monkeypatch.setattr(runtime.tf.config, "list_physical_devices", lambda kind=None: [])
    decision = runtime.precision_decision("auto", "ResNet50", 96)
    assert decision.precision == "none" and "KFT_CALIBRATE_PRECISION" in decision.reason


def test_explicit_precision_is_kept(monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("an explicit --mixed_precision must not be measured")

    monkeypatch.setattr(runtime.calibration, "decide", no_measuring)
    for choice in ("none", "bfloat16", "float16"):
        assert runtime.resolve_precision(choice, "MobileNetV2") == choice
