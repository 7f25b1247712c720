"""The staged unfreeze schedule: parse `--stages`, apply a stage, and its learning rate.

Stage syntax (one flag holds the whole schedule, stages separated by commas)::

    WHAT:EPOCHS@LR[:bn=frozen|train][:warmup=FRACTION]

    WHAT      head         the new head only, backbone frozen
              topN         the head and the top N blocks of the backbone (top1, top2, ...)
              from=BLOCK   the head and every block from BLOCK (a block name) to the top
              all          everything
    EPOCHS    whole epochs of this stage (>= 1)
    LR        the stage's peak learning rate, before --lr_scale
    bn        frozen (default): every BatchNorm stays as pretrained, statistics and gamma/beta
              (the backbone runs in inference mode); train: the unfrozen blocks' BatchNorm layers
              train gamma/beta and update their statistics (frozen blocks still keep theirs)
    warmup    fraction of the stage's steps spent on linear warmup (default 0.1)

Example: ``head:3@1e-3,top2:2@1e-4,all:2@1e-5:bn=frozen``.

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
    r":(?P<epochs>\d+)@(?P<lr>[0-9.eE+-]+)(?P<opts>(:[a-z]+=[A-Za-z0-9_.]+)*)$"
)
STAGE_SYNTAX = "WHAT:EPOCHS@LR[:bn=frozen|train][:warmup=F] with WHAT one of head, topN, from=BLOCK, all"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the unfreeze schedule.

    Attributes:
      what: "head", "top", "from" or "all".
      epochs: number of epochs.
      lr: peak learning rate before --lr_scale.
      top_blocks: for what == "top", how many blocks from the top are trainable.
      from_block: for what == "from", the lowest trainable block's name.
      bn: "frozen" or "train".
      warmup: fraction of the stage's steps used for linear warmup.
    """

    what: str
    epochs: int
    lr: float
    top_blocks: int = 0
    from_block: str = ""
    bn: str = "frozen"
    warmup: float = 0.1

    def describe(self) -> str:
        """The stage written back in `--stages` syntax."""
        what = {"top": f"top{self.top_blocks}", "from": f"from={self.from_block}"}.get(
            self.what, self.what
        )
        return f"{what}:{self.epochs}@{self.lr:g}:bn={self.bn}:warmup={self.warmup:g}"


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
    return tuple(_parse_stage(p) for p in parts)


def _parse_stage(text: str) -> Stage:
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
    epochs = int(match["epochs"])
    if epochs < 1:
        raise ValueError(f"stage {text!r}: epochs must be >= 1, got {epochs}")
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
        else:
            raise ValueError(f"stage {text!r}: unknown option {key!r}; allowed: bn, warmup")
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
    if stage.what == "head":
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
    total = stage.epochs * steps_per_epoch
    return WarmupCosine(stage.lr * lr_scale, total, round(stage.warmup * total))
