"""What a kft.tune search keeps in TUNE_DIR: its record (search.json, which a rerun must match),
the lock that makes it one search per directory, and its outputs (trials.csv, best.cfg, the
TensorBoard HParams).

Files under TUNE_DIR:

    search.json     what this search is (resolved kft.train config + space + tuner); a rerun
                    with anything else is refused
    oracle/         KerasTuner's state (oracle.json, <tuner_id>.json, trial_<id>/trial.json)
    trials/<id>/    each trial's kft run (checkpoints, TensorBoard, flags.cfg, metrics.json);
                    `python -m kft.train --flagfile=TUNE_DIR/trials/<id>/flags.cfg` redoes it;
                    ranked by cross-validation, one run per fold in trials/<id>/fold-<i>
    pretrain/       the source-task run, when the flags set --pretrain_dataset
    tb/             TensorBoard HParams: `tensorboard --logdir TUNE_DIR/tb`
    trials.csv      one row per trial
    best.cfg        the best trial's flags for `python -m kft.train --flagfile=TUNE_DIR/best.cfg`
"""

import csv
import dataclasses
import io
import math
import os
import statistics
import time

import keras_tuner as kt
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from kft import checkpoint, regularizers, rundir, runfiles, search_space
from kft.config import Config

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


# ----------------------------------------------------------------------------------------------
# The search's identity and its directory.


def fingerprint(config: Config, tune: search_space.TuneConfig) -> dict:
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
        saved.get("config", {}), current.get("config", {}), saved.get("identity", {}), current.get("identity", {}).get
    )


def prepare_tune_dir(tune: search_space.TuneConfig, current: dict) -> rundir.DirLock:
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


def wait_for_search(tune: search_space.TuneConfig, current: dict, timeout: float = 3600.0) -> None:
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
# Outputs.


def csv_columns(regularizer: str) -> tuple[str, ...]:
    """trials.csv's header: the searched fields are named as kft.train's flags."""
    return (
        "trial_id",
        *search_space.searched_fields(regularizer),
        "objective",
        "ranked_on",
        "epochs",
        "wall_seconds",
        "status",
    )


def trial_rows(oracle: kt.Oracle, regularizer: str) -> list[dict]:
    """One row per trial in the oracle, in trial order."""
    rows = []
    for trial_id in sorted(oracle.trials, key=int):
        trial = oracle.trials[trial_id]

        def last(name, trial=trial):
            return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None

        epochs, ranked_on = last("epochs"), last("ranked_on")
        rows.append(
            {
                "trial_id": trial_id,
                **search_space.trial_values(trial.hyperparameters.values, regularizer),
                "objective": trial.score if trial.status == "COMPLETED" else None,
                "ranked_on": int(ranked_on) if ranked_on is not None else None,
                "epochs": int(epochs) if epochs is not None else None,
                "wall_seconds": last("wall_seconds"),
                "status": trial.status,
            }
        )
    return rows


def objective_name(folds: list | None) -> str:
    """What a trial's objective is: its best validation accuracy, or with cross-validation
    folds (kft.crossval) the folds' pooled held-out accuracy."""
    return f"cv{len(folds)}_accuracy" if folds else search_space.OBJECTIVE


def objective_display_name(folds: list | None) -> str:
    """The objective in words, for the HParams dashboard."""
    return f"{len(folds)}-fold cross-validated accuracy" if folds else "best val accuracy"


def write_outputs(oracle: kt.Oracle, config: Config, tune: search_space.TuneConfig, folds: list | None = None) -> dict:
    """Writes trials.csv and best.cfg, prints the table; returns {"rows", "best"}.

    Args:
      folds: the cross-validation folds the trials were ranked on, if any (names the objective).
    """
    rows = trial_rows(oracle, config.regularizer)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(config.regularizer), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.write_text(os.path.join(tune.tune_dir, "trials.csv"), buffer.getvalue())

    name = objective_name(folds)
    best, note = choose_best(rows, search_space.searched_fields(config.regularizer), name)
    if best:
        checkpoint.write_text(os.path.join(tune.tune_dir, "best.cfg"), best_flagfile(best, config, tune, name))
    print(format_table(rows, best, search_space.searched_fields(config.regularizer), name))
    if note:
        print(note)
    if best:
        print(
            f"best trial {best['trial_id']}: {name}={best['objective']:.4f}; train it with:\n"
            f"  python -m kft.train --flagfile={os.path.join(tune.tune_dir, 'best.cfg')}"
        )
    else:
        print("no trial completed; no best.cfg written")
    return {"rows": rows, "best": best}


