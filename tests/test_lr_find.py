"""The learning-rate range test: the sweep's rates, the suggestion, and the entry point."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kft import lr_find

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rates_grow_exponentially_from_min_to_max():
    rates = lr_find.exponential_rates(1e-6, 1e-1, 6)
    np.testing.assert_allclose(rates, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], rtol=1e-9)


def test_suggestion_is_the_steepest_descent():
    rates = lr_find.exponential_rates(1e-5, 1.0, 100)
    log_rates = np.log10(rates)
    # A loss curve falling fastest at 1e-3 (a logistic step in log-LR), then blowing up.
    loss = 2.0 - 1.5 / (1 + np.exp(-4 * (log_rates + 3))) + np.where(log_rates > -0.8, 50 * (log_rates + 0.8) ** 2, 0)
    suggested = lr_find.suggest(rates, loss)
    assert 5e-4 < suggested < 2e-3


def test_smoothing_is_bias_corrected():
    assert lr_find.smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])


def test_lr_find_end_to_end_leaves_no_training_state(tmp_path):
    model_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kft.lr_find",
            f"--model_dir={model_dir}",
            "--dataset=digits:0-2",
            "--backbone=MobileNetV2",
            "--weights=none",
            "--image_size=32",
            "--batch_size=16",
            "--stages=head:1@1e-3,all:1@1e-4",
            "--stage=2",
            "--sweep_steps=30",
            "--train_limit_per_class=32",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--lr_scale=" in result.stdout
    out = model_dir / "lr_find"
    report = json.loads((out / "lr_find.json").read_text())
    assert report["stage"].startswith("all:1@0.0001")
    assert 1e-7 <= report["suggested_lr"] <= 1.0
    assert report["suggested_lr_scale"] == pytest.approx(report["suggested_lr"] / 1e-4)
    assert 5 <= len(report["losses"]) <= 30
    assert (out / "loss_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(model_dir)) == [".kft-lock", "lr_find"]  # The run directory's lock, released.
    bad = subprocess.run(
        [sys.executable, "-m", "kft.lr_find", f"--model_dir={model_dir}", "--weights=none", "--stage=5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--stage=5: --stages has only 2 stages" in bad.stderr
