"""What a run directory holds besides its checkpoints (kft.checkpoint): its Config (run.json)
and whether a command may resume it (checked, with the directory locked, by `prepare_model_dir`),
its class list, and the kept classifier rebuilt from them for kft.evaluate, kft.predict and the
exports.
"""

import dataclasses
import os
from collections.abc import Callable

import keras
from absl import logging

from kft import checkpoint, data_folder, model, rundir, schedule
from kft.config import Config

RUN_JSON = "run.json"

# Config fields a rerun may change and still resume the run: where it is, what it prints and
# what it exports once trained.
RESUME_FREE_FIELDS = ("model_dir", "export_dir", "export_tflite", "verbose")
# Config fields that name data or a weights file: compared by what they name, not their spelling.
DATA_FIELDS = ("dataset", "pretrain_dataset")
PATH_FIELDS = (*DATA_FIELDS, "weights", "data_dir")


def write_config(config: Config) -> None:
    """Writes MODEL_DIR/run.json (atomically): the Config with its paths made absolute, and
    what its folder datasets hold (`data_identity`), so a moved folder is the same data."""
    absolute = {
        name: rundir.absolute_path_value(name, getattr(config, name))
        for name in PATH_FIELDS
        if isinstance(getattr(config, name), str)
    }
    record = {**dataclasses.replace(config, **absolute).to_json(), "identity": data_identity(config)}
    checkpoint.write_json(os.path.join(config.model_dir, RUN_JSON), record)


def read_config(model_dir: str) -> Config | None:
    """The Config a run recorded in run.json; None for a run without one (kft before run.json).

    Raises:
      ValueError: an unreadable run.json (one line).
    """
    recorded = recorded_run(model_dir)
    return None if recorded is None else recorded[0]


def recorded_run(model_dir: str) -> tuple[Config, dict] | None:
    """The Config a run recorded in run.json and what its folder datasets held then
    (`data_identity`; {} if not recorded); None for a run without one.

    Raises:
      ValueError: an unreadable run.json (one line).
    """
    path = os.path.join(model_dir, RUN_JSON)
    if not os.path.exists(path):
        return None
    try:
        record = checkpoint.read_json_or_fail(path, "the run's configuration")
        return Config.from_json(record), record.get("identity") or {}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def flagfile_of(config: Config) -> str:
    """The kft.train flagfile of `config`: `python -m kft.train --flagfile=THIS_FILE` runs the
    same Config (paths absolute, --recipe=none: a Config is already resolved). MODEL_DIR/flags.cfg,
    kft.tune's trial flags and best.cfg are written by it."""
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    values["recipe"] = "none"
    lines = ["# Resolved kft.train flags; `python -m kft.train --flagfile=THIS_FILE` reproduces the run."]
    lines += [
        _flag_line(name, values[name]) for name in sorted(values) if values[name] is not None or name == "weights"
    ]
    return "\n".join(lines) + "\n"


