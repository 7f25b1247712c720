"""Every kft.train flag, its help and its validator; `config_from_flags` freezes them into a Config.

Validators run while absl parses the command line, so a bad value stops the program with one
line naming the flag, the value and what is allowed, before any model is built or file written.
"""

import dataclasses
import math
import os
import time

import numpy as np
from absl import flags, logging

from kft import augment, backbones, data, model, recipe, regularizers, schedule
from kft.config import Config

FLAGS = flags.FLAGS

# Sane upper bounds: a bigger --image_size ends in an out-of-memory error, not a model (the
# largest keras.applications input is 600 px), and --cache_gb cannot exceed this machine's memory.
MAX_IMAGE_SIZE = 2048
MAX_CACHE_GB = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)


def _checked(name: str, parse, help_allowed: str = ""):
    """Registers a validator that calls `parse(value)` and turns ValueError into a flag error."""

    def check(value):
        try:
            parse(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_validator(name, check)


def _range(name: str, low=None, high=None, low_open=False):
    def check(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise flags.ValidationError("must be a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            upper = f"<= {high}" if high is not None else ""
            raise flags.ValidationError(f"must be {' and '.join(x for x in (bound, upper) if x)}")
        return True

    flags.register_validator(name, check)


flags.DEFINE_enum(
    "recipe",
    "auto",
    ["auto", "none"],
    "auto: derive --batch_size, --stages, --augment, --test_views (and --val_fraction=0 when the validation split would be too small to rank checkpoints) from the training set's size (a linear probe, then every block for a number of optimizer steps that follows BiT-HyperRule; see kft/recipe.py); a flag you give wins. none: the flags' own defaults. The resolved values are printed and written to MODEL_DIR/flags.cfg; rerunning into that MODEL_DIR resumes with them.",
)
# Data.
flags.DEFINE_string(
    "dataset",
    "digits",
    "Training data: tfds:NAME (e.g. tfds:cifar10), folder:PATH (one subfolder per class; PATH/train and PATH/val used when present), or the built-in offline dataset digits (classes subset: digits:0-4, digits:5-9, digits:1,3,7).",
)
flags.DEFINE_string("data_dir", None, "Where TFDS keeps (or finds already downloaded) datasets.")
flags.DEFINE_float(
    "val_fraction",
    0.1,
    "Fraction of the training data held out for validation when the source has no validation split; 0 holds out nothing (every image trains, the run keeps the end of its schedule).",
)
flags.DEFINE_integer(
    "train_limit_per_class", 0, "Keep at most this many training images per class (0 = all); makes a few-shot task."
)
# Model.
flags.DEFINE_string(
    "backbone",
    "ResNet50",
    "A keras.applications class name, e.g. ResNet50, MobileNetV3Small, EfficientNetB0, ConvNeXtTiny.",
)
flags.DEFINE_string(
    "weights",
    "imagenet",
    "Backbone start: imagenet, none (random init), or a PATH to the backbone.weights.h5 a previous kft run wrote.",
)
flags.DEFINE_integer(
    "image_size",
    0,
    "Square input size of the backbone; 0 = the backbone's ImageNet size. Images are resized inside the model.",
)
flags.DEFINE_float("dropout", 0.2, "Dropout rate before the head's last dense layer.")
flags.DEFINE_integer("hidden_units", 0, "Width of an optional hidden dense layer in the head (0 = none).")
# Training.
flags.DEFINE_integer("batch_size", 64, "Global batch size (split across replicas).")
flags.DEFINE_integer("seed", 0, "Seed for data splits, shuffling, augmentation and initialization.")
flags.DEFINE_string(
    "stages",
    "head:3@1e-3,top2:3@1e-4",
    "The unfreeze schedule: comma-separated WHAT:EPOCHS@LR[:bn=frozen|train][:warmup=F], WHAT = head | topN | from=BLOCK | all. Example: head:3@1e-3,top2:2@1e-4,all:2@1e-5.",
)
flags.DEFINE_float("lr_scale", 1.0, "Multiplies every stage's learning rate (what kft.tune searches).")
flags.DEFINE_enum(
    "optimizer",
    "adam",
    ["adam", "sgd"],
    "adam, or sgd with Nesterov momentum 0.9. Neither adds weight decay: L2-SP replaces it.",
)
flags.DEFINE_float(
    "l2sp_alpha", 0.01, "L2-SP strength pulling backbone weights toward the pretrained ones; 0 = plain fine-tuning."
)
flags.DEFINE_float("l2sp_beta", 0.01, "L2 strength on the new head's kernels.")
flags.DEFINE_enum(
    "regularizer",
    "l2sp",
    list(regularizers.REGISTRY),
    "Regularizer toward the pretrained model: l2sp (weights, --l2sp_alpha), delta (last feature map, --delta_alpha), bss (batch spectral shrinkage of the features, --bss_eta), none. The head's --l2sp_beta applies with all of them.",
)
flags.DEFINE_float("delta_alpha", 0.01, "DELTA strength: feature-map distance to the pretrained backbone's.")
flags.DEFINE_enum(
    "delta_weighting",
    "attention",
    ["attention", "plain"],
    "DELTA channel weights: attention (channels whose removal most raises the loss of the pretrained backbone with the trained head are held closest; computed when the backbone first unfreezes, so put a head stage first) or plain (all equal).",
)
flags.DEFINE_integer(
    "delta_attention_batches",
    10,
    "DELTA attention: training batches over which the loss increase per channel is averaged.",
)
flags.DEFINE_float("bss_eta", 0.001, "BSS strength: the smallest squared singular values of the batch features.")
flags.DEFINE_integer("bss_k", 1, "BSS: how many of the smallest singular values are shrunk.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the training loss.")
flags.DEFINE_float(
    "layer_lr_decay",
    1.0,
    "Layer-wise learning rates: the top block gets the stage's rate, each block below this factor times the one above (1 = off; timm's layer decay, fastai's slice(lo, hi)).",
)
flags.DEFINE_float(
    "cache_gb",
    2.0,
    "Memory (GiB) the decoded training and validation images may take to be cached, so they are decoded once; bigger sets are decoded every epoch. 0 = never cache.",
)
flags.DEFINE_boolean(
    "cache_features",
    False,
    "Compute the frozen backbone's features once and train head-only stages on them (much faster; those stages then run without augmentation).",
)
flags.DEFINE_float(
    "ema_decay",
    0.0,
    "Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0 = off); validation, the best checkpoint and the export use it.",
)
flags.DEFINE_enum(
    "checkpoint_selection",
    "auto",
    ["auto", "best", "last"],
    "Which model a run keeps: best (the round with the best validation accuracy, the linear probe included), last (the end of the schedule), or auto: best when the validation split has at least %d images (binomial standard error of its accuracy <= %.2f), else last."
    % (schedule.MIN_RANKING_VAL, 0.5 / schedule.MIN_RANKING_VAL**0.5),
)
flags.DEFINE_string(
    "augment",
    "crop,flip",
    "Comma list of on-device augmentations from: rotate (up to %g degrees either way), crop, flip, rot90 (quarter turns; square images), translate, colour, mixup, cutmix; none for no augmentation."
    % augment.ROTATE_DEGREES,
)
flags.DEFINE_string(
    "test_views",
    "none",
    "Test-time augmentation built into the finished model (its export, TFLite file, kft.evaluate and kft.predict): the mean probability over the image and its mirror (flip), its quarter turns (rot90, square images), or both (flip,rot90: 8 passes); none for one pass. Costs that many passes per prediction.",
)
# Transfer check (the quickstart uses these).
flags.DEFINE_string(
    "pretrain_dataset",
    "",
    "If set, first train the backbone on this source dataset (same syntax as --dataset) and fine-tune from the result.",
)
flags.DEFINE_string(
    "pretrain_stages",
    "all:5@1e-3:bn=train",
    "Stage schedule of the source-task training (--pretrain_dataset); from random init BatchNorm must train (bn=train).",
)
flags.DEFINE_integer(
    "pretrain_batch_size",
    0,
    "Batch size of the source-task training (--pretrain_dataset); 0 = --batch_size as given or its default (the recipe sizes --batch_size for the target set, not the source).",
)
flags.DEFINE_boolean(
    "compare_scratch",
    False,
    "Also train the same backbone from random init on the target with the same epochs, and report both accuracies.",
)
# Outputs.
flags.DEFINE_string(
    "model_dir",
    None,
    "Run directory: checkpoints, TensorBoard events, flags.cfg, metrics.json, weights. Rerunning the same command resumes.",
)
flags.DEFINE_string(
    "export_dir",
    "",
    "SavedModel base directory (TF Serving layout EXPORT_DIR/<version>/); default MODEL_DIR/export; none to skip.",
)
flags.DEFINE_enum(
    "export_tflite",
    "off",
    ["off", "float32", "dynamic"],
    "Also write TFLite models to MODEL_DIR/tflite (input fixed at --image_size): float32, or float32 plus dynamic-range int8; each checked against the Keras model.",
)
flags.DEFINE_boolean("overwrite", False, "Delete an existing run in --model_dir instead of resuming it.")
# Runtime.
flags.DEFINE_enum(
    "jit_compile",
    "auto",
    ["auto", "true", "false"],
    "XLA compilation of the train step; auto = on for GPU/TPU, off on CPU (slower there).",
)
flags.DEFINE_enum(
    "mixed_precision",
    "auto",
    ["auto", "none", "bfloat16", "float16"],
    "Mixed precision policy; the head's output layer stays float32. auto: bfloat16 on TPUs and GPUs of compute capability 8.0+, float16 on 7.x GPUs; on a CPU bfloat16 when a short measurement of this backbone (cached per machine in ~/.cache/kft) finds it >= 1.15x faster than float32, else none.",
)
flags.DEFINE_enum(
    "strategy",
    "auto",
    ["auto", "mirrored", "multi_worker", "tpu"],
    "tf.distribute strategy. auto: multi_worker when TF_CONFIG names several tasks, else a "
    "TPU if attached, all GPUs when there are several, else one device. multi_worker: "
    "kft.train on several machines (TF_CONFIG; README: Train on several machines).",
)
flags.DEFINE_boolean("deterministic", False, "Force deterministic TF ops (with --seed: identical metrics on CPU).")
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.")

flags.mark_flag_as_required("model_dir")
_checked("dataset", data.parse_spec)
_checked("pretrain_dataset", lambda v: v and data.parse_spec(v))
_checked("backbone", backbones.get)
_checked("stages", schedule.parse_stages)
_checked("pretrain_stages", schedule.parse_stages)
_checked("augment", augment.parse)
_checked("test_views", model.parse_test_views)
_range("val_fraction", 0.0, 0.9)
_range("train_limit_per_class", 0)
_range("image_size", 0, MAX_IMAGE_SIZE)
_range("dropout", 0.0, 0.95)
_range("hidden_units", 0)
_range("batch_size", 1)
_range("pretrain_batch_size", 0)
_range("lr_scale", 0.0, low_open=True)
_range("l2sp_alpha", 0.0)
_range("l2sp_beta", 0.0)
_range("delta_alpha", 0.0)
_range("delta_attention_batches", 1)
_range("bss_eta", 0.0)
_range("cache_gb", 0.0, MAX_CACHE_GB)
_range("bss_k", 1)
_range("label_smoothing", 0.0, 0.5)
_range("layer_lr_decay", 0.0, 1.0, low_open=True)
_range("ema_decay", 0.0, 0.99999)
_range("verbose", 0, 2)


def _check_weights(value):
    if value in ("imagenet", "none") or os.path.isfile(value):
        return True
    raise flags.ValidationError("allowed: imagenet, none, or the path of an existing backbone.weights.h5 file")


flags.register_validator("weights", _check_weights)


@flags.multi_flags_validator(["backbone", "image_size"])
def _check_image_size(values):
    try:
        spec = backbones.get(values["backbone"])
    except ValueError:
        return True  # Reported by the backbone validator.
    size = values["image_size"]
    if size and size < spec.min_size:
        raise flags.ValidationError(f"--image_size={size} is below {spec.name}'s minimum input size {spec.min_size}")
    return True


def config_from_flags() -> Config:
    """Freezes the parsed flags into a Config."""
    spec = backbones.get(FLAGS.backbone)
    return Config(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        val_fraction=FLAGS.val_fraction,
        train_limit_per_class=FLAGS.train_limit_per_class,
        backbone=spec.name,
        weights=None if FLAGS.weights == "none" else FLAGS.weights,
        image_size=FLAGS.image_size,  # 0: Config resolves the backbone's own size.
        dropout=FLAGS.dropout,
        hidden_units=FLAGS.hidden_units,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        stages=schedule.parse_stages(FLAGS.stages),
        checkpoint_selection=FLAGS.checkpoint_selection,
        lr_scale=FLAGS.lr_scale,
        optimizer=FLAGS.optimizer,
        l2sp_alpha=FLAGS.l2sp_alpha,
        l2sp_beta=FLAGS.l2sp_beta,
        regularizer=FLAGS.regularizer,
        cache_gb=FLAGS.cache_gb,
        delta_alpha=FLAGS.delta_alpha,
        delta_weighting=FLAGS.delta_weighting,
        delta_attention_batches=FLAGS.delta_attention_batches,
        bss_eta=FLAGS.bss_eta,
        bss_k=FLAGS.bss_k,
        label_smoothing=FLAGS.label_smoothing,
        layer_lr_decay=FLAGS.layer_lr_decay,
        ema_decay=FLAGS.ema_decay,
        cache_features=FLAGS.cache_features,
        augment=augment.parse(FLAGS.augment),
        test_views=model.parse_test_views(FLAGS.test_views),
        pretrain_dataset=FLAGS.pretrain_dataset,
        pretrain_stages=schedule.parse_stages(FLAGS.pretrain_stages),
        pretrain_batch_size=FLAGS.pretrain_batch_size or FLAGS.batch_size,
        compare_scratch=FLAGS.compare_scratch,
        model_dir=FLAGS.model_dir,
        export_dir=FLAGS.export_dir,
        export_tflite=FLAGS.export_tflite,
        jit_compile=FLAGS.jit_compile,
        mixed_precision=FLAGS.mixed_precision,
        strategy=FLAGS.strategy,
        deterministic=FLAGS.deterministic,
        verbose=FLAGS.verbose,
    )


RECIPE_FLAGS = ("batch_size", "stages", "augment", "test_views", "val_fraction")


def apply_recipe(num_train: int, num_classes: int, mirror=None, rotation=None, unused_val: int = 0) -> str | None:
    """With --recipe=auto, sets the recipe's flags the user did not give (kft.recipe) and turns
    --recipe to none, so the resolved flagfile reproduces the run without deriving it again.

    Args:
      num_train, num_classes, mirror, rotation, unused_val: as kft.recipe.derive takes them.

    Returns:
      The recipe as a printable block, or None with --recipe=none.
    """
    if FLAGS.recipe == "none":
        return None
    given = {name: FLAGS[name].value for name in RECIPE_FLAGS if FLAGS[name].present}
    derived = recipe.derive(
        num_train,
        num_classes,
        hidden_units=FLAGS.hidden_units,
        batch_size=given.get("batch_size"),
        augment=augment.parse(given["augment"]) if "augment" in given else None,
        mirror=mirror,
        rotation=rotation,
        unused_val=unused_val,
    )
    if FLAGS.pretrain_dataset and not FLAGS.pretrain_batch_size:
        FLAGS.pretrain_batch_size = FLAGS.batch_size  # Before the recipe resizes it.
    for name, value in derived.flags().items():
        if name not in given:
            setattr(FLAGS, name, value)
    FLAGS.recipe = "none"
    return recipe.describe(derived, given)


def adopt_recorded_recipe(model_dir: str) -> str | None:
    """With --recipe=auto, a rerun into a directory holding a recipe run resumes it with the
    recipe that run resolved (its run.json), for the recipe's flags the user did not give.
    Derived again, the recipe could differ (a newer kft; a check near its threshold on another
    CPU), and the resume would be refused over flags the user never gave.

    Returns:
      The recipe block the run printed, to print and record again. None with
      --recipe=none or --overwrite, where no recipe run is recorded (nothing there, a run
      with --recipe=none, an unreadable run.json: kft.runfiles.prepare_model_dir names why),
      or where a folder dataset no longer holds the files it held (the recipe is for the data
      now there, and the resume check compares the rest).
    """
    if FLAGS.recipe == "none" or FLAGS.overwrite or not model_dir:
        return None
    from kft import runfiles  # TensorFlow; the flags module stays light.

    try:
        run = runfiles.recorded_run(model_dir)
    except ValueError:
        return None
    recorded = runfiles.recorded_recipe_block(model_dir) if run else ""
    if not recorded:
        return None
    saved, identity = run
    now = runfiles.data_identity(config_from_flags())
    if any(identity.get(name) not in (None, now[name]) for name in now):
        return None
    for name in (*RECIPE_FLAGS, "pretrain_batch_size"):
        if not FLAGS[name].present:
            value = getattr(saved, name)
            setattr(FLAGS, name, runfiles.flag_text(name, value) if isinstance(FLAGS[name].value, str) else value)
    FLAGS.recipe = "none"
    logging.info("resuming %s with the recipe it recorded (--overwrite derives it anew)", model_dir)
    return recorded


def config_and_splits(load_splits, *, may_drop_validation: bool = False):
    """The run's Config and data, with --recipe=auto resolved against the training set.

    Args:
      load_splits: Config -> kft.data.Splits (kft.trainer.load_splits).
      may_drop_validation: whether the recipe may train on a carved validation split too small
        to rank checkpoints (kft.train; kft.tune ranks its trials on it).

    Returns:
      (config, splits batched as config says, the recipe block or None).
    """
    config = config_from_flags()
    splits = load_splits(config)
    schedule.check_selection(config.checkpoint_selection, splits.num_val)
    unused_val = 0
    if may_drop_validation and _validation_unrankable(splits):
        everything = load_splits(dataclasses.replace(config, val_fraction=0.0))
        if everything.num_train > splits.num_train:  # A training-image limit may take none of them.
            unused_val, splits = splits.num_val, everything
    mirror = rotation = None
    if FLAGS.recipe == "auto" and not FLAGS["augment"].present:
        images, labels = _sample(splits, recipe.MIRROR_SAMPLE)
        mirror = recipe.mirror_check(images, labels)
        sample = slice(recipe.ROTATION_SAMPLE)
        rotation = _rotation_check(config, len(splits.class_names), images[sample], labels[sample])
    block = apply_recipe(splits.num_train, len(splits.class_names), mirror, rotation, unused_val)
    if block is not None:
        config = config_from_flags()
        splits = splits.with_batch_size(config.batch_size)
    return config, splits, block


def _rotation_check(config: Config, num_classes: int, images: np.ndarray, labels: np.ndarray):
    """The recipe's rotation check, asked of the backbone the run starts from; None where that
    backbone has nothing to say yet: random weights (--weights=none), or weights that a
    --pretrain_dataset run has still to train."""
    if config.weights is None or config.pretrain_dataset:
        return None
    from kft import features, finetuner  # The model is built here only for the check.

    started = time.time()
    try:
        classifier, _ = finetuner.build_classifier(config, num_classes)
    except backbones.WeightsUnavailableError:
        raise  # The run needs them too: it stops here, before writing anything.
    except Exception as e:  # Keras raises bare Exceptions.
        # The check is advice. A backbone that cannot be built now (a weights file for another
        # backbone) fails the run where it always did, after the other checks, with that
        # error's own message; the recipe goes without rot90.
        logging.warning("rotation check skipped: the backbone could not be built (%s)", str(e).splitlines()[0][:200])
        return None
    batch = features.feature_batch_size(config.image_size)

    def features_of(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(classifier.features(x[i : i + batch], training=False)) for i in range(0, len(x), batch)]
        )

    check = recipe.rotation_check(features_of, images, labels)
    logging.info("rotation check on %d training images took %.1fs", len(labels), time.time() - started)
    return check


def _validation_unrankable(splits) -> bool:
    """Whether --recipe=auto may do without the validation split: kft carved it (the user
    gave no --val_fraction and the source has none of its own), it is too small to rank
    checkpoints, and no --checkpoint_selection=best asks to rank them."""
    return (
        FLAGS.recipe == "auto"
        and not FLAGS["val_fraction"].present
        and FLAGS.checkpoint_selection != "best"
        and splits.val_carved
        and splits.num_val < schedule.MIN_RANKING_VAL
    )


def _sample(splits, limit: int):
    """The first `limit` training images and labels in the source's fixed order (a folder's
    classes interleaved, so every class is in them), as numpy."""
    dataset = splits.train if splits.train_in_order is None else splits.train_in_order
    images, labels, count = [], [], 0
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        count += len(labels[-1])
        if count >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def with_comment(flagfile_text: str, block: str | None) -> str:
    """The flagfile with `block` (the recipe) as comment lines after its first line."""
    if not block:
        return flagfile_text
    first, _, rest = flagfile_text.partition("\n")
    return "\n".join([first, *(f"# {line}" for line in block.splitlines()), rest])
