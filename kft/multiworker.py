"""Training on several machines: tf.distribute's MultiWorkerMirroredStrategy (MWMS), configured
by the TF_CONFIG environment variable that Kubernetes (TFJob), Slurm and Vertex set.

Keras 3 cannot train with MWMS through `Model.fit` (keras-team/keras#20585, open; the TF
multi-worker tutorial fails the same way since TF 2.16, tensorflow/tensorflow#72388): its
epoch iterator and log reduction hand `PerReplica` values to ops that expect tensors, and its
multi-worker `reduce("MEAN", axis=0)` of scalar logs fails. So with MWMS kft runs its own loop
(`fit`): the same `FineTuner.train_step` (augmentation, L2-SP and the other regularizers,
layer-wise learning rates, EMA) inside `strategy.run`, in a `tf.function`, on a dataset
distributed with `strategy.distribute_datasets_from_function`, and the same callbacks as the
single-machine `fit`. Single-machine runs keep `Model.fit`.

Sharding: by data, at the batch level. Every worker runs the same seeded pipeline, so all of
them see the same sequence of global batches (the very batches a single-machine run with the
same seed and --batch_size sees), and worker w keeps slice w of each: each training image is
trained on once per epoch, by one worker, and a global batch holds what it would on one
machine. Sharding by file would spare each worker decoding the others' images, but it needs at
least as many files as workers (TFDS sets ship in a few shards), leaves each worker's share
fixed across epochs, and gives shards of unequal size, whose step counts must be cut to the
smallest. kft caches decoded training sets up to --cache_gb, so the duplicated decoding is one
pass per worker; a bigger set is decoded by every worker every epoch.

Roles: the chief (the `chief` task, else `worker` 0) owns MODEL_DIR as a single-machine run
does: its lock, marker, checkpoints, TensorBoard, metrics.json, flags.cfg and export. Every
other worker trains in a temporary directory of its own (removed when it exits) and neither
reads nor writes MODEL_DIR, so MODEL_DIR need not be shared: on a start or resume the chief
broadcasts the run state, the L2-SP anchors and every weight and optimizer variable to the
others (`Worker.broadcast`), which also keeps their copies identical after steps that run
outside the collective step (the linear probe).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

_STRATEGY: tf.distribute.MultiWorkerMirroredStrategy | None = None

# What a collective raises when another worker has gone (killed, preempted, crashed).
LOST_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
)


def tf_config_tasks(environ=None) -> int:
    """How many training tasks (chief and workers) TF_CONFIG names; 0 without TF_CONFIG.

    Raises:
      ValueError: TF_CONFIG is not JSON with a `cluster` object.
    """
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not text.strip():
        return 0
    try:
        cluster = json.loads(text)["cluster"]
        return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            'TF_CONFIG is not JSON of the form {"cluster": {"worker": [HOST:PORT, '
            '...]}, "task": {"type": "worker", "index": I}}'
        ) from None


def wanted(choice: str, environ=None) -> bool:
    """Whether --strategy=`choice` means MWMS: `multi_worker`, or `auto` with a TF_CONFIG that
    names more than one task."""
    return choice == "multi_worker" or (choice == "auto" and tf_config_tasks(environ) > 1)


def start(choice: str) -> tf.distribute.MultiWorkerMirroredStrategy | None:
    """Creates the process's MWMS if --strategy asks for one, else returns None.

    MWMS configures TF's collective ops, which TF allows only before the first op runs: call
    this at program start, before any data is loaded. `runtime.make_strategy` returns it later.

    Raises:
      ValueError: --strategy=multi_worker without a usable TF_CONFIG (one line).
    """
    global _STRATEGY
    if _STRATEGY is not None or not wanted(choice):
        return _STRATEGY
    if tf_config_tasks() < 1:
        raise ValueError(
            "--strategy=multi_worker needs TF_CONFIG naming the cluster and this task, "
            'e.g. {"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    return _STRATEGY


def started() -> tf.distribute.MultiWorkerMirroredStrategy | None:
    """The MWMS `start` created, or None."""
    return _STRATEGY


def _is_chief(resolver) -> bool:
    task_type, task_id = resolver.task_type, resolver.task_id
    jobs = resolver.cluster_spec().jobs
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in jobs)


@dataclasses.dataclass
class Worker:
    """This process's place in a multi-worker run, and the collectives kft needs besides the
    train step. Every worker must make the same calls in the same order."""

    strategy: tf.distribute.MultiWorkerMirroredStrategy
    is_chief: bool
    index: int  # 0 for the chief
    count: int
    _broadcast_fn: object = dataclasses.field(default=None, repr=False)

    def broadcast(self, values: list) -> list[np.ndarray]:
        """The chief's values of `values` (tensors or arrays, same shapes and dtypes on every
        worker), on every worker: float32 values travel as one float32 vector, all others as
        one float64 vector (exact for integers below 2**53), each in an all-reduce to which
        only global replica 0 (the chief's first device) contributes."""
        arrays = [np.asarray(v) for v in values]
        is_f32 = [a.dtype == np.float32 for a in arrays]
        # One extra element each: a collective on an empty tensor is not worth finding out about.
        f32 = np.concatenate([a.ravel() for a, f in zip(arrays, is_f32) if f] + [np.zeros(1, np.float32)])
        f64 = np.concatenate(
            [a.ravel().astype(np.float64) for a, f in zip(arrays, is_f32) if not f] + [np.zeros(1, np.float64)]
        )
        if self._broadcast_fn is None:
            self._broadcast_fn = self._make_broadcast_fn()
        out32, out64 = (self.strategy.experimental_local_results(r)[0].numpy() for r in self._broadcast_fn(f32, f64))
        received, at32, at64 = [], 0, 0
        for a, f in zip(arrays, is_f32):
            if f:
                received.append(out32[at32 : at32 + a.size].reshape(a.shape))
                at32 += a.size
            else:
                received.append(out64[at64 : at64 + a.size].astype(a.dtype).reshape(a.shape))
                at64 += a.size
        return received

    def _make_broadcast_fn(self):
        def replica_fn(f32, f64):
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group, 0)
            # Two calls: a batched all-reduce packs its tensors into one, of one dtype.
            return (
                context.all_reduce("sum", tf.where(first, f32, tf.zeros_like(f32))),
                context.all_reduce("sum", tf.where(first, f64, tf.zeros_like(f64))),
            )

        # Traced once: every broadcast is two vectors of some length.
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float64)])
        def broadcast_fn(f32, f64):
            return self.strategy.run(replica_fn, args=(f32, f64))

        return broadcast_fn

    def sync_variables(self, variables) -> None:
        """Gives every worker the chief's values of `variables` (Keras or tf variables)."""
        unique = list({id(v): v for v in variables}.values())
        for variable, value in zip(unique, self.broadcast([v.numpy() for v in unique])):
            variable.assign(value)

    def broadcast_json(self, obj):
        """The chief's JSON-serializable `obj` (None included), on every worker."""
        data = np.frombuffer(json.dumps(obj).encode() if self.is_chief else b"", np.uint8)
        (length,) = self.broadcast([np.int64(len(data))])
        padded = np.zeros(int(length), np.int64)
        padded[: len(data)] = data
        (received,) = self.broadcast([padded])
        return json.loads(received.astype(np.uint8).tobytes().decode())

    def broadcast_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The chief's values of a dict of arrays with the same keys and shapes everywhere."""
        keys = sorted(arrays)
        return dict(zip(keys, self.broadcast([arrays[k] for k in keys])))

    def all_ok(self, ok: bool) -> bool:
        """Whether every worker passed its checks (one all-reduce): a worker that refuses to
        start must still take part, or the others would wait for it in the first step."""
        failed = np.int64(0 if ok else 1)

        def replica_fn():
            context = tf.distribute.get_replica_context()
            first_local = tf.equal(context.replica_id_in_sync_group % self.local_replicas, 0)
            return context.all_reduce("sum", tf.where(first_local, failed, tf.zeros_like(failed)))

        total = tf.function(lambda: self.strategy.run(replica_fn))()
        return int(self.strategy.experimental_local_results(total)[0]) == 0

    @property
    def local_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync // self.count