def _flag_line(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if name in ("stages", "pretrain_stages"):
        value = ",".join(stage.describe() for stage in value)
    elif name in ("augment", "test_views"):
        value = ",".join(value) or "none"
    elif name == "weights" and value is None:
        value = "none"
    elif isinstance(value, float):
        value = repr(value)
    elif isinstance(value, str):
        value = rundir.absolute_path_value(name, value)
    return f"--{name}={value}"


def data_identity(config: Config) -> dict:
    """What each folder dataset of `config` holds (kft.data_folder.folder_identity; None for others)."""
    return {name: _folder_identity(getattr(config, name)) for name in DATA_FIELDS}


def _folder_identity(spec: str) -> str | None:
    try:
        return data_folder.folder_identity(spec) if spec else None
    except ValueError:  # Not a data spec (a library caller's placeholder): no folder.
        return None


def comparable_fields(config: Config, free_fields=()) -> dict:
    """The Config as plain values to compare two runs by (stages in `--stages` syntax), without
    `free_fields`."""
    fields = {}
    for field in dataclasses.fields(config):
        if field.name in free_fields:
            continue
        value = getattr(config, field.name)
        if isinstance(value, tuple):
            value = [v.describe() if isinstance(v, schedule.Stage) else v for v in value]
        fields[field.name] = value
    return fields


def first_difference(
    saved: dict, current: dict, saved_identity: dict, current_identity: Callable[[str], str | None]
) -> str | None:
    """Names the first field that differs between two `comparable_fields`, e.g.
    "--stages: saved X, now Y"; None if none does.

    A path spelled differently (relative or absolute, a trailing slash, a link) is the same
    path, and a folder dataset moved elsewhere is the same data if it holds the same files.
    `current_identity(field)` is the current folder's identity, asked only for a moved folder
    (listing 50k files takes a second).
    """
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new or _same_path(key, old, new, saved_identity, current_identity):
            continue
        return f"--{key}: saved {old!r}, now {new!r}"
    return None


def _same_path(key: str, old, new, saved_identity: dict, current_identity: Callable[[str], str | None]) -> bool:
    if key not in PATH_FIELDS or not isinstance(old, str) or not isinstance(new, str):
        return False
    if rundir.absolute_path_value(key, old, os.path.realpath) == rundir.absolute_path_value(key, new, os.path.realpath):
        return True
    saved_id = saved_identity.get(key)
    return saved_id is not None and saved_id == current_identity(key)


def resume_conflict(model_dir: str, config: Config) -> str | None:
    """Why `config` may not resume the run in `model_dir`: the first setting that differs from
    its run.json (e.g. "--stages: saved X, now Y"), or None when it may (or nothing is there).
    An unreadable run.json is a conflict too: nothing there can be resumed (its error is the
    reason).
    """
    try:
        recorded = recorded_run(model_dir)
    except ValueError as e:
        return str(e)
    if recorded is None:
        if os.path.exists(os.path.join(model_dir, "flags.cfg")):
            return "it was written by a kft without run.json, whose settings cannot be compared"
        return None
    saved, saved_identity = recorded
    return first_difference(
        comparable_fields(saved, RESUME_FREE_FIELDS),
        comparable_fields(config, RESUME_FREE_FIELDS),
        saved_identity,
        lambda field: _folder_identity(getattr(config, field)),
    )


def prepare_model_dir(model_dir: str, fine_tune: Config, overwrite: bool) -> rundir.DirLock:
    """Checks the run directory belongs to this command, locks it, and with `overwrite` clears
    what kft wrote there; kft.train calls it once everything else has been checked.

    Args:
      fine_tune: the Config the fine-tune runs (kft.experiment.fine_tune_config), compared with
        the one a run there recorded (`resume_conflict`).

    Returns:
      The directory's lock, held while the run works there.

    Raises:
      ValueError: the directory holds another run or files kft did not write, is in use, or is
        not writable (one line; nothing is changed).
    """
    flag = f"--model_dir={model_dir}"
    try:
        rundir.check_owned(model_dir, flag, "run", overwrite)
        rundir.check_writable_dir(model_dir, flag)
        lock = rundir.DirLock(model_dir, flag)
    except OSError as e:
        raise ValueError(f"{flag} is not writable: {e.strerror}") from None
    try:
        if not overwrite:
            conflict = resume_conflict(model_dir, fine_tune)
            if conflict:
                raise ValueError(
                    f"{flag} holds a run with other flags ({conflict}); "
                    "rerun with its flags to resume, pass --overwrite to start over, or use another --model_dir"
                )
            rundir.check_resumable(model_dir, flag)
    except ValueError:
        lock.release()
        raise
    if overwrite:
        removed = rundir.remove_owned(model_dir, "run")
        if removed:
            logging.info("--overwrite: removed %s from %s", ", ".join(removed), model_dir)
    rundir.mark(model_dir)
    return lock


def recorded_recipe_block(model_dir: str) -> str:
    """The recipe block the run in `model_dir` printed, as its flags.cfg keeps it (the comment
    lines after the first); "" if it has none (a run with --recipe=none)."""
    try:
        with open(os.path.join(model_dir, "flags.cfg")) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return ""
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line.removeprefix("#").removeprefix(" "))
    return "\n".join(block)


