"""`python -m kft.train --flagfile=configs/x.cfg [--flag=value ...]`: fine-tune a backbone.

Later flags override the flagfile. Rerunning the same command resumes an interrupted run.
"""

import os
import shutil

from absl import flags

from kft import cli
from kft import flags as kft_flags

FLAGS = flags.FLAGS


def _prepare_model_dir(model_dir: str, flagfile_text: str, overwrite: bool) -> None:
    """Checks the run directory is writable and belongs to this command, before any training."""
    saved_flags = os.path.join(model_dir, "flags.cfg")
    if overwrite and os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, ".kft-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise cli.UsageError(f"--model_dir={model_dir} is not writable: {e.strerror}") from None
    if os.path.exists(saved_flags):
        with open(saved_flags) as f:
            conflict = kft_flags.resume_conflict(f.read(), flagfile_text)
        if conflict:
            raise cli.UsageError(
                f"--model_dir={model_dir} holds a run with other flags ({conflict}); "
                "rerun with its flags to resume, pass --overwrite to start over, or use another --model_dir"
            )


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    from kft import experiment, trainer  # Heavy imports after the flags are known to be good.

    try:
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if recipe_block:
        print(recipe_block, flush=True)
    flagfile_text = kft_flags.with_comment(kft_flags.resolved_flagfile(), recipe_block)
    _prepare_model_dir(config.model_dir, flagfile_text, FLAGS.overwrite)
    try:
        experiment.run(config, flagfile_text=flagfile_text, splits=splits)
    except trainer.DivergenceError as e:
        cli.fail(str(e), 3)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


if __name__ == "__main__":
    cli.run(main)
