"""Stage parsing, block selection and the per-stage learning-rate schedule."""

import math

import numpy as np
import pytest

from kft import schedule


def test_parse_full_syntax():
    stages = schedule.parse_stages("head:3@1e-3, top2:2@1e-4:bn=train, from=conv4_block1:1@5e-5:warmup=0.2,all:2@1e-5")
    assert [s.what for s in stages] == ["head", "top", "from", "all"]
    assert stages[0] == schedule.Stage("head", 3, 1e-3)
    assert stages[1].top_blocks == 2 and stages[1].bn == "train"
    assert stages[2].from_block == "conv4_block1" and stages[2].warmup == 0.2
    assert stages[3].epochs == 2 and stages[3].lr == 1e-5 and stages[3].bn == "frozen"


def test_describe_round_trips():
    stages = schedule.parse_stages("head:3@0.001,top2:2@1e-4:bn=train,from=block6a:1@3e-5:warmup=0")
    again = schedule.parse_stages(",".join(s.describe() for s in stages))
    assert again == stages


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("head", "malformed stage 'head'"),
        ("head:0@1e-3", "epochs must be >= 1"),
        ("head:2@0", "learning rate must be > 0"),
        ("head:2@abc", "malformed"),
        ("top0:1@1e-3", "N >= 1"),
        ("middle:1@1e-3", "malformed stage 'middle:1@1e-3'"),
        ("head:1@1e-3:bn=maybe", "bn='maybe'; allowed: frozen, train"),
        ("head:1@1e-3:warmup=1.5", "warmup='1.5'"),
        ("head:1@1e-3:speed=3", "unknown option 'speed'"),
    ],
)
def test_parse_errors_name_the_stage(spec, fragment):
    with pytest.raises(ValueError, match=None) as info:
        schedule.parse_stages(spec)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


BLOCKS = ["stem", "conv2_block1", "conv3_block1", "conv4_block1", "conv5_block1"]


def test_trainable_block_names():
    parse = lambda s: schedule.parse_stages(s)[0]  # noqa: E731
    assert schedule.trainable_block_names(parse("head:1@1e-3"), BLOCKS) == []
    assert schedule.trainable_block_names(parse("top2:1@1e-3"), BLOCKS) == ["conv4_block1", "conv5_block1"]
    assert schedule.trainable_block_names(parse("from=conv3_block1:1@1e-3"), BLOCKS) == BLOCKS[2:]
    assert schedule.trainable_block_names(parse("all:1@1e-3"), BLOCKS) == BLOCKS


def test_stage_naming_missing_blocks_fails_clearly():
    with pytest.raises(ValueError, match="only 5 blocks"):
        schedule.validate_against_blocks(schedule.parse_stages("top9:1@1e-3"), BLOCKS)
    with pytest.raises(ValueError, match="no block 'conv9' in this backbone; its blocks are: stem, conv2_block1"):
        schedule.validate_against_blocks(schedule.parse_stages("head:1@1e-3,from=conv9:1@1e-3"), BLOCKS)


def test_warmup_cosine_matches_formula():
    stage = schedule.Stage("all", epochs=2, lr=0.01, warmup=0.25)
    lr = schedule.stage_learning_rate(stage, lr_scale=0.5, steps_per_epoch=10)
    peak, total, warm = 0.005, 20, 5
    for t in range(total + 3):
        if t < warm:
            expected = peak * (t + 1) / warm
        else:
            expected = peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / (total - warm))))
        assert float(lr(t)) == pytest.approx(expected, rel=1e-5, abs=1e-9), t
    values = np.array([float(lr(t)) for t in range(total)])
    assert values.argmax() == warm - 1 or values.argmax() == warm
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-9)


def test_zero_warmup_starts_at_peak():
    lr = schedule.stage_learning_rate(schedule.Stage("head", 1, 1e-3, warmup=0.0), 1.0, 8)
    assert float(lr(0)) == pytest.approx(1e-3)


def test_stages_counted_in_steps_and_the_probe():
    probe, fine = schedule.parse_stages("probe,all:500steps@1e-4")
    assert probe.what == "probe" and probe.epochs == 0
    assert fine.steps == 500 and fine.epochs == schedule.MAX_ROUNDS
    # Rounds of 50 steps whatever the data: 5 steps per pass or 780.
    assert fine.steps_per_round(5) == fine.steps_per_round(780) == 50
    assert fine.total_steps(5) == 500
    lr = schedule.stage_learning_rate(fine, 1.0, steps_per_epoch=5)
    assert lr.total_steps == 500 and lr.warmup_steps == 50
    short = schedule.parse_stages("top1:4steps@1e-3")[0]
    assert short.epochs == 4 and short.steps_per_round(100) == 1
    assert schedule.parse_stages("head:3@1e-3")[0].steps_per_round(7) == 7


def test_steps_and_rounds_round_trip():
    spec = "probe,head:60steps@0.001:bn=frozen:warmup=0.1,all:200steps@0.0001:bn=frozen:warmup=0.1:rounds=4"
    stages = schedule.parse_stages(spec)
    assert stages[2].epochs == 4 and stages[2].steps_per_round(9) == 50
    assert ",".join(s.describe() for s in stages) == spec
    assert schedule.parse_stages(",".join(s.describe() for s in stages)) == stages


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("head:2@1e-3,probe", "probe may only be the first stage"),
        ("all:0steps@1e-4", "steps must be >= 1"),
        ("all:10steps@1e-4:rounds=11", "rounds='11'"),
        ("all:10@1e-4:rounds=2", "unknown option 'rounds'"),
        ("probe:3@1e-3", "malformed stage 'probe:3@1e-3'"),
    ],
)
def test_step_and_probe_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        schedule.parse_stages(spec)
