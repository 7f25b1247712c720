"""--recipe=auto: the schedule follows the data's size, the user's flags win, and the resolved
flags.cfg reproduces the run without deriving the recipe again."""

import dataclasses

import numpy as np
import pytest
from absl import flags

from kft import flags as kft_flags
from kft import recipe, runfiles, schedule

FLAGS = flags.FLAGS


@pytest.mark.parametrize(
    "num_train, batch, steps",
    [
        (25, 8, 500),  # 5 per class: batch 8, 3 steps per pass, 500 steps
        (45, 8, 500),  # the few-shot folder: was 6 steps in all
        (250, 32, 500),  # nearest power of two to 250/8 = 31
        (5_000, 64, 500),  # 78 steps per pass: 500 steps are 6.4 passes
        (19_999, 64, 1_872),  # 6 passes are more than BiT's 500 steps
        (50_000, 64, 10_000),  # CIFAR-10: 12.8 passes, more than the old 6
        (600_000, 64, 56_250),  # 6 passes of a large set beat BiT's 20k steps
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


def test_small_batches_of_small_sets_get_a_larger_learning_rate():
    lr = {n: schedule.parse_stages(recipe.derive(n, 5).stages)[1].lr for n in (45, 250, 50_000)}
    np.testing.assert_allclose(lr[50_000], recipe.BASE_LR)
    np.testing.assert_allclose(lr[45], recipe.BASE_LR * np.sqrt(64 / 8), rtol=0.02)
    assert lr[45] > lr[250] > lr[50_000]


def test_mixup_only_for_large_sets_and_no_probe_with_a_hidden_layer():
    assert "mixup" not in recipe.derive(19_999, 10).augment
    assert "mixup" in recipe.derive(20_000, 10).augment
    stages = schedule.parse_stages(recipe.derive(45, 5, hidden_units=128).stages)
    assert [s.what for s in stages] == ["head", "all"]


def test_a_given_batch_size_counts_the_schedule():
    derived = recipe.derive(45, 5, batch_size=45)
    assert derived.batch_size == 45
    assert schedule.parse_stages(derived.stages)[1].steps == 500
    block = recipe.describe(derived, {"batch_size": 45})
    assert "batch 45: 1 step per pass over the training set" in block
    assert "batch 8: 5 steps per pass" in recipe.describe(recipe.derive(45, 5), {})


def test_small_sets_average_the_symmetries_they_train_with():
    turns = recipe.RotationCheck(accuracy=0.9, turned_accuracy=0.9, chance=0.25)
    mirror_only = recipe.MirrorCheck(accuracy=0.9, mirrored_accuracy=0.2, chance=0.25, margin=0.1)
    assert not mirror_only.symmetric
    below = recipe.TEST_VIEWS_BELOW - 1
    assert recipe.derive(45, 5, rotation=turns).test_views == "flip,rot90"
    assert recipe.derive(below, 5).test_views == "flip"
    assert recipe.derive(45, 5, mirror=mirror_only, rotation=turns).test_views == "rot90"
    assert recipe.derive(45, 5, mirror=mirror_only).test_views == "none"
    assert recipe.derive(below + 1, 5, rotation=turns).test_views == "none"  # serving cost wins
    # The user's --augment: its symmetries, not the checks', are averaged.
    given = recipe.derive(45, 5, augment=("crop", "rot90"), rotation=None)
    assert given.test_views == "rot90" and given.augment == "crop,flip"  # the recipe's own, unused
    assert recipe.derive(45, 5, augment=(), rotation=turns).test_views == "none"
    assert "averages 8 views (flip+rot90)" in recipe.describe(recipe.derive(45, 5, rotation=turns), {})
    assert "8 backbone passes per prediction" in recipe.describe(recipe.derive(45, 5, rotation=turns), {})


def test_given_augment_or_test_views_win_in_the_flags():
    try:
        _parse("--augment=crop")
        block = kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert FLAGS.test_views == "none" and "--test_views=none" in block
        assert kft_flags.config_from_flags().test_views == ()
        _parse("--test_views=none")
        kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert FLAGS.test_views == "none" and FLAGS.augment == "crop,flip"
        _parse()
        kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert kft_flags.config_from_flags().test_views == ("flip",)
    finally:
        FLAGS.unparse_flags()


@pytest.mark.parametrize("value", ["mirror", "flip,flip", "none,flip"])
def test_bad_test_views_are_refused_by_name(value):
    try:
        with pytest.raises(
            flags.IllegalFlagValueError, match=f"--test_views={value!r}.*allowed: none, or a comma list"
        ):
            _parse(f"--test_views={value}")
    finally:
        FLAGS.unparse_flags()


def _parse(*argv):
    FLAGS.unparse_flags()
    FLAGS(["kft.train", "--model_dir=unused", *argv])


def _resume_conflict(run_dir):
    """kft.train's resume check of the command now parsed against the run in `run_dir`."""
    current = dataclasses.replace(kft_flags.config_from_flags(), model_dir=str(run_dir))
    return runfiles.resume_conflict(str(run_dir), current)


def test_flags_given_win_and_flags_cfg_reproduces_without_deriving_again(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        _parse("--stages=head:2@1e-3", "--augment=flip")
        block = kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert FLAGS.stages == "head:2@1e-3" and FLAGS.augment == "flip"
        assert FLAGS.batch_size == 8  # Not given: the recipe's.
        assert "--stages=head:2@1e-3  (yours; the recipe's: probe,all:500steps@" in block
        assert "--batch_size=8" in block and FLAGS.recipe == "none"
        text = kft_flags.with_comment(runfiles.flagfile_of(kft_flags.config_from_flags()), block)
        assert "--recipe=none" in text and "--batch_size=8" in text
        assert text.splitlines()[1].startswith("# recipe (--recipe=auto")
        saved = text
        runfiles.write_config(dataclasses.replace(kft_flags.config_from_flags(), model_dir=str(run_dir)))
        # The same command again resolves the same flags: it may resume the run.
        _parse("--stages=head:2@1e-3", "--augment=flip")
        kft_flags.apply_recipe(num_train=45, num_classes=5)
        assert _resume_conflict(run_dir) is None
        # So does the written flagfile, and there the recipe derives nothing.
        path = str(tmp_path / "flags.cfg")
        with open(path, "w") as f:
            f.write(saved)
        _parse(f"--flagfile={path}")
        assert kft_flags.apply_recipe(num_train=5000, num_classes=5) is None
        assert _resume_conflict(run_dir) is None
        # More data is another recipe: a resume would be refused by name.
        _parse("--stages=head:2@1e-3", "--augment=flip")
        kft_flags.apply_recipe(num_train=5000, num_classes=5)
        assert _resume_conflict(run_dir).startswith("--batch_size")
    finally:
        FLAGS.unparse_flags()


def test_a_rerun_resumes_with_the_recipe_its_run_recorded(tmp_path):
    """A recipe derived again may differ from the one a run recorded (a newer kft, a check
    near its threshold on another CPU): rerunning the command resumes with the recorded one."""
    from kft import trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    command = ["--dataset=digits:0-2", "--train_limit_per_class=10", "--weights=none", f"--model_dir={run_dir}"]
    command += ["--backbone=MobileNetV2", "--image_size=32"]
    try:
        _parse(*command)
        config, _, block = kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=True)
        assert config.test_views == ("flip",) and config.batch_size == 8
        # What an older kft recorded: another schedule, no test views.
        older = dataclasses.replace(config, stages=schedule.parse_stages("probe,all:300steps@3e-4"), test_views=())
        runfiles.write_config(older)
        (run_dir / "flags.cfg").write_text(kft_flags.with_comment(runfiles.flagfile_of(older), block))
        _parse(*command)
        kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=True)
        assert _resume_conflict(run_dir).startswith("--stages")  # Derived again: refused.

        _parse(*command)
        assert kft_flags.adopt_recorded_recipe(str(run_dir)) == block
        config, _, derived = kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=True)
        assert derived is None and config == older
        assert _resume_conflict(run_dir) is None
        # A flag the user gives still wins (and is compared with the run's).
        _parse(*command, "--test_views=flip")
        kft_flags.adopt_recorded_recipe(str(run_dir))
        assert FLAGS.test_views == "flip" and FLAGS.stages == "probe,all:300steps@0.0003:bn=frozen:warmup=0.1"
        assert _resume_conflict(run_dir).startswith("--test_views")
        # Nothing is adopted with --overwrite or --recipe=none, or from a run without a recipe.
        for argv in (["--overwrite"], ["--recipe=none"]):
            _parse(*command, *argv)
            assert kft_flags.adopt_recorded_recipe(str(run_dir)) is None and FLAGS.test_views == "none", argv
        (run_dir / "flags.cfg").write_text(runfiles.flagfile_of(older))
        _parse(*command)
        assert kft_flags.adopt_recorded_recipe(str(run_dir)) is None and FLAGS.recipe == "auto"
        assert kft_flags.adopt_recorded_recipe(str(tmp_path / "new")) is None
    finally:
        FLAGS.unparse_flags()


