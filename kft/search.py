"""KerasTuner search over `lr_scale` and the strength of the chosen `--regularizer`; every trial
is one `kft.trainer.train` run.

Every setting but the searched ones is the Config built from kft.train's flags, unchanged. A
trial runs
`trainer.train(dataclasses.replace(config, lr_scale=..., delta_alpha=...,
model_dir=TUNE_DIR/trials/<id>, export_dir="none", verbose=0))` on the data loaded once per
process. The objective is the trial's best validation accuracy (metrics["best_val_accuracy"]);
no test split is ever read. Every trial uses the same --seed (same initialization and
augmentation draws), but because the loaded training pipeline is shared, its seeded shuffle
goes on from one trial to the next: trial k sees another epoch order than trial 0 or a fresh
kft.train run. best.cfg reproduces the best trial's recipe, its data order only for trial 0.

The space and the Hyperband budgets: kft.search_space. The files under TUNE_DIR: kft.search_files.

Resume: rerunning the same command reloads KerasTuner's oracle; finished trials are kept, a
trial that was running when the process stopped runs again under the same id and directory,
where `trainer.train` resumes from its last epoch checkpoint.

Ranking without a validation split: when the data has none (on a small set kft.train's recipe
trains on every image, and kft.tune resolves the recipe as kft.train does), each trial is
scored by stratified k-fold cross-validation instead (kft.crossval): it trains once per fold,
in TUNE_DIR/trials/<id>/fold-<i>, and its objective is the accuracy of the folds' kept models
on the images each held out, pooled over all the training images. A scored fold keeps its
metrics.json, run.json and TensorBoard logs, not its weights. best.cfg then trains on every
image, as kft.train's recipe would.
"""

import dataclasses
import gc
import os
import shutil
import time

import keras
import keras_tuner as kt
from absl import logging

from kft import checkpoint, crossval, data, runfiles, runtime, search_files, search_space, trainer
from kft.config import Config

# ----------------------------------------------------------------------------------------------
# Distributed roles (KerasTuner's environment variables; see kft/tune.py).


def role() -> str:
    """ "single", "chief" or "worker", from KERASTUNER_ORACLE_IP and KERASTUNER_TUNER_ID."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if v not in os.environ]
    if missing:
        raise ValueError(
            f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} is not; distributed tuning needs all three"
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


# ----------------------------------------------------------------------------------------------
# The tuner.


def release_memory() -> None:
    """Drops the finished trial's models, compiled functions and Keras global state."""
    keras.backend.clear_session()
    gc.collect()


