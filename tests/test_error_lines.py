"""Every `kft.PROGRAM: error: ...` line is one line of bounded length, whatever the message holds
(a tensor's repr, a traceback, newlines); the whole message goes to the debug log."""

import logging as std_logging
import os
import subprocess
import sys

import numpy as np
import pytest

from kft import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = cli.ERROR_LINE_LIMIT


def assert_one_bounded_line(line: str, prefix: str) -> None:
    assert line.startswith(prefix), line[:200]
    assert len(line) <= LIMIT, len(line)
    assert line.isprintable(), repr(line[:200])  # No newline, carriage return, tab or escape.
    assert len(line.splitlines()) == 1


def per_replica_message() -> str:
    """What the upstream report showed: an op error holding a PerReplica batch, every pixel."""
    import tensorflow as tf

    batch = tf.reshape(tf.range(2 * 64 * 64 * 3, dtype=tf.float32), (2, 64, 64, 3))
    with np.printoptions(threshold=sys.maxsize):
        pixels = repr(batch.numpy())
    return (
        "Dimensions must be equal, but are 3 and 10 for '{{node add}}' with input shapes: "
        f"PerReplica:{{\n  0: <tf.Tensor: shape=(2, 64, 64, 3), dtype=float32, numpy=\n{pixels}>\n}}"
    )


def test_short_messages_are_unchanged():
    assert (
        cli.error_line("--batch_size=0: must be >= 1", "kft.train") == "kft.train: error: --batch_size=0: must be >= 1"
    )
    assert cli.error_line("photo.jpg: cannot decode") == "error: photo.jpg: cannot decode"


def test_kfts_own_long_messages_stay_whole():
    from kft import backbones

    with pytest.raises(ValueError) as raised:
        backbones.get("ResNet5")
    message = f"flag --backbone=ResNet5: {raised.value}"
    assert cli.error_line(message, "kft.train") == f"kft.train: error: {message}"
    assert message.endswith(", Xception")


def test_a_tensor_repr_becomes_one_bounded_line():
    message = per_replica_message()
    assert len(message) > 100_000 and message.count("\n") > 100
    line = cli.error_line(message, "kft.train")
    assert_one_bounded_line(line, "kft.train: error: Dimensions must be equal, but are 3 and 10 for '{{node add}}'")
    assert line.endswith("... [cut; --verbosity=1 logs it all]")
    assert "PerReplica:{ 0: <tf.Tensor: shape=(2, 64, 64, 3), dtype=float32, numpy= array([[[[" in line


def test_whitespace_and_control_characters():
    line = cli.error_line("a\r\n\tb\x1b[31mred\x00 \u2028 c\x0b\x0cd \x85 e", "kft.tune")
    assert line == "kft.tune: error: a b\\x1b[31mred\\x00 c d e"


@pytest.mark.parametrize("limit", [60, 200, 500])
def test_the_limit_is_exact(limit):
    prefix = "kft.train: error: "
    fits = "x" * (limit - len(prefix) - 2) + " y"
    assert cli.error_line(fits, "kft.train", limit=limit) == prefix + fits
    for longer in [fits + "z", fits + " z", fits + "\n\n", "w" * 10**6]:
        line = cli.error_line(longer, "kft.train", limit=limit)
        if longer.strip() == fits:
            assert line == prefix + fits  # Trailing whitespace is not content.
            continue
        assert_one_bounded_line(line, prefix)
        assert line.endswith("... [cut; --verbosity=1 logs it all]") and len(line) <= limit


def test_huge_inputs_are_cheap():
    many_words = "word " * 5_000_000
    one_word = "w" * 50_000_000
    for message in (many_words, one_word):
        assert_one_bounded_line(cli.error_line(message, "kft.evaluate"), "kft.evaluate: error: w")


def test_exceptions_and_odd_objects():
    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("no str")

    assert cli.error_line(ValueError("first\nsecond")) == "error: first second"
    assert cli.error_line(Broken(), "kft.train") == "kft.train: error: Broken"
    assert cli.error_line(KeyError(), "kft.train") == "kft.train: error: KeyError"
    assert cli.error_line(np.zeros((3, 3)), "kft.train") == "kft.train: error: [[0. 0. 0.] [0. 0. 0.] [0. 0. 0.]]"


def test_fail_prints_one_line_exits_and_logs_the_whole_message(capsys, caplog):
    message = per_replica_message()
    caplog.set_level(std_logging.DEBUG, logger="absl")
    with pytest.raises(SystemExit) as exited:
        cli.fail(message, 3)
    assert exited.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert_one_bounded_line(err.rstrip("\n"), f"{cli._program(sys.argv)}: error: Dimensions must be equal")
    assert any(message in record.getMessage() for record in caplog.records if record.levelno == std_logging.DEBUG)


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


# A flag value that reaches the error message whole: 42 kB over 6,000 lines (an argument may
# hold 128 kB), ending with a marker that only the full message shows.
HUGE = "head:3@1e-3\t" + "stage\r\n" * 6000 + "\x1b[0m END_OF_MESSAGE"


def test_a_bad_flag_with_a_huge_multiline_value_fails_in_one_line(tmp_path):
    """kft.train's flag parser: absl's message repeats the value, newlines and all."""
    result = run_module("kft.train", f"--model_dir={tmp_path / 'run'}", f"--stages={HUGE}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1, [line[:100] for line in lines[:5]]
    assert_one_bounded_line(lines[0], "kft.train: error: flag --stages=head:3@1e-3 stage stage")
    assert "END_OF_MESSAGE" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_usage_error_with_a_huge_multiline_message_fails_in_one_line_and_logs_it_whole(tmp_path):
    """kft.predict's UsageError (an image path that does not exist) through cli.fail; with
    --verbosity=1 the debug log holds the whole message before the one error line."""
    result = run_module("kft.predict", f"--export_dir={tmp_path}", "--verbosity=1", HUGE)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert_one_bounded_line(last, "kft.predict: error: head:3@1e-3 stage stage")
    assert "END_OF_MESSAGE does not exist" in result.stderr  # The debug log's copy.
    assert result.stderr.count("kft.predict: error: ") == 1
