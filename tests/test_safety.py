"""Nothing the user owns is lost: --overwrite, locks, resume, file modes, validation before
work, no hangs, one line for every failure (issue 11)."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
from absl import flags

from kft import checkpoint, rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

TINY = [
    "--backbone=MobileNetV2",
    "--weights=none",
    "--image_size=32",
    "--stages=head:1@1e-3",
    "--batch_size=8",
    "--train_limit_per_class=8",
    "--verbose=0",
    "--augment=none",
]


def run_module(module, *args, timeout=300, cwd=ROOT, umask=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


def one_error_line(result, status=2):
    """The error line, the last one on stderr (after the data's log line, if any), and no
    traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "error:" in lines[-1], lines
    assert [line for line in lines if "error:" in line] == lines[-1:], lines
    return lines[-1]


def snapshot(directory):
    """Every file under `directory` with its bytes' hash and mtime (the lock file, which names
    the process holding it, aside)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name == rundir.LOCK:
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = (hash(f.read()), os.stat(path).st_mtime_ns)
    return found


def write_png_folder(root, classes, per_class=10, size=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            image[..., index % 3] += 150
            Image.fromarray(image).save(os.path.join(root, name, f"{i}.png"))


# ----------------------------------------------------------------------------------------------
# 1. Data loss and safety.


def test_overwrite_removes_only_kft_runs_and_only_after_every_check(tmp_path):
    """--overwrite never touches a directory kft did not create, nor a run when any other flag
    is bad, nor a run holding foreign files, nor when it comes from a flagfile."""
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("years of work")
    common = [*TINY, "--dataset=digits:0-1", "--export_dir=none"]
    line = one_error_line(run_module("kft.train", f"--model_dir={own}", *common, "--overwrite"))
    assert "holds no kft run" in line
    line = one_error_line(run_module("kft.train", f"--model_dir={own}", *common))
    assert "holds no kft run" in line
    assert sorted(os.listdir(own)) == ["thesis.tex"]

    run = tmp_path / "run"
    result = run_module("kft.train", f"--model_dir={run}", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / rundir.MARKER).exists()
    before = snapshot(run)
    # A stage the backbone does not have: refused before anything is removed.
    line = one_error_line(
        run_module("kft.train", f"--model_dir={run}", *common, "--overwrite", "--stages=from=conv9_block1:1@1e-3")
    )
    assert "conv9_block1" in line
    assert snapshot(run) == before
    # --overwrite read from a flagfile (a copied or tool-written file) deletes nothing.
    flagfile = tmp_path / "copied.cfg"
    flagfile.write_text("--overwrite\n")
    line = one_error_line(run_module("kft.train", f"--flagfile={flagfile}", f"--model_dir={run}", *common))
    assert "--overwrite was read from a flagfile" in line
    assert snapshot(run) == before
    # A run that holds a file kft did not write is not cleared.
    (run / "notes.txt").write_text("mine")
    line = one_error_line(run_module("kft.train", f"--model_dir={run}", *common, "--overwrite"))
    assert "files kft did not write (notes.txt)" in line
    (run / "notes.txt").unlink()
    assert snapshot(run) == before
    # A kft run, everything valid: cleared and trained again.
    result = run_module("kft.train", f"--model_dir={run}", *common, "--overwrite", "--seed=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--seed=1" in (run / "flags.cfg").read_text()


def test_refused_rerun_changes_nothing_and_paths_compare_resolved(tmp_path):
    """A class added to the data is refused with every file of the run unchanged; the same
    run named by another spelling of its paths, or its data moved, resumes; a run whose
    checkpoints are gone is refused, not trained again over its results."""
    data_dir = tmp_path / "data"
    write_png_folder(data_dir, ["a", "b"])
    run = tmp_path / "run"
    common = [*TINY, "--export_dir=none"]
    result = run_module("kft.train", "--model_dir=run", "--dataset=folder:data", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    before = snapshot(run)
    # Absolute paths with trailing slashes name the same run and data: it resumes (nothing to do).
    result = run_module("kft.train", f"--model_dir={run}/", f"--dataset=folder:{data_dir}/", *common, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    write_png_folder(data_dir, ["c"])
    before = snapshot(run)
    line = one_error_line(run_module("kft.train", "--model_dir=run", "--dataset=folder:data", *common, cwd=tmp_path))
    assert "holds a run on 2 classes, the data now has 3 (new: c)" in line
    assert snapshot(run) == before
    classes = json.loads((run / "classes.json").read_text())["class_names"]
    assert classes == ["a", "b"]
    shutil.rmtree(data_dir / "c")
    # The data folder moved, the run reached through a symlink: the same files, the same run.
    moved = tmp_path / "moved"
    os.rename(data_dir, moved)
    (tmp_path / "link").symlink_to(run)
    result = run_module("kft.train", f"--model_dir={tmp_path / 'link'}", f"--dataset=folder:{moved}", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--dataset=folder:{moved}" in (run / "flags.cfg").read_text()
    os.rename(moved, data_dir)
    # Results without a resume checkpoint: refused, not trained again over them from the start.
    shutil.rmtree(run / "ckpt")
    before = snapshot(run)
    line = one_error_line(run_module("kft.train", "--model_dir=run", "--dataset=folder:data", *common, cwd=tmp_path))
    assert "holds model.weights.h5, backbone.weights.h5, metrics.json but no resume checkpoint" in line
    assert "--overwrite" in line and snapshot(run) == before


def test_a_moved_dataset_is_the_same_data_only_with_the_same_files(tmp_path):
    from kft import data_folder, runfiles, schedule
    from kft.config import Config

    write_png_folder(tmp_path / "data", ["a", "b"], per_class=3)
    identity = data_folder.folder_identity(f"folder:{tmp_path / 'data'}")
    assert identity.endswith("/6files")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stages = schedule.parse_stages("head:1@1e-3")

    def config(path):
        return Config(dataset=f"folder:{path}", backbone="MobileNetV2", stages=stages, model_dir=str(run_dir))

    runfiles.write_config(config(tmp_path / "data"))
    os.rename(tmp_path / "data", tmp_path / "elsewhere")
    assert data_folder.folder_identity(f"folder:{tmp_path / 'elsewhere'}/") == identity
    assert data_folder.folder_identity("digits") is None

    def conflict(path):
        return runfiles.resume_conflict(str(run_dir), config(path))

    assert conflict(tmp_path / "elsewhere") is None
    (tmp_path / "elsewhere" / "a" / "0.png").unlink()  # Another file set: other data.
    other = data_folder.folder_identity(f"folder:{tmp_path / 'elsewhere'}")
    assert other != identity and other.endswith("/5files")
    found = conflict(tmp_path / "elsewhere")
    assert found.startswith("--dataset: saved") and "elsewhere" in found


def test_one_process_per_directory_and_kill_9_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; sys.path.insert(0, sys.argv[2]); from kft import rundir; "
                "rundir.DirLock(sys.argv[1], 'x'); print('locked', flush=True); time.sleep(600)"
            ),
            str(run),
            ROOT,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.Busy, match=rf"x is in use by another kft process \(pid {holder.pid}\)"):
            rundir.DirLock(str(run), "x")
        line = one_error_line(
            run_module("kft.train", f"--model_dir={run}", *TINY, "--dataset=digits:0-1", "--export_dir=none")
        )
        assert f"--model_dir={run} is in use by another kft process" in line
        # kft.lr_find takes the same lock: a sweep never shares a run directory with a run.
        line = one_error_line(run_module("kft.lr_find", f"--model_dir={run}", *TINY, "--dataset=digits:0-1"))
        assert f"--model_dir={run} is in use by another kft process (pid {holder.pid})" in line
        assert not (run / "lr_find").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.DirLock(str(run), "x").release()  # The kernel released the killed holder's lock.
    # An export base is shared by waiting for the lock, within a limit.
    with rundir.DirLock(str(tmp_path / "export"), "e", rundir.EXPORT_LOCK):
        started = time.time()
        with pytest.raises(rundir.Busy, match="waited 1s"):
            rundir.DirLock(str(tmp_path / "export"), "e", rundir.EXPORT_LOCK, wait=1.0)
        assert time.time() - started < 5


def _tiny_checkpoints(tmp_path, count=3):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    ckpts = checkpoint.ResumeCheckpoints(str(tmp_path), keep=count)
    for index in range(1, count + 1):
        ckpts.save(index, model, None, {"stage": 0, "epoch": index})
    return model, ckpts


def test_resume_takes_the_newest_complete_checkpoint_or_refuses(tmp_path):
    model, ckpts = _tiny_checkpoints(tmp_path)
    root = tmp_path / "ckpt"
    (root / "latest").unlink()
    assert ckpts.latest_state()["epoch"] == 3  # Not a silent restart from stage 1.
    (root / "epoch-3" / "state.json").write_text('{"stage": 0, "ep')  # Truncated.
    with open(root / "epoch-2" / "model.weights.h5", "r+b") as f:
        f.truncate(100)
    assert ckpts.latest_state()["epoch"] == 1
    ckpts.restore(model, None)
    (root / "epoch-1" / "optimizer.npz").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"no complete resume checkpoint in .*ckpt .*--overwrite"):
        ckpts.latest_state()


def test_files_and_exports_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    result = run_module("kft.train", f"--model_dir={run}", *TINY, "--dataset=digits:0-1", umask=0o022)
    assert result.returncode == 0, result.stderr[-3000:]
    checked = 0
    for root, dirs, files in os.walk(run):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o755, os.path.join(root, name)
        for name in files:
            if name != rundir.LOCK:
                assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, os.path.join(root, name)
                checked += 1
    assert (run / "export" / "1" / "saved_model.pb").exists() and checked > 10
    # kft.train's export records the run's image size for kft.evaluate and kft.predict, and the
    # views it averages: none, as --augment=none trains with no symmetry.
    info = json.loads((run / "export" / "1" / "assets" / "kft.json").read_text())
    assert info == {"image_size": 32, "test_views": []}


# ----------------------------------------------------------------------------------------------
# 2. Everything checked before work starts.


@pytest.mark.parametrize(
    "flag",
    [
        "--ema_decay=nan",
        "--lr_scale=inf",
        "--l2sp_alpha=inf",
        "--layer_lr_decay=nan",
        "--dropout=nan",
        "--val_fraction=nan",
        "--image_size=100000",
        "--cache_gb=1e9",
    ],
)
def test_every_train_float_flag_is_finite_and_in_range(flag):
    from kft import flags as kft_flags  # noqa: F401  (registers kft.train's flags)

    FLAGS.unparse_flags()
    try:
        with pytest.raises(flags.IllegalFlagValueError, match=flag.split("=")[0]):
            FLAGS(["kft.train", "--model_dir=x", flag])
    finally:
        FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "module, args, named",
    [
        ("kft.tune", ["--tune_dir=t", "--lr_scale_max=nan"], "--lr_scale_max=nan"),
        ("kft.evaluate", ["--model_dir=m", "--dataset=digits", "--val_fraction=nan"], "--val_fraction=nan"),
        ("kft.lr_find", ["--model_dir=m", "--max_lr=inf"], "--max_lr=inf"),
    ],
)
def test_other_entry_points_refuse_non_finite_numbers(tmp_path, module, args, named):
    line = one_error_line(run_module(module, *args, timeout=120, cwd=tmp_path))
    assert named in line and "finite" in line
    assert os.listdir(tmp_path) == []


def test_outputs_are_checked_before_training(tmp_path):
    common = [*TINY, "--dataset=digits:0-1"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_error_line(run_module("kft.train", f"--model_dir={tmp_path / 'a'}", *common, f"--export_dir={blocker}"))
    assert f"--export_dir={blocker} is a file" in line
    data_dir = tmp_path / "data"
    write_png_folder(data_dir, ["a", "b\nc"])
    line = one_error_line(
        run_module("kft.train", f"--model_dir={tmp_path / 'b'}", *TINY, f"--dataset=folder:{data_dir}")
    )
    assert "class name 'b\\nc' cannot be exported" in line
    line = one_error_line(
        run_module(
            "kft.train", f"--model_dir={data_dir / 'run'}", *TINY, f"--dataset=folder:{data_dir}", "--export_dir=none"
        )
    )
    assert "is inside --dataset" in line
    assert sorted(os.listdir(tmp_path)) == ["data", "file"]


def test_tune_range_errors_name_the_flag():
    from kft import search_space

    with pytest.raises(ValueError, match=r"--lr_scale_max=0 must be"):
        search_space.SearchSpace(lr_scale_max=0.0).validate()
    with pytest.raises(ValueError, match=r"--strength_max=inf must be"):
        search_space.SearchSpace(strength_max=float("inf")).validate()


# ----------------------------------------------------------------------------------------------
# 3. Never hang.


def test_fifos_and_devices_are_never_read(tmp_path):
    from kft import data, data_folder

    write_png_folder(tmp_path / "set", ["a", "b"], per_class=4)
    os.mkfifo(tmp_path / "set" / "a" / "pipe.png")
    started = time.time()
    splits = data.load(f"folder:{tmp_path / 'set'}", image_size=16, batch_size=4, val_fraction=0.25)
    assert splits.skipped == 1 and time.time() - started < 60
    assert data_folder.file_problem("/dev/zero") == "not a regular file"
    assert data_folder.file_problem(str(tmp_path / "set" / "a" / "pipe.png")) == "not a regular file"


def test_tfds_without_network_fails_fast_in_one_line(tmp_path):
    started = time.time()
    line = one_error_line(
        run_module(
            "kft.train",
            f"--model_dir={tmp_path / 'run'}",
            *TINY,
            "--dataset=tfds:cifar10",
            f"--data_dir={tmp_path / 'tfds'}",
            timeout=120,
        )
    )
    if "cannot be downloaded" not in line:
        pytest.skip("this machine reaches TFDS's servers")
    assert "--data_dir" in line and time.time() - started < 60
    line = one_error_line(
        run_module("kft.train", f"--model_dir={tmp_path / 'run'}", *TINY, "--dataset=tfds:cifarr10", timeout=120)
    )
    assert "tfds:cifarr10: no TFDS dataset of that name" in line


# ----------------------------------------------------------------------------------------------
# 4. One clear line for every failure.


def test_corrupt_files_are_named_in_one_line(tmp_path):
    path = tmp_path / "anchors.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt"):
        checkpoint.load_arrays(str(path))


def test_evaluate_says_a_run_is_unfinished(tmp_path):
    from kft import runfiles

    (tmp_path / "classes.json").write_text('{"class_names": ["a", "b"], "backbone": "MobileNetV2", "image_size": 32}')
    with h5py.File(tmp_path / "model.weights.h5", "w"):
        pass
    with pytest.raises(ValueError, match="holds an unfinished run"):
        runfiles.load_classifier(str(tmp_path))


def test_ctrl_c_keeps_the_checkpoint_and_says_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    args = [f"--model_dir={run}", *TINY, "--dataset=digits:0-1", "--export_dir=none", "--stages=head:50@1e-3"]
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # As from a terminal: a suite started in the background (`cmd &`) passes SIGINT on ignored,
    # which Python, and so kft, rightly keeps ignoring.
    process = subprocess.Popen(
        [sys.executable, "-m", "kft.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    # Any checkpoint: kft keeps the newest two, so epoch-1 may be gone by the time we look.
    while not list((run / "ckpt").glob("epoch-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert "interrupted" in one_error_line(result, status=130)
    assert checkpoint.ResumeCheckpoints(str(run)).latest_state()["epoch"] >= 1


def test_a_full_disk_is_one_line(tmp_path):
    """A file-size limit stands in for a full disk: every write past 64 KiB fails (EFBIG)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kft.train",
            f"--model_dir={tmp_path / 'run'}",
            *TINY,
            "--dataset=digits:0-1",
            "--export_dir=none",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    line = one_error_line(result, status=1)
    assert "File too large" in line and "rerun the same command to resume" in line


def test_a_full_disk_while_rewriting_h5_keeps_the_old_file(tmp_path):
    """HDF5 reports ENOSPC as an OSError without errno inside a paragraph; the rewrite goes to a
    temporary file beside the old one, so the old file stays whole and the error is one line
    naming it."""
    path = tmp_path / "backbone.weights.h5"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    checkpoint.save_backbone_weights(model, "Dense", 2, str(path))
    old = path.read_bytes()
    script = (
        "import sys, h5py, keras\n"
        "from kft import checkpoint, cli\n"
        "def full(*args, **kwargs):\n"
        '    raise OSError("Unable to synchronously create dataset (file write failed: time = Mon, filename = '
        "'x', file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1)\")\n"
        "def main(argv):\n"
        "    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])\n"
        "    h5py.Group.create_dataset = full\n"
        "    checkpoint.save_backbone_weights(model, 'Dense', 2, sys.argv[1])\n"
        "cli.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    line = one_error_line(result, status=1)
    assert f"No space left on device writing {path};" in line
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["backbone.weights.h5"]


def test_a_full_disk_reported_by_hdf5_alone_is_one_line_naming_its_file(tmp_path):
    """Where kft's own write wrapper is not around (a resume checkpoint's temporary directory),
    HDF5's paragraph is all there is: the line gives its reason and file, and the process ends
    at once (no teardown flushing open HDF5 files onto the full disk)."""
    script = (
        "import h5py, sys\n"
        "from kft import cli\n"
        "def main(argv):\n"
        "    held = h5py.File(sys.argv[1], 'w')  # Still open when the error ends the program.\n"
        "    held.create_dataset('x', data=[1, 2, 3])\n"
        "    raise OSError(\"Can't synchronously write data (file write failed: time = Wed Dec  2 04:52:05 2026\\n"
        ", filename = '/runs/a/ckpt/.tmp-1/model.weights.h5', file descriptor = 6, errno = 28, error message = "
        "'No space left on device', buf = 0x1, total write size = 6384)\")\n"
        "cli.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "open.h5")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_error_line(result, status=1)
    assert "error: No space left on device writing /runs/a/ckpt/.tmp-1/model.weights.h5; files are as" in line
