"""What a run directory holds besides its checkpoints (kft.checkpoint): its Config (run.json),
its class list, and the kept classifier rebuilt from them for kft.evaluate, kft.predict and the
exports.
"""

import os

import keras

from kft import checkpoint, model
from kft.config import Config

RUN_JSON = "run.json"


def write_config(config: Config) -> None:
    """Writes MODEL_DIR/run.json (atomically)."""
    checkpoint.write_json(os.path.join(config.model_dir, RUN_JSON), config.to_json())


def read_config(model_dir: str) -> Config | None:
    """The Config a run recorded in run.json; None for a run without one (kft before run.json).

    Raises:
      ValueError: an unreadable run.json (one line).
    """
    path = os.path.join(model_dir, RUN_JSON)
    if not os.path.exists(path):
        return None
    try:
        return Config.from_json(checkpoint.read_json_or_fail(path, "the run's configuration"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


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
      (classifier mapping raw uint8 images to probabilities, class names, image size).
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
    settings = recorded_settings(model_dir, {"dropout": 0.2, "hidden_units": 0})
    head = model.HeadConfig(len(meta["class_names"]), settings["dropout"], settings["hidden_units"])
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        classifier = model.build_classifier(meta["backbone"], meta["image_size"], None, head)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    checkpoint.load_model_weights(classifier, weights_path)
    return classifier, tuple(meta["class_names"]), meta["image_size"]
