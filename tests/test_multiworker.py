"""Multi-worker training (kft.multiworker): the sharding, the roles and a real two-worker run.

The two-worker test starts `python -m kft.train` twice on 127.0.0.1, as TFJob or Slurm would
start it on two machines (one TF_CONFIG each), trains a tiny MobileNetV3Small through two
stages, kills the chief with SIGKILL after its first checkpoint, restarts both with the same
command and checks the run resumes and finishes with every output written by the chief alone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from kft import multiworker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shuffled_batches(n=24, batch=8, seed=3):
    ids = np.arange(n, dtype=np.int32)
    return (
        tf.data.Dataset.from_tensor_slices((ids, ids % 2))
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .batch(batch, drop_remainder=True)
    )


@pytest.mark.parametrize("replicas_per_worker", [1, 2])
def test_each_image_once_per_epoch_in_the_global_batches_of_one_machine(replicas_per_worker):
    workers, batch = 2, 8
    one_machine = [ids.numpy().tolist() for ids, _ in _shuffled_batches(batch=batch)]
    # Each worker builds its own pipeline, as each process does; the seed makes them agree.
    shares = []
    for w in range(workers):
        context = tf.distribute.InputContext(
            num_input_pipelines=workers, input_pipeline_id=w, num_replicas_in_sync=workers * replicas_per_worker
        )
        share = [
            ids.numpy().tolist()
            for ids, _ in multiworker.worker_dataset(_shuffled_batches(batch=batch), context, batch)
        ]
        assert all(len(b) == batch // (workers * replicas_per_worker) for b in share)
        # Group each worker's per-replica batches back into its slice of each global step.
        shares.append([sum(share[i : i + replicas_per_worker], []) for i in range(0, len(share), replicas_per_worker)])
    assert len(shares[0]) == len(shares[1]) == len(one_machine) == 3
    for step, global_batch in enumerate(one_machine):
        assert shares[0][step] + shares[1][step] == global_batch
        assert not set(shares[0][step]) & set(shares[1][step])
    seen = sorted(i for share in shares for b in share for i in b)
    assert seen == list(range(24))


def test_tf_config_decides_what_auto_picks():
    two = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}})
    one = json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    chief = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}})
    assert multiworker.tf_config_tasks({}) == 0
    assert multiworker.tf_config_tasks({"TF_CONFIG": two}) == 2
    assert multiworker.tf_config_tasks({"TF_CONFIG": chief}) == 2
    assert multiworker.wanted("auto", {"TF_CONFIG": two})
    assert not multiworker.wanted("auto", {"TF_CONFIG": one})
    assert not multiworker.wanted("auto", {})
    assert multiworker.wanted("multi_worker", {})
    assert not multiworker.wanted("mirrored", {"TF_CONFIG": two})
    with pytest.raises(ValueError, match="TF_CONFIG is not JSON"):
        multiworker.tf_config_tasks({"TF_CONFIG": "{worker"})


def test_other_programs_refuse_multi_worker():
    from kft import runtime

    with pytest.raises(ValueError, match="--strategy=multi_worker is for kft.train"):
        runtime.make_strategy("multi_worker")


# ---------------------------------------------------------------------------------------------
# Two real workers.

WAIT = 600  # seconds any one wait on a worker may take (generous for a loaded machine; never hangs)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _write_folder(root, per_class=12, size=24):
    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        os.makedirs(root / name)
        for i in range(per_class):
            image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            image[:, :, channel] += 150
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


def _start_workers(args, ports, tmp_dirs, logs):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index, (tmp_dir, log) in enumerate(zip(tmp_dirs, logs)):
        env = {
            **os.environ,
            "PYTHONPATH": ROOT,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TMPDIR": str(tmp_dir),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "kft.train", *args],
                cwd=ROOT,
                env=env,
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
        )
    return processes


def _wait_for(condition, processes, logs, timeout=WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        for p, log in zip(processes, logs):
            if p.poll() is not None:
                raise AssertionError(f"a worker ended before the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("the kill point was never reached")


def _worker_dirs(tmp_dir):
    return sorted(name for name in os.listdir(tmp_dir) if name.startswith("kft-worker"))


def test_two_workers_share_batches_chief_writes_alone_and_resume_after_sigkill(tmp_path):
    data_dir, model_dir = tmp_path / "data", tmp_path / "run"
    _write_folder(data_dir)
    tmp_dirs = [tmp_path / "tmp0", tmp_path / "tmp1"]
    for d in tmp_dirs:
        d.mkdir()
    args = [
        f"--dataset=folder:{data_dir}",
        f"--model_dir={model_dir}",
        "--backbone=MobileNetV3Small",
        "--weights=none",
        "--image_size=32",
        "--val_fraction=0.25",
        "--batch_size=8",
        "--stages=head:2@1e-3,top1:1@1e-4",
        "--augment=flip",
        "--ema_decay=0.9",
        "--layer_lr_decay=0.8",
        "--mixed_precision=none",
        "--export_dir=none",
        "--strategy=multi_worker",
        "--verbose=0",
    ]
    processes = []
    try:
        # First start: killed with -9 once the chief has checkpointed epoch 1 of stage 1.
        logs = [tmp_path / "first0.log", tmp_path / "first1.log"]
        processes = _start_workers(args, _free_ports(2), tmp_dirs, logs)
        _wait_for(lambda: (model_dir / "ckpt" / "epoch-1" / "state.json").exists(), processes, logs)
        first_pids = [p.pid for p in processes]
        scratch = tmp_dirs[1] / _worker_dirs(tmp_dirs[1])[0]
        assert (scratch / "anchors.npz").is_file()  # The other worker writes in its own directory.
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(timeout=30)
        # The other worker notices, stops with one line, and removes its directory.
        assert processes[1].wait(timeout=WAIT) == 1
        last_line = logs[1].read_text().strip().splitlines()[-1]
        assert last_line.startswith("kft.train: error: lost contact with another worker"), last_line
        assert _worker_dirs(tmp_dirs[0]) == [] and _worker_dirs(tmp_dirs[1]) == []

        # Second start: the same command resumes at stage 1, epoch 1, and finishes.
        logs = [tmp_path / "second0.log", tmp_path / "second1.log"]
        processes = _start_workers(args, _free_ports(2), tmp_dirs, logs)
        for p, log in zip(processes, logs):
            assert p.wait(timeout=WAIT) == 0, log.read_text()[-3000:]
        second_pids = [p.pid for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    out = [log.read_text() for log in logs]

    # Resumed where the chief's checkpoint left off, on both workers.
    for text in out:
        assert "resumed at stage 1 epoch 1" in text
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert [s["epochs"] for s in metrics["stages"]] == [2, 1]
    assert metrics["num_train"] == 18

    # The global batch of 8 split in two: 4 images per worker per step, 2 steps per epoch
    # (18 images, the partial batch dropped as on one machine).
    for index, text in enumerate(out):
        for epoch in (2, 3):
            assert f"worker {index} of 2: epoch {epoch}: 2 steps of 4 images (global batch 8)" in text

    # Only the chief wrote MODEL_DIR: its lock names the chief, every TensorBoard file carries
    # a chief's pid (TF puts the writer's pid in the name), one per chief start.
    assert (model_dir / ".kft-lock").read_text().strip() == str(second_pids[0])
    events = [name for _, _, names in os.walk(model_dir / "tb") for name in names if "tfevents" in name]
    writers = {int(name.split(".")[-3]) for name in events}  # events.out.tfevents.T.HOST.PID.N.v2
    assert writers == {first_pids[0], second_pids[0]}
    for name in (
        "flags.cfg",
        "metrics.json",
        "model.weights.h5",
        "backbone.weights.h5",
        "anchors.npz",
        "classes.json",
        ".kft-run",
    ):
        assert (model_dir / name).is_file(), name
    assert not [n for n in os.listdir(model_dir) if n.startswith(".tmp-")]
    # The other worker removed its temporary directory when it finished.
    assert _worker_dirs(tmp_dirs[0]) == [] and _worker_dirs(tmp_dirs[1]) == []
