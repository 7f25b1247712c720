"""--mixed_precision=auto on a CPU: the calibration's decision, its cache, and one real run."""

import json
import os

import pytest

from kft import calibration, runtime


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Calibration on (conftest turns it off), the cache under a fresh XDG_CACHE_HOME."""
    monkeypatch.setenv(calibration.ENV_SWITCH, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "kft" / "precision.json"


class FakeMeasure:
    """An injected timing function: float32 takes `ratio` times as long as bfloat16."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.calls = []

    def __call__(self, backbone, size):
        self.calls.append((backbone, size))
        bf16 = [0.10, 0.12, 0.11, 0.30, 0.10]  # one pair slowed by other load: paired, it cancels
        return {
            "float32": [t * self.ratio for t in bf16],
            "mixed_bfloat16": bf16,
            "wall": {"float32": [1.0] * 5, "mixed_bfloat16": [1.0] * 5},
        }


@pytest.mark.parametrize(
    "ratio,expected", [(1.43, "bfloat16"), (1.15, "bfloat16"), (1.14, "none"), (1.0, "none"), (0.6, "none")]
)
def test_bfloat16_only_when_clearly_faster(cache, ratio, expected):
    decision = calibration.decide("ResNet50", 96, measure=FakeMeasure(ratio))
    assert decision.precision == expected
    assert decision.ratio == pytest.approx(ratio)
    assert not decision.cached
    assert f"{ratio:.2f}x" in decision.reason and "ResNet50" in decision.reason


def test_paired_ratio_is_the_median_of_pairs():
    times = {"float32": [2.0, 9.0, 2.0], "mixed_bfloat16": [1.0, 1.0, 2.0]}
    assert calibration.paired_ratio(times) == 2.0
    with pytest.raises(calibration.CalibrationError):
        calibration.paired_ratio({"float32": [], "mixed_bfloat16": []})
    with pytest.raises(calibration.CalibrationError):
        calibration.paired_ratio({"float32": [1.0], "mixed_bfloat16": [0.0]})


def test_second_call_reads_the_cache(cache):
    measure = FakeMeasure(1.5)
    first = calibration.decide("ResNet50", 224, measure=measure)
    second = calibration.decide("ResNet50", 224, measure=measure)
    assert len(measure.calls) == 1
    assert measure.calls == [("ResNet50", calibration.CALIBRATION_MAX_SIZE)]
    assert (first.precision, second.precision) == ("bfloat16", "bfloat16")
    assert second.cached and second.ratio == pytest.approx(1.5)
    assert "cached in" in second.reason
    content = json.loads(cache.read_text())
    (entry,) = content["entries"].values()
    assert entry["precision"] == "bfloat16" and entry["backbone"] == "ResNet50"
    assert entry["image_size"] == calibration.CALIBRATION_MAX_SIZE and entry["wall_ratio"] == 1.0
    # The write was atomic: no temporary file is left beside the cache.
    assert sorted(os.listdir(cache.parent)) == ["precision.json", "precision.json.lock"]


