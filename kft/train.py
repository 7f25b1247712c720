"""`python -m kft.train --flagfile=configs/x.cfg [--flag=value ...]`: fine-tune a backbone.

Later flags override the flagfile. Rerunning the same command resumes an interrupted run.
"""

import functools
import os
import sys

from absl import flags, logging

from kft import cli, rundir
from kft import flags as kft_flags

FLAGS = flags.FLAGS


def _prepare_model_dir(model_dir: str, fine_tune, overwrite: bool) -> rundir.DirLock:
    """Checks the run directory belongs to this command, locks it, and with --overwrite clears
    what kft wrote there; called once everything else has been checked.

    Args:
      fine_tune: the Config the fine-tune runs (kft.experiment.fine_tune_config), compared with
        the one a run there recorded.

    Returns:
      The directory's lock, held while the run works there.
    """
    flag = f"--model_dir={model_dir}"
    try:
        rundir.check_owned(model_dir, flag, "run", overwrite)
        rundir.check_writable_dir(model_dir, flag)
        lock = rundir.DirLock(model_dir, flag)
    except OSError as e:
        raise cli.UsageError(f"{flag} is not writable: {e.strerror}") from None
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if not overwrite:
        from kft import runfiles  # Imports TensorFlow, as main's other heavy imports do.

        try:
            conflict = runfiles.resume_conflict(model_dir, fine_tune)
        except ValueError as e:
            conflict = str(e)
        if conflict:
            lock.release()
            raise cli.UsageError(
                f"{flag} holds a run with other flags ({conflict}); "
                "rerun with its flags to resume, pass --overwrite to start over, or use another --model_dir"
            )
    if not overwrite:
        try:
            rundir.check_resumable(model_dir, flag)
        except ValueError as e:
            lock.release()
            raise cli.UsageError(str(e)) from None
    if overwrite:
        removed = rundir.remove_owned(model_dir, "run")
        if removed:
            logging.info("--overwrite: removed %s from %s", ", ".join(removed), model_dir)
    rundir.mark(model_dir)
    return lock


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    cli.check_typed("overwrite")
    from kft import experiment, multiworker, trainer  # Heavy imports after the flags are known to be good.

    try:
        # Before any TF op: MultiWorkerMirroredStrategy can only be created at program start.
        worker = multiworker.worker_of(multiworker.start(FLAGS.strategy))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None

    def start():  # Every check; the fine-tune itself is the returned work.
        config, flagfile_text, splits, lock = _checked_start(experiment, trainer, worker)
        work = functools.partial(experiment.run, flagfile_text=flagfile_text, splits=splits)
        return config, (lock.release if lock else None), work

    try:
        multiworker.run_together(worker, start)
    except trainer.DivergenceError as e:
        cli.fail(str(e), 3)
    except (ValueError, multiworker.PeerRefused) as e:
        raise cli.UsageError(str(e)) from None
    except multiworker.PeerLost as e:
        print(cli.error_line(str(e), "kft.train"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: TF would wait at exit for the worker that is gone (up to a minute).
        os._exit(1)


def _checked_start(experiment, trainer, worker):
    """The run's config and data after every check; on a single machine or the chief, also
    MODEL_DIR prepared and locked (another worker takes neither MODEL_DIR's lock nor its marker).

    Returns:
      (config, flagfile text, splits, the lock or None).

    Raises:
      cli.UsageError: one line.
    """
    try:
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits, may_drop_validation=True)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if recipe_block and (worker is None or worker.is_chief):
        print(recipe_block, flush=True)
    from kft import runfiles  # Imports TensorFlow, as main's other heavy imports do.

    flagfile_text = kft_flags.with_comment(runfiles.flagfile_of(config), recipe_block)
    if worker and not worker.is_chief:
        # The checks of MODEL_DIR and the export are the chief's (the others write neither, and
        # need not see MODEL_DIR); its refusal reaches every worker through all_ok.
        return config, flagfile_text, splits, None
    try:
        # With --overwrite nothing is removed before every check has passed; a source task to
        # train first must not find a bad fine-tune schedule only after it.
        experiment.check_before_work(
            config, splits.class_names, build_model=FLAGS.overwrite or bool(config.pretrain_dataset)
        )
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    lock = _prepare_model_dir(config.model_dir, experiment.fine_tune_config(config), FLAGS.overwrite)
    return config, flagfile_text, splits, lock


if __name__ == "__main__":
    cli.run(main)
