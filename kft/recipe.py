"""`--recipe=auto`: the fine-tuning recipe derived from the data, for flags the user did not give.

A schedule counted in epochs fits one size of data: `head:3,top2:3` at batch 64 is 4,700 steps
on CIFAR-10 and 6 steps on a folder of 50 images. BiT-HyperRule (Kolesnikov et al. 2020,
google-research/big_transfer) counts optimizer steps instead, by the size of the set: 500 below
20k examples, 10k below 500k, 20k above (at batch 512). kft keeps those step counts at its own,
smaller batch sizes (so small sets see fewer examples than BiT's, and a CPU can run them), and
never trains fewer than MIN_EPOCHS passes, the length of the old default schedule.

The recipe, for N training images:
  batch     64 from 1,024 images; below, the power of two nearest N/8 (at least 8), so a
            small set still gets several steps per pass
  stages    probe, then every block at once for the steps above (LP-FT, Kumar et al. 2022: the
            head starts as a linear probe, so the fine-tune does not start from a random head),
            Adam with warmup + cosine, BatchNorm frozen; the peak rate scales with the square
            root of the batch (BASE_LR at batch 64)
  augment   crop and flip; mixup added from 20k images (BiT: mixup only for large sets)
With a hidden head layer (`--hidden_units`) the probe cannot initialize the head, and a short
head-only stage takes its place.
"""

import dataclasses
import math

# BiT-HyperRule's schedule lengths (optimizer steps) by training-set size.
SMALL, MEDIUM = 20_000, 500_000
STEPS = {"small": 500, "medium": 10_000, "large": 20_000}
# The old default schedule (head:3,top2:3) ran 6 epochs; no recipe trains fewer.
MIN_EPOCHS = 6
# Adam's peak learning rate for fine-tuning every block at batch 64.
BASE_LR = 1e-4
BASE_BATCH = 64
MIN_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The flags a recipe sets, as `--name=value` strings would give them, and why."""

    batch_size: int
    stages: str
    augment: str
    reasons: tuple[str, ...]

    def flags(self) -> dict[str, object]:
        return {"batch_size": self.batch_size, "stages": self.stages, "augment": self.augment}


def batch_size_for(num_train: int) -> int:
    if num_train >= 16 * BASE_BATCH:
        return BASE_BATCH
    nearest = 2 ** round(math.log2(max(1.0, num_train / 8)))
    return int(min(BASE_BATCH, max(MIN_BATCH, nearest)))


def steps_for(num_train: int, batch_size: int) -> int:
    band = "small" if num_train < SMALL else "medium" if num_train < MEDIUM else "large"
    steps_per_epoch = max(1, num_train // batch_size)
    return max(STEPS[band], MIN_EPOCHS * steps_per_epoch)


def derive(num_train: int, num_classes: int, *, hidden_units: int = 0,
           batch_size: int | None = None) -> Recipe:
    """The recipe for a training set of `num_train` images in `num_classes` classes.

    Args:
      num_train, num_classes: the training split's size and classes.
      hidden_units: the head's hidden layer width (0 = none; the probe needs none).
      batch_size: the user's batch size, which the schedule is then counted in; None: derived.
    """
    batch = batch_size or batch_size_for(num_train)
    steps = steps_for(num_train, batch)
    lr = BASE_LR * math.sqrt(batch / BASE_BATCH)
    first = "probe" if not hidden_units else "head:%dsteps@1e-3" % max(50, steps // 10)
    stages = f"{first},all:{steps}steps@{lr:.2g}"
    augment = "crop,flip,mixup" if num_train >= SMALL else "crop,flip"
    epochs = steps * batch / max(1, num_train)
    reasons = (
        f"{num_train} training images in {num_classes} classes",
        f"batch {batch}: {max(1, num_train // batch)} steps per pass over the training set",
        f"{steps} fine-tuning steps (BiT-HyperRule for {'<20k' if num_train < SMALL else '<500k' if num_train < MEDIUM else '>=500k'} "
        f"images, at least {MIN_EPOCHS} passes): about {epochs:.0f} passes",
        ("the head starts as a linear probe on the frozen features (LP-FT)" if not hidden_units
         else "a head-only stage first (--hidden_units rules out the closed-form probe)"),
        f"then every block at peak rate {lr:.2g} (Adam, warmup + cosine, BatchNorm frozen)",
        f"augmentation {augment}" + (" (mixup from 20k images)" if num_train >= SMALL else ""),
    )
    return Recipe(batch, stages, augment, reasons)


def describe(recipe: Recipe, overridden: dict[str, object]) -> str:
    """The resolved recipe as one readable block: what it set, what the user's flags kept."""
    lines = ["recipe (--recipe=auto; any flag you give wins):"]
    lines += [f"  {reason}" for reason in recipe.reasons]
    for name, value in recipe.flags().items():
        if name in overridden:
            lines.append(f"  --{name}={overridden[name]}  (yours; the recipe's: {value})")
        else:
            lines.append(f"  --{name}={value}")
    return "\n".join(lines)