def worker_of(strategy) -> Worker | None:
    """The `Worker` of an MWMS in multi-worker mode, None for every other strategy."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().as_dict()
    count = sum(len(jobs.get(job, [])) for job in ("chief", "worker"))
    if count < 2:
        return None  # MWMS on one machine: a MirroredStrategy, Model.fit works.
    chief = _is_chief(resolver)
    index = 0 if chief else resolver.task_id + (1 if "chief" in jobs else 0)
    return Worker(strategy, chief, index, count)


@contextlib.contextmanager
def scratch_dir(worker: Worker):
    """A temporary directory for a non-chief worker's files, removed when the block ends (a
    worker killed with -9 leaves it in the system's temporary directory)."""
    path = tempfile.mkdtemp(prefix=f"kft-worker{worker.index}-")
    logging.info(
        "worker %d of %d: MODEL_DIR belongs to the chief; this worker writes to %s (removed at exit)",
        worker.index,
        worker.count,
        path,
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class PeerRefused(Exception):
    """Another worker's checks refused the run, so no worker trains (its log says why)."""


class PeerLost(Exception):
    """Contact with another worker was lost mid-run (killed, preempted, crashed)."""


def run_together(worker: Worker | None, start: Callable[[], tuple]) -> None:
    """Runs one job on every worker of a cluster, or on this machine alone (`worker` None).

    Every worker runs `start` (its checks, and on the chief MODEL_DIR's preparation); they go
    on only if all of them started, so a refusal on one machine stops them all before any of
    them trains. A non-chief worker then works in a scratch directory of its own and exports
    nothing (MODEL_DIR is the chief's). The workers end together, after the chief's export: a
    worker that exits while another still runs is held at exit by TF's runtime for a minute.

    Args:
      worker: this machine's `Worker`, or None.
      start: () -> (config, release, work): the run's kft.config.Config; what to call when the
        run ends (e.g. the run directory's lock release), or None; and `work(config)`, the job,
        called with this worker's config. Raises to refuse.

    Raises:
      PeerRefused: another worker refused to start (what `start` took is released).
      PeerLost: contact with another worker was lost during `work`.
      Whatever `start` or `work` raise.
    """
    try:
        config, release, work = start()
    except Exception:
        if worker:
            worker.all_ok(False)  # The other workers would otherwise wait for this one.
        raise
    with contextlib.ExitStack() as stack:
        if release:
            stack.callback(release)
        if worker and not worker.all_ok(True):
            raise PeerRefused(
                f"another worker of the {worker.count} in TF_CONFIG refused to start (its log says why); "
                "nothing was trained"
            )
        if worker and not worker.is_chief:
            config = dataclasses.replace(
                config, model_dir=stack.enter_context(scratch_dir(worker)), export_dir="none", export_tflite="off"
            )
        try:
            work(config)
        except LOST_PEER_ERRORS as e:
            if not worker:
                raise
            logging.debug("lost a worker", exc_info=True)
            raise PeerLost(
                f"lost contact with another worker ({type(e).__name__}); files are as the chief's last "
                "complete checkpoint left them: restart every worker with the same command to resume"
            ) from None
        if worker:
            worker.all_ok(True)


def check_batch(worker: Worker, batch_size: int, num_train: int) -> None:
    """Raises ValueError (one line) when --batch_size cannot be split evenly across replicas."""
    replicas = worker.strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"--batch_size={batch_size} is the global batch, split across {replicas} "
            f"replicas on {worker.count} workers: use a multiple of {replicas}"
        )
    if num_train < batch_size:
        raise ValueError(
            f"--batch_size={batch_size} is more than the {num_train} training images: "
            "with several workers every step needs a full global batch"
        )