# The chance that a trial no better than the flags' own settings replaces them. With one
# challenger, a margin of one standard error of an accuracy gives it (the difference of two
# accuracies has sqrt(2) standard errors: P(Z > 1 / sqrt(2)) = 0.24).
CHANCE_OF_A_FALSE_CHANGE = 1.0 - statistics.NormalDist().cdf(1.0 / math.sqrt(2.0))


def replacement_margin(mean: float, num_images: int, num_challengers: int) -> float:
    """How far a trial must score above the flags' own settings to replace them.

    The one-standard-error rule for one challenger, widened for several (Sidak) so the chance
    that the best of `num_challengers` trials, all no better than the flags' settings, clears
    it stays at most CHANCE_OF_A_FALSE_CHANGE. Simulated (binomial accuracies on 30-500 images
    at 0.8-0.9, 200,000 draws): the top of 3 such trials beats the first by one standard error
    45-46% of the time and by this margin 19-25%; the top of 19, 78-79% and 11-15%.
    Cross-validation scores on the same images are correlated and err less, so the margin errs
    toward the flags.
    """
    per_comparison = 1.0 - (1.0 - CHANCE_OF_A_FALSE_CHANGE) ** (1.0 / max(1, num_challengers))
    z = statistics.NormalDist().inv_cdf(1.0 - per_comparison)
    return z * math.sqrt(2.0 * mean * (1.0 - mean) / num_images)


def choose_best(rows: list[dict], searched: tuple[str, ...], objective: str) -> tuple[dict | None, str | None]:
    """The trial best.cfg trains, and a line saying why when it is not the top-scoring one.

    The first trial is the run as its flags give it (kft.search_space). A trial that scores
    above it by no more than `replacement_margin` is not evidence enough to replace it: on
    small sets that is most differences (one image of 30 is 3.3 points), and the flags'
    settings, kft.train's recipe by default, are the better bet (the one-standard-error rule:
    Hastie, Tibshirani and Friedman, The Elements of Statistical Learning, 7.10, with a margin
    that grows with the number of trials compared, since the best of many scores high by chance).

    Args:
      rows: `trial_rows`.
      searched: the searched fields, whose values identify the first trial's settings.
      objective: the objective's name, for the line.

    Returns:
      (the chosen row, None when no trial completed; the line, or None).
    """
    best = best_row(rows)
    first = next((r for r in rows if r["trial_id"] == "0"), None)
    if best is None or first is None or not best["ranked_on"]:
        return best, None

    def settings(row: dict) -> tuple:
        return tuple(row[name] for name in searched)

    # The first trial's settings at their longest budget (Hyperband may have promoted them).
    own = max(
        (r for r in _completed(rows) if settings(r) == settings(first)),
        key=lambda r: (r["epochs"] or 0, r["objective"]),
        default=None,
    )
    if own is None or settings(best) == settings(own):
        return best, None
    challengers = len({settings(r) for r in _completed(rows)} - {settings(own)})
    mean = (best["objective"] + own["objective"]) / 2
    margin = replacement_margin(mean, best["ranked_on"], challengers)
    if best["objective"] - own["objective"] > margin:
        return best, None
    return own, (
        f"trial {best['trial_id']} scored {objective}={best['objective']:.4f}, within {margin:.3f} of the "
        f"flags' own settings (trial {own['trial_id']}, {own['objective']:.4f}; the margin for "
        f"{challengers} other setting{'s' if challengers != 1 else ''} tried, on {best['ranked_on']} images): "
        "best.cfg keeps them"
    )


def _completed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "COMPLETED" and r["objective"] is not None]


def best_row(rows: list[dict]) -> dict | None:
    """The completed trial with the highest objective; on a tie, the one trained longest, then
    the earliest (a Hyperband round-0 trial and its promoted rerun can score the same)."""
    completed = _completed(rows)
    if not completed:
        return None
    return max(completed, key=lambda r: (r["objective"], r["epochs"] or 0, -int(r["trial_id"])))


