"""`python -m kft.lr_find --flagfile=F [--stage=N]`: a learning-rate range test for one stage.

Trains the chosen stage (the same model, data, augmentation and penalty as kft.train) for up to
`--sweep_steps` steps while the learning rate grows exponentially from `--min_lr` to
`--max_lr`, records the loss of every step, and stops early once the smoothed loss exceeds 4x
its minimum (fastai's rule). It suggests the learning rate where the smoothed loss falls
fastest and prints the matching `--lr_scale` (suggested rate / the stage's rate).

Outputs go to `--output_dir` (default MODEL_DIR/lr_find/): loss_vs_lr.png, lr_find.json and
TensorBoard events. Nothing else is written (no checkpoint, anchors or flags.cfg), so a later
`kft.train` with the same --model_dir starts exactly as it would have; while it runs it holds
the run directory's lock `MODEL_DIR/.kft-lock`, as kft.train does, so a sweep and a run never
work in one directory at once.
"""

import dataclasses
import math
import os

import numpy as np
from absl import flags, logging

from kft import cli, rundir
from kft import flags as kft_flags

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "stage",
    0,
    "Which stage of --stages to sweep (1-based); 0 = the first one that trains (the one after a probe).",
    lower_bound=0,
)
flags.DEFINE_float("min_lr", 1e-7, "Learning rate of the first step.", lower_bound=0.0)
flags.DEFINE_float("max_lr", 1.0, "Learning rate of the last step.", lower_bound=0.0)
flags.DEFINE_integer("sweep_steps", 200, "Steps of the sweep (fewer if the loss blows up first).", lower_bound=5)
flags.DEFINE_string("output_dir", None, "Where the plot and JSON go; default MODEL_DIR/lr_find.")


