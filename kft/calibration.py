"""Whether mixed bfloat16 trains faster than float32 on this CPU: measured once, then cached.

A rule on CPU flags cannot know it. On a 2-core Xeon with AMX, bfloat16 made ResNet50 steps
1.1-1.7x faster and MobileNetV2's 0.5-0.85x as fast; on a 2-core AMD EPYC with AVX512-BF16 and
no AMX, ResNet50 ran 1.43-1.62x faster (BENCHMARKS.md). So `--mixed_precision=auto` on a CPU
times the backbone itself: forward and backward through every block (the all-blocks stage,
BatchNorm in inference mode as kft's default bn=frozen runs it), float32 against
mixed_bfloat16, on a small random batch, in turns, and keeps bfloat16 only when its step takes
THRESHOLD times less CPU time. The measurement runs in a child process (`python -m
kft.calibration BACKBONE SIZE`), so the run's random seeds, Keras layer names and memory are
untouched by it, and takes 10-20 s on a quiet 2-core machine (40-70 s on a loaded one), once per
machine, backbone and calibration size; the result
is kept in `$XDG_CACHE_HOME/kft/precision.json` (default `~/.cache/kft/`), keyed by the CPU
model, its flags, the core count and the TensorFlow and Keras versions. A cache file that cannot
be read is ignored and rewritten; a failed measurement falls back to float32 and is not cached.

The environment variable KFT_CALIBRATE_PRECISION=0 skips the measurement (float32): the test
suite sets it, so that its runs do not depend on timings.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from absl import logging

try:
    import fcntl
except ImportError:  # Windows has no fcntl: no lock there, two calibrations may run at once
    fcntl = None

# bfloat16 must make a step at least this much faster (float32 time / bfloat16 time) to be
# chosen: it costs some accuracy (BENCHMARKS.md), and a smaller gain can be noise.
THRESHOLD = 1.15
# The measured batch: images are resized to min(--image_size, CALIBRATION_MAX_SIZE), at least
# the backbone's minimum input; bfloat16's gain grows with the image size (ResNet50 all blocks:
# ~1.0x at 32 px, 1.24-1.69x at 96 px), so small-image runs are measured at their own size.
CALIBRATION_MAX_SIZE = 96
CALIBRATION_BATCH = 16
# Timed pairs (one float32 and one bfloat16 step, in alternating order): at least MIN_PAIRS,
# then until TIME_BUDGET_S of timed steps or MAX_PAIRS.
MIN_PAIRS = 5
MAX_PAIRS = 15
TIME_BUDGET_S = 4.0
SUBPROCESS_TIMEOUT_S = 300
CACHE_VERSION = 1
ENV_SWITCH = "KFT_CALIBRATE_PRECISION"
POLICIES = ("float32", "mixed_bfloat16")

# (backbone, image size) -> {"float32": [seconds per step...], "mixed_bfloat16": [...]}, paired
# (the decision's timings: CPU seconds in measure_here), optionally "wall": the same by the clock.
Measure = Callable[[str, int], dict]


class CalibrationError(RuntimeError):
    """The measurement could not be made."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What --mixed_precision resolved to, and why (kft.runtime.precision_decision).

    Attributes:
      precision: "bfloat16", "float16" or "none"; the calibration gives "bfloat16" or "none".
      ratio: float32 step time / bfloat16 step time (median over pairs), or None when not measured.
      reason: one line for the log.
      cached: whether the ratio came from the cache file.
    """

    precision: str
    ratio: float | None
    reason: str
    cached: bool = False


def calibration_size(image_size: int | None, min_size: int = 32) -> int:
    """The image size the calibration measures for a run at `image_size`."""
    size = CALIBRATION_MAX_SIZE if image_size is None else min(int(image_size), CALIBRATION_MAX_SIZE)
    return max(size, int(min_size))


def cache_path() -> str:
    """`$XDG_CACHE_HOME/kft/precision.json`, or `~/.cache/kft/precision.json` (XDG Base
    Directory rules: a relative XDG_CACHE_HOME is ignored)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kft", "precision.json")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", "unknown", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = sorted(value.split())
    except OSError:
        pass
    return model, flags


