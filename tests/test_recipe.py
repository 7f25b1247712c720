"""--recipe=auto: the schedule follows the data's size, the user's flags win, and the resolved
flags.cfg reproduces the run without deriving the recipe again."""

import numpy as np
import pytest
from absl import flags

from kft import flags as kft_flags
from kft import recipe, schedule

FLAGS = flags.FLAGS


@pytest.mark.parametrize(
    "num_train, batch, steps",
    [
        (25, 8, 500),          # 5 per class: batch 8, 3 steps per pass, 500 steps
        (45, 8, 500),          # the few-shot folder: was 6 steps in all
        (250, 32, 500),        # nearest power of two to 250/8 = 31
        (5_000, 64, 500),      # 78 steps per pass: 500 steps are 6.4 passes
        (19_999, 64, 1_872),   # 6 passes are more than BiT's 500 steps
        (50_000, 64, 10_000),  # CIFAR-10: 12.8 passes, more than the old 6
        (600_000, 64, 56_250), # 6 passes of a large set beat BiT's 20k steps
    ],
)
def test_batch_and_steps_follow_the_set_size(num_train, batch, steps):
    derived = recipe.derive(num_train, 10)
    assert derived.batch_size == batch
    stages = schedule.parse_stages(derived.stages)
    assert [s.what for s in stages] == ["probe", "all"]
    assert stages[1].steps == steps
    # Never fewer than MIN_EPOCHS passes over the training set.
    assert steps * batch >= recipe.MIN_EPOCHS * (num_train // batch) * batch


def test_learning_rate_scales_with_the_square_root_of_the_batch():
    lr = {n: schedule.parse_stages(recipe.derive(n, 5).stages)[1].lr for n in (45, 50_000)}
    np.testing.assert_allclose(lr[50_000], recipe.BASE_LR)
    np.testing.assert_allclose(lr[45], recipe.BASE_LR * np.sqrt(8 / 64), rtol=0.02)


def test_mixup_only_for_large_sets_and_no_probe_with_a_hidden_layer():
    assert "mixup" not in recipe.derive(19_999, 10).augment
    assert "mixup" in recipe.derive(20_000, 10).augment
    stages = schedule.parse_stages(recipe.derive(45, 5, hidden_units=128).stages)
    assert [s.what for s in stages] == ["head", "all"]


def test_a_given_batch_size_counts_the_schedule():
    derived = recipe.derive(45, 5, batch_size=45)
    assert derived.batch_size == 45
    assert schedule.parse_stages(derived.stages)[1].steps == 500


def _parse(*argv):
    FLAGS.unparse_flags()
    FLAGS(["kft.train", "--model_dir=unused", *argv])


def test_flags_given_win_and_flags_cfg_reproduces_without_deriving_again(tmp_path):
    try:
        _parse("--stages=head:2@1e-3", "--augment=flip")
        block = kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert FLAGS.stages == "head:2@1e-3" and FLAGS.augment == "flip"
        assert FLAGS.batch_size == 8  # Not given: the recipe's.
        assert "--stages=head:2@1e-3  (yours; the recipe's: probe,all:500steps@" in block
        assert "--batch_size=8" in block and FLAGS.recipe == "none"
        text = kft_flags.with_comment(kft_flags.resolved_flagfile(), block)
        assert "--recipe=none" in text and "--batch_size=8" in text
        assert text.splitlines()[1].startswith("# recipe (--recipe=auto")
        saved = text
        # The same command again resolves the same flags: it may resume the run.
        _parse("--stages=head:2@1e-3", "--augment=flip")
        kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert kft_flags.resume_conflict(saved, kft_flags.resolved_flagfile()) is None
        # So does the written flagfile, and there the recipe derives nothing.
        path = str(tmp_path / "flags.cfg")
        with open(path, "w") as f:
            f.write(saved)
        _parse(f"--flagfile={path}")
        assert kft_flags.apply_recipe(num_train=5000, num_classes=5) is None
        assert kft_flags.resume_conflict(saved, kft_flags.resolved_flagfile()) is None
        # More data is another recipe: a resume would be refused by name.
        _parse("--stages=head:2@1e-3", "--augment=flip")
        kft_flags.apply_recipe(num_train=5000, num_classes=5)
        assert kft_flags.resume_conflict(saved, kft_flags.resolved_flagfile()).startswith("--batch_size")
    finally:
        FLAGS.unparse_flags()


def test_recipe_none_keeps_the_flag_defaults():
    try:
        _parse("--recipe=none")
        assert kft_flags.apply_recipe(num_train=45, num_classes=5) is None
        assert FLAGS.stages == "head:3@1e-3,top2:3@1e-4" and FLAGS.batch_size == 64
    finally:
        FLAGS.unparse_flags()
