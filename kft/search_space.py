"""What kft.tune searches: the space of `lr_scale` and the regularizer's strength, the trials'
Config values, and KerasTuner's oracle, whose Hyperband budgets become shortened schedules.

The strength searched is the Config field its registered class names (kft.regularizers): l2sp ->
l2sp_alpha, delta -> delta_alpha, bss -> bss_eta; with none only lr_scale is searched. The
search space (ranges from kft.tune's flags), written here for --regularizer=delta:

    lr_scale     log-uniform in [lr_scale_min, lr_scale_max]; multiplies every stage's LR
    delta        True/False: whether the regularizer is on. False is plain fine-tuning
                 (strength 0), which a log-uniform strength can never reach, so it gets its own
                 switch (named after the regularizer: l2sp, delta, bss)
    delta_alpha  log-uniform in [strength_min, strength_max]; the trial's strength when the
                 switch is on, ignored when it is off (sampled always, so every oracle, the
                 Bayesian one included, sees the same fixed-size space)

The first trial is the run as its flags give it (--lr_scale and the strength, clipped into the
ranges; kft.train's recipe unchanged by default), so the search ranks what it draws against it.

Hyperband budgets. KerasTuner's Hyperband gives each trial a budget `tuner/epochs` (total
epochs). kft maps it onto the stage schedule by shortening only the LAST stage, the one that
trains the most backbone: every earlier stage, the head stage first of all, always runs its
full epochs. With E_total the schedule's epochs and E_last the last stage's:

    max budget (Hyperband's max_epochs) = E_total                 the full schedule
    min budget                          = E_total - E_last + 1     the last stage cut to 1 epoch
    budget b                            -> last stage runs b - (E_total - E_last) epochs

The shortened stage keeps its learning rate and runs its whole warmup + cosine schedule over
the shorter length. KerasTuner's Hyperband starts at budget 1; kft raises its minimum to the
min budget above, so every budget maps exactly (a schedule whose last stage has 1 epoch makes
Hyperband a random search over full runs). A one-stage schedule shortens that stage.
Promoted trials (`tuner/trial_id`) train again from the start with the larger budget rather
than continuing the earlier run: a shortened stage has already decayed its learning rate to 0,
so its weights are not the midpoint of the longer run. `--max_trials` caps every tuner,
Hyperband included (its iterations are otherwise unbounded). best.cfg always trains the full
schedule; on equal objectives the trial trained longest wins.
"""

import dataclasses
import math

import keras_tuner as kt

from kft import regularizers, schedule
from kft.config import Config

OBJECTIVE = "best_val_accuracy"
TUNERS = ("hyperband", "bayesian", "random")