def machine() -> dict:
    """What the cache key is made of: CPU model, its flags, cores, TensorFlow and Keras."""
    import keras
    import tensorflow as tf

    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "flags_sha1": hashlib.sha1(" ".join(flags).encode()).hexdigest()[:12],
        "bf16_flags": [f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")],
        "cores": cores,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def cache_key(backbone: str, size: int, info: dict) -> str:
    return (
        f"v{CACHE_VERSION} {backbone} {size}px b{CALIBRATION_BATCH} | {info['cpu']} | "
        f"{info['cores']} cores | flags {info['flags_sha1']} | tf {info['tensorflow']} | "
        f"keras {info['keras']}"
    )


def read_cache(path: str) -> dict:
    """The cache's entries; {} when the file is missing, unreadable or not kft's format."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION:
        return {}
    entries = content.get("entries")
    return entries if isinstance(entries, dict) else {}


def _valid(entry) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("precision") in ("bfloat16", "none")
        and isinstance(entry.get("ratio"), (int, float))
        and entry["ratio"] > 0
    )


def write_cache_entry(path: str, key: str, entry: dict) -> None:
    """Adds `entry` under `key`, keeping the other entries, by an atomic replace of the file.

    Raises:
      OSError: the cache directory or file cannot be written.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    entries = read_cache(path)  # again: another process may have added entries meanwhile
    entries[key] = entry
    fd, tmp = tempfile.mkstemp(prefix=".precision.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: str):
    """Holds an exclusive lock beside the cache file, so that processes started together
    (kft.tune trials, workers on one machine) measure one at a time and then read the cache.
    Without a writable cache directory it locks nothing."""
    handle = None
    try:
        if fcntl is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path + ".lock", "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        handle = None
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def paired_ratio(times: dict) -> float:
    """float32 / bfloat16 step time: the median over pairs of the two steps' ratio (the two ran
    one right after the other, so load from other processes that changes between pairs cancels).

    Raises:
      CalibrationError: no pairs, or a time that is not positive.
    """
    pairs = list(zip(times["float32"], times["mixed_bfloat16"]))
    if not pairs or any(t <= 0 for pair in pairs for t in pair):
        raise CalibrationError(f"no usable timings: {times}")
    return statistics.median(f32 / bf16 for f32, bf16 in pairs)


def pick(ratio: float, threshold: float = THRESHOLD) -> str:
    return "bfloat16" if ratio >= threshold else "none"


def _describe(precision: str, ratio: float, backbone: str, size: int, info: dict, where: str) -> str:
    flags = ", ".join(info["bf16_flags"]) or "no bf16 flags"
    verdict = f">= {THRESHOLD}x: bfloat16" if precision == "bfloat16" else f"< {THRESHOLD}x: float32"
    return (
        f"mixed_bfloat16 step {ratio:.2f}x as fast as float32 (CPU time; {backbone}, {size} px, batch "
        f"{CALIBRATION_BATCH}, {where}) {verdict} [{info['cpu']}, {info['cores']} cores, {flags}]"
    )


def decide(
    backbone: str,
    image_size: int | None,
    *,
    measure: Measure | None = None,
    path: str | None = None,
    min_size: int = 32,
) -> Decision:
    """bfloat16 or float32 for `backbone` on this CPU, from the cache or a new measurement.

    Args:
      backbone: keras.applications name.
      image_size: the run's --image_size (None: CALIBRATION_MAX_SIZE).
      measure: the timing function (default: `measure_in_subprocess`); tests inject one.
      path: the cache file (default `cache_path()`).
      min_size: the backbone's smallest input.

    Returns:
      The Decision; a measurement that fails gives float32, uncached.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return Decision("none", None, f"not measured ({ENV_SWITCH}=0): float32")
    path = path or cache_path()
    size = calibration_size(image_size, min_size)
    info = machine()
    key = cache_key(backbone, size, info)
    entry = read_cache(path).get(key)
    if not _valid(entry):
        with _locked(path):
            entry = read_cache(path).get(key)  # another process may have measured meanwhile
            if not _valid(entry):
                return _measure_and_store(backbone, size, info, key, path, measure or measure_in_subprocess)
    ratio = float(entry["ratio"])
    precision = pick(ratio)  # this version's threshold, whatever chose it then
    where = f"cached in {path}, measured {entry.get('measured_at', '?')}"
    return Decision(precision, ratio, _describe(precision, ratio, backbone, size, info, where), cached=True)


def _measure_and_store(backbone: str, size: int, info: dict, key: str, path: str, measure: Measure) -> Decision:
    logging.info(
        "--mixed_precision=auto: timing %s at %d px in float32 and bfloat16, once on this "
        "machine (10-20 s; the result is kept in %s)",
        backbone,
        size,
        path,
    )
    try:
        times = measure(backbone, size)
        ratio = paired_ratio(times)
        wall_ratio = paired_ratio(times["wall"]) if "wall" in times else None
    except (CalibrationError, OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as e:
        message = " ".join(str(e).split())[:300]
        return Decision("none", None, f"calibration failed ({message}): float32")
    precision = pick(ratio)
    entry = {
        "precision": precision,
        "ratio": round(ratio, 4),
        "wall_ratio": wall_ratio and round(wall_ratio, 4),
        "threshold": THRESHOLD,
        "backbone": backbone,
        "image_size": size,
        "batch_size": CALIBRATION_BATCH,
        "float32_step_cpu_s": statistics.median(times["float32"]),
        "bfloat16_step_cpu_s": statistics.median(times["mixed_bfloat16"]),
        "pairs": len(times["float32"]),
        **info,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        write_cache_entry(path, key, entry)
        where = f"measured now, cached in {path}"
    except OSError as e:
        where = f"measured now, not cached: {e.strerror or e}"
    return Decision(precision, ratio, _describe(precision, ratio, backbone, size, info, where))


def measure_in_subprocess(
    backbone: str,
    size: int,
    batch_size: int = CALIBRATION_BATCH,
    min_pairs: int = MIN_PAIRS,
    max_pairs: int = MAX_PAIRS,
) -> dict:
    """Runs `measure_here` in a child Python process and returns its timings.

    Raises:
      CalibrationError: the child failed or printed no timings.
      subprocess.TimeoutExpired: it ran past SUBPROCESS_TIMEOUT_S.
    """
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "kft.calibration",
        backbone,
        str(size),
        str(batch_size),
        str(min_pairs),
        str(max_pairs),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CalibrationError(f"exit {result.returncode}: {tail}")
    times = json.loads(lines[-1])
    if set(POLICIES) - set(times):
        raise CalibrationError(f"unexpected output: {lines[-1][:200]}")
    return times


def _gradient_step(net, x):
    """A traced function: the gradient of every trainable variable of `net` at batch `x`."""
    import tensorflow as tf

    variables = net.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            # training=False: BatchNorm in inference mode, as kft's default bn=frozen runs it.
            loss = tf.reduce_mean(tf.cast(net(x, training=False), tf.float32))
        grads = tape.gradient(loss, variables)
        return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    return step


def measure_here(
    backbone: str,
    size: int,
    batch_size: int = CALIBRATION_BATCH,
    min_pairs: int = MIN_PAIRS,
    max_pairs: int = MAX_PAIRS,
    budget_s: float = TIME_BUDGET_S,
) -> dict:
    """Times forward + backward through the whole backbone, float32 against mixed_bfloat16.

    Each policy gets its own model (Keras fixes a layer's dtypes when it is built), one traced
    tf.function computing the gradient of every trainable variable, and a warm-up call; then
    pairs of steps, the order alternating, until `min_pairs` and `budget_s` of timed steps (or
    `max_pairs`). Runs in this process: call it from a child (`measure_in_subprocess`).

    Returns:
      {"float32": [...], "mixed_bfloat16": [...]}: the process CPU seconds of each step, which
      the decision uses, and "wall": the same for wall-clock seconds. On a machine shared with
      other jobs (2 cores, load 7) the wall-clock ratio of ResNet50 at 96 px ranged 1.35-3.3x
      between runs, the CPU-time ratio 1.41-1.48x; both policies run on the same thread pool.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from kft import backbones

    spec = backbones.get(backbone)
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
    steps = {}
    for policy in POLICIES:
        keras.mixed_precision.set_global_policy(policy)
        try:
            net = spec.constructor(include_top=False, weights=None, input_shape=(size, size, 3))
        finally:
            keras.mixed_precision.set_global_policy("float32")
        step = _gradient_step(net, tf.constant(images))
        step().numpy()  # traces
        step().numpy()  # warm
        steps[policy] = step
    wall = {policy: [] for policy in POLICIES}
    cpu = {policy: [] for policy in POLICIES}
    spent = 0.0
    for index in range(max_pairs):
        if index >= min_pairs and spent >= budget_s:
            break
        for policy in POLICIES if index % 2 == 0 else POLICIES[::-1]:
            started, cpu_started = time.perf_counter(), time.process_time()
            steps[policy]().numpy()
            elapsed = time.perf_counter() - started
            wall[policy].append(elapsed)
            cpu[policy].append(time.process_time() - cpu_started)
            spent += elapsed
    return {**cpu, "wall": wall}


if __name__ == "__main__":
    # python -m kft.calibration BACKBONE SIZE [BATCH MIN_PAIRS MAX_PAIRS]: prints the timings as JSON.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    numbers = [int(a) for a in sys.argv[2:6]]
    print(json.dumps(measure_here(sys.argv[1], *numbers)))
