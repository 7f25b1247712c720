"""The staged unfreeze schedule: parse `--stages`, which blocks a stage trains, and its learning
rate (kft.finetuner.apply_stage makes them trainable).

Stage syntax (one flag holds the whole schedule, stages separated by commas)::

    WHAT:LENGTH@LR[:bn=frozen|train][:warmup=FRACTION][:rounds=R]
    probe

    WHAT      head         the new head only, backbone frozen
              topN         the head and the top N blocks of the backbone (top1, top2, ...)
              from=BLOCK   the head and every block from BLOCK (a block name) to the top
              all          everything
    LENGTH    EPOCHS (whole passes over the training set, >= 1) or Nsteps, e.g. 500steps:
              N optimizer steps whatever the set's size, run as R rounds (default
              min(10, N)) of N/R steps, each ending with validation and a resume checkpoint
    LR        the stage's peak learning rate, before --lr_scale
    bn        frozen (default): every BatchNorm stays as pretrained, statistics and gamma/beta
              (the backbone runs in inference mode); train: the unfrozen blocks' BatchNorm layers
              train gamma/beta and update their statistics (frozen blocks still keep theirs)
    warmup    fraction of the stage's steps spent on linear warmup (default 0.1)
    probe     a linear probe (kft.probe): the head fitted in closed form on the frozen
              backbone's features of every training image; no epochs, no learning rate.
              Only as the first stage.

Examples: ``head:3@1e-3,top2:2@1e-4,all:2@1e-5:bn=frozen``, ``probe,all:500steps@1e-4``.

Learning rate inside a stage of T steps with W = round(warmup * T) warmup steps, at step t
(0-based, counted from the stage start)::

    lr(t) = peak * (t + 1) / W                                  for t < W
    lr(t) = peak * 0.5 * (1 + cos(pi * (t - W) / max(1, T - W)))  for t >= W

where peak = LR * --lr_scale. The learning rate never goes below 0 and stays at 0 after T.
"""

import dataclasses
import math
import re

import keras

_STAGE_RE = re.compile(
    r"^(?P<what>head|all|top(?P<n>\d+)|from=(?P<block>[A-Za-z0-9_]+))"
    r":(?P<length>\d+)(?P<steps>steps)?@(?P<lr>[0-9.eE+-]+)(?P<opts>(:[a-z]+=[A-Za-z0-9_.]+)*)$"
)
STAGE_SYNTAX = (
    "WHAT:EPOCHS@LR or WHAT:Nsteps@LR, then [:bn=frozen|train][:warmup=F][:rounds=R], "
    "with WHAT one of head, topN, from=BLOCK, all; or probe (first stage only)"
)
# Fewest validation images that can rank checkpoints: the binomial standard error of an accuracy
# measured on n images is at most 0.5/sqrt(n), 0.05 at 100. Models a few points apart (epochs of
# one run, the probe and the fine-tune) cannot be told apart on fewer.
MIN_RANKING_VAL = 100


def check_selection(selection: str, num_val: int) -> None:
    """Raises ValueError (one line) for --checkpoint_selection=best without a validation split."""
    if selection == "best" and num_val == 0:
        raise ValueError(
            "--checkpoint_selection=best needs a validation split, and --val_fraction=0 holds out "
            "none; give --val_fraction > 0 or --checkpoint_selection=auto|last"
        )


# A stage counted in steps is run as at most this many rounds, each ending with validation and a
# resume checkpoint: often enough to resume and to follow, rare enough to cost little.
MAX_ROUNDS = 10


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the unfreeze schedule.

    Attributes:
      what: "probe", "head", "top", "from" or "all".
      epochs: number of rounds the trainer runs: whole epochs, or for a stage counted in steps
        the rounds its steps are split into (0 for the probe).
      lr: peak learning rate before --lr_scale (0 for the probe).
      top_blocks: for what == "top", how many blocks from the top are trainable.
      from_block: for what == "from", the lowest trainable block's name.
      bn: "frozen" or "train".
      warmup: fraction of the stage's steps used for linear warmup.
      steps: optimizer steps of a stage counted in steps; 0 for one counted in epochs.
    """

    what: str
    epochs: int
    lr: float
    top_blocks: int = 0
    from_block: str = ""
    bn: str = "frozen"
    warmup: float = 0.1
    steps: int = 0

    def describe(self) -> str:
        """The stage written back in `--stages` syntax."""
        if self.what == "probe":
            return "probe"
        what = {"top": f"top{self.top_blocks}", "from": f"from={self.from_block}"}.get(self.what, self.what)
        length = f"{self.steps}steps" if self.steps else str(self.epochs)
        rounds = f":rounds={self.epochs}" if self.steps and self.epochs != default_rounds(self.steps) else ""
        return f"{what}:{length}@{_exact(self.lr)}:bn={self.bn}:warmup={_exact(self.warmup)}{rounds}"

    def steps_per_round(self, steps_per_epoch: int) -> int:
        """Optimizer steps in one of this stage's rounds (an epoch for stages counted in epochs)."""
        return math.ceil(self.steps / self.epochs) if self.steps else steps_per_epoch

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.epochs * self.steps_per_round(steps_per_epoch)