class StageTuner(kt.engine.base_tuner.BaseTuner):
    """Runs each KerasTuner trial as one `trainer.train` call on the shared data.

    Args:
      oracle: from `search_space.make_oracle`.
      config: the base run configuration (every trial changes only lr_scale, the regularizer's
        strength, the last stage's epochs under Hyperband, and its output settings).
      tune: kft.tune's settings.
      splits: the data, loaded once per process; None on the chief, which runs no trial.
      folds: the cross-validation folds each trial trains on when the data has no validation
        split (kft.crossval), else None.
    """

    def __init__(
        self,
        oracle,
        config: Config,
        tune: search_space.TuneConfig,
        splits: data.Splits | None,
        folds: list[data.Splits] | None = None,
    ):
        self.config = config
        self.tune = tune
        self.splits = splits
        self.folds = folds
        self.ran = []  # Trial ids this process ran.
        self._idle = False
        super().__init__(oracle, directory=tune.tune_dir, project_name=search_files.ORACLE_DIR, overwrite=False)

    def pre_create_trial(self):
        # A Hyperband worker asks again at once while the oracle waits for other workers'
        # trials (status IDLE); pause between such requests instead of spinning.
        if self._idle:
            time.sleep(1.0)
        self._idle = True

    def on_trial_begin(self, trial):
        self._idle = False

    def trial_config(self, trial_id: str, values: dict) -> tuple[Config, str]:
        """The trial's Config and the flagfile that reproduces it with kft.train."""
        stages = self.config.stages
        if "tuner/epochs" in values:
            stages = search_space.budget_stages(stages, int(values["tuner/epochs"]))
        model_dir = os.path.abspath(os.path.join(self.tune.tune_dir, "trials", trial_id))
        overrides = dict(
            **search_space.trial_values(values, self.config.regularizer),
            model_dir=model_dir,
            stages=stages,
            export_dir="none",
            verbose=0,
            compare_scratch=False,
        )
        config = dataclasses.replace(self.config, **overrides)
        return config, runfiles.flagfile_of(config)

    def run_trial(self, trial, *args, **kwargs) -> dict:
        config, text = self.trial_config(trial.trial_id, trial.hyperparameters.values)
        values = {name: getattr(config, name) for name in search_space.searched_fields(config.regularizer)}
        ranking = f", {len(self.folds)}-fold cross-validation" if self.folds else ""
        print(
            f"trial {trial.trial_id}: {search_space.describe(values)} epochs={config.total_epochs}{ranking}{_on_worker()}",
            flush=True,
        )
        started = time.time()
        try:
            if self.folds:
                objective, epochs, detail = self._cross_validate(config)
                ranked_on = sum(fold.num_val for fold in self.folds)
            else:
                _discard_stale_run(config)
                metrics = trainer.train(config, splits=self.splits, flagfile_text=text)
                objective, epochs, detail = metrics[search_space.OBJECTIVE], _epochs(metrics), ""
                ranked_on = metrics["num_val"]
        except trainer.DivergenceError as e:
            print(f"trial {trial.trial_id}: failed, {e}", flush=True)
            raise kt.errors.FailedTrialError(str(e)) from None
        except ValueError as e:
            # A configuration error (trainer.train checks before training) fails every trial.
            raise kt.errors.FatalValueError(f"trial {trial.trial_id}: {e}") from None
        finally:
            release_memory()
        seconds = time.time() - started
        self.ran.append(trial.trial_id)
        search_files.write_trial_hparams(self.tune.tune_dir, trial.trial_id, values, objective, epochs)
        print(
            f"trial {trial.trial_id}: {search_files.objective_name(self.folds)}={objective:.4f}{detail} in {seconds:.1f}s",
            flush=True,
        )
        return {
            search_space.OBJECTIVE: float(objective),
            "epochs": float(epochs),
            "ranked_on": float(ranked_on),  # Images the objective was measured on.
            "wall_seconds": round(seconds, 2),
        }

    def _cross_validate(self, config: Config) -> tuple[float, int, str]:
        """Trains `config` once per fold; returns the pooled held-out accuracy of the folds'
        kept models, the epochs of one fold's run and the per-fold accuracies as text."""
        correct, held_out, accuracies = 0.0, 0, []
        for index, fold in enumerate(self.folds):
            fold_config = dataclasses.replace(config, model_dir=os.path.join(config.model_dir, f"fold-{index}"))
            metrics = _train_fold(fold_config, fold)
            release_memory()
            accuracies.append(metrics["best_model_val_accuracy"])
            correct += accuracies[-1] * fold.num_val
            held_out += fold.num_val
        detail = f" (folds: {', '.join(f'{a:.3f}' for a in accuracies)})"
        return correct / held_out, _epochs(metrics), detail


# What a finished fold no longer needs: its weights and resume checkpoints. A fold's model
# (trained on part of the data) serves nothing once scored, and each is the size of a run's
# (ResNet50 with its checkpoint: about 560 MB), times folds, times trials.
FOLD_WEIGHTS = ("ckpt", "model.weights.h5", "backbone.weights.h5", "anchors.npz")


