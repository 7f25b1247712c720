"""kft.tune: the smoke search end to end, Hyperband budgets, the strength each --regularizer
searches, resume, overwrite, memory per trial, distributed chief + workers, and bad input.

Tests of the search's bookkeeping replace `trainer.train` with an instant fake whose objective
is a known function of the trial's values; the smoke, BSS, memory and distributed tests train
for real.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from kft import crossval, data, model, regularizers, runfiles, schedule, search, search_files, search_space, trainer
from kft import flags as kft_flags
from kft import tune as tune_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
KT_ENV = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")

# Real trials as cheap as kft gets: one 1-epoch head stage on 16 digit images.
TINY = [
    "--dataset=digits:0-1",
    "--backbone=MobileNet",
    "--weights=none",
    "--image_size=32",
    "--batch_size=32",
    "--stages=head:1@1e-3",
    "--train_limit_per_class=8",
    "--augment=none",
    "--verbose=0",
]
# For the fake trainer: a two-stage schedule whose last stage Hyperband can shorten.
FAKE = [
    "--dataset=digits:0-2",
    "--backbone=MobileNet",
    "--weights=none",
    "--image_size=32",
    "--batch_size=32",
    "--stages=head:1@1e-3,top1:2@1e-4",
    "--train_limit_per_class=4",
    "--verbose=0",
]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in KT_ENV:
        monkeypatch.delenv(name, raising=False)


def parse(argv: list[str], prog: str = "kft.tune") -> None:
    """Parses flags as `python -m kft.tune` does (it needs no --model_dir)."""
    FLAGS.unparse_flags()
    FLAGS([prog, "--model_dir=", *argv] if prog == "kft.tune" else [prog, *argv])


def config_of(argv: list[str], prog: str = "kft.tune"):
    """The kft.train Config these flags parse to, as `prog` would parse them; flags reset after."""
    try:
        parse(argv, prog)
        return kft_flags.config_from_flags()
    finally:
        FLAGS.unparse_flags()


def with_recipe_views(config):
    """`config` with the test views kft.tune's recipe adds to these small sets: the symmetries
    of its --augment (config_of parses the flags without resolving the recipe)."""
    return dataclasses.replace(config, test_views=tuple(op for op in config.augment if op in model.TEST_VIEWS))


def best_cfg_config(tune_dir):
    """The Config `python -m kft.train --flagfile=TUNE_DIR/best.cfg` would run."""
    return config_of([f"--flagfile={tune_dir / 'best.cfg'}"], prog="kft.train")


def run_tune(argv: list[str]) -> None:
    """Runs kft.tune's main() in this process, as the command line would."""
    try:
        parse(argv)
        tune_main.main(["kft.tune"])
    finally:
        FLAGS.unparse_flags()


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    for name in KT_ENV:
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