def _exact(x: float) -> str:
    """`x` as %g where that parses back to the same float, else in full (flags.cfg reproduces
    a run's stages exactly)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def default_rounds(steps: int) -> int:
    return min(MAX_ROUNDS, steps)


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """Parses a `--stages` value.

    Args:
      spec: comma-separated stages, e.g. "head:3@1e-3,top2:2@1e-4".

    Returns:
      The stages in order.

    Raises:
      ValueError: one line naming the bad stage and the syntax.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--stages={spec!r} is empty; expected {STAGE_SYNTAX}")
    stages = tuple(_parse_stage(p) for p in parts)
    if any(stage.what == "probe" for stage in stages[1:]):
        raise ValueError(
            f"--stages={spec!r}: probe may only be the first stage (it fits the new "
            "head on the pretrained backbone's features)"
        )
    return stages


def _parse_stage(text: str) -> Stage:
    if text == "probe":
        return Stage(what="probe", epochs=0, lr=0.0)
    match = _STAGE_RE.match(text)
    if not match:
        raise ValueError(f"malformed stage {text!r} in --stages; expected {STAGE_SYNTAX}")
    what = match["what"]
    fields = {}
    if match["n"] is not None:
        what, fields["top_blocks"] = "top", int(match["n"])
        if fields["top_blocks"] < 1:
            raise ValueError(f"stage {text!r}: topN needs N >= 1")
    elif match["block"] is not None:
        what, fields["from_block"] = "from", match["block"]
    length = int(match["length"])
    if length < 1:
        raise ValueError(f"stage {text!r}: {'steps' if match['steps'] else 'epochs'} must be >= 1, got {length}")
    if match["steps"]:
        fields["steps"] = length
        epochs = default_rounds(length)
    else:
        epochs = length
    try:
        lr = float(match["lr"])
    except ValueError:
        raise ValueError(f"stage {text!r}: learning rate {match['lr']!r} is not a number") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"stage {text!r}: learning rate must be > 0, got {match['lr']}")
    for opt in filter(None, match["opts"].split(":")):
        key, value = opt.split("=", 1)
        if key == "bn":
            if value not in ("frozen", "train"):
                raise ValueError(f"stage {text!r}: bn={value!r}; allowed: frozen, train")
            fields["bn"] = value
        elif key == "warmup":
            try:
                warmup = float(value)
            except ValueError:
                warmup = -1.0
            if not 0.0 <= warmup < 1.0:
                raise ValueError(f"stage {text!r}: warmup={value!r}; allowed: a fraction in [0, 1)")
            fields["warmup"] = warmup
        elif key == "rounds" and match["steps"]:
            if not value.isdigit() or not 1 <= int(value) <= length:
                raise ValueError(f"stage {text!r}: rounds={value!r}; allowed: 1 to the stage's {length} steps")
            epochs = int(value)
        else:
            allowed = "bn, warmup, rounds (stages counted in steps)"
            raise ValueError(f"stage {text!r}: unknown option {key!r}; allowed: {allowed}")
    return Stage(what=what, epochs=epochs, lr=lr, **fields)


def trainable_block_names(stage: Stage, block_names: list[str]) -> list[str]:
    """The backbone blocks a stage trains.

    Args:
      stage: the stage.
      block_names: the backbone's block names, bottom (input) to top.

    Returns:
      The trainable block names, bottom to top (empty for a head-only stage).

    Raises:
      ValueError: the stage names a block, or more blocks, than the backbone has.
    """
    if stage.what in ("head", "probe"):
        return []
    if stage.what == "all":
        return list(block_names)
    if stage.what == "top":
        if stage.top_blocks > len(block_names):
            raise ValueError(
                f"stage top{stage.top_blocks}: the backbone has only {len(block_names)} blocks "
                f"({block_names[0]} ... {block_names[-1]})"
            )
        return list(block_names[-stage.top_blocks :])
    if stage.from_block not in block_names:
        raise ValueError(
            f"stage from={stage.from_block}: no block {stage.from_block!r} in this backbone; "
            f"its blocks are: {', '.join(block_names)}"
        )
    return list(block_names[block_names.index(stage.from_block) :])


def validate_against_blocks(stages: tuple[Stage, ...], block_names: list[str]) -> None:
    """Raises ValueError if any stage names blocks the backbone lacks."""
    for stage in stages:
        trainable_block_names(stage, block_names)


@keras.saving.register_keras_serializable("kft")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup then cosine decay to zero over one stage (formula in the module doc)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak = float(peak)
        self.total_steps = int(max(1, total_steps))
        self.warmup_steps = int(max(0, min(warmup_steps, self.total_steps - 1)))

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(1, self.warmup_steps)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = self.peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        return keras.ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def stage_learning_rate(stage: Stage, lr_scale: float, steps_per_epoch: int) -> WarmupCosine:
    """The learning-rate schedule of one stage."""
    total = stage.total_steps(steps_per_epoch)
    return WarmupCosine(stage.lr * lr_scale, total, round(stage.warmup * total))
