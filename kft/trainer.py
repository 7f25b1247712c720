"""The staged fine-tune: the stage loop, what it records after every epoch, checkpoints and resume.

A run is a list of stages (kft.schedule). For each stage kft sets what is trainable, builds a
fresh optimizer with the stage's warmup+cosine schedule and recompiles (kft.finetuner, which
also holds the train step), then trains for the stage's epochs. After every
epoch it writes a complete resume checkpoint, so rerunning the same command continues at the
same stage and epoch with its optimizer state.

Files under MODEL_DIR:
  ckpt/epoch-N/       resume checkpoints (model + optimizer + state), the newest two while the run
                      trains and the newest alone once it has finished; ckpt/latest names it
  anchors.npz         L2-SP theta0: the backbone as first loaded, kept across resume
  delta_attention.npz DELTA's channel weights (--delta_weighting=attention), kept across resume
  model.weights.h5    the classifier with the best validation accuracy
  backbone.weights.h5 its backbone, usable as the next run's --weights
  classes.json        class names, image size and backbone, for kft.evaluate / kft.predict
  metrics.json        final and best validation accuracy, per stage, wall time
  run.json            the run's Config (kft.config), read back by kft.evaluate and the exports
  flags.cfg           the same as a flagfile: `--flagfile=MODEL_DIR/flags.cfg` reruns it
  tb/                 TensorBoard events (kft.report.Summaries)

About 540 lines: the loop and its per-epoch bookkeeping (the run state, the recorder, the
callbacks, the probe stage and the end of the run) share one state and change together.
"""

import contextlib
import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import (
    checkpoint,
    data,
    features,
    l2sp,
    model,
    multiworker,
    regularizers,
    report,
    rundir,
    runfiles,
    runtime,
    schedule,
)
from kft import probe as probe_lib
from kft.config import Config
from kft.finetuner import FineTuner, build_classifier, make_finetuner, prepare_stage


class DivergenceError(RuntimeError):
    """The loss became NaN or Inf."""


