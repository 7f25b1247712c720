"""`python -m kft.predict` end to end, as a user runs it: a subprocess on a tiny export; and its
library function `kft.predict.predict` in this process, beside kft.train's flags (the entry
point defines its flags only when run, so the two do not clash).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import colour_model
from PIL import Image

from kft import checkpoint, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["blue", "green", "red"]
RUN_IMAGE_SIZE = 20  # What the fake training run's classes.json says.
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} |To enable the following)")


def coloured(channel: int, size=(14, 18), seed=0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 60, (*size, 3), dtype=np.uint8)
    image[..., channel] += 150
    return image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An export laid out as kft.train leaves it (RUN/export/1 beside RUN/classes.json) and a
    folder of images: nested, mixed formats and modes, one corrupt file, files to ignore."""
    root = tmp_path_factory.mktemp("predict")
    run = root / "run"
    model = colour_model(logit_scale=5.0)
    check = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    version = export.export_saved_model(model, CLASSES, str(run / "export"), check)
    checkpoint.write_json(
        str(run / "classes.json"), {"class_names": CLASSES, "backbone": "MobileNetV2", "image_size": RUN_IMAGE_SIZE}
    )

    images = root / "images"
    (images / "nested" / "deeper").mkdir(parents=True)
    (images / ".hidden").mkdir()
    # path -> (expected top class, or None for an image without a dominant colour)
    expected = {}
    Image.fromarray(coloured(0)).save(images / "red.png")
    expected[images / "red.png"] = "red"
    Image.fromarray(coloured(1, seed=1)).save(images / "nested" / "green.JPG", quality=95)
    expected[images / "nested" / "green.JPG"] = "green"
    Image.fromarray(coloured(2, seed=2)).convert("RGBA").save(images / "nested" / "blue_rgba.png")
    expected[images / "nested" / "blue_rgba.png"] = "blue"
    Image.fromarray(coloured(0, seed=3)).convert("P").save(images / "nested" / "deeper" / "red_palette.gif")
    expected[images / "nested" / "deeper" / "red_palette.gif"] = "red"
    Image.fromarray(coloured(2, seed=4)).save(images / "nested" / "deeper" / "blue.bmp")
    expected[images / "nested" / "deeper" / "blue.bmp"] = "blue"
    Image.fromarray(coloured(1, seed=5)).convert("L").save(images / "nested" / "grey.png")
    expected[images / "nested" / "grey.png"] = None
    (images / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "notes.txt").write_text("not an image")  # Wrong extension: not listed.
    Image.fromarray(coloured(0)).save(images / ".hidden" / "skip.png")  # Hidden folder: skipped.
    (images / "._blue.bmp").write_bytes(b"\0\5\26\7 Mac OS X")  # Hidden file (AppleDouble): skipped.
    return model, run, version, images, {str(k): v for k, v in expected.items()}


def run_predict(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "kft.predict", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _TF_NOISE.match(line)]


def decoded_resized(path: str, size: int) -> np.ndarray:
    """What kft.evaluate would feed the model: decoded and resized as kft.data does.

    TF decodes all but BMPs (its JPEG decoder differs from PIL's by a few levels per pixel).
    """
    import tensorflow as tf

    from kft import data

    if path.endswith(".bmp"):
        with Image.open(path) as image:
            rgb = tf.constant(np.asarray(image.convert("RGB")))
    else:
        rgb = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return np.asarray(data.resize_uint8(rgb, size))


