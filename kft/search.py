"""KerasTuner search over `lr_scale` and the strength of the chosen `--regularizer`; every trial
is one `kft.trainer.train` run.

The strength searched is the Config field its registered class names (kft.regularizers): l2sp ->
l2sp_alpha, delta -> delta_alpha, bss -> bss_eta; with none only lr_scale is searched. The
search space (ranges from kft.tune's flags), written here for --regularizer=delta:

    lr_scale     log-uniform in [lr_scale_min, lr_scale_max]; multiplies every stage's LR
    delta        True/False: whether the regularizer is on. False is plain fine-tuning
                 (strength 0), which a log-uniform strength can never reach, so it gets its own
                 switch (named after the regularizer: l2sp, delta, bss)
    delta_alpha  log-uniform in [strength_min, strength_max]; the trial's strength when the
                 switch is on, ignored when it is off (sampled always, so every oracle, the
                 Bayesian one included, sees the same fixed-size space)

Every other setting is the Config built from kft.train's flags, unchanged. A trial runs
`trainer.train(dataclasses.replace(config, lr_scale=..., delta_alpha=...,
model_dir=TUNE_DIR/trials/<id>, export_dir="none", verbose=0))` on the data loaded once per
process. The objective is the trial's best validation accuracy (metrics["best_val_accuracy"]);
no test split is ever read. Every trial uses the same --seed (same initialization and
augmentation draws), but because the loaded training pipeline is shared, its seeded shuffle
goes on from one trial to the next: trial k sees another epoch order than trial 0 or a fresh
kft.train run. best.cfg reproduces the best trial's recipe, its data order only for trial 0.

Hyperband budgets. KerasTuner's Hyperband gives each trial a budget `tuner/epochs` (total
epochs). kft maps it onto the stage schedule by shortening only the LAST stage, the one that
trains the most backbone: every earlier stage, the head stage first of all, always runs its
full epochs. With E_total the schedule's epochs and E_last the last stage's:

    max budget (Hyperband's max_epochs) = E_total                 the full schedule
    min budget                          = E_total - E_last + 1     the last stage cut to 1 epoch
    budget b                            -> last stage runs b - (E_total - E_last) epochs

The shortened stage keeps its learning rate and runs its whole warmup + cosine schedule over
the shorter length. KerasTuner's Hyperband starts at budget 1; kft raises its minimum to the
min budget above, so every budget maps exactly (a schedule whose last stage has 1 epoch makes
Hyperband a random search over full runs). A one-stage schedule shortens that stage.
Promoted trials (`tuner/trial_id`) train again from the start with the larger budget rather
than continuing the earlier run: a shortened stage has already decayed its learning rate to 0,
so its weights are not the midpoint of the longer run. `--max_trials` caps every tuner,
Hyperband included (its iterations are otherwise unbounded). best.cfg always trains the full
schedule; on equal objectives the trial trained longest wins.

Files under TUNE_DIR:

    search.json     what this search is (resolved kft.train config + space + tuner); a rerun
                    with anything else is refused
    oracle/         KerasTuner's state (oracle.json, <tuner_id>.json, trial_<id>/trial.json)
    trials/<id>/    each trial's kft run (checkpoints, TensorBoard, flags.cfg, metrics.json);
                    `python -m kft.train --flagfile=TUNE_DIR/trials/<id>/flags.cfg` redoes it
    pretrain/       the source-task run, when the flags set --pretrain_dataset
    tb/             TensorBoard HParams: `tensorboard --logdir TUNE_DIR/tb`
    trials.csv      one row per trial
    best.cfg        the best trial's flags for `python -m kft.train --flagfile=TUNE_DIR/best.cfg`

Resume: rerunning the same command reloads KerasTuner's oracle; finished trials are kept, a
trial that was running when the process stopped runs again under the same id and directory,
where `trainer.train` resumes from its last epoch checkpoint.
"""

import csv
import dataclasses
import gc
import io
import math
import os
import shutil
import time

import keras
import keras_tuner as kt
import tensorflow as tf
from absl import logging
from tensorboard.plugins.hparams import api as hparams_api

from kft import checkpoint, data, regularizers, rundir, runfiles, runtime, schedule, trainer
from kft.config import Config