def test_a_folder_that_changed_gets_its_recipe_derived_again(tmp_path):
    from PIL import Image

    from kft import trainer

    folder, run_dir = tmp_path / "data", tmp_path / "run"
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    command = [f"--dataset=folder:{folder}", "--weights=none", "--backbone=MobileNetV2", "--image_size=32"]
    command.append(f"--model_dir={run_dir}")
    try:
        _parse(*command)
        config, _, block = kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=True)
        runfiles.write_config(config)
        (run_dir / "flags.cfg").write_text(kft_flags.with_comment(runfiles.flagfile_of(config), block))
        _parse(*command)
        assert kft_flags.adopt_recorded_recipe(str(run_dir)) == block
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder / "a" / "new.png")
        _parse(*command)
        assert kft_flags.adopt_recorded_recipe(str(run_dir)) is None and FLAGS.recipe == "auto"
    finally:
        FLAGS.unparse_flags()


def test_recipe_none_keeps_the_flag_defaults():
    try:
        _parse("--recipe=none")
        assert kft_flags.apply_recipe(num_train=45, num_classes=5) is None
        assert FLAGS.stages == "head:3@1e-3,top2:3@1e-4" and FLAGS.batch_size == 64
    finally:
        FLAGS.unparse_flags()


def _bars(num_per_class, seed=0):
    """Class 0: a bright bar in the left third; class 1: in the right third; noise around."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(2 * num_per_class, 24, 24, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], num_per_class)
    for image, label in zip(images, labels):
        column = rng.integers(1, 7) if label == 0 else rng.integers(17, 23)
        image[:, column - 1 : column + 1] = 250
    return images, labels


def _colour_blobs(num_per_class, seed=0):
    """Class = the colour of a square at a random place: left and right do not matter."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(3 * num_per_class, 24, 24, 3), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], num_per_class)
    for image, label in zip(images, labels):
        y, x = rng.integers(0, 16, size=2)
        image[y : y + 8, x : x + 8, label] = 250
    return images, labels