def worker_dataset(dataset: tf.data.Dataset, context: tf.distribute.InputContext, global_batch: int) -> tf.data.Dataset:
    """This worker's share of a dataset of global batches: slice `input_pipeline_id` of every
    batch, in batches of the per-replica size (see the module docstring)."""
    per_replica = context.get_per_replica_batch_size(global_batch)
    per_worker = per_replica * (context.num_replicas_in_sync // context.num_input_pipelines)
    start = context.input_pipeline_id * per_worker

    def take_slice(*batch):
        return tuple(part[start : start + per_worker] for part in batch)

    sliced = dataset.map(take_slice, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if per_worker != per_replica:
        sliced = sliced.rebatch(per_replica)
    return sliced.prefetch(tf.data.AUTOTUNE)


def distribute(worker: Worker, dataset: tf.data.Dataset, global_batch: int):
    """`dataset` (global batches) as a distributed dataset sharded by `worker_dataset`."""
    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return worker.strategy.distribute_datasets_from_function(
        lambda context: worker_dataset(dataset, context, global_batch), options
    )


def fit(
    tuner,
    worker: Worker,
    data: tf.data.Dataset,
    *,
    global_batch: int,
    steps_per_epoch,
    validation_data: tf.data.Dataset | None,
    initial_epoch: int,
    epochs: int,
    callbacks,
) -> None:
    """`Model.fit` for MWMS: the same train step and callbacks (see the module docstring).

    Args:
      tuner: the compiled kft.finetuner.FineTuner.
      worker: this process's Worker.
      data: global batches; finite (one pass per epoch) unless `steps_per_epoch` is given.
      global_batch: the batch size of `data`.
      steps_per_epoch: steps per epoch over repeated `data`, or None for one pass.
      validation_data: validated by every worker in full with its (identical) weights, so no
        collective is needed; the callbacks see the same numbers as on one machine. None: no
        validation.
      initial_epoch, epochs: as for Model.fit.
      callbacks: Keras callbacks; called with on_epoch_begin, on_train_batch_end, on_test_begin,
        on_test_end and on_epoch_end.
    """
    strategy = worker.strategy
    distributed = distribute(worker, data, global_batch)
    step_fn = tf.function(tuner.train_step, jit_compile=bool(getattr(tuner, "jit_compile", False)))

    @tf.function
    def train_step(iterator):
        logs = strategy.run(step_fn, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    predict = _predictor(tuner)
    stage_iterator = iter(distributed) if steps_per_epoch else None
    shard = global_batch // worker.count
    for epoch in range(initial_epoch, epochs):
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        tuner.reset_metrics()
        iterator = stage_iterator or iter(distributed)
        steps = steps_per_epoch or int(data.cardinality())
        logs = {}
        for step in range(steps):
            logs = {k: float(v) for k, v in train_step(iterator).items()}
            for callback in callbacks:
                callback.on_train_batch_end(step, logs)
        if validation_data is not None:
            for callback in callbacks:
                callback.on_test_begin()
            val_loss, val_accuracy = _validate(predict, validation_data)
            for callback in callbacks:
                callback.on_test_end()
            logs.update(val_loss=val_loss, val_accuracy=val_accuracy)
        logging.info(
            "worker %d of %d: epoch %d: %d steps of %d images (global batch %d); %s",
            worker.index,
            worker.count,
            epoch + 1,
            steps,
            shard,
            global_batch,
            ", ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items())),
        )
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)


def _predictor(tuner):
    """Probabilities of a validation batch: the head alone on cached features, else the
    classifier in inference mode (as FineTuner.test_step)."""

    @tf.function
    def predict(inputs):
        if tuner.on_features:
            return tuner.classifier.head(inputs, training=False)
        return tuner.classifier(inputs, training=False)

    return predict


def _validate(predict, dataset: tf.data.Dataset) -> tuple[float, float]:
    """(loss, accuracy) as FineTuner.test_step's trackers give them: the mean of the batches'
    mean losses, and the accuracy over every example."""
    losses, correct, total = [], 0, 0
    for inputs, labels in dataset:
        probs = tf.cast(predict(inputs), tf.float32)
        labels = tf.cast(labels, tf.int32)
        losses.append(float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))))
        correct += int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels), tf.int32)))
        total += int(labels.shape[0])
    return float(np.mean(losses)) if losses else float("nan"), correct / max(total, 1)