def best_flagfile(
    best: dict, config: Config, tune: search_space.TuneConfig, objective: str = search_space.OBJECTIVE
) -> str:
    """The full resolved kft.train flags with the best trial's lr_scale and strength (`objective`
    names what the trials were ranked on)."""
    model_dir = os.path.abspath(os.path.join(tune.tune_dir, "best"))
    epochs_note = ""
    if best["epochs"] is not None and best["epochs"] < config.total_epochs:
        epochs_note = (
            f" That trial trained {best['epochs']} of the schedule's {config.total_epochs} "
            "epochs (a Hyperband budget); this file trains the full schedule."
        )
    header = (
        f"# The best trial ({best['trial_id']}) of the kft.tune search in {os.path.abspath(tune.tune_dir)} "
        f"({tune.tuner}, {objective}={best['objective']:.4f}).{epochs_note}\n"
        f"# Purpose: train the tuned recipe. Command: python -m kft.train --flagfile=THIS_FILE\n"
        f"# Expected: {_expected(objective, best['objective'])}. Hardware: as the search.\n"
    )
    searched = {name: float(best[name]) for name in search_space.searched_fields(config.regularizer)}
    body = runfiles.flagfile_of(dataclasses.replace(config, **searched, model_dir=model_dir))
    return header + body.partition("\n")[2]


def _expected(objective: str, value: float) -> str:
    if objective == search_space.OBJECTIVE:
        return f"validation accuracy near the trial's {value:.4f}"
    return (
        f"accuracy on new images near the trial's cross-validated {value:.4f} (each fold trained on "
        "fewer images than this run, so usually a little above); no validation split, every image trains"
    )


def format_table(
    rows: list[dict], best: dict | None, searched: tuple[str, ...], objective: str = search_space.OBJECTIVE
) -> str:
    """The trials as a fixed-width text table, one column per searched field; the best is marked *."""
    widths = {name: max(len(name), 9) + 1 for name in searched}
    names = " ".join(f"{name:>{width}}" for name, width in widths.items())
    lines = [f"{'trial':>6} {names} {'epochs':>6} {objective:>18} {'seconds':>8}  status"]
    for r in rows:
        mark = "*" if best and r["trial_id"] == best["trial_id"] else " "
        values = " ".join(f"{r[name]:>{width}.4g}" for name, width in widths.items())
        objective = f"{r['objective']:.4f}" if r["objective"] is not None else "-"
        seconds = f"{r['wall_seconds']:.1f}" if r["wall_seconds"] is not None else "-"
        epochs = str(r["epochs"]) if r["epochs"] is not None else "-"
        lines.append(f"{mark}{r['trial_id']:>5} {values} {epochs:>6} {objective:>18} {seconds:>8}  {r['status']}")
    return "\n".join(lines)


def write_hparams_config(tune: search_space.TuneConfig, config: Config, folds: list | None = None) -> None:
    """Declares the HParams dashboard's columns once, in TUNE_DIR/tb.

    Args:
      folds: the cross-validation folds the trials are ranked on, if any (names the metric).
    """
    logdir = os.path.join(tune.tune_dir, "tb")
    if os.path.isdir(logdir) and any(n.startswith("events.") for n in os.listdir(logdir)):
        return
    space = tune.space
    hparams = [hparams_api.HParam("lr_scale", hparams_api.RealInterval(space.lr_scale_min, space.lr_scale_max))]
    field = regularizers.strength_field(config.regularizer)
    if field:  # From 0: the regularizer switched off.
        hparams.append(hparams_api.HParam(field, hparams_api.RealInterval(0.0, space.strength_max)))
    epochs = hparams_api.IntInterval(search_space.min_budget(config.stages), config.total_epochs)
    hparams.append(hparams_api.HParam("epochs", epochs))
    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(
            hparams=hparams,
            metrics=[hparams_api.Metric(search_space.OBJECTIVE, display_name=objective_display_name(folds))],
        )


def write_trial_hparams(tune_dir: str, trial_id: str, values: dict, objective: float, epochs: int) -> None:
    """One HParams session per finished trial (its searched `values`), in TUNE_DIR/tb/<trial id>."""
    writer = tf.summary.create_file_writer(os.path.join(tune_dir, "tb", trial_id))
    with writer.as_default():
        hparams_api.hparams({**values, "epochs": epochs}, trial_id=f"trial {trial_id}")
        tf.summary.scalar(search_space.OBJECTIVE, objective, step=epochs)
    writer.close()


def read_trials_csv(path: str) -> list[dict]:
    """trials.csv back as dicts of strings (for tests and tools)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