def searched_fields(regularizer: str) -> tuple[str, ...]:
    """The Config fields each trial sets: lr_scale, then the regularizer's strength if it has one."""
    field = regularizers.strength_field(regularizer)
    return ("lr_scale", field) if field else ("lr_scale",)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Ranges of the searched knobs (both log-uniform; the regularizer off is a candidate too).

    The strength range applies to whichever strength `--regularizer` selects (its defaults suit
    L2-SP's alpha, DELTA's alpha and BSS's eta alike); --regularizer=none does not use it.
    """

    lr_scale_min: float = 0.1
    lr_scale_max: float = 10.0
    strength_min: float = 1e-4
    strength_max: float = 1e-1

    def validate(self) -> None:
        """Raises ValueError naming the flag of an empty, inverted or non-positive range."""
        for name in ("lr_scale", "strength"):
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            for end, value in (("min", low), ("max", high)):
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(f"--{name}_{end}={value:g} must be a finite number > 0 (the range is log-uniform)")
            if low >= high:
                raise ValueError(
                    f"--{name}_min={low:g} must be < --{name}_max={high:g} (the range is "
                    f"{'empty' if low == high else 'inverted'})"
                )

    def hyperparameters(self, regularizer: str, lr_scale: float = 1.0, strength: float = 0.0) -> kt.HyperParameters:
        """lr_scale, and for a regularizer with a strength its on/off switch and its strength.

        Their defaults, the search's first trial (`_RunFirst`), are the run's own `lr_scale` and
        `strength` (0: the regularizer off), each clipped into its range.
        """
        hp = kt.HyperParameters()
        low, high = self.lr_scale_min, self.lr_scale_max
        hp.Float("lr_scale", low, high, sampling="log", default=min(max(lr_scale, low), high))
        field = regularizers.strength_field(regularizer)
        if field:
            low, high = self.strength_min, self.strength_max
            hp.Boolean(regularizer, default=strength > 0)
            hp.Float(field, low, high, sampling="log", default=min(max(strength, low), high))
        return hp


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What kft.tune's own flags say."""

    tune_dir: str
    tuner: str = "hyperband"
    max_trials: int = 20
    space: SearchSpace = SearchSpace()
    hyperband_factor: int = 3
    overwrite: bool = False


def trial_values(values: dict, regularizer: str) -> dict:
    """The Config values of a trial's hyperparameters, e.g. {"lr_scale": 2.0, "delta_alpha": 0.01};
    the strength is 0 when the regularizer's switch is off."""
    out = {"lr_scale": float(values["lr_scale"])}
    field = regularizers.strength_field(regularizer)
    if field:
        out[field] = float(values[field]) if values.get(regularizer, True) else 0.0
    return out


def describe(values: dict) -> str:
    """ "lr_scale=2 delta_alpha=0.01", for the lines printed per trial."""
    return " ".join(f"{name}={value:.4g}" for name, value in values.items())


# ----------------------------------------------------------------------------------------------
# Hyperband budget -> stage schedule.


def min_budget(stages: tuple[schedule.Stage, ...]) -> int:
    """The fewest total epochs a trial may train: all stages but the last in full, the last 1."""
    if len(stages) == 1:
        return 1
    return sum(s.epochs for s in stages[:-1]) + 1


def budget_stages(stages: tuple[schedule.Stage, ...], budget: int) -> tuple[schedule.Stage, ...]:
    """The schedule shortened to `budget` total epochs by cutting only its last stage.

    Raises:
      ValueError: the budget is below `min_budget` or above the schedule's total epochs.
    """
    total = sum(s.epochs for s in stages)
    low = min_budget(stages)
    if not low <= budget <= total:
        raise ValueError(f"epoch budget {budget} outside [{low}, {total}] for this schedule")
    last = stages[-1]
    epochs = last.epochs - (total - budget)
    # A stage counted in steps keeps its steps per round: fewer rounds, fewer steps.
    steps = last.steps_per_round(0) * epochs if last.steps else 0
    return stages[:-1] + (dataclasses.replace(last, epochs=epochs, steps=steps),)


class _RunFirst:
    """Makes an oracle's first trial the run as configured (the hyperparameters' defaults: the
    flags' --lr_scale and strength) before it draws any: what kft.train would train is always a
    candidate, so the search never keeps a trial it did not rank above it."""

    def _random_values(self):
        values = dict(self.hyperparameters.values)
        if self._compute_values_hash(values) not in self._tried_so_far:
            return values
        return super()._random_values()


class _RandomSearchOracle(_RunFirst, kt.oracles.RandomSearchOracle):
    pass


class _BayesianOracle(_RunFirst, kt.oracles.BayesianOptimizationOracle):
    pass


class _StageHyperbandOracle(_RunFirst, kt.oracles.HyperbandOracle):
    """KerasTuner's Hyperband with its smallest budget raised from 1 epoch to `min_epochs`."""

    def __init__(self, min_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.min_epochs = min_epochs
        # HyperbandOracle.__init__ derived its brackets from min_epochs=1; derive them again.
        self._current_bracket = self._get_num_brackets() - 1
        self._brackets = []
        self._start_new_bracket()


def hyperband_shortfall(tune: TuneConfig, config: Config) -> str | None:
    """The warning for a Hyperband search that --max_trials ends before any trial has trained
    the whole schedule (best.cfg would be chosen on shortened runs), or None."""
    if tune.tuner != "hyperband":
        return None
    oracle = make_oracle(tune, config)
    bracket = oracle._get_num_brackets() - 1  # The first bracket: the most trials, the shortest.
    # Its rounds before the last, then the first trial of its last round, the full schedule.
    needed = sum(oracle._get_size(bracket, r) for r in range(bracket)) + 1
    if tune.max_trials >= needed:
        return None
    return (
        f"warning: --max_trials={tune.max_trials} stops Hyperband before any trial trains the whole "
        f"schedule: its first bracket trains {oracle._get_size(bracket, 0)} trials for "
        f"{oracle._get_epochs(bracket, 0)} of the schedule's {config.total_epochs} epochs, and its first "
        f"full-length trial is trial {needed - 1}, so best.cfg would be chosen on shortened runs; give "
        f"--max_trials={needed} or more, or --tuner=random or bayesian (every trial trains in full)"
    )


def _strength(config: Config, regularizer: str) -> float:
    field = regularizers.strength_field(regularizer)
    return getattr(config, field) if field else 0.0


def make_oracle(tune: TuneConfig, config: Config) -> kt.Oracle:
    """The KerasTuner oracle named by `tune.tuner`, seeded from `config.seed`."""
    common = dict(
        objective=kt.Objective(OBJECTIVE, direction="max"),
        hyperparameters=tune.space.hyperparameters(
            config.regularizer, config.lr_scale, _strength(config, config.regularizer)
        ),
        # KerasTuner takes seed 0 to mean "pick one at random".
        seed=config.seed + 1,
    )
    if tune.tuner == "hyperband":
        oracle = _StageHyperbandOracle(
            min_epochs=min_budget(config.stages),
            max_epochs=config.total_epochs,
            factor=tune.hyperband_factor,
            hyperband_iterations=None,  # Unbounded: --max_trials ends the search.
            **common,
        )
        oracle.max_trials = tune.max_trials
    elif tune.tuner == "bayesian":
        oracle = _BayesianOracle(max_trials=tune.max_trials, **common)
    elif tune.tuner == "random":
        oracle = _RandomSearchOracle(max_trials=tune.max_trials, **common)
    else:
        raise ValueError(f"unknown tuner {tune.tuner!r}; choose one of: {', '.join(TUNERS)}")
    oracle.verbose = 0  # kft prints its own one line per trial.
    return oracle
