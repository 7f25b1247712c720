"""tools/transfer_bench.py: the --quick run end to end, and its bookkeeping on made-up results.

No timing or accuracy assertions: --quick trains each recipe for one step or epoch, and the
numbers are BENCHMARKS.md's business.
"""

import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "transfer_bench.py")


def _load_tool():
    spec = importlib.util.spec_from_file_location("transfer_bench", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # Cheap: TensorFlow is imported only when a recipe runs.
    return module


tb = _load_tool()


def _run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _hashes(folder: str) -> tuple[set, set]:
    """sha256 of the files' bytes and of their decoded pixels."""
    files, pixels = set(), set()
    for path in glob.glob(os.path.join(folder, "*", "*.png")):
        with open(path, "rb") as f:
            files.add(hashlib.sha256(f.read()).hexdigest())
        pixels.add(hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest())
    return files, pixels


def test_quick_run_end_to_end(tmp_path):
    # One test for the whole run: pytest-xdist (-n 2) would give each worker its own copy of a
    # module-scoped fixture, running --quick twice.
    work, out = tmp_path / "work", tmp_path / "result.json"
    proc = _run("--quick", f"--work_dir={work}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _check_every_method_has_an_accuracy_for_every_seed(result, str(work))
    _check_test_folder_is_held_out(os.path.join(str(work), "data", "digits"))
    _check_kft_default_trained_on_train_and_was_evaluated_by_kft(result, str(work))
    _check_table_is_printed(proc.stdout, result)
    _check_rerun_reuses_the_cache(result, str(work), tmp_path / "again.json")


def _check_every_method_has_an_accuracy_for_every_seed(result, work):
    settings = result["settings"]
    assert settings["quick"] and settings["tasks"] == ["digits"] and settings["sizes"] == ["5"]
    assert set(settings["methods"]) == set(tb.METHODS) - {"kft_tune"}
    (backbone,) = settings["backbones"]
    num_test = len(glob.glob(os.path.join(work, "data", "digits", "test", "*", "*.png")))
    assert num_test > 400  # half of digits 5-9
    for method in settings["methods"]:
        for seed in range(settings["seeds"]):
            run = result["runs"][f"digits|5|{backbone}|{method}|{seed}"]
            assert 0.0 <= run["accuracy"] <= 1.0, (method, seed)
            assert run["num_test"] == num_test, (method, seed)
            assert run["wall_s"] > 0 and run["cpu_s"] > 0, (method, seed)
    (row,) = result["rows"]
    assert set(row["methods"]) == set(settings["methods"])
    assert row["best_baseline"] in tb.BASELINES
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu_model"]
    assert len(result["git"]["commit"]) == 40 and isinstance(result["git"]["dirty"], bool)
    assert result["pretrain"][f"digits/{backbone}"]["weights"].endswith("backbone.weights.h5")
    assert result["failed"] == []


def _check_test_folder_is_held_out(data):
    test_files, test_pixels = _hashes(os.path.join(data, "test"))
    assert test_files
    for size in tb.SIZES:
        files, pixels = _hashes(os.path.join(data, f"train_{size}"))
        assert files and not files & test_files, size
        assert not pixels & test_pixels, size
    sizes = {s: len(glob.glob(os.path.join(data, f"train_{s}", "*", "*.png"))) for s in tb.SIZES}
    assert sizes["5"] == 25 and sizes["10"] == 50 and sizes["50"] == 250 and sizes["full"] > 250
    # Each size holds the smaller ones (the same images, more of them).
    assert _hashes(os.path.join(data, "train_5"))[0] <= _hashes(os.path.join(data, "train_10"))[0]
    # The source task is other classes: digits 0-4 vs the target's 5-9.
    assert sorted(os.listdir(os.path.join(data, "source"))) == ["0", "1", "2", "3", "4"]
    assert sorted(os.listdir(os.path.join(data, "test"))) == ["5", "6", "7", "8", "9"]


def test_image_tasks_hold_their_test_images_out(tmp_path):
    # The two tasks made from scikit-image's bundled images (no training: the folders only).
    textures = tb.build_task("textures", str(tmp_path / "textures"))
    assert textures["target_classes"] == sorted(tb.TEXTURE_CLASSES)
    assert textures["source_classes"] == sorted(tb.PHOTO_CLASSES)
    faces = tb.build_task("faces", str(tmp_path / "faces"))
    assert faces["target_classes"] == ["face", "nonface"] and faces["source_classes"] == []
    assert faces["counts"]["test"] == {"face": 50, "nonface": 50}
    assert faces["counts"]["train_10"] == {"face": 10, "nonface": 10}
    # faces has no source folder: it starts from the weights pretrained on textures' source.
    assert not (tmp_path / "faces" / "source").exists() and tb.SOURCE_TASK["faces"] == "textures"
    for task in ("textures", "faces"):
        data = str(tmp_path / task)
        test_files, test_pixels = _hashes(os.path.join(data, "test"))
        assert test_files, task
        for size in tb.SIZES:
            files, pixels = _hashes(os.path.join(data, f"train_{size}"))
            assert files and not files & test_files and not pixels & test_pixels, (task, size)
        assert _hashes(os.path.join(data, "train_5"))[0] <= _hashes(os.path.join(data, "train_10"))[0]
    # Rebuilding reuses the folders (same manifest, nothing rewritten).
    assert tb.build_task("faces", str(tmp_path / "faces")) == faces


def _check_kft_default_trained_on_train_and_was_evaluated_by_kft(result, work):
    (backbone,) = result["settings"]["backbones"]
    run_dir = os.path.join(work, "runs", "digits", "5", backbone, "kft_default", "seed0")
    with open(os.path.join(run_dir, "eval", "eval.json")) as f:
        evaluation = json.load(f)
    data = os.path.join(work, "data", "digits")
    assert evaluation["dataset"] == f"folder:{os.path.join(data, 'test')}"
    assert evaluation["accuracy"] == result["runs"][f"digits|5|{backbone}|kft_default|0"]["accuracy"]
    with open(os.path.join(run_dir, "flags.cfg")) as f:
        flags = f.read()
    assert f"--dataset=folder:{os.path.join(data, 'train_5')}\n" in flags


def _check_table_is_printed(stdout, result):
    header = next(line for line in stdout.splitlines() if line.startswith("task"))
    for method in result["settings"]["methods"]:
        assert method in header
    assert "kft_default - best baseline" in header
    (backbone,) = result["settings"]["backbones"]
    row = next(line for line in stdout.splitlines() if line.startswith("digits"))
    assert row.split()[:3] == ["digits", "5", backbone] and "±" in row


def _check_rerun_reuses_the_cache(result, work, out):
    proc = _run("--quick", f"--work_dir={work}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy " not in proc.stderr and "pretraining" not in proc.stderr
    assert json.loads(out.read_text())["runs"] == result["runs"]


# ----------------------------------------------------------------------------------------------
# Bookkeeping on made-up results (no training).


def _entry(accuracy):
    return {"accuracy": accuracy, "wall_s": 1.0, "cpu_s": 1.0}


def test_summarize_reports_mean_std_and_margin_over_the_best_baseline():
    entries = {}
    for seed, (kft, probe, guide) in enumerate([(0.8, 0.6, 0.7), (0.9, 0.6, 0.5), (0.7, 0.6, 0.75)]):
        entries[f"digits|5|B|kft_default|{seed}"] = _entry(kft)
        entries[f"digits|5|B|linear_probe|{seed}"] = _entry(probe)
        entries[f"digits|5|B|keras_guide|{seed}"] = _entry(guide)
    entries["digits|full|B|linear_probe|0"] = _entry(0.95)
    methods = ["kft_default", "linear_probe", "keras_guide"]
    rows = tb.summarize(entries, methods)
    assert [(r["size"]) for r in rows] == ["5", "full"]  # sizes in their natural order
    five = rows[0]["methods"]
    assert five["kft_default"]["mean"] == pytest.approx(0.8)
    assert five["kft_default"]["std"] == pytest.approx(0.1)  # sample std over 3 seeds
    assert five["linear_probe"]["std"] == pytest.approx(0.0) and five["keras_guide"]["n"] == 3
    assert rows[0]["best_baseline"] == "keras_guide"  # mean 0.65 vs linear_probe's 0.6
    assert rows[0]["kft_default_margin"] == pytest.approx(0.15)
    assert "kft_default_margin" not in rows[1]  # no kft run there
    table = tb.format_table(rows, methods)
    assert "0.800 ± 0.100" in table and "+0.150 (keras_guide)" in table
    assert table.splitlines()[-1].split()[:3] == ["digits", "full", "B"]


@pytest.mark.parametrize("method", ["linear_probe", "keras_guide", "kft_default"])
def test_cache_ignores_results_computed_with_other_settings(tmp_path, method):
    cache = tb.Cache(str(tmp_path / "results.json"))
    job = tb.Job("digits", "5", "B", method, 0, str(tmp_path), "w.h5", 5, tb.Settings())
    expected = tb.fingerprint(job, "ab" * 32, "data")
    cache.put(job.key, {**_entry(0.5), "fingerprint": expected})
    reloaded = tb.Cache(str(tmp_path / "results.json"))
    assert reloaded.get(job.key, tb.fingerprint(job, "ab" * 32, "data"))["accuracy"] == 0.5
    quick_job = tb.Job("digits", "5", "B", method, 0, str(tmp_path), "w.h5", 5, tb.QUICK)
    assert reloaded.get(job.key, tb.fingerprint(quick_job, "ab" * 32, "data")) is None
    assert reloaded.get(job.key, tb.fingerprint(job, "cd" * 32, "data")) is None
    assert reloaded.get(job.key, tb.fingerprint(job, "ab" * 32, "other data")) is None


def test_two_processes_sharing_a_cache_keep_each_others_runs(tmp_path):
    path = str(tmp_path / "results.json")
    first, second = tb.Cache(path), tb.Cache(path)  # both loaded before either wrote
    first.put("a", _entry(0.1))
    second.put("b", _entry(0.2))
    first.put("c", _entry(0.3))
    assert sorted(tb.Cache(path).runs) == ["a", "b", "c"]


def test_a_recipe_fingerprint_holds_its_own_settings_only():
    def settings(method):
        job = tb.Job("digits", "5", "B", method, 0, "/w", "w.h5", 5, tb.Settings())
        return tb.fingerprint(job, "ab" * 32, "data")["settings"]

    assert "guide_head_epochs" in settings("keras_guide") and "kft_flags" not in settings("keras_guide")
    assert "kft_flags" in settings("kft_default") and "probe_cs" not in settings("kft_default")
    assert "tune_trials" in settings("kft_tune") and "kft_flags" in settings("kft_tune")
    assert settings("seed_head_only") == settings("seed_all_sgd")


def test_a_missing_scikit_image_file_is_one_line_and_exit_1(tmp_path):
    # A scikit-image without its bundled data (a stripped install) stands in for a missing one:
    # both reach the same check.
    fake = tmp_path / "site" / "skimage"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(tmp_path / "site"))
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, TOOL, "--quick", f"--work_dir={work}", "--tasks=faces", f"--out={tmp_path / 'out.json'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"transfer_bench: error: the faces task reads {str(fake / 'data' / 'lfw_subset.npy')!r}, bundled in "
        "scikit-image's wheel; install it: pip install -e '.[bench]'"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "out.json").exists()


def test_a_work_dir_linked_to_another_never_deletes_that_ones_files(tmp_path):
    # Work dir "b" reuses "a"'s pretrained weights through a link. Its pretraining command names
    # its own data folder, so the cache entry does not match and would be trained again: that
    # must stop before deleting anything of "a"'s.
    weights = tmp_path / "a" / "pretrain" / "textures" / "ResNet50" / "backbone.weights.h5"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"a's weights")
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a" / "pretrain", tmp_path / "b" / "pretrain")
    with pytest.raises(SystemExit) as e:
        tb.pretrain("textures", "ResNet50", str(tmp_path / "b"), tb.Settings())
    assert f"leads to {os.path.realpath(weights.parent)}, outside {tmp_path / 'b'}" in str(e.value)
    assert weights.read_bytes() == b"a's weights"
    own = tmp_path / "b" / "runs" / "old"  # What the benchmark wrote in its own work dir goes.
    own.mkdir(parents=True)
    tb._remove_tree(str(own), str(tmp_path / "b"))
    assert not own.exists() and (tmp_path / "b" / "runs").is_dir()


