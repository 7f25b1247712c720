"""`python -m kft.evaluate (--export_dir=D | --model_dir=D) --dataset=SPEC`: test-set metrics.

Evaluates an exported SavedModel (a TF Serving base directory, whose latest version is used, or
one version directory) or a finished kft training run on a data source and writes, by default
beside the model (`<version dir>/eval/` or `<model_dir>/eval/`):

    eval.json             accuracy, log loss (mean -ln of the true class's probability),
                          per-class precision/recall/support, confusion matrix,
                          dataset, model path, image size, test-time augmentation (--tta)
                          and the number of undecodable files
    confusion_matrix.png  the confusion matrix, coloured by fraction of the true class

and prints the per-class table. Which examples are evaluated: a TFDS test split, `PATH/test`
(else `PATH/val`) of a split image folder, every image of a flat one (`folder:PATH` with one
subfolder per class), or the held-out split of `digits`; see `kft.data.load_eval`.
"""

import os
import sys
import time

from absl import flags, logging

from kft import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines kft.evaluate's flags; only `python -m kft.evaluate` calls it, so the library below
    can be imported beside kft.train's flags (several names are the same)."""
    flags.DEFINE_string(
        "export_dir",
        None,
        "A SavedModel written by kft: the export base directory (its latest integer version is used) or one version directory. Exactly one of --export_dir and --model_dir.",
    )
    flags.DEFINE_string(
        "model_dir",
        None,
        "A finished kft.train run directory; its best weights are evaluated. Exactly one of --export_dir and --model_dir.",
    )
    flags.DEFINE_string(
        "dataset",
        None,
        "Data to evaluate on, same specs as training: tfds:NAME[,test=SPLIT], folder:PATH (PATH/test or PATH/val if present, else every image under PATH, one subfolder per class), or digits[:CLASSES].",
    )
    flags.DEFINE_string("data_dir", None, "Where TFDS keeps (or finds already downloaded) datasets.")
    cli.define_export_image_size()
    flags.DEFINE_integer("batch_size", 64, "Images per evaluation batch.", lower_bound=1)
    flags.DEFINE_enum(
        "tta",
        "none",
        ["none", "flip"],
        "Test-time augmentation: none, or flip (average the probabilities of each image and its left-right mirror; twice the compute).",
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Where eval.json and confusion_matrix.png go; default: an eval/ folder beside the model (<version dir>/eval or <model_dir>/eval).",
    )
    flags.DEFINE_float(
        "val_fraction",
        None,
        "digits only: the held-out fraction used in training (the split is seeded, so it must match); default: read from the run's run.json, else 0.1.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_integer(
        "seed",
        None,
        "digits only: the training --seed (the held-out split depends on it); default: read from the run's run.json, else 0.",
    )
    flags.mark_flag_as_required("dataset")
    flags.register_multi_flags_validator(
        ["export_dir", "model_dir"],
        lambda values: (values["export_dir"] is None) != (values["model_dir"] is None),
        message="exactly one of --export_dir and --model_dir is required",
    )


# Log a progress line every this many batches.
_PROGRESS_EVERY = 20

# What kft.evaluate writes into its output folder, and the keys that mark an eval.json as its own.
_REPORT, _PNG = "eval.json", "confusion_matrix.png"
_REPORT_KEYS = {"accuracy", "confusion_matrix", "dataset", "model", "tta"}