@pytest.mark.parametrize(
    "content", ["{not json", "", '{"version": 1, "entries": []}', '["a"]', '{"version": 99, "entries": {}}']
)
def test_corrupt_cache_is_ignored_and_rewritten(cache, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    measure = FakeMeasure(1.3)
    assert calibration.decide("VGG16", 64, measure=measure).precision == "bfloat16"
    assert len(measure.calls) == 1
    entries = json.loads(cache.read_text())["entries"]
    assert [e["backbone"] for e in entries.values()] == ["VGG16"]
    assert calibration.decide("VGG16", 64, measure=measure).cached


def test_invalid_entry_is_measured_again(cache):
    measure = FakeMeasure(1.3)
    calibration.decide("VGG16", 64, measure=measure)
    content = json.loads(cache.read_text())
    for entry in content["entries"].values():
        entry["ratio"] = "fast"
    cache.write_text(json.dumps(content))
    assert not calibration.decide("VGG16", 64, measure=measure).cached
    assert len(measure.calls) == 2


def test_other_backbone_size_or_machine_is_another_key(cache, monkeypatch):
    measure = FakeMeasure(0.7)
    calibration.decide("MobileNetV2", 96, measure=measure)
    calibration.decide("MobileNetV2", 32, measure=measure)  # smaller images: measured at their size
    calibration.decide("ResNet50", 96, measure=measure)
    calibration.decide("MobileNetV2", 500, measure=measure)  # capped at 96: the first entry
    assert measure.calls == [("MobileNetV2", 96), ("MobileNetV2", 32), ("ResNet50", 96)]
    machine = calibration.machine()
    for change in ({"tensorflow": "9.9.9"}, {"cpu": "Other CPU"}, {"flags_sha1": "0" * 12}, {"cores": 64}):
        monkeypatch.setattr(calibration, "machine", lambda change=change: {**machine, **change})
        calibration.decide("ResNet50", 96, measure=measure)
    assert len(measure.calls) == 7
    assert len(json.loads(cache.read_text())["entries"]) == 7


def test_calibration_size_respects_the_backbone_minimum():
    assert calibration.calibration_size(32) == 32
    assert calibration.calibration_size(224) == calibration.CALIBRATION_MAX_SIZE
    assert calibration.calibration_size(None) == calibration.CALIBRATION_MAX_SIZE
    assert calibration.calibration_size(32, min_size=75) == 75


def test_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.cache_path() == str(tmp_path / "kft" / "precision.json")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored (XDG spec)
    assert calibration.cache_path() == os.path.join(os.path.expanduser("~"), ".cache", "kft", "precision.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert calibration.cache_path() == os.path.join(os.path.expanduser("~"), ".cache", "kft", "precision.json")


def test_failed_measurement_falls_back_to_float32_uncached(cache):
    def broken(backbone, size):
        raise calibration.CalibrationError("exit 1: out of memory")

    decision = calibration.decide("ResNet50", 96, measure=broken)
    assert decision.precision == "none" and decision.ratio is None
    assert "calibration failed" in decision.reason and "out of memory" in decision.reason
    assert not cache.exists() or json.loads(cache.read_text())["entries"] == {}


def test_unwritable_cache_still_decides(cache):
    # A file where the cache directory should be: not writable, even for root.
    cache.parent.parent.mkdir(parents=True)
    cache.parent.write_text("not a directory")
    decision = calibration.decide("ResNet50", 96, measure=FakeMeasure(1.4))
    assert decision.precision == "bfloat16" and "not cached" in decision.reason
    assert cache.parent.read_text() == "not a directory"


def test_switched_off_measures_nothing(cache, monkeypatch):
    monkeypatch.setenv(calibration.ENV_SWITCH, "0")
    measure = FakeMeasure(2.0)
    decision = calibration.decide("ResNet50", 96, measure=measure)
    assert decision.precision == "none" and measure.calls == [] and not cache.exists()


def test_runtime_uses_the_calibration_on_cpu(cache, monkeypatch):
    monkeypatch.setattr(runtime.tf.config, "list_physical_devices", lambda kind=None: [])
    assert runtime.precision_decision("auto", "ResNet50", 96, measure=FakeMeasure(1.6)).precision == "bfloat16"
    assert runtime.precision_decision("auto", "ResNet50", 96, measure=FakeMeasure(1.0)).cached
    assert runtime.precision_decision("auto", "MobileNetV2", 96, measure=FakeMeasure(0.6)).precision == "none"
    # InceptionV3 cannot be built below 75 px: it is measured at its minimum.
    measure = FakeMeasure(1.2)
    runtime.precision_decision("auto", "InceptionV3", 32, measure=measure)
    assert measure.calls == [("InceptionV3", 75)]


def test_real_measurement_in_a_child_process():
    """The real path, tiny: a child process builds both models, times them, prints JSON."""
    times = calibration.measure_in_subprocess("MobileNetV3Small", 32, batch_size=2, min_pairs=2, max_pairs=2)
    for timings in (times, times["wall"]):
        assert len(timings["float32"]) == len(timings["mixed_bfloat16"]) == 2
        assert all(t > 0 for t in timings["float32"] + timings["mixed_bfloat16"])
    assert calibration.paired_ratio(times) > 0


def test_child_failure_is_a_calibration_error(monkeypatch, tmp_path):
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'ValueError: unknown backbone' >&2\nexit 3\n")
    failing.chmod(0o755)
    monkeypatch.setattr(calibration.sys, "executable", str(failing))
    with pytest.raises(calibration.CalibrationError, match="exit 3: ValueError: unknown backbone"):
        calibration.measure_in_subprocess("ResNet50", 32)
