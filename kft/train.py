"""`python -m kft.train --flagfile=configs/x.cfg [--flag=value ...]`: fine-tune a backbone.

Later flags override the flagfile. Rerunning the same command resumes an interrupted run.
"""

import os

from absl import flags, logging

from kft import cli, rundir
from kft import flags as kft_flags

FLAGS = flags.FLAGS


def _prepare_model_dir(model_dir: str, flagfile_text: str, overwrite: bool) -> rundir.DirLock:
    """Checks the run directory belongs to this command, locks it, and with --overwrite clears
    what kft wrote there; called once everything else has been checked.

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
    saved_flags = os.path.join(model_dir, "flags.cfg")
    if os.path.exists(saved_flags) and not overwrite:
        with open(saved_flags, errors="replace") as f:
            conflict = kft_flags.resume_conflict(f.read(), flagfile_text)
        if conflict:
            lock.release()
            raise cli.UsageError(
                f"{flag} holds a run with other flags ({conflict}); "
                "rerun with its flags to resume, pass --overwrite to start over, or use another --model_dir"
            )
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
    from kft import experiment, trainer  # Heavy imports after the flags are known to be good.

    try:
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if recipe_block:
        print(recipe_block, flush=True)
    flagfile_text = kft_flags.with_comment(kft_flags.resolved_flagfile(), recipe_block)
    try:
        # With --overwrite nothing is removed before every check has passed; a source task to
        # train first must not find a bad fine-tune schedule only after it.
        experiment.check_before_work(config, splits.class_names,
                                     build_model=FLAGS.overwrite or bool(config.pretrain_dataset))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    lock = _prepare_model_dir(config.model_dir, flagfile_text, FLAGS.overwrite)
    try:
        experiment.run(config, flagfile_text=flagfile_text, splits=splits)
    except trainer.DivergenceError as e:
        cli.fail(str(e), 3)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    finally:
        lock.release()


if __name__ == "__main__":
    cli.run(main)