def test_json_lines(setup):
    model, run, version, images, expected = setup
    result = run_predict(f"--export_dir={run / 'export'}", str(images), "--json", "--top_k=2", "--batch_size=4")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]  # Every stdout line is JSON.
    broken = str(images / "nested" / "broken.png")
    assert sorted(r["path"] for r in records) == sorted([*expected, broken])
    (error,) = [r for r in records if "error" in r]
    assert error["path"] == broken and "top_k" not in error
    for record in records:
        if record["path"] == broken:
            continue
        top = record["top_k"]
        assert [entry.keys() for entry in top] == [{"class", "probability"}] * 2
        probabilities = [entry["probability"] for entry in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-6
        if expected[record["path"]] is not None:
            assert top[0]["class"] == expected[record["path"]]
        # The same numbers as the Keras model on the same pixels.
        want = np.asarray(model(decoded_resized(record["path"], RUN_IMAGE_SIZE)[None]))[0]
        got = dict(zip((e["class"] for e in top), probabilities))
        for name, probability in got.items():
            assert probability == pytest.approx(float(want[CLASSES.index(name)]), abs=1e-4)
    lines = error_lines(result.stderr)
    assert [line for line in lines if "broken.png" in line] == [f"error: {broken}: " + error["error"]]
    assert lines[-1] == f"predicted 6 images with {version} at {RUN_IMAGE_SIZE} px; 1 file could not be decoded"


def test_the_library_predicts_in_process_beside_kft_train_flags(setup, capsys):
    from kft import cli, predict
    from kft import flags as kft_flags  # noqa: F401  (defines --image_size, --batch_size, ... too)

    _, run, _, images, expected = setup
    red = str(images / "red.png")
    assert predict.predict([red], export_dir=str(run / "export"), as_json=True, top_k=1) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["path"] == red and record["top_k"][0]["class"] == expected[red] == "red"
    with pytest.raises(cli.UsageError, match="does not exist"):
        predict.predict([str(images / "absent.png")], export_dir=str(run / "export"))


def test_table_with_defaults(setup):
    """Default --top_k=5 is capped at the 3 classes; the image size comes from the run's classes.json."""
    _, run, version, images, expected = setup
    red = str(images / "red.png")
    result = run_predict(f"--export_dir={version}", red, str(images / "nested" / "deeper"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"image +rank +class +probability", lines[0])
    rows = [line.split() for line in lines[1:-1]]
    assert len(rows) == 3 * 3  # Three images, all three classes each.
    assert rows[0][:3] == [red, "1", "red"]
    assert [row[0] for row in rows[1:3]] == ["2", "3"]  # Continuation rows leave the path blank.
    probabilities = [float(row[-1]) for row in rows[:3]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    paths = [row[0] for row in rows if len(row) == 4]
    assert paths == [red, *sorted(p for p in expected if "deeper" in p)]  # Command-line order, folders sorted.
    assert lines[-1] == f"predicted 3 images with {version} at {RUN_IMAGE_SIZE} px"
    assert error_lines(result.stderr) == []


def test_nothing_decodable_exits_1(setup, tmp_path):
    _, run, _, images, _ = setup
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = run_predict(
        f"--export_dir={run / 'export'}", str(images / "nested" / "broken.png"), str(tmp_path / "empty.jpg")
    )
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len([line for line in lines if line.startswith("error: ")]) == 2
    assert "predicted 0 images" in result.stdout and "2 files could not be decoded" in result.stdout


def test_missing_path_is_one_line_exit_2(setup, tmp_path):
    _, run, _, images, _ = setup
    missing = str(tmp_path / "nope.jpg")
    result = run_predict(f"--export_dir={run / 'export'}", str(images / "red.png"), missing)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"kft.predict: error: {missing} does not exist"]
    assert result.stdout == ""


def test_image_size_is_the_models_own(setup, tmp_path):
    """Files are resized to the size the model was trained at, never to another: a second
    resize would give other probabilities than a server fed the whole image."""
    model, run, version, images, _ = setup
    red = str(images / "red.png")
    result = run_predict(f"--export_dir={version}", red, "--image_size=16")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"kft.predict: error: --image_size=16: the model at {version} was trained at {RUN_IMAGE_SIZE} px and "
        f"resizes every image to {RUN_IMAGE_SIZE}; files resized to 16 first would be resized twice and get "
        "other probabilities than served ones (leave --image_size out)"
    ]
    # An export that records no size, away from its run: refused without --image_size.
    check = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    lone = export.export_saved_model(model, CLASSES, str(tmp_path / "export"), check)
    result = run_predict(f"--export_dir={lone}", red)
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"kft.predict: error: {lone} does not record the image size") and "--image_size" in line