def test_a_drawn_size_trains_each_seed_on_its_own_draw_from_the_pool(tmp_path):
    data = str(tmp_path / "data" / "faces")  # As the tool lays out its work dir (tmp_path).
    tb.build_task("faces", data)
    pool, _ = _hashes(os.path.join(data, "train_full"))
    test_files, _ = _hashes(os.path.join(data, "test"))
    draws = {seed: tb.draw_folder(data, "5d", seed) for seed in range(3)}
    files = {seed: _hashes(path)[0] for seed, (path, _) in draws.items()}
    # Seed 0 trains on the fixed draw, the other seeds on their own: 5 per class from the pool.
    assert files[0] == _hashes(os.path.join(data, "train_5"))[0]
    for seed, (path, _) in draws.items():
        assert sorted(os.listdir(path)) == ["draw.json", "face", "nonface"]
        assert [len(os.listdir(os.path.join(path, c))) for c in ("face", "nonface")] == [5, 5]
        assert files[seed] <= pool and not files[seed] & test_files
    assert len({frozenset(f) for f in files.values()}) == 3
    assert len({draw_hash for _, draw_hash in draws.values()}) == 3
    job = tb.Job("faces", "5d", "ResNet50", "kft_default", 1, str(tmp_path), "w.h5", 2, tb.Settings())
    assert job.train_dir == draws[1][0] and job.key == "faces|5d|ResNet50|kft_default|1"
    # A second call reuses the folder; one that lost a file is written again, whole.
    path, draw_hash = draws[1]
    first = sorted(os.listdir(os.path.join(path, "face")))[0]
    before = os.stat(os.path.join(path, "face", first)).st_mtime_ns
    assert tb.draw_folder(data, "5d", 1) == (path, draw_hash)
    assert os.stat(os.path.join(path, "face", first)).st_mtime_ns == before
    os.remove(os.path.join(path, "face", first))
    assert tb.draw_folder(data, "5d", 1) == (path, draw_hash) and _hashes(path)[0] == files[1]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]  # No staging left.
    assert tb.parse_args(["--sizes=5d,10"]).sizes == ["5d", "10"]
    with pytest.raises(SystemExit):
        tb.parse_args(["--sizes=fulld"])