def steps_per_epoch(dataset: tf.data.Dataset, num_examples: int, batch_size: int) -> int:
    cardinality = int(dataset.cardinality())
    if cardinality > 0:
        return cardinality
    return max(1, num_examples // batch_size)


class _EpochEnd(keras.callbacks.Callback):
    """Checks for divergence each batch; after each epoch hands the logs to the recorder, which
    knows the stage in progress."""

    def __init__(self, recorder: "_EpochRecorder"):
        super().__init__()
        self.recorder = recorder
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            run = self.recorder
            raise DivergenceError(
                f"loss became {loss} in stage {run.index + 1} ({run.stage.describe()}), "
                f"epoch {self.epoch - run.first_epoch + 1}, step {batch + 1}: the learning rate is "
                f"likely too high; lower --lr_scale or the stage's learning rate. The last good "
                f"checkpoint is kept."
            )

    def on_epoch_end(self, epoch, logs=None):
        self.recorder(epoch, dict(logs or {}))


class _ValidateAveraged(keras.callbacks.Callback):
    """With --ema_decay, validation sees the averaged weights."""

    def __init__(self, tuner: FineTuner):
        super().__init__()
        self.tuner = tuner

    def on_test_begin(self, logs=None):
        if self.tuner.ema_weights:
            self.tuner.swap_ema()

    def on_test_end(self, logs=None):
        if self.tuner.ema_weights:
            self.tuner.swap_ema()


@contextlib.contextmanager
def _averaged_weights(tuner: FineTuner):
    """Puts the averaged weights in the model for the block (nothing without --ema_decay)."""
    if tuner.ema_weights:
        tuner.swap_ema()
    try:
        yield
    finally:
        if tuner.ema_weights:
            tuner.swap_ema()


@dataclasses.dataclass
class _RunState:
    """What a resume checkpoint records besides weights."""

    stage: int = 0  # index of the stage in progress
    epoch: int = 0  # epochs (rounds) finished in that stage
    # The kept model's validation accuracy: the best so far, or with checkpoint selection
    # "last" the newest (None without a validation split).
    best_val_accuracy: float | None = -1.0
    probe_val_accuracy: float | None = None
    probe_seconds: float = 0.0  # the probe stage's wall time, feature pass included
    history: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _block_of_variable(blocks) -> dict[str, str]:
    return {w.path: block.name for block in blocks for layer in block.layers for w in layer.weights}


def load_seeded_splits(config: Config) -> data.Splits:
    """`load_splits` after seeding TF as `train` seeds it, so the pipelines match a run's."""
    runtime.set_determinism(config.seed, config.deterministic)
    return load_splits(config)


def load_splits(config: Config, batch_size: int | None = None) -> data.Splits:
    """The run's data as `config` describes it (batches of `batch_size`, default the run's)."""
    return data.load(
        config.dataset,
        image_size=config.image_size,
        batch_size=batch_size or config.batch_size,
        val_fraction=config.val_fraction,
        seed=config.seed,
        data_dir=config.data_dir,
        train_limit_per_class=config.train_limit_per_class or None,
        cache_bytes=int(config.cache_gb * 1024**3),
    )


def train(config: Config, splits: data.Splits | None = None, flagfile_text: str = "") -> dict:
    """Runs (or resumes) the staged fine-tune described by `config`.

    Args:
      config: the run configuration.
      splits: the data; loaded from `config.dataset` when None.
      flagfile_text: written to MODEL_DIR/flags.cfg once the configuration has been checked.

    Returns:
      The metrics written to MODEL_DIR/metrics.json.

    Raises:
      ValueError: bad configuration found before training (one line).
      DivergenceError: the loss became NaN or Inf.
    """
    started = time.time()
    runtime.set_determinism(config.seed, config.deterministic)
    precision = runtime.resolve_precision(config.mixed_precision, config.backbone, config.image_size)
    runtime.set_precision(precision)
    strategy = runtime.make_strategy(config.strategy)
    # With several workers (kft.multiworker) this one's config.model_dir is the chief's
    # MODEL_DIR on the chief and a temporary directory of its own on every other worker.
    worker = multiworker.worker_of(strategy)
    jit = runtime.resolve_jit_compile(config.jit_compile)
    os.makedirs(config.model_dir, exist_ok=True)

    if splits is None:
        splits = load_splits(config)
    logging.info("precision: %s (--mixed_precision=%s); XLA: %s", precision, config.mixed_precision, jit)
    logging.info(
        "data: %d train, %d val images, %d classes, %d unreadable files skipped",
        splits.num_train,
        splits.num_val,
        len(splits.class_names),
        splits.skipped,
    )
    if splits.classes_not_in_val:
        logging.warning(
            "validation has no image of %s: --val_fraction=%g of so few images holds none out, so all of them train",
            ", ".join(repr(name) for name in splits.classes_not_in_val),
            config.val_fraction,
        )

    runfiles.check_same_classes(config.model_dir, splits.class_names)
    if worker:
        multiworker.check_batch(worker, config.batch_size, splits.num_train)
    select_best = selects_best(config.checkpoint_selection, splits.num_val)
    rundir.mark(config.model_dir)
    ckpts = checkpoint.ResumeCheckpoints(config.model_dir)
    saved = ckpts.latest_state()
    if worker:  # Only the chief has checkpoints; every worker resumes where it left off.
        saved = worker.broadcast_json(saved)
    state = _RunState(**saved) if saved else _RunState()
    with strategy.scope():
        tuner, blocks, anchors = _build_tuner(
            config, len(splits.class_names), flagfile_text, worker.broadcast_arrays if worker else None
        )
    classifier, feature_regularizer = tuner.classifier, tuner.feature_regularizer
    checkpoint.write_json(
        os.path.join(config.model_dir, "classes.json"),
        {"class_names": list(splits.class_names), "backbone": config.backbone, "image_size": config.image_size},
    )
    summaries = report.Summaries(os.path.join(config.model_dir, "tb"))
    if not saved:
        summaries.augmented_grid(splits.train, config.augment, config.seed, len(splits.class_names))
    recorder = _EpochRecorder(config, tuner, anchors, _block_of_variable(blocks), summaries, state, ckpts, select_best)
    steps = steps_per_epoch(splits.train, splits.num_train, config.batch_size)
    first_epoch_of = np.cumsum([0] + [s.epochs for s in config.stages]).tolist()

    cached = None
    # compile() drops the traced validation step, but validation runs in inference mode and
    # does not depend on the stage: reuse it (one per input kind: images or cached features).
    validation_steps = {}
    for index, stage in enumerate(config.stages):
        if index < state.stage:
            continue
        stage_started = time.time()
        if stage.what == "probe":
            _run_probe(classifier, splits, config, recorder, first_epoch_of[index], index)
            continue
        train_data, val_data = splits.train, splits.val
        tuner.on_features = config.cache_features and stage.what == "head"
        if tuner.on_features:
            if cached is None:
                cached = features.cache_features(classifier, splits, config.batch_size, config.seed)
            train_data, val_data = cached
        with strategy.scope():
            lr = schedule.stage_learning_rate(stage, config.lr_scale, steps)
            trainable_blocks, optimizer = prepare_stage(
                tuner,
                blocks,
                stage,
                lr,
                optimizer=config.optimizer,
                precision=precision,
                jit_compile=jit,
                layer_lr_decay=config.layer_lr_decay,
            )
            tuner.test_function = validation_steps.get(tuner.on_features)
        resumed_mid_stage = saved is not None and state.epoch > 0
        if saved is not None:
            if worker is None or worker.is_chief:
                ckpts.restore(tuner, optimizer if resumed_mid_stage else None)
            logging.info("resumed at stage %d epoch %d from %s", index + 1, state.epoch, ckpts.root)
            saved = None
        if worker:
            # The chief's weights, optimizer state and augmentation seed on every worker: what
            # it restored, or what the probe fitted outside the collective step.
            worker.sync_variables(tuner.variables + optimizer.variables)
        if (
            trainable_blocks
            and isinstance(feature_regularizer, regularizers.Delta)
            and feature_regularizer.needs_attention()
        ):
            _set_delta_attention(
                feature_regularizer, classifier, splits.train, config, index, summaries, first_epoch_of[index], worker
            )
        logging.info(
            "stage %d/%d %s: trainable blocks %s, %d steps/%s",
            index + 1,
            len(config.stages),
            stage.describe(),
            ", ".join(trainable_blocks) if trainable_blocks else "none (head only)",
            stage.steps_per_round(steps),
            "round" if stage.steps else "epoch",
        )
        first = first_epoch_of[index]
        summaries.stage_start(index, stage, trainable_blocks, first)
        recorder.start_stage(index, stage, first, optimizer, lr)
        # A stage counted in steps runs its rounds over the repeated training set: a round may
        # span several passes (small sets) or part of one (large ones).
        fit_args = dict(
            steps_per_epoch=stage.steps_per_round(steps) if stage.steps else None,
            validation_data=val_data,
            initial_epoch=first + state.epoch,
            epochs=first + stage.epochs,
            callbacks=[_EpochEnd(recorder), _ValidateAveraged(tuner)],
        )
        train_input = train_data.repeat() if stage.steps else train_data
        if worker:  # Keras's fit fails on MultiWorkerMirroredStrategy (keras-team/keras#20585).
            multiworker.fit(tuner, worker, train_input, global_batch=config.batch_size, **fit_args)
        else:
            # The tf.data pipeline shuffles (seeded).
            tuner.fit(train_input, verbose=config.verbose, shuffle=False, **fit_args)
        validation_steps[tuner.on_features] = tuner.test_function
        logging.info("stage %d done in %.1fs", index + 1, time.time() - stage_started)

    metrics = _finish(config, classifier, splits, state, summaries, started, select_best, worker)
    ckpts.finish()  # After metrics.json: a run cut off before it still has its fallback.
    return metrics


def selects_best(selection: str, num_val: int) -> bool:
    """Whether a run keeps its best-validation model (else the end of its schedule).

    Raises:
      ValueError: "best" without a validation split.
    """
    schedule.check_selection(selection, num_val)
    if selection != "auto":
        return selection == "best"
    if num_val >= schedule.MIN_RANKING_VAL:
        return True
    if num_val == 0:
        logging.info("no validation split: keeping the end of the schedule")
        return False
    logging.warning(
        "the validation split has %d images: the standard error of an accuracy measured on it is "
        "up to 0.5/sqrt(%d) = %.2f, too coarse to rank checkpoints (kft ranks from %d images); "
        "keeping the end of the schedule (--checkpoint_selection=best overrides)",
        num_val,
        max(1, num_val),
        0.5 / math.sqrt(max(1, num_val)),
        schedule.MIN_RANKING_VAL,
    )
    return False


def _run_probe(classifier, splits: data.Splits, config: Config, recorder, global_epoch: int, index: int) -> None:
    """The probe stage: fits the head on the frozen backbone's features (kft.probe), records
    its validation accuracy as the run's baseline and checkpoints it like an epoch."""
    if classifier.hidden is not None:
        raise ValueError("the probe stage needs --hidden_units=0: it fits the head's only dense layer in closed form")
    started = time.time()
    # A pass over every image and a fit, with nothing else to show for up to minutes on 50,000.
    logging.info(
        "probe stage: backbone features of %d training and %d validation images, then a logistic regression",
        splits.num_train,
        splits.num_val,
    )
    batch = features.feature_batch_size(config.image_size)
    train_x, train_y = features.features_of(
        classifier, splits.train if splits.train_in_order is None else splits.train_in_order, batch
    )
    val_x, val_y = features.features_of(classifier, splits.val, batch)
    rankable = len(val_y) >= schedule.MIN_RANKING_VAL
    fitted = probe_lib.fit(
        train_x,
        train_y,
        len(splits.class_names),
        val_x=val_x if rankable else None,
        val_y=val_y if rankable else None,
        seed=config.seed,
    )
    classifier.classify.set_weights([fitted.kernel, fitted.bias])
    val_accuracy = probe_lib.accuracy(fitted, val_x, val_y) if len(val_y) else None
    probe_lib.log(fitted, len(train_y), val_accuracy)
    seconds = time.time() - started
    logging.info("probe stage (features included) took %.1fs", seconds)
    recorder.probe_done(index, global_epoch, val_accuracy, fitted.c, seconds)


def _build_tuner(
    config: Config, num_classes: int, flagfile_text: str, share_anchors=None
) -> tuple[FineTuner, list, dict]:
    """The classifier, its blocks and the FineTuner around it; writes run.json and flags.cfg once
    the stages are known to fit the backbone, and anchors.npz (theta0) unless a resumed run has it.

    Args:
      share_anchors: with several workers, maps this worker's anchors to the chief's.

    Returns:
      (tuner, blocks, anchors).
    """
    classifier, blocks = build_classifier(config, num_classes)
    schedule.validate_against_blocks(config.stages, [b.name for b in blocks])
    runfiles.write_config(config)
    if flagfile_text:
        checkpoint.write_text(os.path.join(config.model_dir, "flags.cfg"), flagfile_text)
    anchors_path = os.path.join(config.model_dir, "anchors.npz")
    if os.path.exists(anchors_path):
        anchors = checkpoint.load_arrays(anchors_path)
    else:
        anchors = l2sp.anchor_arrays(classifier.backbone)
        if share_anchors is None:
            checkpoint.save_arrays(anchors_path, anchors)
    if share_anchors is not None:  # The chief's theta0, kept in its MODEL_DIR.
        anchors = share_anchors(anchors)
        if not os.path.exists(anchors_path):
            checkpoint.save_arrays(anchors_path, anchors)
    return make_finetuner(config, classifier, anchors), blocks, anchors


class _EpochRecorder:
    """What happens after every epoch: the history and TensorBoard, the best weights, and a
    resume checkpoint with the run state."""

    def __init__(
        self,
        config: Config,
        tuner: FineTuner,
        anchors: dict,
        block_of: dict,
        summaries,
        state: _RunState,
        ckpts: checkpoint.ResumeCheckpoints,
        select_best: bool,
    ):
        self.config, self.tuner, self.anchors, self.block_of = config, tuner, anchors, block_of
        self.summaries, self.state, self.ckpts = summaries, state, ckpts
        self.select_best = select_best

    def _keep(self, val_acc: float | None) -> None:
        """Writes model.weights.h5 if this model is the one to keep: the best so far, or with
        selection "last" every newer one (val_acc None: no validation split)."""
        if self.select_best and not val_acc > self.state.best_val_accuracy:
            return
        self.state.best_val_accuracy = val_acc
        with _averaged_weights(self.tuner):
            checkpoint.save_model_weights(
                self.tuner.classifier, os.path.join(self.config.model_dir, "model.weights.h5")
            )

    def probe_done(self, index: int, global_epoch: int, val_acc: float | None, c: float, seconds: float) -> None:
        """Records the probe stage like an epoch: history, TensorBoard, kept model, checkpoint."""
        state = self.state
        record = {"stage": index + 1, "epoch": 0, "global_epoch": global_epoch, "probe_c": c}
        if val_acc is not None:
            record["val_accuracy"] = val_acc
        self.summaries.epoch(global_epoch, record, {})
        state.history.append(record)
        state.probe_val_accuracy = val_acc
        state.probe_seconds = seconds
        state.seconds += seconds
        self._keep(val_acc)
        state.stage, state.epoch = index + 1, 0
        self.ckpts.save(global_epoch, self.tuner, None, dataclasses.asdict(state))

    def start_stage(self, index: int, stage: schedule.Stage, first_epoch: int, optimizer, lr) -> None:
        self.index, self.stage, self.first_epoch, self.optimizer, self.lr = index, stage, first_epoch, optimizer, lr
        self.last = time.time()

    def __call__(self, epoch: int, logs: dict) -> None:
        state, classifier = self.state, self.tuner.classifier
        stage_epoch = epoch - self.first_epoch + 1
        record = {
            "stage": self.index + 1,
            "epoch": stage_epoch,
            "global_epoch": epoch + 1,
            **{k: float(v) for k, v in logs.items()},
        }
        record["learning_rate"] = float(self.lr(max(0, int(self.optimizer.iterations.numpy()) - 1)))
        self.summaries.epoch(epoch + 1, record, l2sp.drift(classifier.backbone, self.anchors, self.block_of))
        state.history.append(record)
        self._keep(float(logs["val_accuracy"]) if "val_accuracy" in logs else None)
        state.seconds += time.time() - self.last
        self.last = time.time()
        if stage_epoch == self.stage.epochs:
            state.stage, state.epoch = self.index + 1, 0
        else:
            state.stage, state.epoch = self.index, stage_epoch
        self.ckpts.save(epoch + 1, self.tuner, self.optimizer, dataclasses.asdict(state))


def _set_delta_attention(delta, classifier, train_data, config, stage_index, summaries, step, worker=None) -> None:
    """DELTA's channel attention, computed when the backbone first unfreezes (the head has
    trained by then and the backbone is still the pretrained one), or read back on resume;
    with several workers, the chief's."""
    path = os.path.join(config.model_dir, "delta_attention.npz")
    if os.path.exists(path):
        weights = checkpoint.load_arrays(path)["channel_weights"]
    else:
        if stage_index == 0:
            logging.warning(
                "DELTA attention is measured with an untrained head (the first stage "
                "unfreezes the backbone); put a head stage first, e.g. head:2@1e-3"
            )
        started = time.time()
        batches = train_data.take(config.delta_attention_batches)
        weights = regularizers.channel_attention(delta, classifier, batches)
        checkpoint.save_arrays(path, {"channel_weights": weights})
        logging.info(
            "DELTA channel attention from %d batches in %.1fs: weights %.3g..%.3g (mean 1)",
            config.delta_attention_batches,
            time.time() - started,
            weights.min(),
            weights.max(),
        )
    if worker:
        (weights,) = worker.broadcast([weights])
    delta.set_channel_weights(weights)
    summaries.delta_attention(step, weights)


def _finish(config, classifier, splits, state, summaries, started, select_best, worker=None) -> dict:
    """Loads the kept weights, writes backbone weights, confusion matrix and metrics.json; with
    several workers every worker gets the chief's kept weights (a source task's backbone is the
    next run's --weights on each of them)."""
    best_path = os.path.join(config.model_dir, "model.weights.h5")
    if worker is None or worker.is_chief:
        checkpoint.load_model_weights(classifier, best_path)
    if worker:
        worker.sync_variables(classifier.weights)
        if not worker.is_chief:
            checkpoint.save_model_weights(classifier, best_path)
    backbone_path = os.path.join(config.model_dir, "backbone.weights.h5")
    # A finished run's rerun leaves its backbone file alone: written after the kept weights,
    # it already holds them (and nothing is rewritten on a disk that may be full).
    if not (os.path.exists(backbone_path) and os.path.getmtime(backbone_path) >= os.path.getmtime(best_path)):
        checkpoint.save_backbone_weights(classifier.backbone, config.backbone, config.image_size, backbone_path)
    kept_val_accuracy = None
    if splits.val is not None:
        labels, probs = model.predict_dataset(classifier, splits.val)
        val_report = report.classification_report(labels, probs, splits.class_names)
        kept_val_accuracy = val_report["accuracy"]
        summaries.confusion(
            config.total_epochs, report.confusion_png(np.asarray(val_report["confusion_matrix"]), splits.class_names)
        )
    per_stage = []
    for index, stage in enumerate(config.stages):
        rows = [r for r in state.history if r["stage"] == index + 1]
        per_stage.append(
            {
                "stage": stage.describe(),
                "epochs": len([r for r in rows if r["epoch"] > 0]),  # The probe trains no epoch.
                "final_val_accuracy": rows[-1].get("val_accuracy") if rows else None,
                "best_val_accuracy": max((r["val_accuracy"] for r in rows if "val_accuracy" in r), default=None),
            }
        )
    per_stage = [{k: v for k, v in row.items() if v is not None} for row in per_stage]
    final = state.history[-1].get("val_accuracy") if state.history else None
    probe_note = _probe_verdict(
        state.probe_val_accuracy, final, state.best_val_accuracy, select_best, len(state.history), splits.num_val
    )
    if probe_note:
        print(probe_note, flush=True)
    metrics = {
        "best_val_accuracy": state.best_val_accuracy,
        "checkpoint_selection": "best" if select_best else "last",
        "probe_val_accuracy": state.probe_val_accuracy,
        "probe_seconds": round(state.probe_seconds, 2),
        "final_val_accuracy": state.history[-1].get("val_accuracy") if state.history else None,
        "best_model_val_accuracy": kept_val_accuracy,
        "stages": per_stage,
        "train_seconds": round(state.seconds, 2),
        "wall_seconds_this_invocation": round(time.time() - started, 2),
        "num_train": splits.num_train,
        "num_val": splits.num_val,
        "skipped_files": splits.skipped,
    }
    checkpoint.write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    return metrics


def _probe_verdict(probe_acc, final_acc, kept_acc, select_best, records, num_val) -> str | None:
    """One line when the fine-tune ended below the linear probe on validation, else None."""
    if probe_acc is None or final_acc is None or records < 2 or not final_acc < probe_acc:
        return None
    head = f"the fine-tune ended below the linear probe on validation ({final_acc:.4f} < {probe_acc:.4f})"
    if not select_best:
        return (
            f"{head}, but {num_val} validation images cannot rank them; keeping the fine-tune "
            "(--checkpoint_selection=best keeps the better on validation)"
        )
    if kept_acc == probe_acc:
        return f"{head}: keeping the probe's model"
    return f"{head}: keeping the fine-tune's best round ({kept_acc:.4f})"