OBJECTIVE = "best_val_accuracy"
TUNERS = ("hyperband", "bayesian", "random")
SEARCH_FILE = "search.json"
ORACLE_DIR = "oracle"

# Config fields that do not change what a trial computes, or that each trial sets itself; a
# rerun may change them without starting a different search. Every strength is one of these:
# the chosen regularizer's is searched, the others are unused.
_FREE_FIELDS = (
    "model_dir",
    "export_dir",
    "verbose",
    "lr_scale",
    "compare_scratch",
    *(choice.strength_field for choice in regularizers.REGISTRY.values() if choice.strength_field),
)


def searched_fields(regularizer: str) -> tuple[str, ...]:
    """The Config fields each trial sets: lr_scale, then the regularizer's strength if it has one."""
    field = regularizers.strength_field(regularizer)
    return ("lr_scale", field) if field else ("lr_scale",)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched knobs (both log-uniform; the regularizer off is a candidate too).

    The strength range applies to whichever strength `--regularizer` selects (its defaults suit
    L2-SP's alpha, DELTA's alpha and BSS's eta alike); --regularizer=none does not use it.
    """

    lr_scale_min: float = 0.1
    lr_scale_max: float = 10.0
    strength_min: float = 1e-4
    strength_max: float = 1e-1

    def validate(self) -> None:
        """Raises ValueError naming the flag of an empty, inverted or non-positive range."""
        for name in ("lr_scale", "strength"):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            for end, value in (("min", low), ("max", high)):
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(f"--{name}_{end}={value:g} must be a finite number > 0 (the range is log-uniform)")
            if low >= high:
                raise ValueError(
                    f"--{name}_min={low:g} must be < --{name}_max={high:g} (the range is "
                    f"{'empty' if low == high else 'inverted'})"
                )

    def hyperparameters(self, regularizer: str) -> kt.HyperParameters:
        """lr_scale, and for a regularizer with a strength its on/off switch and its strength."""
        hp = kt.HyperParameters()
        hp.Float("lr_scale", self.lr_scale_min, self.lr_scale_max, sampling="log")
        field = regularizers.strength_field(regularizer)
        if field:
            hp.Boolean(regularizer, default=True)
            hp.Float(field, self.strength_min, self.strength_max, sampling="log")
        return hp


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What kft.tune's own flags say."""

    tune_dir: str
    tuner: str = "hyperband"
    max_trials: int = 20
    space: SearchSpace = SearchSpace()
    hyperband_factor: int = 3
    overwrite: bool = False


def trial_values(values: dict, regularizer: str) -> dict:
    """The Config values of a trial's hyperparameters, e.g. {"lr_scale": 2.0, "delta_alpha": 0.01};
    the strength is 0 when the regularizer's switch is off."""
    out = {"lr_scale": float(values["lr_scale"])}
    field = regularizers.strength_field(regularizer)
    if field:
        out[field] = float(values[field]) if values.get(regularizer, True) else 0.0
    return out


def describe(values: dict) -> str:
    """ "lr_scale=2 delta_alpha=0.01", for the lines printed per trial."""
    return " ".join(f"{name}={value:.4g}" for name, value in values.items())


# ----------------------------------------------------------------------------------------------
# Hyperband budget -> stage schedule.


def min_budget(stages: tuple[schedule.Stage, ...]) -> int:
    """The fewest total epochs a trial may train: all stages but the last in full, the last 1."""
    if len(stages) == 1:
        return 1
    return sum(s.epochs for s in stages[:-1]) + 1


def budget_stages(stages: tuple[schedule.Stage, ...], budget: int) -> tuple[schedule.Stage, ...]:
    """The schedule shortened to `budget` total epochs by cutting only its last stage.

    Raises:
      ValueError: the budget is below `min_budget` or above the schedule's total epochs.
    """
    total = sum(s.epochs for s in stages)
    low = min_budget(stages)
    if not low <= budget <= total:
        raise ValueError(f"epoch budget {budget} outside [{low}, {total}] for this schedule")
    last = stages[-1]
    epochs = last.epochs - (total - budget)
    # A stage counted in steps keeps its steps per round: fewer rounds, fewer steps.
    steps = last.steps_per_round(0) * epochs if last.steps else 0
    return stages[:-1] + (dataclasses.replace(last, epochs=epochs, steps=steps),)


class _StageHyperbandOracle(kt.oracles.HyperbandOracle):
    """KerasTuner's Hyperband with its smallest budget raised from 1 epoch to `min_epochs`."""

    def __init__(self, min_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.min_epochs = min_epochs
        # HyperbandOracle.__init__ derived its brackets from min_epochs=1; derive them again.
        self._current_bracket = self._get_num_brackets() - 1
        self._brackets = []
        self._start_new_bracket()


def make_oracle(tune: TuneConfig, config: Config) -> kt.Oracle:
    """The KerasTuner oracle named by `tune.tuner`, seeded from `config.seed`."""
    common = dict(
        objective=kt.Objective(OBJECTIVE, direction="max"),
        hyperparameters=tune.space.hyperparameters(config.regularizer),
        # KerasTuner takes seed 0 to mean "pick one at random".
        seed=config.seed + 1,
    )
    if tune.tuner == "hyperband":
        oracle = _StageHyperbandOracle(
            min_epochs=min_budget(config.stages),
            max_epochs=config.total_epochs,
            factor=tune.hyperband_factor,
            hyperband_iterations=None,  # Unbounded: --max_trials ends the search.
            **common,
        )
        oracle.max_trials = tune.max_trials
    elif tune.tuner == "bayesian":
        oracle = kt.oracles.BayesianOptimizationOracle(max_trials=tune.max_trials, **common)
    elif tune.tuner == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=tune.max_trials, **common)
    else:
        raise ValueError(f"unknown tuner {tune.tuner!r}; choose one of: {', '.join(TUNERS)}")
    oracle.verbose = 0  # kft prints its own one line per trial.
    return oracle


# ----------------------------------------------------------------------------------------------
# The search's identity and its directory.


def fingerprint(config: Config, tune: TuneConfig) -> dict:
    """What makes a search this search: the config (minus free fields; its regularizer names the
    strength searched), the space, the tuner."""
    search = {"tuner": tune.tuner, **dataclasses.asdict(tune.space)}
    if not regularizers.strength_field(config.regularizer):  # No strength searched: its range is unused.
        del search["strength_min"], search["strength_max"]
    if tune.tuner == "hyperband":
        search["hyperband_factor"] = tune.hyperband_factor
    return {
        "config": runfiles.comparable_fields(config, _FREE_FIELDS),
        "search": search,
        # What a folder dataset holds, so that the same files moved elsewhere are the same data.
        "identity": runfiles.data_identity(config),
    }


def fingerprint_conflict(saved: dict, current: dict) -> str | None:
    """Names the first difference between two fingerprints, e.g. "--stages: saved X, now Y"
    (paths and moved folders compared as kft.runfiles.first_difference does)."""
    old, new = saved.get("search", {}), current.get("search", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"--{key}: saved {old.get(key)!r}, now {new.get(key)!r}"
    return runfiles.first_difference(
        saved.get("config", {}), current.get("config", {}), saved.get("identity", {}), current.get("identity", {})
    )


def prepare_tune_dir(tune: TuneConfig, current: dict) -> rundir.DirLock:
    """Checks TUNE_DIR holds this search (or nothing), locks it, then records the search in it.

    Nothing is deleted unless `tune.overwrite`, and then only what kft.tune wrote; a refused
    directory is left as it was.

    Returns:
      The directory's lock, held while this process searches.

    Raises:
      ValueError: the directory holds another search, files that are not a kft search, or is
        in use by another kft.tune process.
    """
    flag = f"--tune_dir={tune.tune_dir}"
    path = os.path.join(tune.tune_dir, SEARCH_FILE)
    try:
        rundir.check_owned(tune.tune_dir, flag, "tune", tune.overwrite)
        rundir.check_writable_dir(tune.tune_dir, flag)
        lock = rundir.DirLock(tune.tune_dir, flag)
    except OSError as e:
        raise ValueError(f"{flag} is not writable: {e.strerror}") from None
    try:
        if tune.overwrite:
            rundir.remove_owned(tune.tune_dir, "tune")
        elif os.path.exists(path):
            conflict = fingerprint_conflict(checkpoint.read_json_or_fail(path, "the search record"), current)
            if conflict:
                raise ValueError(
                    f"{flag} holds a different search ({conflict}); rerun with its "
                    "flags to resume it, pass --overwrite to start over, or use another --tune_dir"
                )
        rundir.mark(tune.tune_dir, "tune")
        checkpoint.write_json(path, current)
    except OSError as e:
        lock.release()
        raise ValueError(f"{flag} is not writable: {e.strerror}") from None
    except ValueError:
        lock.release()
        raise
    return lock


def wait_for_search(tune: TuneConfig, current: dict, timeout: float = 3600.0) -> None:
    """A worker's check: waits for the chief to record the search, then compares it with ours.

    Raises:
      ValueError: the chief runs another search, or never recorded one within `timeout`.
    """
    path = os.path.join(tune.tune_dir, SEARCH_FILE)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise ValueError(f"no chief recorded a search in --tune_dir={tune.tune_dir} within {timeout:.0f}s")
        time.sleep(1.0)
    conflict = fingerprint_conflict(checkpoint.read_json(path), current)
    if conflict:
        raise ValueError(
            f"this worker's flags differ from the chief's search in --tune_dir={tune.tune_dir} ({conflict})"
        )


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
      oracle: from `make_oracle`.
      config: the base run configuration (every trial changes only lr_scale, the regularizer's
        strength, the last stage's epochs under Hyperband, and its output settings).
      tune: kft.tune's settings.
      splits: the data, loaded once per process; None on the chief, which runs no trial.
    """

    def __init__(self, oracle, config: Config, tune: TuneConfig, splits: data.Splits | None):
        self.config = config
        self.tune = tune
        self.splits = splits
        self.ran = []  # Trial ids this process ran.
        self._idle = False
        super().__init__(oracle, directory=tune.tune_dir, project_name=ORACLE_DIR, overwrite=False)

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
            stages = budget_stages(stages, int(values["tuner/epochs"]))
        model_dir = os.path.abspath(os.path.join(self.tune.tune_dir, "trials", trial_id))
        overrides = dict(
            **trial_values(values, self.config.regularizer),
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
        _discard_stale_run(config)
        values = {name: getattr(config, name) for name in searched_fields(config.regularizer)}
        print(f"trial {trial.trial_id}: {describe(values)} epochs={config.total_epochs}{_on_worker()}", flush=True)
        started = time.time()
        try:
            metrics = trainer.train(config, splits=self.splits, flagfile_text=text)
        except trainer.DivergenceError as e:
            print(f"trial {trial.trial_id}: failed, {e}", flush=True)
            raise kt.errors.FailedTrialError(str(e)) from None
        except ValueError as e:
            # A configuration error (trainer.train checks before training) fails every trial.
            raise kt.errors.FatalValueError(f"trial {trial.trial_id}: {e}") from None
        finally:
            release_memory()
        seconds = time.time() - started
        epochs = sum(s["epochs"] for s in metrics["stages"])
        self.ran.append(trial.trial_id)
        write_trial_hparams(self.tune.tune_dir, trial.trial_id, values, metrics[OBJECTIVE], epochs)
        print(f"trial {trial.trial_id}: {OBJECTIVE}={metrics[OBJECTIVE]:.4f} in {seconds:.1f}s", flush=True)
        return {OBJECTIVE: float(metrics[OBJECTIVE]), "epochs": float(epochs), "wall_seconds": round(seconds, 2)}


def _on_worker() -> str:
    return f" on {os.environ['KERASTUNER_TUNER_ID']}" if role() == "worker" else ""


def _discard_stale_run(config: Config) -> None:
    """Deletes a trial directory left by another configuration (kft.runfiles.resume_conflict);
    one of this trial's configuration resumes."""
    if not os.path.isdir(config.model_dir):
        return
    try:
        conflict = runfiles.resume_conflict(config.model_dir, config)
    except ValueError as e:  # An unreadable run.json: nothing there can be resumed.
        conflict = str(e)
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
    print(f"source task {source.dataset}: best val accuracy {metrics[OBJECTIVE]:.4f}", flush=True)
    return dataclasses.replace(
        config, weights=os.path.join(source.model_dir, "backbone.weights.h5"), pretrain_dataset=""
    )


def run(config: Config, tune: TuneConfig, splits: data.Splits | None = None) -> dict | None:
    """Runs (or resumes) the search and writes its outputs.

    On the chief of a distributed search, this serves the oracle until the workers are done;
    on a worker, it runs trials and writes no outputs.

    Args:
      config: the base run configuration (from kft.train's flags).
      tune: kft.tune's settings.
      splits: the data; loaded from `config.dataset` when None.

    Returns:
      The summary `write_outputs` returns (None on a worker).

    Raises:
      ValueError: bad settings, or a tune directory that holds something else (one line).
    """
    tune.space.validate()
    if tune.max_trials < 1:
        raise ValueError(f"--max_trials={tune.max_trials} must be >= 1")
    make_oracle(tune, config)  # Checks the tuner name before anything is written.
    current = fingerprint(config, tune)
    who = role()
    if who == "worker":
        wait_for_search(tune, current)
        return _search(config, tune, splits, who)
    # One chief (or single search) per directory; workers join the chief's.
    lock = prepare_tune_dir(tune, current)
    try:
        write_hparams_config(tune, config)
        return _search(config, tune, splits, who)
    finally:
        lock.release()


def _search(config: Config, tune: TuneConfig, splits: data.Splits | None, who: str) -> dict | None:
    """`run` once the tune directory is checked (and locked, unless `who` is a worker)."""
    if config.pretrain_dataset:
        weights = os.path.join(os.path.abspath(tune.tune_dir), "pretrain", "backbone.weights.h5")
        if who == "worker":
            # The chief pretrains before it serves the first trial.
            config = dataclasses.replace(config, weights=weights, pretrain_dataset="")
        else:
            config = pretrain(config, tune.tune_dir)
    if who != "chief" and splits is None:
        # Seeded as trainer.train seeds itself, so the data match a kft.train run's.
        runtime.set_determinism(config.seed, config.deterministic)
        splits = trainer.load_splits(config)
    tuner = StageTuner(make_oracle(tune, config), config, tune, splits)
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
    summary = write_outputs(tuner.oracle, config, tune)
    if error:
        raise RuntimeError(str(error).splitlines()[0]) from None
    return summary


# ----------------------------------------------------------------------------------------------
# Outputs.


def csv_columns(regularizer: str) -> tuple[str, ...]:
    """trials.csv's header: the searched fields are named as kft.train's flags."""
    return ("trial_id", *searched_fields(regularizer), "objective", "epochs", "wall_seconds", "status")


def trial_rows(oracle: kt.Oracle, regularizer: str) -> list[dict]:
    """One row per trial in the oracle, in trial order."""
    rows = []
    for trial_id in sorted(oracle.trials, key=int):
        trial = oracle.trials[trial_id]

        def last(name, trial=trial):
            return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None

        epochs = last("epochs")
        rows.append(
            {
                "trial_id": trial_id,
                **trial_values(trial.hyperparameters.values, regularizer),
                "objective": trial.score if trial.status == "COMPLETED" else None,
                "epochs": int(epochs) if epochs is not None else None,
                "wall_seconds": last("wall_seconds"),
                "status": trial.status,
            }
        )
    return rows


def write_outputs(oracle: kt.Oracle, config: Config, tune: TuneConfig) -> dict:
    """Writes trials.csv and best.cfg, prints the table; returns {"rows", "best"}."""
    rows = trial_rows(oracle, config.regularizer)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(config.regularizer), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.write_text(os.path.join(tune.tune_dir, "trials.csv"), buffer.getvalue())

    best = best_row(rows)
    if best:
        checkpoint.write_text(os.path.join(tune.tune_dir, "best.cfg"), best_flagfile(best, config, tune))
    print(format_table(rows, best, searched_fields(config.regularizer)))
    if best:
        print(
            f"best trial {best['trial_id']}: {OBJECTIVE}={best['objective']:.4f}; train it with:\n"
            f"  python -m kft.train --flagfile={os.path.join(tune.tune_dir, 'best.cfg')}"
        )
    else:
        print("no trial completed; no best.cfg written")
    return {"rows": rows, "best": best}


def best_row(rows: list[dict]) -> dict | None:
    """The completed trial with the highest objective; on a tie, the one trained longest, then
    the earliest (a Hyperband round-0 trial and its promoted rerun can score the same)."""
    completed = [r for r in rows if r["status"] == "COMPLETED" and r["objective"] is not None]
    if not completed:
        return None
    return max(completed, key=lambda r: (r["objective"], r["epochs"] or 0, -int(r["trial_id"])))


def best_flagfile(best: dict, config: Config, tune: TuneConfig) -> str:
    """The full resolved kft.train flags with the best trial's lr_scale and strength."""
    model_dir = os.path.abspath(os.path.join(tune.tune_dir, "best"))
    epochs_note = ""
    if best["epochs"] is not None and best["epochs"] < config.total_epochs:
        epochs_note = (
            f" That trial trained {best['epochs']} of the schedule's {config.total_epochs} "
            "epochs (a Hyperband budget); this file trains the full schedule."
        )
    header = (
        f"# The best trial ({best['trial_id']}) of the kft.tune search in {os.path.abspath(tune.tune_dir)} "
        f"({tune.tuner}, {OBJECTIVE}={best['objective']:.4f}).{epochs_note}\n"
        f"# Purpose: train the tuned recipe. Command: python -m kft.train --flagfile=THIS_FILE\n"
        f"# Expected: validation accuracy near the trial's {best['objective']:.4f}. Hardware: as the search.\n"
    )
    searched = {name: float(best[name]) for name in searched_fields(config.regularizer)}
    body = runfiles.flagfile_of(dataclasses.replace(config, **searched, model_dir=model_dir))
    return header + body.partition("\n")[2]


def format_table(rows: list[dict], best: dict | None, searched: tuple[str, ...]) -> str:
    """The trials as a fixed-width text table, one column per searched field; the best is marked *."""
    widths = {name: max(len(name), 9) + 1 for name in searched}
    names = " ".join(f"{name:>{width}}" for name, width in widths.items())
    lines = [f"{'trial':>6} {names} {'epochs':>6} {OBJECTIVE:>18} {'seconds':>8}  status"]
    for r in rows:
        mark = "*" if best and r["trial_id"] == best["trial_id"] else " "
        values = " ".join(f"{r[name]:>{width}.4g}" for name, width in widths.items())
        objective = f"{r['objective']:.4f}" if r["objective"] is not None else "-"
        seconds = f"{r['wall_seconds']:.1f}" if r["wall_seconds"] is not None else "-"
        epochs = str(r["epochs"]) if r["epochs"] is not None else "-"
        lines.append(f"{mark}{r['trial_id']:>5} {values} {epochs:>6} {objective:>18} {seconds:>8}  {r['status']}")
    return "\n".join(lines)


def write_hparams_config(tune: TuneConfig, config: Config) -> None:
    """Declares the HParams dashboard's columns once, in TUNE_DIR/tb."""
    logdir = os.path.join(tune.tune_dir, "tb")
    if os.path.isdir(logdir) and any(n.startswith("events.") for n in os.listdir(logdir)):
        return
    space = tune.space
    hparams = [hparams_api.HParam("lr_scale", hparams_api.RealInterval(space.lr_scale_min, space.lr_scale_max))]
    field = regularizers.strength_field(config.regularizer)
    if field:  # From 0: the regularizer switched off.
        hparams.append(hparams_api.HParam(field, hparams_api.RealInterval(0.0, space.strength_max)))
    epochs = hparams_api.IntInterval(min_budget(config.stages), config.total_epochs)
    hparams.append(hparams_api.HParam("epochs", epochs))
    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(
            hparams=hparams,
            metrics=[hparams_api.Metric(OBJECTIVE, display_name="best val accuracy")],
        )


def write_trial_hparams(tune_dir: str, trial_id: str, values: dict, objective: float, epochs: int) -> None:
    """One HParams session per finished trial (its searched `values`), in TUNE_DIR/tb/<trial id>."""
    writer = tf.summary.create_file_writer(os.path.join(tune_dir, "tb", trial_id))
    with writer.as_default():
        hparams_api.hparams({**values, "epochs": epochs}, trial_id=f"trial {trial_id}")
        tf.summary.scalar(OBJECTIVE, objective, step=epochs)
    writer.close()


def read_trials_csv(path: str) -> list[dict]:
    """trials.csv back as dicts of strings (for tests and tools)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
