"""Interrupted runs resume with nothing lost; divergence stops cleanly; runs repeat exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from kft import checkpoint, model, schedule, trainer
from kft.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(
        [sys.executable, "-m", "kft.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_when(process, condition, timeout=240.0):
    """SIGKILLs the process as soon as condition() holds; returns True if it was still running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            alive = process.poll() is None
            process.send_signal(signal.SIGKILL)
            process.wait()
            return alive
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    process.kill()
    raise AssertionError("the kill point was never reached")


def _exists_with_prefix(directory, prefix):
    def check():
        try:
            return any(name.startswith(prefix) for name in os.listdir(directory))
        except FileNotFoundError:
            return False

    return check


def _all_files_readable(model_dir):
    """Every file kft wrote parses: JSON, HDF5, npz; no temporary file is left behind."""
    for root, dirs, files in os.walk(model_dir):
        for name in dirs + files:
            assert not name.startswith(".tmp-"), os.path.join(root, name)
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".json"):
                json.load(open(path))
            elif name.endswith(".h5"):
                h5py.File(path, "r").close()
            elif name.endswith(".npz"):
                checkpoint.load_arrays(path)


def test_sigkill_at_every_point_then_resume(tmp_path):
    start_weights = tmp_path / "start.weights.h5"
    classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(2))
    checkpoint.save_backbone_weights(classifier.backbone, "MobileNetV2", 32, str(start_weights))
    model_dir = tmp_path / "run"
    args = [
        f"--model_dir={model_dir}",
        "--dataset=digits:0-1",
        "--train_limit_per_class=48",
        "--backbone=MobileNetV2",
        f"--weights={start_weights}",
        "--image_size=32",
        "--batch_size=16",
        "--stages=head:2@1e-3,top2:2@1e-4",
        "--augment=flip",
        "--verbose=0",
    ]
    ckpt = model_dir / "ckpt"
    kill_points = {
        "inside the head stage": lambda: (ckpt / "epoch-1").exists(),
        "inside the second stage": lambda: (ckpt / "epoch-3").exists(),
        "while a checkpoint is written": _exists_with_prefix(ckpt, ".tmp-"),
        "during export": _exists_with_prefix(model_dir / "export", ".tmp-export"),
    }
    anchors_before = None
    for point, condition in kill_points.items():
        process = _start(args)
        assert _kill_when(process, condition), f"run finished before the kill point: {point}"
        if anchors_before is None:
            anchors_before = checkpoint.load_arrays(str(model_dir / "anchors.npz"))
        if point == "while a checkpoint is written" and (ckpt / "latest").exists():
            latest = (ckpt / "latest").read_text().strip()
            assert (ckpt / latest / "state.json").exists(), "latest points at an incomplete checkpoint"
    process = _start(args)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert [s["epochs"] for s in metrics["stages"]] == [2, 2]
    # The L2-SP anchors are the weights the run started from, never rewritten by a resume.
    anchors_after = checkpoint.load_arrays(str(model_dir / "anchors.npz"))
    original = model.build_classifier("MobileNetV2", 32, str(start_weights), model.HeadConfig(2))
    for w in original.backbone.weights:
        if w.path in anchors_after:
            np.testing.assert_array_equal(anchors_after[w.path], w.numpy())
            np.testing.assert_array_equal(anchors_before[w.path], w.numpy())
    assert sorted(os.listdir(model_dir / "export")) == ["1"]
    _all_files_readable(model_dir)


def _tiny_config(tmp_path, stages, **overrides):
    fields = dict(
        dataset="digits:0-2",
        backbone="MobileNetV2",
        weights=None,
        image_size=32,
        batch_size=16,
        stages=schedule.parse_stages(stages),
        model_dir=str(tmp_path),
        train_limit_per_class=32,
        verbose=0,
        augment=("crop", "flip"),
        seed=3,
        deterministic=True,
    )
    fields.update(overrides)
    return Config(**fields)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    config = _tiny_config(tmp_path, "head:1@1e-3,all:2@1e9", optimizer="sgd")
    with pytest.raises(trainer.DivergenceError) as info:
        trainer.train(config)
    message = str(info.value)
    assert "stage 2 (all:2@1e+09" in message and "epoch 1" in message and "learning rate is likely too high" in message
    state = json.loads((tmp_path / "ckpt" / "epoch-1" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (1, 0)
    assert not (tmp_path / "ckpt" / "epoch-2").exists()
    weights = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    weights.load_weights(str(tmp_path / "model.weights.h5"))
    assert all(np.isfinite(w.numpy()).all() for w in weights.weights)


def test_divergence_exit_code_from_the_command_line(tmp_path):
    process = _start(
        [
            f"--model_dir={tmp_path}",
            "--dataset=digits:0-2",
            "--train_limit_per_class=32",
            "--backbone=MobileNetV2",
            "--weights=none",
            "--image_size=32",
            "--batch_size=16",
            "--stages=all:2@1e9",
            "--optimizer=sgd",
            "--verbose=0",
        ]
    )
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 3, output[-2000:]
    assert "error: loss became" in output and "lower --lr_scale" in output


def test_seeded_deterministic_runs_repeat_exactly(tmp_path):
    runs = []
    for name in ("a", "b"):
        metrics = trainer.train(_tiny_config(tmp_path / name, "head:1@1e-2,top1:1@1e-3"))
        runs.append({k: v for k, v in metrics.items() if "seconds" not in k})
        history = json.loads((tmp_path / name / "ckpt" / "epoch-2" / "state.json").read_text())["history"]
        runs[-1]["history"] = history
    assert runs[0] == runs[1]


def test_arrays_are_never_unpickled(tmp_path):
    path = str(tmp_path / "anchors.npz")
    np.savez(path, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        checkpoint.load_arrays(path)