def _check_output_dir(output_dir: str) -> None:
    """Refuses an output folder whose eval.json or confusion_matrix.png kft.evaluate did not write:
    a report kft wrote before is replaced, a file of the user's of the same name never is."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise cli.UsageError(f"the output folder {output_dir} is a file, not a directory")
    report_path, png_path = os.path.join(output_dir, _REPORT), os.path.join(output_dir, _PNG)
    ours = False
    if os.path.lexists(report_path):
        from kft import checkpoint

        try:
            existing = checkpoint.read_json(report_path)
            ours = isinstance(existing, dict) and _REPORT_KEYS <= existing.keys()
        except (OSError, ValueError):  # unreadable, or not JSON: not a report of kft's
            pass
        if not ours:
            raise cli.UsageError(
                f"{report_path} exists and is not a report kft.evaluate wrote; it is left as it is: "
                "move it or give another --output_dir"
            )
    # kft.evaluate writes eval.json before the picture, so its picture always has its report.
    if os.path.lexists(png_path) and not ours:
        raise cli.UsageError(
            f"{png_path} exists beside no report of kft.evaluate's; it is left as it is: "
            "move it or give another --output_dir"
        )


def _training_settings(run_dir: str, defaults: dict) -> dict:
    """`defaults` with the values the training run in `run_dir` recorded (kft.runfiles)."""
    from kft import runfiles

    try:
        return runfiles.recorded_settings(run_dir, defaults)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def _load_model(export_dir: str | None, model_dir: str | None):
    """Returns (predict: uint8 batch -> probabilities, class names, image size, model path, run dir)."""
    if export_dir is not None:
        from kft import export

        try:
            served = export.load_serving(export_dir)
        except ValueError as e:
            raise cli.UsageError(f"--export_dir={export_dir}: {e}") from None
        # The default export of a run is MODEL_DIR/export/<version>; its run.json, if there,
        # holds the digits split settings.
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(served.path)))
        return served, tuple(served.class_names), served.image_size, served.path, run_dir

    import tensorflow as tf

    from kft import runfiles

    try:
        classifier, class_names, image_size = runfiles.load_classifier(model_dir)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if classifier.test_views:
        logging.info("the run's model averages its predictions over %s (--test_views)", "+".join(classifier.test_views))
    predict = tf.function(lambda images: classifier(images, training=False), reduce_retracing=True)
    return (lambda images: predict(images).numpy()), tuple(class_names), image_size, model_dir, model_dir


def _with_tta(predict, tta: str):
    """`predict` itself for tta="none"; for "flip", the mean of the images' and their mirrors' probabilities."""
    if tta == "none":
        return predict
    import numpy as np
    import tensorflow as tf

    def flip_averaged(images):
        # Two calls rather than one on a doubled batch: same batch shape, no extra retrace or memory.
        mirrored = tf.reverse(images, axis=[2])  # [B, H, W, C]: W is axis 2.
        return (np.asarray(predict(images), np.float32) + np.asarray(predict(mirrored), np.float32)) / 2

    return flip_averaged


def _log_loss(labels, probabilities) -> float:
    """Mean -ln(probability of the true class), each probability floored at 1e-12 (finite JSON)."""
    import numpy as np

    true = probabilities[np.arange(len(labels)), labels.astype(np.int64)]
    return float(np.mean(-np.log(np.clip(true.astype(np.float64), 1e-12, 1.0))))


def _predict_all(predict, dataset, spec: str):
    """Runs `predict` over every batch; returns (labels, probabilities) as numpy."""
    import numpy as np

    batches = int(dataset.cardinality())
    of = f"/{batches}" if batches > 0 else ""
    labels, probabilities = [], []
    started = time.time()
    for index, (images, batch_labels) in enumerate(dataset, start=1):
        probabilities.append(np.asarray(predict(images), np.float32))
        labels.append(np.asarray(batch_labels))
        if index % _PROGRESS_EVERY == 0:
            done = sum(len(b) for b in labels)
            logging.info(
                "evaluated %d images (batch %d%s, %.1f img/s)", done, index, of, done / (time.time() - started)
            )
    if not labels:
        raise cli.UsageError(f"--dataset={spec} has no examples to evaluate")
    return np.concatenate(labels), np.concatenate(probabilities)


def evaluate(
    *,
    dataset: str,
    export_dir: str | None = None,
    model_dir: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    tta: str = "none",
    output_dir: str | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
) -> dict:
    """Evaluates an export or a finished run (exactly one of `export_dir`, `model_dir`) on
    `dataset`; writes eval.json and confusion_matrix.png, prints the per-class table. Arguments
    are the flags of the same names.

    Returns:
      The report written to eval.json.

    Raises:
      cli.UsageError: bad input (one line).
    """
    if (export_dir is None) == (model_dir is None):
        raise cli.UsageError("exactly one of --export_dir and --model_dir is required")
    # Cheap checks before TensorFlow is imported.
    for name, value in (("export_dir", export_dir), ("model_dir", model_dir)):
        if value is not None and not os.path.isdir(value):
            raise cli.UsageError(f"--{name}={value} does not exist or is not a directory")

    from kft import checkpoint, data, export, report  # Heavy imports after the flags are known to be good.

    predict, model_classes, model_image_size, model_path, run_dir = _load_model(export_dir, model_dir)
    # Before the images are read: a pass of minutes must not end in a refusal to write the report.
    output_dir = output_dir or os.path.join(model_path, "eval")
    _check_output_dir(output_dir)
    try:
        # The model's own size: the loader then resizes exactly as the model does for a whole image.
        image_size = export.choose_image_size(image_size, model_image_size, model_path)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if val_fraction is None or seed is None:  # digits' split: as the run made it
        recorded = _training_settings(run_dir, {"val_fraction": 0.1, "seed": 0})
        val_fraction = recorded["val_fraction"] if val_fraction is None else val_fraction
        seed = recorded["seed"] if seed is None else seed
    try:
        # With class_names, labels index the model's classes; a source with other classes
        # (or, for TFDS and digits, another order) is rejected, naming both lists.
        loaded, data_classes, skipped = data.load_eval(
            dataset,
            image_size=image_size,
            batch_size=batch_size,
            data_dir=data_dir,
            class_names=model_classes,
            val_fraction=val_fraction,
            seed=seed,
        )
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if tuple(data_classes) != model_classes:
        raise cli.UsageError(
            f"--dataset={dataset} has classes {list(data_classes)}, but the model at {model_path} "
            f"was trained on {list(model_classes)}"
        )

    logging.info("evaluating %s on %s at %d px, tta=%s", model_path, dataset, image_size, tta)
    labels, probabilities = _predict_all(_with_tta(predict, tta), loaded, dataset)
    result = report.classification_report(labels, probabilities, model_classes)
    result.update(
        dataset=dataset,
        model=os.path.abspath(model_path),
        image_size=image_size,
        skipped=skipped,
        tta=tta,
        log_loss=_log_loss(labels, probabilities),
    )

    json_path = os.path.join(output_dir, _REPORT)
    png_path = os.path.join(output_dir, _PNG)
    checkpoint.write_json(json_path, result)
    png = report.confusion_png(result["confusion_matrix"], model_classes)
    with checkpoint.atomic_path(png_path, suffix=".png") as tmp, open(tmp, "wb") as f:
        f.write(png)

    print(report.format_table(result))
    if skipped:
        print(f"skipped {skipped} files that could not be decoded")
    print(f"wrote {json_path} and {png_path}")
    sys.stdout.flush()
    return result


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    evaluate(
        dataset=FLAGS.dataset,
        export_dir=FLAGS.export_dir,
        model_dir=FLAGS.model_dir,
        data_dir=FLAGS.data_dir,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        tta=FLAGS.tta,
        output_dir=FLAGS.output_dir,
        val_fraction=FLAGS.val_fraction,
        seed=FLAGS.seed,
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
