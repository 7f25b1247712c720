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
import os
import shutil

import numpy as np
from absl import logging

from kft import checkpoint, export, schedule, trainer
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
        # Nothing pretrained to stay close to yet: the source task trains freely.
        l2sp_alpha=0.0,
        regularizer="none",
        model_dir=model_dir,
        pretrain_dataset="",
        compare_scratch=False,
    )


def scratch_stages(stages: tuple[schedule.Stage, ...], lr: float) -> tuple[schedule.Stage, ...]:
    """The from-scratch baseline's schedule: every block trained (BatchNorm too) at `lr` for as
    long as the fine-tune's stages train (the probe fits nothing from scratch)."""
    trained = [stage for stage in stages if stage.what != "probe"]
    if not any(stage.steps for stage in trained):
        return (schedule.Stage("all", sum(stage.epochs for stage in trained), lr, bn="train"),)
    return tuple(dataclasses.replace(stage, what="all", top_blocks=0, from_block="", lr=lr, bn="train")
                 for stage in trained)


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
        print(f"source task {source.dataset}: best val accuracy {source_metrics['best_val_accuracy']:.4f}")
        config = dataclasses.replace(config, weights=os.path.join(source.model_dir, "backbone.weights.h5"))

    metrics = trainer.train(config, splits=splits, flagfile_text=flagfile_text)
    print(f"fine-tuned on {config.dataset}: best val accuracy {metrics['best_val_accuracy']:.4f}")

    if config.export_dir != "none" or config.export_tflite != "off":
        classifier, class_names, _ = trainer.load_classifier(config.model_dir)
        images, labels = _validation_batch(config)
    if config.export_dir != "none":
        export_base = config.export_dir or os.path.join(config.model_dir, "export")
        _remove_interrupted_exports(export_base)
        version_dir = export.export_saved_model(classifier, class_names, export_base, images)
        metrics["export"] = version_dir
        print(f"exported SavedModel to {version_dir}")
    if config.export_tflite != "off":
        from kft import tflite  # The TFLite converter is only loaded when asked for.

        metrics["tflite"] = tflite.export_tflite(
            classifier, os.path.join(config.model_dir, "tflite"), images,
            quantize="none" if config.export_tflite == "float32" else "dynamic",
            check_labels=labels, class_names=class_names,
        )
        print(f"exported TFLite models to {os.path.join(config.model_dir, 'tflite')}")

    if config.compare_scratch:
        # From-scratch training needs BatchNorm statistics that adapt; it uses the learning
        # rate of the source-task recipe when there is one (a from-scratch recipe), else 1e-3.
        lr = config.pretrain_stages[0].lr if config.pretrain_stages else 1e-3
        scratch = dataclasses.replace(
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
        logging.info("baseline: training %s from scratch on %s", config.backbone, config.dataset)
        scratch_metrics = trainer.train(scratch, splits=splits)
        metrics["scratch_best_val_accuracy"] = scratch_metrics["best_val_accuracy"]
        print(
            f"transfer check on {config.dataset}: fine-tuned {metrics['best_val_accuracy']:.4f} vs "
            f"from scratch {scratch_metrics['best_val_accuracy']:.4f} (same backbone and training length)"
        )
    checkpoint.write_json(os.path.join(config.model_dir, "metrics.json"), metrics)
    return metrics


def _remove_interrupted_exports(export_base: str) -> None:
    """Deletes temporary directories an interrupted export of this run left behind."""
    if os.path.isdir(export_base):
        for name in os.listdir(export_base):
            if name.startswith(export.TMP_PREFIX):
                shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)


def _validation_batch(config: Config, limit: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A batch of validation images and labels to check exports against the Keras model."""
    splits = trainer.load_splits(config, batch_size=limit)
    images, labels = next(iter(splits.val))
    return np.asarray(images), np.asarray(labels)
