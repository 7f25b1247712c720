"""One `kft.train` invocation: optional source-task pretraining, the fine-tune, export, and an
optional from-scratch comparison. Each part is a `trainer.train` run in its own directory, so
each resumes on its own after an interruption.

    MODEL_DIR/pretrain/   the source-task run (--pretrain_dataset); its backbone.weights.h5 is
                          the fine-tune's --weights
    MODEL_DIR/            the fine-tune
    MODEL_DIR/scratch/    the same backbone from random init on the target, all layers
                          trainable, same total epochs (--compare_scratch)
"""

import dataclasses
import hashlib
import os
import shutil

import numpy as np
from absl import logging

from kft import checkpoint, export, finetuner, rundir, runfiles, schedule, trainer
from kft.config import Config


def source_config(config: Config, model_dir: str) -> Config:
    """The source-task run of `--pretrain_dataset` (also used by kft.tune), in `model_dir`."""
    return dataclasses.replace(
        config,
        dataset=config.pretrain_dataset,
        stages=config.pretrain_stages,
        batch_size=config.pretrain_batch_size or config.batch_size,
        checkpoint_selection="auto",
        train_limit_per_class=0,
        # The source task holds out its own validation split even where the target has none.
        val_fraction=config.val_fraction or Config.val_fraction,
        # Nothing pretrained to stay close to yet: the source task trains freely.
        l2sp_alpha=0.0,
        regularizer="none",
        model_dir=model_dir,
        pretrain_dataset="",
        compare_scratch=False,
    )


def fine_tune_config(config: Config) -> Config:
    """The fine-tune of `config` as trainer.train runs it (and records it in run.json): after
    a source task (--pretrain_dataset) it starts from that task's backbone."""
    if not config.pretrain_dataset:
        return config
    return dataclasses.replace(config, weights=os.path.join(config.model_dir, "pretrain", "backbone.weights.h5"))


def scratch_config(config: Config) -> Config:
    """The from-scratch baseline of `--compare_scratch`, in MODEL_DIR/scratch: random init, no
    regularizer (there is no pretrained start to stay close to), nothing exported.

    From-scratch training needs BatchNorm statistics that adapt; it uses the learning rate of
    the source-task recipe when there is one (a from-scratch recipe), else 1e-3.
    """
    lr = config.pretrain_stages[0].lr if config.pretrain_stages else 1e-3
    return dataclasses.replace(
        config,
        weights=None,
        stages=scratch_stages(config.stages, lr),
        l2sp_alpha=0.0,
        regularizer="none",
        model_dir=os.path.join(config.model_dir, "scratch"),
        pretrain_dataset="",
        compare_scratch=False,
        export_dir="none",
    )


def scratch_stages(stages: tuple[schedule.Stage, ...], lr: float) -> tuple[schedule.Stage, ...]:
    """The from-scratch baseline's schedule: every block trained (BatchNorm too) at `lr` for as
    long as the fine-tune's stages train (the probe fits nothing from scratch)."""
    trained = [stage for stage in stages if stage.what != "probe"]
    if not any(stage.steps for stage in trained):
        return (schedule.Stage("all", sum(stage.epochs for stage in trained), lr, bn="train"),)
    return tuple(
        dataclasses.replace(stage, what="all", top_blocks=0, from_block="", lr=lr, bn="train") for stage in trained
    )


# Seconds a run waits for another run's export into the same --export_dir to finish.
EXPORT_LOCK_WAIT = 1800.0


def export_base(config: Config) -> str | None:
    """Where the SavedModel versions go, or None with --export_dir=none."""
    if config.export_dir == "none":
        return None
    return config.export_dir or os.path.join(config.model_dir, "export")


def check_before_work(config: Config, class_names, build_model: bool = False) -> None:
    """Everything about the outputs that can be known before training, checked without writing.

    Args:
      config: the run.
      class_names: the training data's classes.
      build_model: also build the model (without ImageNet weights) to check the stages against
        its blocks and a --weights file against the backbone, as trainer.train does first;
        costs one model build, so kft.train does it when a failure later would cost more (an
        --overwrite, a source task to train first). With --weights=imagenet the backbone is
        built with them in any case, so a machine that can neither find nor download them
        stops here.

    Raises:
      ValueError: one line naming the flag.
    """
    rundir.check_writable_dir(config.model_dir, f"--model_dir={config.model_dir}")
    for flag, spec in (("dataset", config.dataset), ("pretrain_dataset", config.pretrain_dataset)):
        root = spec[len("folder:") :].strip() if spec.startswith("folder:") else None
        if root and rundir.is_inside(config.model_dir, os.path.expanduser(root)):
            raise ValueError(
                f"--model_dir={config.model_dir} is inside --{flag}={spec}: the run's "
                "files would be read as data; put the run elsewhere"
            )
        base = export_base(config)
        if root and base and config.export_dir and rundir.is_inside(base, os.path.expanduser(root)):
            raise ValueError(f"--export_dir={config.export_dir} is inside --{flag}={spec}; put the export elsewhere")
    base = export_base(config)
    if base:
        flag = (
            f"--export_dir={config.export_dir}"
            if config.export_dir
            else f"--model_dir={config.model_dir} (its export/)"
        )
        rundir.check_writable_dir(base, flag)
    if base or config.export_tflite != "off":
        export.check_class_names(class_names)
    if build_model:
        finetuner.check_model(config, len(class_names))
    finetuner.check_weights_reachable(config)


