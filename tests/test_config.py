"""Tests for kft.config: defaults shared with the flags, and run.json's round trip."""

import dataclasses
import json

import pytest
from absl import flags

from kft import augment, model, runfiles, schedule
from kft import flags as kft_flags  # noqa: F401  (defines kft.train's flags)
from kft.config import RUN_JSON_VERSION, SECTIONS, Config

FLAGS = flags.FLAGS


def _flag_default(name: str):
    """A kft.train flag's default as config_from_flags turns it into a Config value."""
    value = FLAGS[name].default
    if name == "augment":
        return augment.parse(value)
    if name == "test_views":
        return model.parse_test_views(value)
    if name.endswith("stages"):
        return schedule.parse_stages(value)
    if name == "weights" and value == "none":
        return None
    return value


def test_config_defaults_are_the_flag_defaults():
    with_default = [f for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING]
    assert len(with_default) > 30
    for field in with_default:
        assert field.default == _flag_default(field.name), field.name
    # The fields without a default are what every caller must say: data, backbone, schedule, where.
    assert [f.name for f in dataclasses.fields(Config) if f.default is dataclasses.MISSING] == [
        "dataset",
        "backbone",
        "stages",
        "model_dir",
    ]


def test_image_size_zero_means_the_backbones_own_size():
    assert Config(dataset="d", backbone="EfficientNetB3", stages=(), model_dir="x").image_size == 300
    assert Config(dataset="d", backbone="EfficientNetB3", stages=(), model_dir="x", image_size=32).image_size == 32


def test_every_field_is_in_exactly_one_section():
    names = [name for section in SECTIONS.values() for name in section]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(Config))
    assert len(names) == len(set(names))


def _config(**overrides) -> Config:
    fields = dict(
        dataset="folder:/data/x",
        backbone="ResNet50",
        # An LR that --stages text would round (describe() writes %g).
        stages=schedule.parse_stages("probe,all:500steps@0.00028284271247:bn=train"),
        model_dir="/runs/a",
        augment=("crop",),
        test_views=("flip",),
        regularizer="delta",
        weights=None,
        image_size=32,
    )
    return Config(**{**fields, **overrides})


def test_run_json_round_trips_exactly():
    config = _config()
    written = json.loads(json.dumps(config.to_json()))
    assert written["version"] == RUN_JSON_VERSION
    assert written["model"] == {
        "backbone": "ResNet50",
        "weights": None,
        "image_size": 32,
        "dropout": 0.2,
        "hidden_units": 0,
        "test_views": ["flip"],
    }
    assert written["schedule"]["stages"][1]["lr"] == 0.00028284271247
    assert Config.from_json(written) == config


def test_flagfile_of_a_config_parses_back_to_it(tmp_path):
    config = _config(
        augment=(),
        cache_features=True,
        compare_scratch=False,
        lr_scale=0.1 + 0.2,
        pretrain_batch_size=16,  # Resolved, as config_from_flags makes it (0: the batch size).
        model_dir=str(tmp_path / "run"),
    )
    text = runfiles.flagfile_of(config)
    assert "--weights=none\n" in text and "--augment=none\n" in text and "--recipe=none\n" in text
    assert "--cache_features\n" in text and "--nocompare_scratch\n" in text
    (tmp_path / "flags.cfg").write_text(text)
    try:
        FLAGS.unparse_flags()
        FLAGS(["kft.train", f"--flagfile={tmp_path / 'flags.cfg'}"])
        assert kft_flags.config_from_flags() == config
    finally:
        FLAGS.unparse_flags()


def test_run_json_of_another_version_or_with_unknown_fields_is_refused():
    written = _config().to_json()
    with pytest.raises(ValueError, match="run.json version 99: this kft reads version 1"):
        Config.from_json({**written, "version": 99})
    with pytest.raises(ValueError, match="fields this kft does not know: colour"):
        Config.from_json({**written, "model": {**written["model"], "colour": "red"}})


def test_a_run_records_its_config_and_the_readers_use_it(tmp_path, tiny_splits):
    from kft import trainer

    config = _config(
        dataset="unused",
        backbone="MobileNetV2",
        stages=schedule.parse_stages("head:1@1e-2"),
        model_dir=str(tmp_path),
        regularizer="l2sp",
        augment=(),
        dropout=0.3,
        hidden_units=8,
        batch_size=8,
        verbose=0,
    )
    trainer.train(config, tiny_splits)
    assert runfiles.read_config(str(tmp_path)) == config
    classifier, _, _ = runfiles.load_classifier(str(tmp_path))
    assert classifier.head_config.hidden_units == 8 and classifier.head_config.dropout == 0.3
    (tmp_path / "run.json").write_text('{"version": 7}')
    with pytest.raises(ValueError, match=r"run.json: run.json version 7: this kft reads version 1"):
        runfiles.read_config(str(tmp_path))