def test_the_long_tailed_size_gives_each_seed_its_own_rare_class(tmp_path):
    # Five classes, as digits 5-9: 40, 20, 10, 5 and 2 images, in a seeded order.
    names = [str(d) for d in range(5, 10)]
    orders = {seed: tb.drawn_counts("lt", names, seed) for seed in range(6)}
    for counts in orders.values():
        assert sorted(counts) == names and sorted(counts.values()) == [2, 5, 10, 20, 40]
    assert len({min(counts, key=counts.get) for counts in orders.values()}) > 1  # The rare class moves.
    assert tb.drawn_counts("lt", ["a", "b", "c", "d", "e", "f"], 0)["a"] in (2, 5, 10, 20, 40)
    assert sorted(tb.drawn_counts("lt", ["a", "b", "c", "d", "e", "f"], 0).values()) == [2, 2, 5, 10, 20, 40]
    assert tb.drawn_counts("10d", names, 3) == dict.fromkeys(names, 10)
    # Faces: 40 and 20 of the pool's 50 per class, never a test image, a draw per seed.
    data = str(tmp_path / "data" / "faces")
    tb.build_task("faces", data)
    pool, _ = _hashes(os.path.join(data, "train_full"))
    test_files, _ = _hashes(os.path.join(data, "test"))
    for seed in range(2):
        path, _ = tb.draw_folder(data, "lt", seed)
        counts = {c: len(os.listdir(os.path.join(path, c))) for c in ("face", "nonface")}
        assert counts == tb.drawn_counts("lt", ["face", "nonface"], seed) and sorted(counts.values()) == [20, 40]
        files = _hashes(path)[0]
        assert files <= pool and not files & test_files
    assert tb.parse_args(["--sizes=lt,5d"]).sizes == ["lt", "5d"]