class FakeTrain:
    """Stands in for trainer.train: instant; the objective peaks at lr_scale = 1 and L2-SP on.

    Writes run.json and flags.cfg like the real trainer, so resume and stale-directory handling
    are real.
    """

    def __init__(self, interrupt_at: int | None = None, diverge_at: tuple[int, ...] = ()):
        self.calls = []
        self.interrupt_at = interrupt_at
        self.diverge_at = diverge_at

    def __call__(self, config, splits=None, flagfile_text=""):
        os.makedirs(config.model_dir, exist_ok=True)
        flags_path = os.path.join(config.model_dir, "flags.cfg")
        resumed = os.path.exists(os.path.join(config.model_dir, "run.json"))
        self.calls.append({"config": config, "splits": splits, "resumed": resumed})
        runfiles.write_config(config)
        if flagfile_text:
            with open(flags_path, "w") as f:
                f.write(flagfile_text)
        open(os.path.join(config.model_dir, "backbone.weights.h5"), "w").close()
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # The process is stopped in the middle of this trial.
        if len(self.calls) in self.diverge_at or -1 in self.diverge_at:
            raise trainer.DivergenceError("loss became nan in stage 2")
        score = 1.0 / (1.0 + abs(math.log10(config.lr_scale))) * (1.0 if config.l2sp_alpha else 0.9)
        kept = score * (1 - 0.1 * _fold_index(config.model_dir))  # Cross-validation folds differ.
        metrics = {
            "best_val_accuracy": score,
            "best_model_val_accuracy": kept,
            "num_val": splits.num_val if splits is not None else 0,
            "stages": [{"epochs": s.epochs} for s in config.stages],
        }
        with open(os.path.join(config.model_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f)  # Last, as the real trainer writes it.
        return metrics

    def trial_dirs(self):
        return [os.path.basename(c["config"].model_dir) for c in self.calls]


def _fold_index(model_dir: str) -> int:
    name = os.path.basename(model_dir)
    return int(name.removeprefix("fold-")) if name.startswith("fold-") else 0


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(trainer, "train", fake)
    return fake


def read_rows(tune_dir) -> list[dict]:
    return search_files.read_trials_csv(os.path.join(tune_dir, "trials.csv"))


def tree_digest(root) -> dict:
    digests = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


# ----------------------------------------------------------------------------------------------
# Hyperband budget -> stage schedule.


def test_budget_shortens_only_the_last_stage():
    stages = schedule.parse_stages("head:2@1e-3,top2:3@1e-4,all:4@1e-5")
    assert search_space.min_budget(stages) == 6
    assert search_space.budget_stages(stages, 9) == stages
    short = search_space.budget_stages(stages, 7)
    assert [s.epochs for s in short] == [2, 3, 2]
    assert short[-1].lr == stages[-1].lr and short[-1].what == "all"
    for bad in (5, 10):
        with pytest.raises(ValueError, match=rf"epoch budget {bad} outside \[6, 9\]"):
            search_space.budget_stages(stages, bad)
    one = schedule.parse_stages("head:4@1e-3")
    assert search_space.min_budget(one) == 1 and search_space.budget_stages(one, 2)[0].epochs == 2


def test_hyperband_budgets_never_cut_into_the_head_stage(tmp_path):
    # head:1 + top1:8: budgets must be >= 2; stock KerasTuner Hyperband would also try 1 epoch.
    config = config_of([*FAKE, "--stages=head:1@1e-3,top1:8@1e-4", "--seed=3"])
    tune = search_space.TuneConfig(tune_dir=str(tmp_path), tuner="hyperband", max_trials=12)
    oracle = search_space.make_oracle(tune, config)
    oracle._set_project_dir(str(tmp_path), "oracle")
    budgets = []
    for i in range(12):
        trial = oracle.create_trial("tuner0")
        assert trial.status == "RUNNING"
        budgets.append(trial.hyperparameters.values["tuner/epochs"])
        oracle.update_trial(trial.trial_id, {search_space.OBJECTIVE: (i * 7 % 5) / 5})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    assert set(budgets) == {3, 9}, budgets
    assert oracle.create_trial("tuner0").status == "STOPPED"  # --max_trials caps Hyperband.


def test_too_few_trials_for_hyperband_to_train_one_in_full_is_said_with_how_many_would(tmp_path, capsys):
    config = config_of([*FAKE, "--stages=head:1@1e-3,top1:8@1e-4", "--seed=3"])
    tune = search_space.TuneConfig(tune_dir=str(tmp_path), tuner="hyperband", max_trials=6)
    oracle = search_space.make_oracle(tune, config)
    oracle._set_project_dir(str(tmp_path), "oracle")
    budgets = []
    for _ in range(6):
        trial = oracle.create_trial("tuner0")
        budgets.append(trial.hyperparameters.values["tuner/epochs"])
        oracle.update_trial(trial.trial_id, {search_space.OBJECTIVE: 0.5})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    assert budgets == [3] * 5 + [9]  # KerasTuner's first bracket: its 6th trial is the first in full.
    assert search_space.hyperband_shortfall(tune, config) is None
    assert search_space.hyperband_shortfall(dataclasses.replace(tune, tuner="random", max_trials=1), config) is None
    assert search_space.hyperband_shortfall(dataclasses.replace(tune, max_trials=5), config) == (
        "warning: --max_trials=5 stops Hyperband before any trial trains the whole schedule: its first "
        "bracket trains 5 trials for 3 of the schedule's 9 epochs, and its first full-length trial is "
        "trial 5, so best.cfg would be chosen on shortened runs; give --max_trials=6 or more, or "
        "--tuner=random or bayesian (every trial trains in full)"
    )


def test_kft_tune_warns_when_hyperband_would_choose_on_shortened_runs(tmp_path, fake_train, capsys):
    argv = [*FAKE, "--stages=head:1@1e-3,top1:8@1e-4", "--tuner=hyperband", "--max_trials=2"]
    run_tune([*argv, f"--tune_dir={tmp_path / 'short'}"])
    assert (
        "warning: --max_trials=2 stops Hyperband before any trial trains the whole schedule" in capsys.readouterr().out
    )
    assert [r["epochs"] for r in read_rows(tmp_path / "short")] == ["3", "3"]
    run_tune([*argv, "--tuner=random", f"--tune_dir={tmp_path / 'full'}"])
    assert "stops Hyperband" not in capsys.readouterr().out
    assert [r["epochs"] for r in read_rows(tmp_path / "full")] == ["9", "9"]


# ----------------------------------------------------------------------------------------------
# --regularizer -> the strength searched.


@pytest.mark.parametrize("regularizer, field", [("l2sp", "l2sp_alpha"), ("delta", "delta_alpha"), ("bss", "bss_eta")])
def test_each_regularizer_searches_its_own_strength(regularizer, field):
    assert regularizers.strength_field(regularizer) == field
    hp = search_space.SearchSpace(strength_min=1e-3, strength_max=1e-2).hyperparameters(regularizer)
    assert [p.name for p in hp.space] == ["lr_scale", regularizer, field]
    strength = hp.space[2]
    assert (strength.min_value, strength.max_value, strength.sampling) == (1e-3, 1e-2, "log")
    on = {"lr_scale": 2.0, regularizer: True, field: 0.005}
    assert search_space.trial_values(on, regularizer) == {"lr_scale": 2.0, field: 0.005}
    # Switched off: strength 0, plain fine-tuning, whatever strength was sampled.
    assert search_space.trial_values({**on, regularizer: False}, regularizer) == {"lr_scale": 2.0, field: 0.0}
    assert search_files.csv_columns(regularizer)[:3] == ("trial_id", "lr_scale", field)


def test_regularizer_none_searches_lr_scale_only():
    hp = search_space.SearchSpace().hyperparameters("none")
    assert [p.name for p in hp.space] == ["lr_scale"]
    assert search_space.trial_values({"lr_scale": 2.0}, "none") == {"lr_scale": 2.0}
    assert search_files.csv_columns("none")[:3] == ("trial_id", "lr_scale", "objective")


# ----------------------------------------------------------------------------------------------
# The search's bookkeeping (fake trainer).


def test_best_cfg_holds_the_best_trial_and_parses_as_kft_train_flags(tmp_path, fake_train):
    tune_dir = tmp_path / "tune"
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=5"])
    rows = read_rows(tune_dir)
    assert [r["trial_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r["status"] == "COMPLETED" and r["epochs"] == "3" for r in rows)
    assert sorted(fake_train.trial_dirs()) == ["0", "1", "2", "3", "4"]
    for row, call in zip(rows, sorted(fake_train.calls, key=lambda c: int(os.path.basename(c["config"].model_dir)))):
        assert float(row["lr_scale"]) == call["config"].lr_scale
        assert float(row["l2sp_alpha"]) == call["config"].l2sp_alpha
        assert call["config"].export_dir == "none" and call["config"].verbose == 0
    best = max(rows, key=lambda r: float(r["objective"]))
    assert float(best["objective"]) == pytest.approx(
        1 / (1 + abs(math.log10(float(best["lr_scale"])))) * (1.0 if float(best["l2sp_alpha"]) else 0.9)
    )
    base = with_recipe_views(config_of([*FAKE]))
    assert base.test_views == ("flip",)
    tuned = best_cfg_config(tune_dir)
    assert tuned == dataclasses.replace(
        base, lr_scale=float(best["lr_scale"]), l2sp_alpha=float(best["l2sp_alpha"]), model_dir=str(tune_dir / "best")
    )


def test_delta_search_sets_delta_alpha_in_trials_csv_table_and_best_cfg(tmp_path, fake_train, capsys):
    tune_dir = tmp_path / "tune"
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--regularizer=delta", "--tuner=random", "--max_trials=4"])
    rows = read_rows(tune_dir)
    assert list(rows[0]) == [
        "trial_id",
        "lr_scale",
        "delta_alpha",
        "objective",
        "ranked_on",
        "epochs",
        "wall_seconds",
        "status",
    ]
    base = with_recipe_views(config_of([*FAKE, "--regularizer=delta"]))
    for row, call in zip(rows, sorted(fake_train.calls, key=lambda c: int(os.path.basename(c["config"].model_dir)))):
        config = call["config"]
        assert float(row["delta_alpha"]) == config.delta_alpha
        assert config.delta_alpha == 0 or 1e-4 <= config.delta_alpha <= 1e-1
        assert (config.regularizer, config.l2sp_alpha, config.bss_eta) == ("delta", base.l2sp_alpha, base.bss_eta)
    assert any(
        line.split()[:3] == ["trial", "lr_scale", "delta_alpha"] for line in capsys.readouterr().out.splitlines()
    )
    best = max(rows, key=lambda r: float(r["objective"]))
    tuned = best_cfg_config(tune_dir)
    assert tuned == dataclasses.replace(
        base, lr_scale=float(best["lr_scale"]), delta_alpha=float(best["delta_alpha"]), model_dir=str(tune_dir / "best")
    )


def test_regularizer_none_searches_lr_scale_alone(tmp_path, fake_train):
    tune_dir = tmp_path / "tune"
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--regularizer=none", "--tuner=random", "--max_trials=3"])
    rows = read_rows(tune_dir)
    assert list(rows[0]) == ["trial_id", "lr_scale", "objective", "ranked_on", "epochs", "wall_seconds", "status"]
    base = with_recipe_views(config_of([*FAKE, "--regularizer=none"]))
    for call in fake_train.calls:  # Only lr_scale and the trial's output settings differ from the flags.
        config = call["config"]
        assert (
            dataclasses.replace(
                config,
                lr_scale=base.lr_scale,
                model_dir=base.model_dir,
                export_dir=base.export_dir,
                verbose=base.verbose,
            )
            == base
        )
    best = max(rows, key=lambda r: float(r["objective"]))
    tuned = best_cfg_config(tune_dir)
    assert tuned == dataclasses.replace(base, lr_scale=float(best["lr_scale"]), model_dir=str(tune_dir / "best"))
    # The strength range is unused, so changing it is no other search.
    run_tune(
        [
            *FAKE,
            f"--tune_dir={tune_dir}",
            "--regularizer=none",
            "--tuner=random",
            "--max_trials=3",
            "--strength_max=0.5",
        ]
    )
    assert len(fake_train.calls) == 3


def test_rerun_after_a_stop_keeps_finished_trials_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    tune_dir = tmp_path / "tune"
    argv = [*FAKE, f"--tune_dir={tune_dir}", "--tuner=bayesian", "--max_trials=4"]
    stopped = FakeTrain(interrupt_at=3)
    monkeypatch.setattr(trainer, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_tune(argv)
    assert stopped.trial_dirs() == ["0", "1", "2"]
    finished = {name: (tune_dir / "oracle" / f"trial_{name}" / "trial.json").read_text() for name in ("0", "1")}

    rerun = FakeTrain()
    monkeypatch.setattr(trainer, "train", rerun)
    run_tune(argv)
    # Trial 2 runs again in its own directory (where the real trainer resumes); 0 and 1 do not.
    assert rerun.trial_dirs() == ["2", "3"]
    assert rerun.calls[0]["resumed"] and rerun.calls[0]["config"] == stopped.calls[2]["config"]
    for name, text in finished.items():
        assert (tune_dir / "oracle" / f"trial_{name}" / "trial.json").read_text() == text
    assert [r["status"] for r in read_rows(tune_dir)] == ["COMPLETED"] * 4

    # The same command once more has nothing left to do; a larger --max_trials extends.
    again = FakeTrain()
    monkeypatch.setattr(trainer, "train", again)
    run_tune(argv)
    assert again.calls == []
    run_tune([*argv[:-1], "--max_trials=5"])
    assert again.trial_dirs() == ["4"] and len(read_rows(tune_dir)) == 5


def test_overwrite_starts_over(tmp_path, fake_train):
    tune_dir = tmp_path / "tune"
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=3"])
    assert len(read_rows(tune_dir)) == 3
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--tuner=hyperband", "--max_trials=1", "--overwrite"])
    rows = read_rows(tune_dir)
    # Hyperband (factor 3) over 3 epochs with a 2-epoch minimum has one bracket: full budgets.
    assert len(rows) == 1 and rows[0]["epochs"] == "3"
    assert sorted(os.listdir(tune_dir / "trials")) == ["0"]
    assert sorted(os.listdir(tune_dir / "oracle")) == ["oracle.json", "trial_0", "tuner0.json"]


def test_pretrain_dataset_is_trained_once_and_every_trial_starts_from_it(tmp_path, fake_train, monkeypatch):
    monkeypatch.chdir(ROOT)
    tune_dir = tmp_path / "tune"
    run_tune(["--flagfile=configs/quickstart.cfg", f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=2"])
    pretrain_dir = str(tune_dir / "pretrain")
    source, *trials = [c["config"] for c in fake_train.calls]
    assert source.model_dir == pretrain_dir and source.dataset == "digits:0-4" and source.l2sp_alpha == 0
    weights = os.path.join(pretrain_dir, "backbone.weights.h5")
    for config in trials:
        assert config.weights == weights and config.pretrain_dataset == "" and not config.compare_scratch
        assert config.dataset == "digits:5-9"
    best_cfg = (tune_dir / "best.cfg").read_text()
    assert f"--weights={weights}\n" in best_cfg and "--pretrain_dataset=\n" in best_cfg
    assert "--compare_scratch\n" in best_cfg  # The final run still reports the baseline.
    # A rerun finds the source task done (the real trainer returns at once) and no new trials.
    fake_train.calls.clear()
    run_tune(["--flagfile=configs/quickstart.cfg", f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=2"])
    assert [c["config"].model_dir for c in fake_train.calls] == [pretrain_dir]


def test_diverged_trials_fail_without_stopping_the_search_until_three_in_a_row(tmp_path, monkeypatch, capsys):
    tune_dir = tmp_path / "tune"
    monkeypatch.setattr(trainer, "train", FakeTrain(diverge_at=(2,)))
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=3"])
    rows = read_rows(tune_dir)
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert rows[1]["objective"] == "" and "trial 1: failed, loss became nan" in capsys.readouterr().out
    assert (
        f"The best trial ({max(rows[0::2], key=lambda r: float(r['objective']))['trial_id']})"
        in (tune_dir / "best.cfg").read_text()
    )

    # KerasTuner ends a search after 3 consecutive failed trials: exit 1, the table still written.
    monkeypatch.setattr(trainer, "train", FakeTrain(diverge_at=(-1,)))
    with pytest.raises(SystemExit) as stopped:
        run_tune([*FAKE, f"--tune_dir={tmp_path / 'nan'}", "--tuner=random", "--max_trials=5"])
    assert stopped.value.code == 1
    assert "error: Number of consecutive failures exceeded the limit of 3." in capsys.readouterr().err
    assert [r["status"] for r in read_rows(tmp_path / "nan")] == ["FAILED"] * 3
    assert not (tmp_path / "nan" / "best.cfg").exists()


@pytest.mark.parametrize("tuner", search_space.TUNERS)
@pytest.mark.parametrize(
    "args, first",
    [
        ([], {"lr_scale": 1.0, "l2sp_alpha": 0.01}),
        (["--lr_scale=2", "--l2sp_alpha=0.003"], {"lr_scale": 2.0, "l2sp_alpha": 0.003}),
        (["--l2sp_alpha=0"], {"lr_scale": 1.0, "l2sp_alpha": 0.0}),  # The regularizer off.
        (["--lr_scale=50", "--l2sp_alpha=0.5"], {"lr_scale": 10.0, "l2sp_alpha": 0.1}),  # Clipped into range.
    ],
)
def test_the_first_trial_is_the_run_as_its_flags_give_it(tmp_path, fake_train, tuner, args, first):
    run_tune([*FAKE, *args, f"--tune_dir={tmp_path / 'tune'}", f"--tuner={tuner}", "--max_trials=3"])
    first_call = next(c["config"] for c in fake_train.calls if c["config"].model_dir.endswith(os.sep + "0"))
    assert {"lr_scale": first_call.lr_scale, "l2sp_alpha": first_call.l2sp_alpha} == first
    later = [c["config"] for c in fake_train.calls if not c["config"].model_dir.endswith(os.sep + "0")]
    assert later and all((c.lr_scale, c.l2sp_alpha) != (first["lr_scale"], first["l2sp_alpha"]) for c in later)


def _row(trial_id, lr_scale, objective, epochs=3, ranked_on=30, status="COMPLETED"):
    return {
        "trial_id": str(trial_id),
        "lr_scale": lr_scale,
        "l2sp_alpha": 0.01,
        "objective": objective,
        "ranked_on": ranked_on,
        "epochs": epochs,
        "status": status,
    }


def test_a_trial_within_the_margin_of_the_flags_settings_does_not_replace_them():
    searched = ("lr_scale", "l2sp_alpha")

    def choose(rows):
        best, note = search_files.choose_best(rows, searched, "cv3_accuracy")
        return best["trial_id"], note

    # 0.8333 vs 0.8000 on 30 images: one image; the standard error is sqrt(0.817 * 0.183 / 30).
    trial, note = choose([_row(0, 1.0, 0.8), _row(1, 0.2, 0.8333)])
    assert trial == "0" and note == (
        "trial 1 scored cv3_accuracy=0.8333, within 0.071 of the flags' own settings (trial 0, 0.8000; "
        "the margin for 1 other setting tried, on 30 images): best.cfg keeps them"
    )
    # 10 images of 300 (1.5 standard errors) beat the flags' settings when one other setting was
    # tried; when it was the best of three, the margin is 1.9 standard errors and they stay.
    assert choose([_row(0, 1.0, 0.8, ranked_on=300), _row(1, 0.2, 0.8333, ranked_on=300)]) == ("1", None)
    three = [_row(0, 1.0, 0.8, ranked_on=300), _row(1, 0.2, 0.8333, ranked_on=300)]
    three += [_row(2, 0.5, 0.79, ranked_on=300), _row(3, 3.0, 0.7, ranked_on=300)]
    trial, note = choose(three)
    assert trial == "0" and "within 0.043 of" in note and "the margin for 3 other settings tried, on 300" in note
    # Hyperband's reruns of one setting at a longer budget are one setting, not more challengers.
    reruns = [_row(0, 1.0, 0.8, ranked_on=300), _row(1, 0.2, 0.81, ranked_on=300, epochs=1)]
    assert choose([*reruns, _row(2, 0.2, 0.8333, ranked_on=300)]) == ("2", None)
    assert choose([_row(0, 1.0, 0.8), _row(1, 0.2, 0.95)]) == ("1", None)  # 15 points: evidence.
    assert choose([_row(0, 1.0, 0.8, ranked_on=3000), _row(1, 0.2, 0.8333, ranked_on=3000)]) == ("1", None)
    assert choose([_row(0, 1.0, 0.9), _row(1, 0.2, 0.8)]) == ("0", None)  # The flags' settings on top.
    # Hyperband promoted the first trial's settings (trial 3): those are what the rule keeps.
    rows = [_row(0, 1.0, 0.80, epochs=2), _row(1, 0.2, 0.84, epochs=11), _row(3, 1.0, 0.82, epochs=11)]
    assert choose(rows)[0] == "3"
    # No first trial to keep (it failed), or nothing to measure the error on: the top score.
    assert choose([_row(0, 1.0, None, status="FAILED"), _row(1, 0.2, 0.8333)]) == ("1", None)
    assert choose([_row(0, 1.0, 0.8, ranked_on=None), _row(1, 0.2, 0.8333, ranked_on=None)]) == ("1", None)


# ----------------------------------------------------------------------------------------------
# No validation split: trials ranked by cross-validation.


def _digits(limit: int, seed: int = 0) -> data.Splits:
    return data.load(
        "digits:0-2", image_size=32, batch_size=8, val_fraction=0.0, seed=seed, train_limit_per_class=limit
    )


def _image_keys(dataset) -> list[bytes]:
    return sorted(x.tobytes() + bytes([int(y)]) for images, labels in dataset for x, y in zip(images.numpy(), labels))


def test_folds_hold_every_training_image_out_once_stratified_and_seeded():
    splits = _digits(limit=7)
    folds = crossval.folds(splits, seed=0)
    everything = _image_keys(splits.train_in_order)
    assert len(folds) == crossval.FOLDS == 3 and len(everything) == 21
    held_out = []
    for fold in folds:
        val = _image_keys(fold.val)
        assert sorted(_image_keys(fold.train_in_order) + val) == everything  # Train and val partition the set.
        assert sorted(val[i][-1] for i in range(len(val))) in ([0] * 3 + [1] * 3 + [2] * 3, [0] * 2 + [1] * 2 + [2] * 2)
        assert fold.num_val == len(val) and fold.num_train == 21 - len(val) and fold.class_names == ("0", "1", "2")
        assert fold.train.element_spec[0].shape[1:] == (32, 32, 3)
        held_out += val
    assert sorted(held_out) == everything
    assert [_image_keys(f.val) for f in crossval.folds(splits, seed=0)] == [_image_keys(f.val) for f in folds]
    assert [_image_keys(f.val) for f in crossval.folds(splits, seed=1)] != [_image_keys(f.val) for f in folds]
    # Two images per class make two folds; one image cannot be both trained on and held out.
    assert len(crossval.folds(_digits(limit=2), seed=0)) == 2
    with pytest.raises(ValueError, match=r"^every class has a single training image \(3 classes\): ranking kft.tune"):
        crossval.folds(_digits(limit=1), seed=0)
    with pytest.raises(ValueError, match=r"^kft.tune ranks .* 2001 training images is more than the 2000"):
        crossval.check(2001, ("a", "b"), [1000, 1001])


def _uneven_splits(counts: list[int]) -> data.Splits:
    labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    in_order = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    names = tuple(f"c{i}" for i in range(len(counts)))
    return data.Splits(
        train=in_order, val=None, class_names=names, num_train=len(labels), num_val=0, skipped=0,
        train_in_order=in_order, batch_size=4,
    )  # fmt: skip


def test_folds_of_uneven_classes_keep_every_class_in_every_folds_training(caplog):
    # Classes of 7, 2 and 1 images: three folds (the largest class sets them, not the smallest);
    # the 2-image class is held out in two folds, one image each; the 1-image class trains in all.
    splits = _uneven_splits([7, 2, 1])
    with caplog.at_level("WARNING"):
        folds = crossval.folds(splits, seed=0)
    assert len(folds) == 3
    assert "cross-validation scores no image of 'c2': a class of one image trains in every fold" in caplog.text
    held_out = []
    for fold in folds:
        train_labels = [int(y) for _, labels in fold.train_in_order for y in labels]
        val_labels = [int(y) for _, labels in fold.val for y in labels]
        assert set(train_labels) == {0, 1, 2} and fold.num_train + fold.num_val == 10
        assert val_labels.count(0) in (2, 3) and val_labels.count(1) <= 1 and 2 not in val_labels
        held_out += [int(x[0, 0, 0]) for images, _ in fold.val for x in images.numpy()]
    assert sorted(held_out) == list(range(9))  # Every image but the single one, once.


def test_without_a_validation_split_each_trial_is_scored_by_cross_validation(tmp_path, monkeypatch, capsys):
    tune_dir = tmp_path / "tune"
    argv = [*FAKE, "--val_fraction=0", f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=2"]
    stopped = FakeTrain(interrupt_at=5)  # In trial 1's second fold.
    monkeypatch.setattr(trainer, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_tune(argv)
    rerun = FakeTrain()
    monkeypatch.setattr(trainer, "train", rerun)
    run_tune(argv)
    out = capsys.readouterr().out
    assert "ranks its trials by 3-fold cross-validation on the 12 training images" in out

    # Trial 0 trained 3 folds, trial 1 its first; the rerun read that fold's score back, resumed
    # the fold that was stopped and trained the last.
    dirs = [os.path.relpath(c["config"].model_dir, tune_dir / "trials") for c in stopped.calls + rerun.calls]
    fold_dirs = [os.path.join(t, f"fold-{i}") for t in ("0", "1") for i in range(3)]
    assert dirs == fold_dirs[:5] + fold_dirs[4:]
    assert [c["resumed"] for c in rerun.calls] == [True, False]
    # Stratified folds of 4 images per class: 2, 1 and 1 of each class held out.
    assert [(c["splits"].num_train, c["splits"].num_val) for c in stopped.calls[:3]] == [(6, 6), (9, 3), (9, 3)]
    # A scored fold keeps its metrics and settings, not its weights.
    for fold_dir in fold_dirs:
        assert sorted(os.listdir(tune_dir / "trials" / fold_dir)) == ["metrics.json", "run.json"]
    rows = read_rows(tune_dir)
    for row in rows:
        calls = [
            c
            for c in stopped.calls[:4] + rerun.calls
            if f"{os.sep}{row['trial_id']}{os.sep}fold-" in c["config"].model_dir
        ]
        assert len(calls) == 3
        assert {dataclasses.replace(c["config"], model_dir="") for c in calls} == {  # Folds differ in model_dir alone.
            dataclasses.replace(calls[0]["config"], model_dir="")
        }
        assert calls[0]["config"].val_fraction == 0.0
        score = 1.0 / (1.0 + abs(math.log10(float(row["lr_scale"])))) * (1.0 if float(row["l2sp_alpha"]) else 0.9)
        # The fake scores fold i's held-out images (1 - 0.1 i) x score; pooled over all 12 images.
        assert float(row["objective"]) == pytest.approx(score * (6 * 1.0 + 3 * 0.9 + 3 * 0.8) / 12)
        assert row["ranked_on"] == "12"
    assert "cv3_accuracy" in out
    tuned = best_cfg_config(tune_dir)
    assert tuned.val_fraction == 0.0  # The tuned run trains on every image.
    assert "cross-validated" in (tune_dir / "best.cfg").read_text()


def test_cross_validated_search_trains_for_real_and_its_best_cfg_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for index, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(6):  # Few enough that the recipe holds out no validation split.
            pixels = rng.integers(0, 80, (24, 24, 3)) + 120 * index
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    tune_dir = tmp_path / "tune"
    run_tune(
        [
            f"--dataset=folder:{root}",
            "--backbone=MobileNet",
            "--weights=none",
            "--image_size=32",
            "--stages=head:1@1e-3",
            "--augment=none",
            "--verbose=0",
            f"--tune_dir={tune_dir}",
            "--tuner=random",
            "--max_trials=2",
        ]
    )
    assert "3-fold cross-validation on the 12 training images" in capsys.readouterr().out
    for row in read_rows(tune_dir):
        metrics = [
            json.loads((tune_dir / "trials" / row["trial_id"] / f"fold-{i}" / "metrics.json").read_text())
            for i in range(3)
        ]
        assert [(m["num_train"], m["num_val"]) for m in metrics] == [(8, 4)] * 3
        for i in range(3):  # Scored: the fold's weights and checkpoints are gone, its logs stay.
            kept = sorted(os.listdir(tune_dir / "trials" / row["trial_id"] / f"fold-{i}"))
            assert kept == [".kft-run", "classes.json", "metrics.json", "run.json", "tb"], kept
        pooled = sum(m["best_model_val_accuracy"] * m["num_val"] for m in metrics) / 12
        assert float(row["objective"]) == pytest.approx(pooled)
    assert _hparams_metric_names(tune_dir / "tb") == ["3-fold cross-validated accuracy"]
    result = run_module("kft.train", f"--flagfile={tune_dir / 'best.cfg'}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tune_dir / "best" / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_val"]) == (12, 0)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--lr_scale_min=2", "--lr_scale_max=1"],
            "--lr_scale_min=2 must be < --lr_scale_max=1 (the range is inverted)",
        ),
        (
            ["--strength_min=0.01", "--strength_max=0.01"],
            "--strength_min=0.01 must be < --strength_max=0.01 (the range is empty)",
        ),
        (["--lr_scale_min=0"], "--lr_scale_min=0 must be a finite number > 0"),
        (["--tune_dir="], "--tune_dir is required"),
        (
            ["--val_fraction=0", "--train_limit_per_class=1"],
            "every class has a single training image (3 classes): ranking kft.tune's trials by cross-validation",
        ),
    ],
)
def test_bad_ranges_are_one_line_usage_errors(tmp_path, fake_train, args, fragment):
    tune_dir = tmp_path / "tune"
    with pytest.raises(tune_main.cli.UsageError) as error:
        run_tune([*FAKE, f"--tune_dir={tune_dir}", *args])
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not tune_dir.exists() and fake_train.calls == []


@pytest.mark.parametrize(
    "args, fragment", [(["--max_trials=0"], "--max_trials=0"), (["--hyperband_factor=1"], "--hyperband_factor=1")]
)
def test_bad_flag_values_are_refused_by_the_parser(args, fragment):
    with pytest.raises(flags.Error, match=fragment):
        parse([*FAKE, "--tune_dir=/nonexistent", *args])
    FLAGS.unparse_flags()


def test_a_directory_of_another_search_or_not_a_search_is_refused_untouched(tmp_path, fake_train):
    tune_dir = tmp_path / "tune"
    run_tune([*FAKE, f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=2"])
    before = tree_digest(tune_dir)
    for args, fragment in [
        (["--tuner=random", "--stages=head:2@1e-3"], "holds a different search (--stages: saved ['head:1@0.001"),
        (["--tuner=bayesian"], "holds a different search (--tuner: saved 'random', now 'bayesian')"),
        (["--tuner=random", "--strength_max=0.5"], "(--strength_max: saved 0.1, now 0.5)"),
        (["--tuner=random", "--regularizer=delta"], "(--regularizer: saved 'l2sp', now 'delta')"),
    ]:
        with pytest.raises(tune_main.cli.UsageError, match=r"pass --overwrite to start over") as error:
            run_tune([*FAKE, f"--tune_dir={tune_dir}", "--max_trials=3", *args])
        assert fragment in str(error.value)
    assert tree_digest(tune_dir) == before and len(fake_train.calls) == 2

    other = tmp_path / "run"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    with pytest.raises(tune_main.cli.UsageError, match="is not empty and holds no kft search"):
        run_tune([*FAKE, f"--tune_dir={other}"])
    assert os.listdir(other) == ["metrics.json"]


def test_command_line_errors_exit_2_with_one_line(tmp_path):
    result = run_module("kft.tune", *FAKE, f"--tune_dir={tmp_path / 't'}", "--tuner=grid")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tuner=grid" in lines[0] and "hyperband" in lines[0], lines
    result = run_module("kft.tune", *FAKE, f"--tune_dir={tmp_path / 't'}", "--lr_scale_min=30")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "kft.tune: error: --lr_scale_min=30 must be < --lr_scale_max=10 (the range is inverted)"
    ]
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------------------------
# Real trials.


def _record_train_calls(monkeypatch) -> list:
    """Lets trainer.train run as usual and returns the list of configs it is called with."""
    calls = []
    real_train = trainer.train

    def counted(config, **kwargs):
        calls.append(config)
        return real_train(config, **kwargs)

    monkeypatch.setattr(trainer, "train", counted)
    return calls


def test_smoke_config_searches_end_to_end_and_a_rerun_keeps_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    calls = _record_train_calls(monkeypatch)
    tune_dir = tmp_path / "tune"
    argv = ["--flagfile=configs/smoke/tune.cfg", f"--tune_dir={tune_dir}"]
    started = time.time()
    run_tune(argv)
    seconds = time.time() - started
    out = capsys.readouterr().out

    rows = read_rows(tune_dir)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4 and len(calls) == 4
    # Hyperband, factor 2, on head:1 + top1:3: three trials at 2 epochs, the best promoted to 4.
    assert [r["epochs"] for r in rows] == ["2", "2", "2", "4"]
    assert [[s.epochs for s in c.stages] for c in calls] == [[1, 1]] * 3 + [[1, 3]]
    first_round = rows[:3]
    promoted = rows[3]
    top = max(float(r["objective"]) for r in first_round)
    assert any(
        (r["lr_scale"], r["l2sp_alpha"]) == (promoted["lr_scale"], promoted["l2sp_alpha"])
        and float(r["objective"]) == top
        for r in first_round
    )
    for row in rows:
        assert 0.0 <= float(row["objective"]) <= 1.0 and float(row["wall_seconds"]) > 0
        trial_dir = tune_dir / "trials" / row["trial_id"]
        assert (trial_dir / "metrics.json").exists() and (trial_dir / "flags.cfg").exists()
        assert not (trial_dir / "export").exists()
    assert "best_val_accuracy" in out and "python -m kft.train --flagfile=" in out
    # The smoke data's validation split is too small to rank trials on, and the search says so.
    num_val = json.loads((tune_dir / "trials" / rows[0]["trial_id"] / "metrics.json").read_text())["num_val"]
    assert 0 < num_val < schedule.MIN_RANKING_VAL
    assert out.count("warning: kft.tune ranks") == 1
    assert f"warning: kft.tune ranks its trials on {num_val} validation images, too few to tell them apart" in out

    # best.cfg: kft.train's flags with the best trial's values, a model_dir of its own.
    # Highest objective; on a tie the longest-trained, then the earliest trial; but the first
    # trial's settings (the flags' own) when the top is within the margin of them.
    best = max(rows, key=lambda r: (float(r["objective"]), int(r["epochs"]), -int(r["trial_id"])))
    if "best.cfg keeps them" in out:
        first = (rows[0]["lr_scale"], rows[0]["l2sp_alpha"])
        best = max(
            (r for r in rows if (r["lr_scale"], r["l2sp_alpha"]) == first),
            key=lambda r: (int(r["epochs"]), float(r["objective"])),
        )
    base = config_of(["--flagfile=configs/smoke/tune.cfg"])
    tuned = best_cfg_config(tune_dir)
    assert tuned == dataclasses.replace(
        base, lr_scale=float(best["lr_scale"]), l2sp_alpha=float(best["l2sp_alpha"]), model_dir=str(tune_dir / "best")
    )
    assert f"The best trial ({best['trial_id']})" in (tune_dir / "best.cfg").read_text()

    # TensorBoard HParams: the experiment at tb/, one session per trial with its objective.
    assert _hparams_tags(tune_dir / "tb") == {"_hparams_/experiment"}
    assert _hparams_metric_names(tune_dir / "tb") == ["best val accuracy"]
    for row in rows:
        assert _hparams_tags(tune_dir / "tb" / row["trial_id"]) == {"_hparams_/session_start_info", "best_val_accuracy"}

    # The same command again: every trial is kept, nothing trains.
    csv_before = (tune_dir / "trials.csv").read_text()
    run_tune(argv)
    assert len(calls) == 4 and (tune_dir / "trials.csv").read_text() == csv_before
    print(f"smoke search: 4 trials in {seconds:.1f}s")


def _hparams_tags(logdir) -> set[str]:
    import tensorflow as tf

    tags = set()
    for name in os.listdir(logdir):
        if name.startswith("events."):
            for event in tf.compat.v1.train.summary_iterator(str(logdir / name)):
                tags.update(v.tag for v in event.summary.value)
    return tags


def _hparams_experiment(logdir):
    """The HParams experiment declared at `logdir` (its hparam_infos and metric_infos)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    for name in os.listdir(logdir):
        if name.startswith("events."):
            for event in tf.compat.v1.train.summary_iterator(str(logdir / name)):
                for value in event.summary.value:
                    if value.tag == "_hparams_/experiment":
                        return plugin_data_pb2.HParamsPluginData.FromString(
                            value.metadata.plugin_data.content
                        ).experiment
    raise AssertionError(f"no HParams experiment in {logdir}")


def _hparams_names(logdir) -> list[str]:
    """The hparams the HParams experiment at `logdir` declares."""
    return [h.name for h in _hparams_experiment(logdir).hparam_infos]


def _hparams_metric_names(logdir) -> list[str]:
    """The display names of the metrics the HParams experiment at `logdir` declares."""
    return [m.display_name for m in _hparams_experiment(logdir).metric_infos]


def test_bss_search_trains_each_trial_with_its_bss_eta(tmp_path, monkeypatch):
    calls = _record_train_calls(monkeypatch)
    tune_dir = tmp_path / "tune"
    run_tune(
        [
            *TINY,
            f"--tune_dir={tune_dir}",
            "--regularizer=bss",
            "--tuner=random",
            "--max_trials=2",
            "--strength_min=1e-3",
            "--strength_max=1e-2",
        ]
    )
    rows = read_rows(tune_dir)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 2 and len(calls) == 2
    for row, config in zip(rows, calls):
        assert config.regularizer == "bss" and float(row["bss_eta"]) == config.bss_eta
        assert config.bss_eta == 0 or 1e-3 <= config.bss_eta <= 1e-2
        assert config.l2sp_alpha == 0.01 and config.delta_alpha == 0.01  # kft.train's defaults, unused.
        # The trial's flags.cfg reproduces it with kft.train.
        assert f"--bss_eta={config.bss_eta!r}\n" in (tune_dir / "trials" / row["trial_id"] / "flags.cfg").read_text()
    best_cfg = (tune_dir / "best.cfg").read_text()
    # The chosen trial (test_a_trial_within_one_standard_error_... tests which) sets --bss_eta.
    best = rows[int(re.search(r"The best trial \((\d+)\)", best_cfg).group(1))]
    assert f"--bss_eta={float(best['bss_eta'])!r}\n" in best_cfg and "--regularizer=bss\n" in best_cfg
    assert _hparams_names(tune_dir / "tb") == ["lr_scale", "bss_eta", "epochs"]


def test_memory_stays_bounded_over_six_trials(tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    rss = []
    real_release = search.release_memory

    def measured():
        real_release()
        rss.append(psutil.Process().memory_info().rss)

    monkeypatch.setattr(search, "release_memory", measured)
    run_tune([*TINY, f"--tune_dir={tmp_path / 'tune'}", "--tuner=random", "--max_trials=6"])
    assert len(rss) == 6
    growth_mb = (rss[5] - rss[1]) / 2**20
    print(f"resident memory after trials 2..6 (MB): {[round(r / 2**20) for r in rss[1:]]}; growth {growth_mb:.0f}")
    # Measured here: ~80 MB over these four trials, ~20 MB a trial that TensorFlow keeps after
    # clear_session (each trial's traced train-step graph; keras-team/keras#17458). A trial that
    # stayed referenced (weights, Adam slots, L2-SP anchors, graphs: ~80 MB for MobileNet)
    # would add over 300 MB.
    assert growth_mb < 150, [round(r / 2**20) for r in rss]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_chief_and_two_workers_run_each_trial_once(tmp_path):
    tune_dir = tmp_path / "tune"
    argv = [sys.executable, "-m", "kft.tune", *TINY, f"--tune_dir={tune_dir}", "--tuner=random", "--max_trials=4"]
    base_env = {k: v for k, v in os.environ.items() if k not in KT_ENV}
    base_env.update(
        PYTHONPATH=ROOT,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(_free_port()),
    )
    procs = {}
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            log = open(tmp_path / f"{tuner_id}.log", "w")
            procs[tuner_id] = subprocess.Popen(
                argv, cwd=ROOT, env={**base_env, "KERASTUNER_TUNER_ID": tuner_id}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.time() + 300
        for proc in procs.values():
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {tuner_id: (tmp_path / f"{tuner_id}.log").read_text() for tuner_id in procs}
    for tuner_id, proc in procs.items():
        assert proc.returncode == 0, f"{tuner_id}:\n{logs[tuner_id][-3000:]}"

    started = []
    for tuner_id in ("tuner0", "tuner1"):
        started += [
            line.split(":")[0].split()[1]
            for line in logs[tuner_id].splitlines()
            if line.startswith("trial ") and "lr_scale=" in line
        ]
        assert f"worker {tuner_id} done" in logs[tuner_id]
    assert sorted(started) == ["0", "1", "2", "3"], started  # Every trial ran exactly once.
    assert not [line for line in logs["chief"].splitlines() if "lr_scale=" in line]  # It trains nothing.
    rows = read_rows(tune_dir)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4
    assert (tune_dir / "best.cfg").exists() and "best trial" in logs["chief"]
    for row in rows:
        assert (tune_dir / "trials" / row["trial_id"] / "metrics.json").exists()


def test_a_search_record_compares_data_by_what_it_names(tmp_path):
    """The same folder spelled differently, or moved with the same files, is the same search;
    other files are another search."""
    import shutil

    from kft.config import Config

    folder = tmp_path / "data"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        (folder / name / "1.png").write_bytes(b"\x89PNG" + name.encode())
    tune = search_space.TuneConfig(tune_dir=str(tmp_path / "tune"))

    def record(spec):
        config = Config(dataset=spec, backbone="MobileNetV2", stages=schedule.parse_stages("head:1@1e-3"), model_dir="")
        return search_files.fingerprint(config, tune)

    saved = record(f"folder:{folder}")
    (tmp_path / "link").symlink_to(folder)
    assert search_files.fingerprint_conflict(saved, record(f"folder:{folder}/")) is None
    assert search_files.fingerprint_conflict(saved, record(f"folder:{tmp_path / 'link'}")) is None
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    assert search_files.fingerprint_conflict(saved, record(f"folder:{moved}")) is None
    (moved / "b" / "2.png").write_bytes(b"\x89PNG2")
    assert "--dataset: saved" in search_files.fingerprint_conflict(saved, record(f"folder:{moved}"))