def flag_text(name: str, value) -> str:
    """A Config field's value as its kft.train flag takes it (the text after `--name=`)."""
    return _flag_line(name, value).partition("=")[2]


def recorded_settings(model_dir: str, defaults: dict) -> dict:
    """The Config fields named in `defaults` as the run in `model_dir` recorded them: its
    run.json, or for a run from kft before run.json the flags.cfg lines given (read as the
    default's type); a field recorded nowhere keeps its default.

    Raises:
      ValueError: an unreadable run.json (one line).
    """
    config = read_config(model_dir)
    if config is not None:
        return {name: getattr(config, name) for name in defaults}
    values = dict(defaults)
    path = os.path.join(model_dir, "flags.cfg")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                name, _, value = line.removeprefix("--").partition("=")
                if line.startswith("--") and name in defaults:
                    values[name] = type(defaults[name])(value)
    return values


def check_same_classes(model_dir: str, class_names) -> None:
    """Refuses to resume a run whose data now has other classes, before any file is written
    (the run's classes.json, read by kft.evaluate and the exports, must stay its own).

    Raises:
      ValueError: one line naming the classes added or gone.
    """
    path = os.path.join(model_dir, "classes.json")
    if not os.path.exists(path):
        return
    saved = checkpoint.read_json_or_fail(path, "the run's class list")
    before = list(saved.get("class_names", [])) if isinstance(saved, dict) else []
    if before == list(class_names):
        return
    added = [n for n in class_names if n not in before]
    gone = [n for n in before if n not in class_names]
    change = (
        "; ".join(
            x for x in (f"new: {', '.join(added)}" if added else "", f"gone: {', '.join(gone)}" if gone else "") if x
        )
        or "reordered"
    )
    raise ValueError(
        f"--model_dir={model_dir} holds a run on {len(before)} classes, the data now has "
        f"{len(class_names)} ({change}); pass --overwrite to start over, or use another --model_dir"
    )


def load_classifier(model_dir: str) -> tuple[model.Classifier, tuple[str, ...], int]:
    """Rebuilds the best classifier of a finished kft run (for kft.evaluate, kft.predict and the
    exports), in float32 whatever precision trained it: mixed precision keeps the weights in
    float32, and a float32 graph gives the same answers on every CPU, GPU and server (bfloat16
    ones differ between graph optimizations by ~0.03 in probability, and run slowly without AMX).

    Returns:
      (classifier mapping raw uint8 images to probabilities, averaged over the run's
      --test_views, class names, image size).
    """
    meta_path = os.path.join(model_dir, "classes.json")
    weights_path = os.path.join(model_dir, "model.weights.h5")
    if not (os.path.exists(meta_path) and os.path.exists(weights_path)):
        raise ValueError(f"--model_dir={model_dir} holds no finished kft run (no classes.json / model.weights.h5)")
    if not os.path.exists(os.path.join(model_dir, "metrics.json")):
        raise ValueError(
            f"--model_dir={model_dir} holds an unfinished run (no metrics.json yet); rerun "
            "its kft.train command to finish it"
        )
    meta = checkpoint.read_json_or_fail(meta_path, "the run's class list")
    settings = recorded_settings(model_dir, {"dropout": 0.2, "hidden_units": 0, "test_views": "none"})
    head = model.HeadConfig(len(meta["class_names"]), settings["dropout"], settings["hidden_units"])
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        classifier = model.build_classifier(meta["backbone"], meta["image_size"], None, head)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    checkpoint.load_model_weights(classifier, weights_path)
    views = settings["test_views"]  # A tuple from run.json; a flags.cfg line is text.
    classifier.test_views = model.parse_test_views(views) if isinstance(views, str) else tuple(views)
    return classifier, tuple(meta["class_names"]), meta["image_size"]