def test_mirror_check_tells_sided_tasks_from_symmetric_ones():
    sided = recipe.mirror_check(*_bars(15))
    assert sided.accuracy > 0.9 and sided.mirrored_accuracy < 0.1 and not sided.symmetric
    assert "no flip" in sided.describe()
    symmetric = recipe.mirror_check(*_colour_blobs(15))
    assert symmetric.symmetric and "flip kept" in symmetric.describe()
    assert recipe.derive(45, 2, mirror=sided).augment == "crop"
    assert recipe.derive(45, 3, mirror=symmetric).augment == "crop,flip"


def test_mirror_check_on_real_images():
    from sklearn.datasets import load_digits, load_sample_images

    # Digits 5-9 change meaning when mirrored; 0, 1 and 8 hardly do.
    digits = load_digits()
    for classes, symmetric in (([5, 6, 7, 8, 9], False), ([0, 1, 8], True)):
        keep = np.isin(digits.target, classes)
        images = np.repeat((digits.images[keep] * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
        assert recipe.mirror_check(images, digits.target[keep]).symmetric == symmetric, classes
    # Crops of the left and right halves of two photographs: overlapping crops match each other
    # better than their mirror images, yet the task is kept mirror-symmetric.
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, (photo, half) in enumerate((p, h) for p in load_sample_images().images for h in (0, 1)):
        height, width, _ = photo.shape
        for _ in range(12):
            y, x = rng.integers(0, height - 64), rng.integers(half * width // 2, (half + 1) * width // 2 - 64)
            images.append(photo[y : y + 64, x : x + 64])
            labels.append(label)
    check = recipe.mirror_check(np.stack(images), np.array(labels))
    assert check.mirrored_accuracy < check.accuracy and check.symmetric


def _pixel_features(images):
    """Stand-in backbone features for the rotation check's mechanics: the image's own pixels."""
    return images.reshape(len(images), -1).astype(np.float64)


def _bars_across_or_down(num_per_class, seed=0):
    """Class 0: a bright row somewhere; class 1: a bright column: a quarter turn swaps them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(2 * num_per_class, 24, 24, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], num_per_class)
    for image, label in zip(images, labels):
        line = rng.integers(2, 22)
        if label == 0:
            image[line - 1 : line + 1] = 250
        else:
            image[:, line - 1 : line + 1] = 250
    return images, labels


def test_rotation_check_tells_turnable_tasks_from_upright_ones():
    upright = recipe.rotation_check(_pixel_features, *_bars_across_or_down(15))
    # A half turn keeps rows rows; the quarter turns make them columns: a third of the turns.
    assert upright.accuracy > 0.7 and upright.turned_accuracy < 0.5 and not upright.invariant
    assert "no rot90" in upright.describe()
    turnable = recipe.rotation_check(_pixel_features, *_colour_blobs(15))
    assert turnable.retention > 0.8 and turnable.invariant and "rot90 added" in turnable.describe()
    # No evidence is no rot90: features that tell nothing apart (noise, labels at random).
    rng = np.random.default_rng(0)
    noise = recipe.rotation_check(
        _pixel_features, rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8), np.repeat([0, 1, 2], 10)
    )
    assert noise.accuracy - noise.chance < recipe.MIN_ABOVE_CHANCE and not noise.invariant
    # A quarter turn changes the shape of an image that is not square: no check.
    assert recipe.rotation_check(_pixel_features, np.zeros((4, 8, 6, 3), np.uint8), np.array([0, 0, 1, 1])) is None
    assert recipe.derive(45, 3, rotation=turnable).augment == "crop,flip,rot90"
    assert recipe.derive(45, 2, rotation=upright).augment == "crop,flip"
    assert recipe.derive(45, 3).augment == "crop,flip"  # No backbone to ask: no rot90.


def test_on_a_long_tailed_set_the_checks_weigh_every_class_alike():
    # 40, 20, 10, 5 and 2 images and features that tell nothing apart: a neighbour at random is
    # most often of a big class, so the plain rate is 0.35 upright and turned alike, which read
    # as turns keeping the classes (rot90 was added to digits). Class by class it is chance.
    labels = np.repeat(np.arange(5), [40, 20, 10, 5, 2])
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)

    def features_of(batch):
        return np.random.default_rng(int(batch.sum()) + len(batch)).normal(size=(len(batch), 16))

    check = recipe.rotation_check(features_of, images, labels)
    assert check.accuracy == pytest.approx(0.2, abs=0.05) and check.turned_accuracy == pytest.approx(0.2, abs=0.05)
    assert not check.invariant and recipe.derive(77, 5, rotation=check).augment == "crop,flip"
    # Balanced, nothing changes: the rate class by class is the plain rate.
    balanced = np.repeat(np.arange(3), 10)
    hits = recipe.rotation_check(lambda batch: np.eye(3)[balanced], images[:30], balanced)
    assert hits.accuracy == 1.0 and hits.turned_accuracy == 1.0 and hits.invariant


def test_the_recipe_asks_the_starting_backbone_about_rotation(tmp_path):
    from kft import checkpoint, model, trainer

    weights = tmp_path / "start.weights.h5"
    classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(2))
    checkpoint.save_backbone_weights(classifier.backbone, "MobileNetV2", 32, str(weights))
    common = ["--dataset=digits:0-2", "--train_limit_per_class=20", "--backbone=MobileNetV2", "--image_size=32"]
    try:
        for argv, asked in [
            ([f"--weights={weights}"], True),
            (["--weights=none"], False),  # Random features say nothing about the task.
            ([f"--weights={weights}", "--augment=crop"], False),  # The user chose.
        ]:
            _parse(*common, *argv)
            config, _, block = kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=True)
            assert ("rotation check: nearest-neighbour accuracy" in block) == asked, argv
            assert ("rot90" in config.augment) == ("(rot90 added)" in block)
    finally:
        FLAGS.unparse_flags()


def _config_and_splits(*argv, may_drop_validation=True):
    from kft import trainer

    _parse("--dataset=digits:0-2", "--image_size=32", "--augment=crop", *argv)
    return kft_flags.config_and_splits(trainer.load_splits, may_drop_validation=may_drop_validation)


def test_a_carved_validation_split_too_small_to_rank_trains_too():
    try:
        # digits 0-2: 537 images; 10% is 54 validation images, fewer than MIN_RANKING_VAL.
        config, splits, block = _config_and_splits()
        assert splits.val is None and splits.num_val == 0 and splits.num_train == 537
        assert config.val_fraction == 0.0 and FLAGS.val_fraction == 0.0
        assert "no validation split: the 54 images --val_fraction would hold out" in block
        assert "--val_fraction=0.0\n" in runfiles.flagfile_of(config)
        # It stands where it costs no training image (a per-class limit takes 10 of the rest),
        # where the user asks for it, and where kft.tune ranks trials on it.
        for argv, may_drop in [
            (["--train_limit_per_class=10"], True),
            (["--val_fraction=0.1"], True),
            (["--checkpoint_selection=best"], True),
            (["--recipe=none"], True),
            ([], False),
        ]:
            config, splits, block = _config_and_splits(*argv, may_drop_validation=may_drop)
            assert splits.num_val == 54 and splits.val_carved and config.val_fraction == 0.1, argv
            assert block is None or "no validation split" not in block
    finally:
        FLAGS.unparse_flags()


def test_best_checkpoint_without_a_validation_split_is_refused():
    try:
        with pytest.raises(ValueError, match="--checkpoint_selection=best needs a validation split"):
            _config_and_splits("--val_fraction=0", "--checkpoint_selection=best")
    finally:
        FLAGS.unparse_flags()
