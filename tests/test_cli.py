"""Entry points end to end: the smoke configs under TFDS mock data, resume, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from absl import flags

from kft import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
# The recipe's path in seconds: a small random-weight backbone, a probe and two steps, no export.
TINY_RECIPE_RUN = (
    "--backbone=MobileNetV2",
    "--weights=none",
    "--image_size=32",
    "--stages=probe,all:2steps@1e-4",
    "--verbose=0",
    "--export_dir=none",
)


def run_train_in_process(argv: list[str]) -> None:
    """Parses kft.train flags as the command line would and runs its main()."""
    from kft import train

    FLAGS.unparse_flags()
    try:
        FLAGS(["kft.train", *argv])
        train.main(["kft.train"])
    finally:
        FLAGS.unparse_flags()


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("name", ["cifar10_resnet50", "cifar10_mobilenetv3"])
def test_smoke_twin_trains_exports_and_evaluates(tmp_path, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    model_dir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=24):
        run_train_in_process([f"--flagfile=configs/smoke/{name}.cfg", f"--model_dir={model_dir}"])
    metrics = json.loads((model_dir / "metrics.json").read_text())
    smoke_stages = [s for s in open(f"configs/smoke/{name}.cfg") if s.startswith("--stages=")][0]
    assert len(metrics["stages"]) == smoke_stages.count(",") + 1
    assert all(s["epochs"] == 1 for s in metrics["stages"])
    version = metrics["export"]
    assert version.endswith(os.path.join("export", "1"))
    assert export.read_class_names(version) == [str(i) for i in range(10)]
    saved_flags = (model_dir / "flags.cfg").read_text()
    assert "--backbone=" in saved_flags and "--dataset=tfds:cifar10" in saved_flags
    # The resolved flags reproduce the run: rerunning with them resumes (nothing left to do),
    # and adds no identical export version.
    with tfds.testing.mock_data(num_examples=24):
        run_train_in_process([f"--flagfile={model_dir / 'flags.cfg'}"])
    assert sorted(n for n in os.listdir(model_dir / "export") if not n.startswith(".")) == ["1"]


def test_train_then_evaluate_model_dir_on_digits(tmp_path):
    model_dir = tmp_path / "run"
    result = run_module(
        "kft.train",
        f"--model_dir={model_dir}",
        "--dataset=digits:0-2",
        "--backbone=MobileNetV2",
        "--weights=none",
        "--image_size=32",
        "--batch_size=32",
        "--stages=head:1@1e-2,top1:1@1e-3",
        "--train_limit_per_class=32",
        "--verbose=0",
        "--export_dir=none",
        "--export_tflite=dynamic",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best val accuracy" in result.stdout
    assert not (model_dir / "export").exists()
    tflite_report = json.loads((model_dir / "tflite" / "tflite.json").read_text())
    assert (model_dir / "tflite" / "model_float32.tflite").exists()
    assert (model_dir / "tflite" / "model_int8_dynamic.tflite").exists()
    assert tflite_report
    result = run_module("kft.evaluate", f"--model_dir={model_dir}", "--dataset=digits:0-2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((model_dir / "eval" / "eval.json").read_text())
    assert report["num_examples"] > 0 and 0 <= report["accuracy"] <= 1
    assert (model_dir / "eval" / "confusion_matrix.png").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backbone=ResNet5"], "unknown backbone 'ResNet5'; choose one of:"),
        (["--bogus=1"], "Unknown command line flag 'bogus'"),
        (["--stages=head:3"], "malformed stage 'head:3'"),
        (["--lr_scale=0"], "flag --lr_scale=0.0: must be > 0.0"),
        (["--lr_scale=-1"], "--lr_scale=-1.0"),
        (["--augment=shear"], "unknown augmentation 'shear'"),
        (["--dataset=imagenet"], "imagenet"),
        (["--weights=/nonexistent/backbone.weights.h5"], "--weights=/nonexistent/backbone.weights.h5"),
        (["--backbone=InceptionV3", "--image_size=32"], "--image_size=32 is below InceptionV3's minimum input size 75"),
        (["--jit_compile=maybe"], "--jit_compile"),
        (["--batch_size=0"], "--batch_size=0"),
    ],
)
def test_bad_flags_fail_in_one_line_before_writing(tmp_path, args, fragment):
    model_dir = tmp_path / "run"
    result = run_module("kft.train", f"--model_dir={model_dir}", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert fragment in lines[0]
    assert not model_dir.exists()


@pytest.mark.parametrize(
    "module, args",
    [
        ("kft.train", []),  # The recipe's rotation check builds the backbone first.
        ("kft.train", ["--augment=crop"]),  # No rotation check: the checks before writing build it.
        ("kft.tune", ["--augment=crop", "--max_trials=1"]),
        ("kft.lr_find", ["--augment=crop"]),
    ],
)
def test_imagenet_weights_out_of_reach_stop_the_run_in_one_line_before_writing(tmp_path, module, args):
    # An empty Keras cache, and a proxy that refuses every connection: no download, network or not.
    proxy = "http://127.0.0.1:9"
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_HOME": str(tmp_path / "keras")}
    env.update({name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    env.update(NO_PROXY="", no_proxy="")
    out_dir = tmp_path / "out"
    out_flag = "--tune_dir" if module == "kft.tune" else "--model_dir"  # kft.lr_find writes in MODEL_DIR too.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            f"{out_flag}={out_dir}",
            "--dataset=digits:0-2",
            "--backbone=MobileNetV2",
            "--image_size=32",
            "--train_limit_per_class=10",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{module}: error: --weights=imagenet: the ImageNet weights of MobileNetV2 are not in ")
    assert "give --weights=PATH" in last and "Traceback" not in result.stderr
    assert not out_dir.exists()


def test_stage_naming_missing_block_and_resume_conflicts(tmp_path):
    model_dir = tmp_path / "run"
    common = [
        f"--model_dir={model_dir}",
        "--dataset=digits:0-1",
        "--backbone=MobileNetV2",
        "--weights=none",
        "--image_size=32",
        "--batch_size=32",
        "--verbose=0",
        "--export_dir=none",
        "--train_limit_per_class=16",
    ]
    result = run_module("kft.train", *common, "--stages=head:1@1e-3,from=conv9_block1:1@1e-4")
    assert result.returncode == 2
    assert (
        "no block 'conv9_block1' in this backbone; its blocks are: stem, expanded_conv, block_1"
        in result.stderr.strip().splitlines()[-1]
    )
    assert not (model_dir / "flags.cfg").exists()
    assert run_module("kft.train", *common, "--stages=head:1@1e-3").returncode == 0
    result = run_module("kft.train", *common, "--stages=head:2@1e-3")
    assert result.returncode == 2
    assert (
        "holds a run with other flags (--stages: saved ['head:1@0.001:bn=frozen:warmup=0.1'], "
        "now ['head:2@0.001:bn=frozen:warmup=0.1'])" in result.stderr
    )
    assert (model_dir / "metrics.json").exists()


def test_rerunning_a_recipe_run_resumes_it_with_the_recipe_it_recorded(tmp_path):
    model_dir = tmp_path / "run"
    command = [f"--model_dir={model_dir}", "--dataset=digits:0-1", "--train_limit_per_class=8", *TINY_RECIPE_RUN]
    first = run_module("kft.train", *command)
    assert first.returncode == 0, first.stderr[-3000:]
    # A run from a kft whose recipe gave no test views (before --test_views): this kft's
    # recipe derives flip views for 16 images, and deriving it again refused the resume.
    run_json = model_dir / "run.json"
    record = json.loads(run_json.read_text())
    assert record["model"].pop("test_views") == ["flip"]
    run_json.write_text(json.dumps(record))
    again = run_module("kft.train", *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {model_dir} with the recipe it recorded" in again.stderr
    assert "the finished model averages 2 views (flip)" in again.stdout  # The recorded block.
    assert json.loads(run_json.read_text())["model"]["test_views"] == []
    assert "--test_views=none" in (model_dir / "flags.cfg").read_text()


def test_unwritable_model_dir_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_module("kft.train", f"--model_dir={blocker}/run", "--weights=none", "--image_size=32")
    assert result.returncode == 2
    assert f"--model_dir={blocker}/run is not writable" in result.stderr


def test_a_folder_with_a_class_of_a_few_images_trains_with_the_defaults(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in {"common": 6, "usual": 6, "rare": 2}.items():
        folder = tmp_path / "images" / name
        os.makedirs(folder)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = [f"--dataset=folder:{tmp_path / 'images'}", *TINY_RECIPE_RUN]
    # The recipe's default: no split to carve from 14 images, every image trains.
    default = run_module("kft.train", f"--model_dir={tmp_path / 'default'}", *common)
    assert default.returncode == 0, default.stderr[-3000:]
    assert json.loads((tmp_path / "default" / "metrics.json").read_text())["num_train"] == 14
    # A split the user asks for holds out 1 + 1 images; the rare class cannot spare one.
    held = run_module("kft.train", f"--model_dir={tmp_path / 'held'}", "--val_fraction=0.2", *common)
    assert held.returncode == 0, held.stderr[-3000:]
    assert "validation has no image of 'rare': --val_fraction=0.2 of so few images" in held.stderr
    metrics = json.loads((tmp_path / "held" / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_val"]) == (12, 2)