def run(config: Config, flagfile_text: str = "", splits=None) -> dict:
    """Runs everything `config` asks for and returns the fine-tune's metrics.

    Args:
      config: the run.
      flagfile_text: written to MODEL_DIR/flags.cfg.
      splits: the target data (kft.data.Splits) when already loaded, else None.
    """
    if config.pretrain_dataset:
        source = source_config(config, os.path.join(config.model_dir, "pretrain"))
        logging.info("source task: training %s on %s", config.backbone, source.dataset)
        source_metrics = trainer.train(source)
        print(f"source task {source.dataset}: best val accuracy {_accuracy(source_metrics)}")
        config = fine_tune_config(config)

    previous = _previous_metrics(config.model_dir)
    metrics = trainer.train(config, splits=splits, flagfile_text=flagfile_text)
    print(f"fine-tuned on {config.dataset}: best val accuracy {_accuracy(metrics)}")

    if config.export_dir != "none" or config.export_tflite != "off":
        classifier, class_names, image_size = runfiles.load_classifier(config.model_dir)
        images, labels = _validation_batch(config)
    if config.export_dir != "none":
        base = export_base(config)
        digest = _file_digest(os.path.join(config.model_dir, "model.weights.h5"))
        version_dir = _unchanged_export(previous, base, digest)
        if version_dir:
            print(f"the model is unchanged since its export {version_dir}; not exported again")
        else:
            # One export at a time per base: another run's clean-up must not delete an export
            # in flight. An export takes seconds to minutes; a run waits that long for its turn.
            with rundir.DirLock(base, f"--export_dir={base}", rundir.EXPORT_LOCK, wait=EXPORT_LOCK_WAIT):
                _remove_interrupted_exports(base)
                version_dir = export.export_saved_model(classifier, class_names, base, images, image_size=image_size)
            print(f"exported SavedModel to {version_dir}")
        metrics["export"] = version_dir
        metrics["export_weights_sha256"] = digest
    if config.export_tflite != "off":
        from kft import tflite  # The TFLite converter is only loaded when asked for.

        metrics["tflite"] = tflite.export_tflite(
            classifier,
            os.path.join(config.model_dir, "tflite"),
            images,
            quantize="none" if config.export_tflite == "float32" else "dynamic",
            check_labels=labels,
            class_names=class_names,
        )
        print(f"exported TFLite models to {os.path.join(config.model_dir, 'tflite')}")

    if config.compare_scratch:
        scratch = scratch_config(config)
        logging.info("baseline: training %s from scratch on %s", config.backbone, config.dataset)
        scratch_metrics = trainer.train(scratch, splits=splits)
        metrics["scratch_best_val_accuracy"] = scratch_metrics["best_val_accuracy"]
        print(
            f"transfer check on {config.dataset}: fine-tuned {_accuracy(metrics)} vs "
            f"from scratch {_accuracy(scratch_metrics)} (same backbone and training length)"
        )
    checkpoint.write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    return metrics


def _accuracy(metrics: dict) -> str:
    value = metrics["best_val_accuracy"]
    return "n/a (no validation split)" if value is None else f"{value:.4f}"


def _previous_metrics(model_dir: str) -> dict:
    """The metrics.json of an earlier invocation of this run, or {}."""
    try:
        previous = checkpoint.read_json(os.path.join(model_dir, "metrics.json"))
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unchanged_export(previous: dict, base: str, digest: str) -> str | None:
    """The version an earlier invocation exported from these very weights into `base`, if it is
    still there: rerunning a finished run's command adds no identical version."""
    version_dir = previous.get("export")
    if previous.get("export_weights_sha256") != digest or not isinstance(version_dir, str):
        return None
    if os.path.realpath(os.path.dirname(version_dir)) != os.path.realpath(base):
        return None
    return version_dir if os.path.isfile(os.path.join(version_dir, "saved_model.pb")) else None


def _remove_interrupted_exports(export_base: str) -> None:
    """Deletes temporary directories an interrupted export of this run left behind."""
    if os.path.isdir(export_base):
        for name in os.listdir(export_base):
            if name.startswith(export.TMP_PREFIX):
                shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)


def _validation_batch(config: Config, limit: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A batch of validation images and labels (training images without a validation split)
    to check exports against the Keras model."""
    splits = trainer.load_splits(config, batch_size=limit)
    images, labels = next(iter(splits.val if splits.val is not None else splits.train_in_order))
    return np.asarray(images), np.asarray(labels)
