"""`python -m kft.tune --flagfile=F --tune_dir=D [--tuner=hyperband|bayesian|random] [--max_trials=N]`

Searches `lr_scale` and the strength of the flagfile's `--regularizer` with KerasTuner, each
trial a `kft.trainer.train` run of the flagfile's recipe, then writes D/best.cfg:

    python -m kft.tune  --flagfile=configs/cifar10_resnet50.cfg --tune_dir=runs/tune
    python -m kft.train --flagfile=runs/tune/best.cfg

kft.tune accepts every kft.train flag (later flags override the flagfile) plus its own:
--tune_dir, --tuner, --max_trials, --lr_scale_min/max, --strength_min/max,
--hyperband_factor. kft.train's --lr_scale and the strength --regularizer selects are what it
searches: --l2sp_alpha (l2sp), --delta_alpha (delta) or --bss_eta (bss), each either 0 (the
regularizer off, plain fine-tuning) or log-uniform in [--strength_min, --strength_max];
--regularizer=none has no strength, so only --lr_scale is searched. --model_dir is not used
(trials run in D/trials/<id>, best.cfg trains into D/best); --overwrite deletes D and starts
the search over. Trials never export and never train the --compare_scratch baseline (best.cfg
keeps both settings for the final run). With --pretrain_dataset, the source task is trained
once, in D/pretrain, exactly as kft.train would; every trial, and best.cfg, starts from its
backbone.weights.h5. The search space and the Hyperband budget -> stage mapping are described
in kft/search_space.py, the files in D in kft/search_files.py. The first trial is the flagfile's
recipe as kft.train would run it; the tuner draws the others. best.cfg keeps the first trial's
settings unless another trial beat them by more than one standard error of an accuracy on the
images they were ranked on, widened for the number of trials compared
(kft.search_files.choose_best).

Trials are ranked on the validation split. kft.tune resolves --recipe=auto as kft.train does,
so on a small set the recipe trains on every image and there is none: trials are then ranked by
3-fold cross-validation on the training images (kft.crossval; each trial trains once per fold,
scored on the images its fold held out, pooled), and best.cfg trains on every image. A
validation split of the user's own (--val_fraction, a val/ folder) is always ranked on, with a
warning when it has fewer than 100 images.

Rerunning the same command resumes: finished trials are kept, an interrupted one continues from
its last epoch checkpoint. A rerun may raise --max_trials to extend the search; any change that
alters what a trial computes (another --stages, --regularizer, range, --tuner, ...) is refused
with one line naming the flag; pass --overwrite to start over or pick another --tune_dir.

Distributed tuning (KerasTuner's chief/worker mode). Start the same command once as the chief
and once per worker, with KerasTuner's three environment variables; D must be one directory
that every process can read and write (a shared filesystem):

    export KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000   # the chief's address
    KERASTUNER_TUNER_ID=chief   python -m kft.tune --flagfile=F --tune_dir=/shared/D   # one host
    KERASTUNER_TUNER_ID=tuner0  python -m kft.tune --flagfile=F --tune_dir=/shared/D   # each worker:
    KERASTUNER_TUNER_ID=tuner1  python -m kft.tune --flagfile=F --tune_dir=/shared/D   # unique id

The chief (any id containing "chief") holds the oracle: it checks and records the search
(D/search.json, --overwrite acts here only), runs the source-task pretraining if any, serves
trials over gRPC, and once every worker has finished writes trials.csv, best.cfg and the table.
It trains nothing, so it fits on a small CPU host. Each worker waits for the
chief's D/search.json, refuses to join a search with other flags, loads the data once and runs
trials until the oracle says stop. Start order does not matter; rerunning the chief and workers
with the same command resumes the search.
"""

import math

from absl import flags

from kft import cli, schedule
from kft import flags as kft_flags

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "tune_dir",
    None,
    "Search directory: KerasTuner state, one run per trial, trials.csv, best.cfg, TensorBoard HParams. Rerunning the same command resumes.",
)
flags.DEFINE_enum("tuner", "hyperband", ["hyperband", "bayesian", "random"], "KerasTuner search algorithm.")
flags.DEFINE_integer("max_trials", 20, "Number of trials (each one kft.train run); also caps Hyperband.", lower_bound=1)
flags.DEFINE_float("lr_scale_min", 0.1, "Lower end of the log-uniform --lr_scale range searched.")
flags.DEFINE_float("lr_scale_max", 10.0, "Upper end of the log-uniform --lr_scale range searched.")
flags.DEFINE_float(
    "strength_min",
    1e-4,
    "Lower end of the log-uniform range searched for the --regularizer's strength: --l2sp_alpha, --delta_alpha or --bss_eta (0, the regularizer off, is always a candidate too; unused with --regularizer=none).",
)
flags.DEFINE_float(
    "strength_max", 1e-1, "Upper end of the log-uniform range searched for the --regularizer's strength."
)
flags.DEFINE_integer(
    "hyperband_factor",
    3,
    "Hyperband's reduction factor: each round keeps 1/factor of the trials and trains them factor times longer.",
    lower_bound=2,
)


def tune_config_from_flags():
    from kft import search_space

    return search_space.TuneConfig(
        tune_dir=FLAGS.tune_dir,
        tuner=FLAGS.tuner,
        max_trials=FLAGS.max_trials,
        space=search_space.SearchSpace(
            lr_scale_min=FLAGS.lr_scale_min,
            lr_scale_max=FLAGS.lr_scale_max,
            strength_min=FLAGS.strength_min,
            strength_max=FLAGS.strength_max,
        ),
        hyperband_factor=FLAGS.hyperband_factor,
        overwrite=FLAGS.overwrite,
    )


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    if not FLAGS.tune_dir:
        raise cli.UsageError("--tune_dir is required: the directory of the search (created, or resumed)")
    cli.check_typed("overwrite")
    from kft import finetuner, search, trainer  # Heavy imports after the flags are known to be good.

    tune = tune_config_from_flags()
    try:
        tune.space.validate()  # Before the data is read: a bad range needs no data to be found.
        # As kft.train resolves it: a carved validation split too small to rank on trains too.
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits, may_drop_validation=True)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if recipe_block:
        print(recipe_block, flush=True)
    if splits.val is not None and splits.num_val < schedule.MIN_RANKING_VAL:
        print(_few_validation_images(splits.num_val), flush=True)
    try:
        if tune.overwrite:  # Nothing is removed before every check has passed.
            finetuner.check_model(config, len(splits.class_names))
        finetuner.check_weights_reachable(config)
        search.run(config, tune, splits=splits)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    except RuntimeError as e:
        cli.fail(str(e), 1)


def _few_validation_images(num_val: int) -> str:
    """The warning for a search whose trials are ranked on too few validation images.

    Measured (BENCHMARKS.md): textures at 10 images per class, 3 validation images, MobileNetV2,
    3 seeds: kft.tune's best 0.887 on the test set, kft.train's recipe 0.916.
    """
    return (
        f"warning: kft.tune ranks its trials on {num_val} validation images, too few to tell them apart "
        f"(an accuracy measured on them has a standard error of up to {0.5 / math.sqrt(num_val):.2f}; "
        f"kft ranks models from {schedule.MIN_RANKING_VAL} images), so its best trial is largely chance. "
        "kft.train's recipe trains on every image instead; to tune, hold out more (--val_fraction, or a val/ folder)"
    )


def run_main() -> None:
    # kft.train requires --model_dir; kft.tune gives each trial its own, so it needs none.
    FLAGS.set_default("model_dir", "")
    cli.run(main)


if __name__ == "__main__":
    run_main()