def _train_fold(config: Config, fold: data.Splits) -> dict:
    """One cross-validation fold's metrics: read back from its finished earlier run (an
    interrupted trial runs again), else trained now; then its weights are deleted."""
    _discard_stale_run(config)
    finished = os.path.join(config.model_dir, "metrics.json")
    if os.path.exists(finished):  # Written last by trainer.train.
        metrics = checkpoint.read_json(finished)
    else:
        # No flags.cfg: a fold's images are not a --dataset kft.train could read.
        metrics = trainer.train(config, splits=fold)
    for name in FOLD_WEIGHTS:
        path = os.path.join(config.model_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return metrics


def _epochs(metrics: dict) -> int:
    return sum(s["epochs"] for s in metrics["stages"])


def _on_worker() -> str:
    return f" on {os.environ['KERASTUNER_TUNER_ID']}" if role() == "worker" else ""


def _discard_stale_run(config: Config) -> None:
    """Deletes a trial directory left by another configuration (kft.runfiles.resume_conflict);
    one of this trial's configuration resumes."""
    if not os.path.isdir(config.model_dir):
        return
    conflict = runfiles.resume_conflict(config.model_dir, config)
    if conflict:
        logging.warning("discarding %s: it holds another run than this trial (%s)", config.model_dir, conflict)
        shutil.rmtree(config.model_dir)


# ----------------------------------------------------------------------------------------------
# Running a search.


def pretrain(config: Config, tune_dir: str) -> Config:
    """Runs the source-task training once in TUNE_DIR/pretrain; the trials fine-tune from it.

    Uses the same source-task config as `kft.train` (kft.experiment) and resumes like any run.

    Returns:
      `config` starting from the pretrained backbone, with no pretraining of its own.
    """
    from kft import experiment

    source = experiment.source_config(config, os.path.join(os.path.abspath(tune_dir), "pretrain"))
    metrics = trainer.train(source)
    release_memory()
    print(f"source task {source.dataset}: best val accuracy {metrics[search_space.OBJECTIVE]:.4f}", flush=True)
    return dataclasses.replace(
        config, weights=os.path.join(source.model_dir, "backbone.weights.h5"), pretrain_dataset=""
    )


def run(config: Config, tune: search_space.TuneConfig, splits: data.Splits | None = None) -> dict | None:
    """Runs (or resumes) the search and writes its outputs.

    On the chief of a distributed search, this serves the oracle until the workers are done;
    on a worker, it runs trials and writes no outputs.

    Args:
      config: the base run configuration (from kft.train's flags).
      tune: kft.tune's settings.
      splits: the data; loaded from `config.dataset` when None.

    Returns:
      The summary `search_files.write_outputs` returns (None on a worker).

    Raises:
      ValueError: bad settings, or a tune directory that holds something else (one line).
    """
    tune.space.validate()
    if tune.max_trials < 1:
        raise ValueError(f"--max_trials={tune.max_trials} must be >= 1")
    search_space.make_oracle(tune, config)  # Checks the tuner name before anything is written.
    current = search_files.fingerprint(config, tune)
    who = role()
    if splits is None:
        # Seeded as trainer.train seeds itself, so the data match a kft.train run's. The chief
        # trains nothing, but names the objective by them: validation or cross-validation.
        runtime.set_determinism(config.seed, config.deterministic)
        splits = trainer.load_splits(config)
    # Before anything is written: a set that cannot be cross-validated is refused untouched.
    folds = crossval.folds(splits, config.seed) if splits is not None and splits.val is None else None
    if folds:
        print(
            f"no validation split: kft.tune ranks its trials by {len(folds)}-fold cross-validation on the "
            f"{splits.num_train} training images (each trial trains once per fold); best.cfg trains on all of them",
            flush=True,
        )
    shortfall = search_space.hyperband_shortfall(tune, config)
    if shortfall and who != "worker":
        print(shortfall, flush=True)
    if who == "worker":
        search_files.wait_for_search(tune, current)
        return _search(config, tune, splits, folds, who)
    # One chief (or single search) per directory; workers join the chief's.
    lock = search_files.prepare_tune_dir(tune, current)
    try:
        search_files.write_hparams_config(tune, config, folds)
        return _search(config, tune, splits, folds, who)
    finally:
        lock.release()


def _search(
    config: Config,
    tune: search_space.TuneConfig,
    splits: data.Splits | None,
    folds: list[data.Splits] | None,
    who: str,
) -> dict | None:
    """`run` once the tune directory is checked (and locked, unless `who` is a worker)."""
    if config.pretrain_dataset:
        weights = os.path.join(os.path.abspath(tune.tune_dir), "pretrain", "backbone.weights.h5")
        if who == "worker":
            # The chief pretrains before it serves the first trial.
            config = dataclasses.replace(config, weights=weights, pretrain_dataset="")
        else:
            config = pretrain(config, tune.tune_dir)
    tuner = StageTuner(search_space.make_oracle(tune, config), config, tune, splits, folds)
    # Saved before the first trial, so a rerun after any interruption reloads the oracle.
    tuner.save()
    error = None
    try:
        tuner.search()
    except RuntimeError as e:
        error = e  # KerasTuner stops after consecutive failed trials; report what finished.
    if who == "worker":
        print(
            f"worker {os.environ['KERASTUNER_TUNER_ID']} done; ran trials: {', '.join(tuner.ran) or 'none'}", flush=True
        )
        if error:
            raise error
        return None
    summary = search_files.write_outputs(tuner.oracle, config, tune, folds)
    if error:
        raise RuntimeError(str(error).splitlines()[0]) from None
    return summary
