"""`python -m kft.train --flagfile=configs/x.cfg [--flag=value ...]`: fine-tune a backbone.

Later flags override the flagfile. Rerunning the same command resumes an interrupted run.
"""

import functools
import os
import sys

from absl import flags

from kft import cli
from kft import flags as kft_flags

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    cli.check_typed("overwrite")
    from kft import multiworker, trainer  # Heavy imports after the flags are known to be good.

    try:
        # Before any TF op: MultiWorkerMirroredStrategy can only be created at program start.
        worker = multiworker.worker_of(multiworker.start(FLAGS.strategy))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None

    try:
        multiworker.run_together(worker, functools.partial(_start, worker))
    except trainer.DivergenceError as e:
        cli.fail(str(e), 3)
    except (ValueError, multiworker.PeerRefused) as e:
        raise cli.UsageError(str(e)) from None
    except multiworker.PeerLost as e:
        print(cli.error_line(str(e), "kft.train"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: TF would wait at exit for the worker that is gone (up to a minute).
        os._exit(1)


def _start(worker):
    """Every check, then the run's start as kft.multiworker.run_together takes it: the Config,
    the release of MODEL_DIR's lock, and the fine-tune to run. On a single machine or the chief
    MODEL_DIR is prepared and locked here; another worker takes neither its lock nor its marker.

    Returns:
      (config, release or None, work).

    Raises:
      cli.UsageError: one line.
    """
    from kft import experiment, runfiles, trainer  # Import TensorFlow, as main's do.

    try:
        # One machine only: other workers need not see MODEL_DIR, so all derive the recipe.
        recorded_recipe = kft_flags.adopt_recorded_recipe(FLAGS.model_dir) if worker is None else None
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits, may_drop_validation=True)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    recipe_block = recipe_block or recorded_recipe
    if recipe_block and (worker is None or worker.is_chief):
        print(recipe_block, flush=True)
    flagfile_text = kft_flags.with_comment(runfiles.flagfile_of(config), recipe_block)
    work = functools.partial(experiment.run, flagfile_text=flagfile_text, splits=splits)
    if worker and not worker.is_chief:
        # The checks of MODEL_DIR and the export are the chief's (the others write neither, and
        # need not see MODEL_DIR); its refusal reaches every worker through all_ok.
        return config, None, work
    try:
        # With --overwrite nothing is removed before every check has passed; a source task to
        # train first must not find a bad fine-tune schedule only after it.
        experiment.check_before_work(
            config, splits.class_names, build_model=FLAGS.overwrite or bool(config.pretrain_dataset)
        )
        lock = runfiles.prepare_model_dir(config.model_dir, experiment.fine_tune_config(config), FLAGS.overwrite)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return config, lock.release, work


if __name__ == "__main__":
    cli.run(main)