def exponential_rates(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """The sweep's learning rate at each step: min_lr * (max_lr / min_lr) ** (t / (steps - 1))."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(1, steps - 1))


def smooth(losses: list[float], beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average of the losses (as fastai plots them)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return np.array(out)


def suggest(rates: np.ndarray, smoothed: np.ndarray) -> float:
    """The learning rate where the smoothed loss decreases fastest per log-LR step."""
    if len(smoothed) < 3:
        return float(rates[0])
    slopes = np.gradient(smoothed, np.log(rates[: len(smoothed)]))
    # Ignore the first and last few steps: the start is noise, the end is the blow-up.
    margin = max(1, len(smoothed) // 10)
    window = slice(margin, max(margin + 1, len(smoothed) - margin))
    return float(rates[window][int(np.argmin(slopes[window]))])


def run_sweep(config, stage_index: int, min_lr: float, max_lr: float, steps: int, splits=None) -> dict:
    """Runs the range test; returns rates, losses, smoothed losses and the suggestion.

    `splits` (kft.data.Splits) is the data when already loaded, else it is loaded from config.
    """
    import keras

    from kft import finetuner, l2sp, runtime, trainer

    runtime.set_determinism(config.seed, config.deterministic)
    precision = runtime.resolve_precision(config.mixed_precision, config.backbone, config.image_size)
    runtime.set_precision(precision)
    stage = config.stages[stage_index]
    if splits is None:
        splits = trainer.load_splits(config)
    classifier, blocks = finetuner.build_classifier(config, len(splits.class_names))
    # The sweep measures the step as the run takes it, minus the EMA (it does not change the loss).
    tuner = finetuner.make_finetuner(
        dataclasses.replace(config, ema_decay=0.0), classifier, l2sp.anchor_arrays(classifier.backbone)
    )
    rates = exponential_rates(min_lr, max_lr, steps)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        min_lr, decay_steps=max(1, steps - 1), decay_rate=max_lr / min_lr
    )
    finetuner.prepare_stage(
        tuner,
        blocks,
        stage,
        schedule,
        optimizer=config.optimizer,
        precision=precision,
        jit_compile=runtime.resolve_jit_compile(config.jit_compile),
        layer_lr_decay=config.layer_lr_decay,
    )
    losses: list[float] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            tuner.loss_tracker.reset_state()  # so each batch's logs hold that batch's loss

        def on_train_batch_end(self, batch, logs=None):
            loss = float(logs["loss"])
            losses.append(loss)
            best = float(np.min(smooth(losses)))
            if not math.isfinite(loss) or smooth(losses)[-1] > 4 * best:
                self.model.stop_training = True
            if (batch + 1) % 20 == 0:
                logging.info("lr_find step %d/%d: lr %.3g loss %.4f", batch + 1, steps, rates[batch], loss)

    tuner.fit(splits.train.repeat(), steps_per_epoch=steps, epochs=1, callbacks=[Record()], verbose=0)
    finite = [x if math.isfinite(x) else float("inf") for x in losses]
    smoothed = smooth([x for x in finite if math.isfinite(x)] or [0.0])
    suggested = suggest(rates, smoothed)
    return {
        "stage": stage.describe(),
        "stage_lr": stage.lr,
        "rates": rates[: len(losses)].tolist(),
        "losses": finite,
        "smoothed": smoothed.tolist(),
        "suggested_lr": suggested,
        "suggested_lr_scale": suggested / stage.lr,
    }


def write_outputs(result: dict, output_dir: str) -> None:
    """loss_vs_lr.png, lr_find.json and TensorBoard scalars (step = sweep step)."""
    import matplotlib.figure
    import tensorflow as tf
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from kft import checkpoint

    checkpoint.write_json(os.path.join(output_dir, "lr_find.json"), result)
    figure = matplotlib.figure.Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    count = len(result["smoothed"])
    axes.plot(result["rates"][:count], result["smoothed"], label="smoothed loss")
    axes.axvline(result["suggested_lr"], color="red", linestyle="--", label=f"suggested {result['suggested_lr']:.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss")
    axes.set_title(f"LR range test, stage {result['stage']}")
    axes.legend()
    with checkpoint.atomic_path(os.path.join(output_dir, "loss_vs_lr.png"), suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    writer = tf.summary.create_file_writer(os.path.join(output_dir, "tb"))
    with writer.as_default():
        for step, (rate, loss) in enumerate(zip(result["rates"], result["losses"])):
            if math.isfinite(loss):
                tf.summary.scalar("lr_find/loss", loss, step=step)
            tf.summary.scalar("lr_find/learning_rate", rate, step=step)
    writer.flush()


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}; flags look like --name=value")
    from kft import finetuner, trainer

    try:
        config, splits, recipe_block = kft_flags.config_and_splits(trainer.load_seeded_splits, may_drop_validation=True)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if recipe_block:
        print(recipe_block, flush=True)
    stage = FLAGS.stage or next((i + 1 for i, s in enumerate(config.stages) if s.what != "probe"), 1)
    if stage > len(config.stages):
        raise cli.UsageError(f"--stage={stage}: --stages has only {len(config.stages)} stages")
    if config.stages[stage - 1].what == "probe":
        raise cli.UsageError(
            f"--stage={stage} is the linear probe, which has no learning rate; "
            f"sweep a later stage (--stage={stage + 1})"
        )
    if not FLAGS.min_lr < FLAGS.max_lr or FLAGS.min_lr <= 0:
        raise cli.UsageError(f"--min_lr={FLAGS.min_lr} and --max_lr={FLAGS.max_lr}: need 0 < min_lr < max_lr")
    try:
        finetuner.check_weights_reachable(config)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    output_dir = FLAGS.output_dir or os.path.join(config.model_dir, "lr_find")
    # kft.train's lock: a sweep and a run (or two sweeps) never share a run directory.
    flag = f"--model_dir={config.model_dir}"
    try:
        rundir.check_owned(config.model_dir, flag, "run")
        lock = rundir.DirLock(config.model_dir, flag)
    except OSError as e:
        raise cli.UsageError(f"{flag} is not writable: {e.strerror}") from None
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    try:
        try:
            result = run_sweep(config, stage - 1, FLAGS.min_lr, FLAGS.max_lr, FLAGS.sweep_steps, splits)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
        write_outputs(result, output_dir)
    finally:
        lock.release()
    print(
        f"stage {stage} ({result['stage']}): {len(result['losses'])} steps, suggested learning rate "
        f"{result['suggested_lr']:.3g} -> --lr_scale={result['suggested_lr_scale']:.3g}; plot: "
        f"{os.path.join(output_dir, 'loss_vs_lr.png')}"
    )


if __name__ == "__main__":
    cli.run(main)
