#!/usr/bin/env python
"""Benchmarks kft's training step, input pipeline and stage changes against plain Keras.

Commands (BENCHMARKS.md holds the results and what they mean):

    python tools/bench.py                    # ResNet50, MobileNetV2 at 32, 96 px, batch 64 (~4 min)
    python tools/bench.py --extended         # every variant in every group (~20 min)
    python tools/bench.py --quick --out=/tmp/b.json  # smoke run of this tool (tests/test_bench.py)
    python tools/bench.py --gpu              # the GPU check (tools/gpu_check.sh; see gpu_check)

Everything runs in one process on the same synthetic uint8 batches, backbone, image size, batch
size and dtype (weights=None: same FLOPs as ImageNet weights, nothing to download):

* train: the plain Keras fine-tune a user writes from the keras-io transfer-learning guide
  (keras.applications base called with training=False, GlobalAveragePooling2D, Dropout, Dense;
  `compile(Adam, sparse CE)`; `fit`), head-only (base.trainable=False) and all layers trainable,
  the latter both as written (in Keras 3 its BatchNorm then trains: see `baseline_runner`) and
  with BatchNorm frozen, the like-for-like comparison for kft's default bn=frozen;
  kft's step for each stage kind (head, top2, all) built exactly as `kft.trainer.train` builds it
  (FineTuner with the default L2-SP alpha=beta=0.01, apply_stage, make_optimizer, compile,
  optimizer.build), augmentation off, plus crop,flip on, plus mixed bfloat16 and XLA variants.
  Each model is warmed up with `fit` (its first step traces the train function), then every
  model's `train_function` is called on its own iterator over a repeated, cached dataset, one
  step per model per round, rotating the order, so that load from other processes on this
  shared machine hits every row alike. Reported: median step time.
* feature_cache: what a `--cache_features` head-only stage would cost: the frozen backbone's
  forward pass once per image, then head-only epochs on the stored features.
* stage_change: apply_stage + new optimizer + compile + optimizer.build, plus the first train
  step (tracing) beyond a steady step, against the stage's time on CIFAR-10 (50k images, the
  epochs of configs/cifar10_resnet50.cfg) at the measured step time. The first stage also pays
  the validation step's trace, which kft.trainer.train reuses in later stages; it is the
  initial compile every Keras run pays, reported but not a stage change.
* pipeline: kft.data's pipelines alone, tfds:cifar10 under tfds.testing.mock_data and folder:
  with JPEG and PNG files written to a temporary folder: the first pass (decode + resize, fills
  the cache) and a later pass (from the cache), against what kft's steps consume.
* flops: forward FLOPs per image from TF's profiler on the model's graph, split by backbone
  block; training FLOPs per image = forward + 2 x (forward of the trainable blocks and head).
  Peak = cores x clock x FLOPs per cycle per core (from /proc/cpuinfo flags).
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from kft import augment, backbones, data, finetuner, l2sp, model, runtime, schedule  # noqa: E402
from kft.config import Config  # noqa: E402

NUM_CLASSES = 10
# The default CIFAR-10 setting the stage-change and feature-cache estimates refer to.
CIFAR_TRAIN_IMAGES = 50_000
# Epochs per stage kind in configs/cifar10_resnet50.cfg (head:2, top3:3, all:5).
CIFAR_STAGE_EPOCHS = {"head": 2, "top": 3, "all": 5}
# kft's flag defaults (kft/flags.py).
L2SP_ALPHA = 0.01
L2SP_BETA = 0.01
DROPOUT = 0.2
TOP_BLOCKS = 2
AUGMENT = ("crop", "flip")
# Side of the JPEG/PNG files written for the folder: source (resized to each --image_sizes).
FOLDER_SOURCE_SIZE = 128
# Target thresholds of issue 4.
TARGET_L2SP_VS_BASELINE = 1.0
TARGET_HEAD_VS_ALL = 4.0
TARGET_CACHED_HEAD_VS_ALL = 20.0
TARGET_PIPELINE_VS_STEP = 10.0
TARGET_STAGE_CHANGE_FRACTION = 0.05
# Two timings this close are a tie on this shared machine.
NOISE = 0.03
# --mixed_precision value -> the Keras dtype policy it sets (kft.runtime.set_precision).
POLICY = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


# ----------------------------------------------------------------------------------------------
# The machine and its peak.


def _cpuinfo() -> dict:
    info = {"model": platform.processor() or "unknown", "flags": set(), "mhz": 0.0}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for key, pattern in (
        ("model", r"^model name\s*:\s*(.+)$"),
        ("mhz", r"^cpu MHz\s*:\s*(.+)$"),
        ("flags", r"^flags\s*:\s*(.+)$"),
    ):
        match = re.search(pattern, text, re.M)
        if match:
            info[key] = match.group(1).strip()
    info["mhz"] = float(info["mhz"] or 0.0)
    info["flags"] = set(str(info["flags"]).split()) if info["flags"] else set()
    return info


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
        return round(kib / 1024**2, 1)
    except (OSError, AttributeError):
        return 0.0


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    """CPU model, cores, clock, memory and the peak FLOP/s formula with its numbers."""
    cpu = _cpuinfo()
    flags = cpu["flags"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    clock_hz = cpu["mhz"] * 1e6
    # FP32 FLOPs per cycle per core = FMA units x SIMD lanes x 2 (an FMA is 2 FLOPs). Xeons with
    # AVX-512 have two 512-bit FMA units (ports 0+1 and 5); a one-FMA SKU would halve this.
    if "avx512f" in flags:
        fp32, fp32_why = 2 * 16 * 2, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 FLOPs"
    elif "avx2" in flags and "fma" in flags:
        fp32, fp32_why = 2 * 8 * 2, "AVX2: 2 FMA units x 8 fp32 lanes x 2 FLOPs"
    else:
        fp32, fp32_why = 2 * 4 * 2, "SSE: 2 units x 4 fp32 lanes x 2 FLOPs (no FMA: upper bound)"
    if "amx_bf16" in flags:
        # One TDPBF16PS (16x32 by 32x16 bf16 tiles, 8192 MACs) per 16 cycles: 512 MACs/cycle.
        bf16, bf16_why = 1024, "AMX-BF16: 512 bf16 MACs/cycle x 2 FLOPs"
    elif "avx512_bf16" in flags:
        bf16, bf16_why = 2 * 32 * 2, "AVX512_BF16: 2 units x 32 bf16 MACs x 2 FLOPs"
    else:
        bf16, bf16_why = fp32, "no bf16 instructions: as fp32"
    interesting = sorted(f for f in flags if re.match(r"(avx|fma|amx|f16c)", f))
    return {
        "cpu_model": cpu["model"],
        "cores": cores,
        "clock_ghz": round(clock_hz / 1e9, 3),
        "clock_source": "/proc/cpuinfo 'cpu MHz' (nominal; turbo, if any, not counted)",
        "memory_gib": _memory_gib(),
        "simd_flags": interesting,
        "fp32_flops_per_cycle_per_core": fp32,
        "fp32_formula": f"{cores} cores x {clock_hz / 1e9:.2f} GHz x {fp32} ({fp32_why})",
        "peak_fp32_flops": cores * clock_hz * fp32,
        "bf16_flops_per_cycle_per_core": bf16,
        "bf16_formula": f"{cores} cores x {clock_hz / 1e9:.2f} GHz x {bf16} ({bf16_why})",
        "peak_bf16_flops": cores * clock_hz * bf16,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "commit": _commit(),
    }


# ----------------------------------------------------------------------------------------------
# FLOPs from the profiler.


def forward_flops(classifier: model.Classifier, blocks: list, image_size: int) -> dict:
    """Forward FLOPs of one image through `classifier`, by backbone block and for the head.

    TF's v1 profiler counts the float ops of every op in the concrete function's graph (a
    convolution counts 2 x MACs). Each op is attributed to the layer named in its scope.
    """
    fn = tf.function(lambda x: classifier(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, 3], tf.uint8)
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=fn.graph, options=options)
    layer_block = {layer.name: block.name for block in blocks for layer in block.layers}
    for layer in classifier.head_layers:
        layer_block[layer.name] = "head"
    per_block: dict[str, int] = {}

    def visit(node):
        if node.float_ops:
            where = "other"
            for part in node.name.split("/"):
                for name in (part, re.sub(r"_\d+$", "", part)):
                    if name in layer_block:
                        where = layer_block[name]
                        break
            per_block[where] = per_block.get(where, 0) + int(node.float_ops)
        for child in node.children:
            visit(child)

    for child in profile.children:
        visit(child)
    return {"total": int(profile.total_float_ops), "per_block": per_block}


def train_flops(forward: dict, trainable_blocks: list[str]) -> int:
    """Training FLOPs per image: the forward pass, plus 2x (input and weight gradients) the
    forward FLOPs of everything the gradient flows through (trainable blocks and head)."""
    per_block = forward["per_block"]
    backward = sum(per_block.get(name, 0) for name in trainable_blocks) + per_block.get("head", 0)
    return forward["total"] + 2 * backward


# ----------------------------------------------------------------------------------------------
# Timed runners.


@dataclasses.dataclass
class Runner:
    """One timed row: a step callable plus what it measured."""

    name: str
    meta: dict
    step: Callable[[], object] | None = None
    setup_s: float = 0.0  # apply_stage + optimizer + compile + optimizer.build (kft rows)
    first_step_s: float = 0.0  # first step, including its trace
    first_eval_s: float | None = None  # first validation step, including its trace
    times: list = dataclasses.field(default_factory=list)  # wall seconds per timed step
    cpu_times: list = dataclasses.field(default_factory=list)  # process CPU seconds per step
    keep: list = dataclasses.field(default_factory=list)  # objects the step needs alive

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1)) / 1024**2
    except (OSError, AttributeError):
        return 0.0


def _sync(outputs) -> None:
    for value in tf.nest.flatten(outputs):
        np.asarray(value)


def _train_dataset(batch_size: int, image_size: int, seed: int = 0) -> tf.data.Dataset:
    """Four distinct uint8 batches with labels, cached and repeated (no input cost in steps)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4 * batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, 4 * batch_size).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return dataset.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(2)


def _start(
    runner: Runner, keras_model: keras.Model, dataset: tf.data.Dataset, warmup_steps: int, eval_trace: bool = False
) -> Runner:
    """Warms `keras_model` up the way training starts (fit traces the step), then hands the
    runner a step on a persistent iterator."""
    started = time.perf_counter()
    keras_model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    runner.first_step_s = time.perf_counter() - started
    if eval_trace:
        started = time.perf_counter()
        keras_model.evaluate(dataset, steps=1, verbose=0)
        runner.first_eval_s = time.perf_counter() - started
    iterator = iter(dataset)
    train_function = keras_model.train_function
    runner.step = lambda: train_function(iterator)
    runner.keep = [keras_model, iterator]
    for _ in range(max(0, warmup_steps - 1)):
        _sync(runner.step())
    return runner


def baseline_runner(backbone: str, image_size: int, batch_size: int, stage: str, warmup_steps: int) -> Runner:
    """The plain Keras fine-tune: keras.applications base + pooling + dropout + dense head.

    stage "head": base.trainable = False. "all-guide": everything trainable, written as the
    keras-io transfer-learning guide does (base called with training=False). In Keras 3 the
    outer model's training=True overrides that nested training=False (keras-team/keras#20285),
    so its BatchNorm layers normalize with batch statistics and update their moving statistics.
    "all": the same, plus each BatchNormalization layer set trainable=False, the Keras 3 way to
    keep BatchNorm in inference mode (statistics and gamma/beta frozen): the baseline for kft's
    bn=frozen stages, which freeze BatchNorm the same way.
    """
    spec = backbones.get(backbone)
    base = spec.constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    base.trainable = stage != "head"
    if stage == "all":
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
    x = spec.preprocess(keras.ops.cast(inputs, "float32"))  # e.g. resnet50.preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(DROPOUT)(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    keras_model = keras.Model(inputs, outputs)
    # compile's default jit_compile="auto": Keras turns XLA on where a GPU is, off on CPU.
    keras_model.compile(
        optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    name = {"head": "baseline head", "all": "baseline all (BN frozen)", "all-guide": "baseline all (as guide)"}[stage]
    runner = Runner(
        name,
        {
            "impl": "baseline" if stage != "all-guide" else "baseline_guide",
            "stage": "head" if stage == "head" else "all",
            "precision": "float32",
            "jit_compile": bool(keras_model.jit_compile),
            "augment": "",
            "l2sp": False,
        },
    )
    return _start(runner, keras_model, _train_dataset(batch_size, image_size), warmup_steps)


@dataclasses.dataclass
class KftBuild:
    classifier: model.Classifier
    blocks: list
    tuner: finetuner.FineTuner
    anchors: dict


def _kft_config(backbone: str, image_size: int, augment_ops: tuple, alpha: float, beta: float) -> Config:
    """The Config of the benchmarked run (weights=None instead of imagenet; no data is read)."""
    return Config(
        dataset="",
        backbone=backbone,
        stages=(),
        model_dir="",
        weights=None,
        image_size=image_size,
        l2sp_alpha=alpha,
        l2sp_beta=beta,
        regularizer="l2sp",
        dropout=DROPOUT,
        augment=tuple(augment_ops),
        seed=0,
    )


def build_kft(
    backbone: str,
    image_size: int,
    precision: str,
    augment_ops: tuple,
    alpha: float = L2SP_ALPHA,
    beta: float = L2SP_BETA,
) -> KftBuild:
    """The FineTuner as kft.trainer.train builds it (kft.finetuner; weights=None)."""
    config = _kft_config(backbone, image_size, augment_ops, alpha, beta)
    runtime.set_precision(precision)
    try:
        with tf.distribute.get_strategy().scope():
            classifier, blocks = finetuner.build_classifier(config, NUM_CLASSES)
            anchors = l2sp.anchor_arrays(classifier.backbone)
            tuner = finetuner.make_finetuner(config, classifier, anchors)
    finally:
        runtime.set_precision("none")
    return KftBuild(classifier, blocks, tuner, anchors)


def kft_stage_runners(
    backbone: str,
    image_size: int,
    batch_size: int,
    stages: list[tuple[str, bool]],
    *,
    precision: str = "none",
    augment_ops: tuple = (),
    alpha: float = L2SP_ALPHA,
    warmup_steps: int = 1,
    eval_trace: bool = False,
    share: "KftBuild | None" = None,
) -> tuple[list[Runner], KftBuild]:
    """kft's step for each stage, one FineTuner going through the stages as trainer.train does.

    For each (stage spec, jit_compile): apply_stage, a new optimizer with the stage's schedule,
    compile, optimizer.build (timed together as `setup_s`), then fit's first step (traces). The
    runner keeps that stage's train function: a later compile replaces the model's function but
    not the traced graph the runner holds, so every stage can be timed afterwards, interleaved.
    With `share`, the FineTuner wraps that build's classifier (same weights, same graph) instead
    of a new one: what kft builds for another --augment or --l2sp_alpha, minus a model build.
    """
    if share is None:
        built = build_kft(backbone, image_size, precision, augment_ops, alpha=alpha)
    else:
        config = _kft_config(backbone, image_size, augment_ops, alpha, L2SP_BETA)
        tuner = finetuner.make_finetuner(config, share.classifier, share.anchors)
        built = KftBuild(share.classifier, share.blocks, tuner, share.anchors)
    dataset = _train_dataset(batch_size, image_size)
    steps = CIFAR_TRAIN_IMAGES // batch_size
    runners = []
    for index, (stage_spec, jit_compile) in enumerate(stages):
        stage = schedule.parse_stages(stage_spec)[0]
        started = time.perf_counter()
        with tf.distribute.get_strategy().scope():
            lr = schedule.stage_learning_rate(stage, 1.0, steps)
            finetuner.prepare_stage(
                built.tuner, built.blocks, stage, lr, optimizer="adam", precision=precision, jit_compile=jit_compile
            )
        setup_s = time.perf_counter() - started
        what = stage_spec.split(":")[0]
        l2sp_on = bool(alpha) and what != "head"
        name = f"kft {what}" + (" L2-SP" if l2sp_on else " alpha=0" if what != "head" else "")
        runner = Runner(
            name,
            {
                "impl": "kft",
                "stage": what,
                "precision": POLICY[precision],
                "jit_compile": jit_compile,
                "augment": ",".join(augment_ops),
                "l2sp": l2sp_on,
            },
        )
        runner.setup_s = setup_s
        _start(runner, built.tuner, dataset, warmup_steps, eval_trace and index == 0)
        runners.append(runner)
    return runners, built


def features_runner(built: KftBuild, image_size: int, batch_size: int) -> Runner:
    """The frozen backbone's forward pass, as a --cache_features pass would run it."""
    features = tf.function(lambda x: built.classifier.features(x, training=False))
    iterator = iter(_train_dataset(batch_size, image_size).map(lambda x, y: x))
    runner = Runner(
        "features (forward)",
        {
            "impl": "feature_cache",
            "stage": "extract",
            "precision": "float32",
            "jit_compile": False,
            "augment": "",
            "l2sp": False,
        },
    )
    started = time.perf_counter()
    _sync(features(next(iterator)))
    runner.first_step_s = time.perf_counter() - started
    runner.step = lambda: features(next(iterator))
    runner.keep = [features, iterator]
    return runner


def head_on_features_runner(num_features: int, batch_size: int, warmup_steps: int) -> Runner:
    """A head-only training step on stored features (dropout + dense, Adam, like kft's head)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4 * batch_size, num_features)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, 4 * batch_size).astype(np.int32)
    dataset = (
        tf.data.Dataset.from_tensor_slices((feats, labels))
        .batch(batch_size, drop_remainder=True)
        .cache()
        .repeat()
        .prefetch(2)
    )
    inputs = keras.Input((num_features,))
    x = keras.layers.Dropout(DROPOUT)(inputs)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    head = keras.Model(inputs, outputs)
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    runner = Runner(
        "head on cached features",
        {
            "impl": "feature_cache",
            "stage": "head",
            "precision": "float32",
            "jit_compile": False,
            "augment": "",
            "l2sp": False,
        },
    )
    return _start(runner, head, dataset, warmup_steps)


def measure(runners: list[Runner], steps: int) -> None:
    """`steps` rounds, each one step of every runner; odd rounds run in reverse order, so each
    runner's neighbours (the rows it is compared with) run right before or after it."""
    for index in range(steps):
        for runner in runners if index % 2 == 0 else runners[::-1]:
            started, cpu_started = time.perf_counter(), time.process_time()
            _sync(runner.step())
            runner.times.append(time.perf_counter() - started)
            runner.cpu_times.append(time.process_time() - cpu_started)


# ----------------------------------------------------------------------------------------------
# One backbone at one image size.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which optional rows a group measures."""

    guide_baseline: bool  # the all-trainable baseline exactly as the guide writes it
    bf16: tuple[str, ...]  # stages with a mixed-bfloat16 row
    xla: tuple[str, ...]  # stages with a float32 XLA row
    xla_bf16: bool  # also a mixed-bfloat16 XLA row for those stages
    augment: bool  # a kft all-blocks row with crop,flip
    no_l2sp: bool  # a kft all-blocks row with alpha = 0


def group_plans(args) -> list[tuple[str, int, Plan]]:
    """The groups and their rows.

    Every group: the baselines (all trainable with BatchNorm frozen, head-only), kft head, top2
    and all with L2-SP, the feature-cache rows. To stay under 5 minutes here the default
    measures each variant in one group per backbone at most: bfloat16 head at each backbone's
    largest size (and at every size where --mixed_precision=auto picks bfloat16), plus bfloat16
    all-blocks for the first backbone there; XLA (head) at the first
    backbone's smallest size; the as-written guide baseline and crop,flip at the last backbone's
    smallest size (the cheapest group, and the one where both matter most). --extended
    measures every variant in every group.
    """
    plans = []
    smallest, largest = min(args.image_sizes), max(args.image_sizes)
    for b, backbone in enumerate(args.backbones):
        first, last = b == 0, b == len(args.backbones) - 1
        for size in args.image_sizes:
            # Target 4 needs the variant --mixed_precision=auto picks in every group.
            auto_bf16 = runtime.resolve_precision("auto", backbone, size) == "bfloat16"
            if args.extended:
                plan = Plan(True, ("head", "all"), ("head", "all"), True, True, True)
            else:
                plan = Plan(
                    guide_baseline=last and size == smallest and not args.quick,
                    bf16=(
                        ("head", "all")
                        if first and size == largest and not args.quick
                        else ("head",)
                        if size == largest or auto_bf16
                        else ()
                    ),
                    xla=("head",) if first and size == smallest else (),
                    xla_bf16=False,
                    augment=last and size == smallest and not args.quick,
                    no_l2sp=False,
                )
            plans.append((backbone, size, plan))
    return plans


def bench_group(backbone: str, image_size: int, args, plan: Plan, machine: dict, log: Callable[[str], None]) -> dict:
    """All rows of one (backbone, image size) group."""
    bs, warm = args.batch_size, args.warmup_steps
    top = f"top{TOP_BLOCKS}"
    specs = {"head": "head:1@1e-3", top: f"{top}:1@1e-4", "all": "all:1@1e-5"}
    log(f"[{backbone} {image_size}px] building and warming up")
    base_all = baseline_runner(backbone, image_size, bs, "all", warm)
    base_head = baseline_runner(backbone, image_size, bs, "head", warm)
    # float32, the defaults: head -> top2 -> all as a staged run goes, XLA rows after them.
    stages = [(specs["head"], False), (specs[top], False), (specs["all"], False)]
    stages += [(specs[what], True) for what in plan.xla]
    fp32, fp32_build = kft_stage_runners(backbone, image_size, bs, stages, warmup_steps=warm, eval_trace=True)
    kft_head, kft_top, kft_all, *kft_xla = fp32
    # Rows compared with each other sit next to each other (see `measure`).
    runners = [base_all, kft_all, kft_head, base_head, kft_top]
    if plan.guide_baseline:
        runners.insert(0, baseline_runner(backbone, image_size, bs, "all-guide", warm))
    if plan.bf16:
        stages = [(specs[what], False) for what in plan.bf16]
        stages += [(specs[what], True) for what in plan.xla if plan.xla_bf16]
        runners += kft_stage_runners(backbone, image_size, bs, stages, precision="bfloat16", warmup_steps=warm)[0]
    runners += kft_xla
    if plan.augment:
        runners += kft_stage_runners(
            backbone, image_size, bs, [(specs["all"], False)], augment_ops=AUGMENT, warmup_steps=warm, share=fp32_build
        )[0]
    if plan.no_l2sp:
        runners += kft_stage_runners(
            backbone, image_size, bs, [(specs["all"], False)], alpha=0.0, warmup_steps=warm, share=fp32_build
        )[0]
    runners.append(features_runner(fp32_build, image_size, bs))
    num_features = int(fp32_build.classifier.pool.compute_output_shape(fp32_build.classifier.backbone.output.shape)[-1])
    runners.append(head_on_features_runner(num_features, bs, warm))
    log(f"[{backbone} {image_size}px] timing {len(runners)} rows x {args.steps} interleaved steps")
    measure(runners, args.steps)

    forward = forward_flops(fp32_build.classifier, fp32_build.blocks, image_size)
    block_names = [b.name for b in fp32_build.blocks]
    trainable = {"head": [], top: block_names[-TOP_BLOCKS:], "all": block_names}
    flops = {
        "forward_per_image": forward["total"],
        "forward_per_image_by_block": forward["per_block"],
        "train_per_image": {k: train_flops(forward, v) for k, v in trainable.items()},
    }
    flops["train_per_image"]["extract"] = forward["total"]
    flops["train_per_image"]["head_on_features"] = 3 * forward["per_block"].get("head", 0)

    rows = []
    for runner in runners:
        stage = runner.meta["stage"]
        cached_head = runner.meta["impl"] == "feature_cache" and stage == "head"
        per_image = flops["train_per_image"]["head_on_features" if cached_head else stage]
        images_per_s = bs / runner.median
        bf16 = runner.meta["precision"] != "float32"
        peak = machine["peak_bf16_flops"] if bf16 else machine["peak_fp32_flops"]
        rows.append(
            {
                "backbone": backbone,
                "image_size": image_size,
                "batch_size": bs,
                "row": runner.name,
                **runner.meta,
                "step_s_median": runner.median,
                "step_s_min": min(runner.times),
                "step_s": runner.times,
                "cpu_s_median": statistics.median(runner.cpu_times),
                "cpu_s": runner.cpu_times,
                "images_per_s": images_per_s,
                "flops_per_image": per_image,
                "achieved_flops": per_image * images_per_s,
                "peak_flops": peak,
                "peak_fraction": per_image * images_per_s / peak,
                "setup_s": runner.setup_s,
                "first_step_s": runner.first_step_s,
                "first_eval_s": runner.first_eval_s,
            }
        )
    return {"rows": rows, "flops": flops}


def _row(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _main_row(rows, impl, stage) -> dict | None:
    """The float32 row of `impl` and `stage`: XLA off for kft; the baseline as Keras compiles it."""
    xla = {"jit_compile": False} if impl == "kft" else {}
    return _row(
        rows, impl=impl, stage=stage, precision="float32", augment="", l2sp=(impl == "kft" and stage != "head"), **xla
    )


def paired_speedup(row: dict, reference: dict) -> float:
    """Throughput of `row` over `reference`: the median over rounds of their step-time ratio.

    The two ran one after the other in every round, so load from other processes that changes
    between rounds cancels out.
    """
    return statistics.median(r / t for r, t in zip(reference["step_s"], row["step_s"]))


def feature_cache_estimate(rows: list[dict], batch_size: int) -> dict:
    """Epoch times at CIFAR-10 size for all-blocks, head-only, and head-only on cached features."""
    steps = CIFAR_TRAIN_IMAGES // batch_size
    all_step = _main_row(rows, "kft", "all")["step_s_median"]
    head_step = _main_row(rows, "kft", "head")["step_s_median"]
    extract_step = _row(rows, impl="feature_cache", stage="extract")["step_s_median"]
    cached_step = _row(rows, impl="feature_cache", stage="head")["step_s_median"]
    epoch = {
        "all_blocks": steps * all_step,
        "head_only": steps * head_step,
        "extract_features_once": steps * extract_step,
        "head_on_cached_features": steps * cached_step,
    }
    return {
        "backbone": rows[0]["backbone"],
        "image_size": rows[0]["image_size"],
        "images": CIFAR_TRAIN_IMAGES,
        "batch_size": batch_size,
        "epoch_s": epoch,
        "head_vs_all": all_step / head_step,
        "cached_later_epochs_vs_all": epoch["all_blocks"] / epoch["head_on_cached_features"],
        "cached_first_epoch_vs_all": epoch["all_blocks"]
        / (epoch["extract_features_once"] + epoch["head_on_cached_features"]),
        "cached_later_epochs_vs_head_only": epoch["head_only"] / epoch["head_on_cached_features"],
    }


def stage_change_rows(rows: list[dict], batch_size: int) -> list[dict]:
    """The cost of entering each stage beyond its steady steps, against the stage's time."""
    steps = CIFAR_TRAIN_IMAGES // batch_size
    # kft.trainer.train traces the validation step in the first stage and reuses it after.
    first_eval_s = _main_row(rows, "kft", "head")["first_eval_s"] or 0.0
    out = []
    for stage in ("head", f"top{TOP_BLOCKS}", "all"):
        row = _main_row(rows, "kft", stage)
        step = row["step_s_median"]
        eval_s = first_eval_s if stage == "head" else 0.0
        change = row["setup_s"] + max(0.0, row["first_step_s"] - step) + eval_s
        epochs = CIFAR_STAGE_EPOCHS[re.sub(r"\d+$", "", stage)]
        out.append(
            {
                "backbone": row["backbone"],
                "image_size": row["image_size"],
                "stage": stage,
                "setup_s": row["setup_s"],
                "first_step_s": row["first_step_s"],
                "first_eval_s": eval_s,
                "steady_step_s": step,
                "change_s": change,
                "epoch_s": steps * step,
                "epochs": epochs,
                "stage_s": steps * epochs * step,
                "fraction_of_stage": change / (steps * epochs * step),
                "fraction_of_one_epoch": change / (steps * step),
            }
        )
    return out


def precision_xla_rows(rows: list[dict]) -> list[dict]:
    """For each stage measured in several (precision, jit_compile) variants: which is fastest,
    and what kft's defaults (--jit_compile=auto, --mixed_precision=auto) pick here."""
    out = []
    auto_jit = runtime.resolve_jit_compile("auto")
    auto_bf16 = runtime.resolve_precision("auto", rows[0]["backbone"], rows[0]["image_size"]) == "bfloat16"
    for stage in ("head", "all"):
        variants = {}
        for row in rows:
            if (
                row["impl"] == "kft"
                and row["stage"] == stage
                and not row["augment"]
                and (row["l2sp"] or stage == "head")
            ):
                key = f"{row['precision']}{' + XLA' if row['jit_compile'] else ''}"
                variants[key] = row["images_per_s"]
        if len(variants) < 2:
            continue
        default_key = f"{'mixed_bfloat16' if auto_bf16 else 'float32'}{' + XLA' if auto_jit else ''}"
        if default_key not in variants:
            continue
        fastest = max(variants, key=variants.get)
        out.append(
            {
                "backbone": rows[0]["backbone"],
                "image_size": rows[0]["image_size"],
                "stage": stage,
                "images_per_s": variants,
                "fastest": fastest,
                "default": default_key,
                "default_images_per_s": variants.get(default_key, 0.0),
                "fastest_vs_default": variants[fastest] / variants[default_key],
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# Input pipelines alone.


def _write_folder(root: str, fmt: str, count: int) -> None:
    """`count` smooth random images in NUM_CLASSES class folders (compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for index in range(count):
        label = index % NUM_CLASSES
        folder = os.path.join(root, f"class{label}")
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((FOLDER_SOURCE_SIZE, FOLDER_SOURCE_SIZE), Image.BICUBIC)
        noisy = np.asarray(image, np.int16) + rng.integers(-8, 9, (FOLDER_SOURCE_SIZE,) * 2 + (3,))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        if fmt == "jpeg":
            image.save(os.path.join(folder, f"{index}.jpg"), quality=90)
        else:
            image.save(os.path.join(folder, f"{index}.png"))


def _passes(dataset: tf.data.Dataset, passes: int = 2) -> list[float]:
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        count = 0
        for images, _ in dataset:
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - started))
    return rates


def bench_pipelines(image_sizes: list[int], batch_size: int, num_images: int, log: Callable[[str], None]) -> list[dict]:
    """Images/s of kft.data's train pipeline: first pass (decode) and a cached pass."""
    import tensorflow_datasets as tfds

    rows = []
    tmp = tempfile.mkdtemp(prefix="kft_bench_")
    try:
        for fmt in ("jpeg", "png"):
            _write_folder(os.path.join(tmp, fmt), fmt, num_images)
        log(f"[pipeline] wrote {num_images} JPEG and PNG files")
        for size in image_sizes:
            log(f"[pipeline {size}px]")
            with tfds.testing.mock_data(num_examples=num_images):
                source = tfds.builder("cifar10").as_dataset(
                    split="train", decoders={"image": tfds.decode.SkipDecoding()}
                )
                started = time.perf_counter()
                count = sum(1 for _ in source)
                source_rate = count / (time.perf_counter() - started)
                started = time.perf_counter()
                splits = data.load("tfds:cifar10", image_size=size, batch_size=batch_size)
                load_s = time.perf_counter() - started
                first, cached = _passes(splits.train)
            rows.append(
                {
                    "source": "tfds:cifar10 (mock_data)",
                    "image_size": size,
                    "images": splits.num_train,
                    "load_s": load_s,
                    "first_pass_images_per_s": first,
                    "cached_pass_images_per_s": cached,
                    "source_alone_images_per_s": source_rate,
                    "note": "first pass includes tfds mock_data generating and PNG-encoding each example in Python",
                }
            )
            for fmt in ("jpeg", "png"):
                started = time.perf_counter()
                splits = data.load(f"folder:{os.path.join(tmp, fmt)}", image_size=size, batch_size=batch_size)
                load_s = time.perf_counter() - started
                first, cached = _passes(splits.train)
                rows.append(
                    {
                        "source": f"folder: {fmt.upper()} {FOLDER_SOURCE_SIZE}px",
                        "image_size": size,
                        "images": splits.num_train,
                        "load_s": load_s,
                        "first_pass_images_per_s": first,
                        "cached_pass_images_per_s": cached,
                        "note": "load_s includes kft.data probing (decoding) every file once",
                    }
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def pipeline_ratios(pipelines: list[dict], train_rows: list[dict]) -> None:
    """Adds, per pipeline row, its rate over the fastest-consuming kft float32 step at that size."""
    for row in pipelines:
        consumers = [
            r
            for r in train_rows
            if r["impl"] == "kft"
            and r["image_size"] == row["image_size"]
            and r["precision"] == "float32"
            and not r["jit_compile"]
            and not r["augment"]
        ]
        if not consumers:
            continue
        fastest = max(consumers, key=lambda r: r["images_per_s"])
        row["fastest_consumer"] = f"{fastest['backbone']} {fastest['row']}"
        row["fastest_consumer_images_per_s"] = fastest["images_per_s"]
        row["first_pass_vs_step"] = row["first_pass_images_per_s"] / fastest["images_per_s"]
        row["cached_pass_vs_step"] = row["cached_pass_images_per_s"] / fastest["images_per_s"]
        slowest = min(consumers, key=lambda r: r["images_per_s"])
        row["first_pass_vs_slowest_step"] = row["first_pass_images_per_s"] / slowest["images_per_s"]


# ----------------------------------------------------------------------------------------------
# Targets.


def evaluate_targets(result: dict) -> list[dict]:
    rows = result["train"]
    groups = sorted({(r["backbone"], r["image_size"]) for r in rows})
    targets = []

    def add(tid, name, values, threshold, detail, higher=True):
        worst = min(values.values()) if higher else max(values.values())
        met = worst >= threshold if higher else worst < threshold
        targets.append(
            {
                "id": tid,
                "target": name,
                "threshold": threshold,
                "worst": worst,
                "met": bool(met),
                "values": values,
                "detail": detail,
            }
        )

    ratio, ratio_cpu, guide, head_all, head_all_cpu = {}, {}, {}, {}, {}
    for backbone, size in groups:
        group = [r for r in rows if (r["backbone"], r["image_size"]) == (backbone, size)]
        kft_all, base_all = _main_row(group, "kft", "all"), _main_row(group, "baseline", "all")
        kft_head = _main_row(group, "kft", "head")
        key = f"{backbone}@{size}"
        ratio[key] = paired_speedup(kft_all, base_all)
        ratio_cpu[key] = base_all["cpu_s_median"] / kft_all["cpu_s_median"]
        as_written = _row(group, impl="baseline_guide")
        if as_written:
            guide[key] = round(paired_speedup(kft_all, as_written), 3)
        head_all[key] = paired_speedup(kft_head, kft_all)
        head_all_cpu[key] = kft_all["cpu_s_median"] / kft_head["cpu_s_median"]
    add(
        "1",
        "kft all-blocks with L2-SP vs plain Keras all-trainable, BN frozen (throughput ratio)",
        ratio,
        TARGET_L2SP_VS_BASELINE,
        "median over rounds of baseline step / kft step (wall); "
        f"by median CPU time per step: { {k: round(v, 3) for k, v in ratio_cpu.items()} }; "
        f"vs the baseline as the guide writes it (BatchNorm training): {guide}",
    )
    add(
        "2a",
        "kft head-only vs kft all-blocks (throughput ratio)",
        head_all,
        TARGET_HEAD_VS_ALL,
        "median over rounds of kft all step / kft head step (wall); by median CPU time: "
        f"{ {k: round(v, 3) for k, v in head_all_cpu.items()} }",
    )
    add(
        "2b",
        "head-only epochs on cached features vs an all-blocks epoch",
        {f"{c['backbone']}@{c['image_size']}": c["cached_later_epochs_vs_all"] for c in result["feature_cache"]},
        TARGET_CACHED_HEAD_VS_ALL,
        "estimated, --cache_features not built: all-blocks epoch / head-on-features epoch",
    )
    if result["pipeline"]:
        cached = {
            f"{p['source']}@{p['image_size']}": p["cached_pass_vs_step"]
            for p in result["pipeline"]
            if "cached_pass_vs_step" in p
        }
        first = {
            f"{p['source']}@{p['image_size']}": p["first_pass_vs_step"]
            for p in result["pipeline"]
            if "first_pass_vs_step" in p
        }
        if cached:
            add(
                "3",
                "input pipeline (cached epochs) vs the fastest kft step's consumption",
                cached,
                TARGET_PIPELINE_VS_STEP,
                "pipeline img/s / fastest kft float32 step img/s",
            )
            add(
                "3-first",
                "input pipeline (first, decoding epoch) vs the fastest kft step",
                first,
                TARGET_PIPELINE_VS_STEP,
                "pipeline img/s / fastest kft float32 step img/s",
            )
    if result["precision_xla"]:
        add(
            "4",
            "defaults (jit_compile=auto, mixed_precision=auto) are the fastest variant (fastest/default)",
            {
                f"{p['backbone']}@{p['image_size']} {p['stage']}": p["fastest_vs_default"]
                for p in result["precision_xla"]
            },
            1.0 + NOISE,
            f"met when no variant beats the default by more than {NOISE:.0%} (noise)",
            higher=False,
        )
    add(
        "5",
        "stage change vs the stage's time (CIFAR-10: 50k images, epochs of configs/cifar10_resnet50.cfg)",
        {
            f"{s['backbone']}@{s['image_size']} {s['stage']}": s["fraction_of_stage"]
            for s in result["stage_change"]
            if s["stage"] != "head"
        },
        TARGET_STAGE_CHANGE_FRACTION,
        "(setup + first-step trace) / (steps x epochs x step time); the first (head) stage's "
        "initial compile, with the validation trace: "
        + str(
            {
                f"{s['backbone']}@{s['image_size']}": round(s["fraction_of_stage"], 4)
                for s in result["stage_change"]
                if s["stage"] == "head"
            }
        )
        + "; for a 1-epoch stage: "
        + str(
            {
                f"{s['backbone']}@{s['image_size']} {s['stage']}": round(s["fraction_of_one_epoch"], 4)
                for s in result["stage_change"]
            }
        ),
        higher=False,
    )
    return targets


# ----------------------------------------------------------------------------------------------
# Report.


def print_report(result: dict) -> None:
    m = result["machine"]
    print(
        f"\n{m['cpu_model']}, {m['cores']} cores @ {m['clock_ghz']} GHz, {m['memory_gib']} GiB; "
        f"TF {m['tensorflow']}, Keras {m['keras']}, commit {m['commit']}"
    )
    print(f"peak fp32 {m['peak_fp32_flops'] / 1e9:.0f} GFLOP/s = {m['fp32_formula']}")
    print(f"peak bf16 {m['peak_bf16_flops'] / 1e9:.0f} GFLOP/s = {m['bf16_formula']}\n")
    print("x base: paired median step-time ratio against the float32 baseline of the same stage")
    header = (
        f"{'backbone':<12} {'px':>3} {'row':<26} {'prec':<5} {'XLA':<3} {'img/s':>8} "
        f"{'step ms':>8} {'x base':>6} {'GFLOP/img':>9} {'GFLOP/s':>8} {'%peak':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in result["train"]:
        group = [r for r in result["train"] if (r["backbone"], r["image_size"]) == (row["backbone"], row["image_size"])]
        base = (
            _main_row(group, "baseline", row["stage"])
            if row["impl"] != "feature_cache" and row["stage"] in ("head", "all")
            else None
        )
        vs = f"{paired_speedup(row, base):.2f}" if base else ""
        name = row["row"] + (f" +{row['augment']}" if row["augment"] else "")
        name = name.replace("baseline all (BN frozen)", "baseline all BN-frozen")
        print(
            f"{row['backbone']:<12} {row['image_size']:>3} {name:<26} "
            f"{'bf16' if row['precision'] != 'float32' else 'fp32':<5} "
            f"{'on' if row['jit_compile'] else 'off':<3} {row['images_per_s']:>8.1f} "
            f"{1e3 * row['step_s_median']:>8.1f} {vs:>6} {row['flops_per_image'] / 1e9:>9.3f} "
            f"{row['achieved_flops'] / 1e9:>8.1f} {100 * row['peak_fraction']:>5.1f}%"
        )
    print("\nfeature cache (estimated for --cache_features, CIFAR-10 epoch of 50k images):")
    for c in result["feature_cache"]:
        e = c["epoch_s"]
        print(
            f"  {c['backbone']} {c['image_size']}px: all-blocks epoch {e['all_blocks']:.0f}s, "
            f"head-only {e['head_only']:.0f}s, extract once {e['extract_features_once']:.0f}s, "
            f"head on cached {e['head_on_cached_features']:.1f}s -> later epochs "
            f"{c['cached_later_epochs_vs_all']:.0f}x, first {c['cached_first_epoch_vs_all']:.1f}x"
        )
    print("\nstage change (apply_stage + optimizer + compile + first train/eval trace):")
    for s in result["stage_change"]:
        print(
            f"  {s['backbone']} {s['image_size']}px {s['stage']:<5}: {s['change_s']:.1f}s "
            f"= {100 * s['fraction_of_stage']:.2f}% of {s['epochs']} epochs ({s['stage_s']:.0f}s), "
            f"{100 * s['fraction_of_one_epoch']:.2f}% of one"
        )
    print("\ninput pipeline alone (images/s; x = over the fastest kft step at that size):")
    for p in result["pipeline"]:
        print(
            f"  {p['source']:<28} {p['image_size']:>3}px: first pass "
            f"{p['first_pass_images_per_s']:>8.0f} ({p.get('first_pass_vs_step', 0):.1f}x), "
            f"cached {p['cached_pass_images_per_s']:>8.0f} ({p.get('cached_pass_vs_step', 0):.1f}x), "
            f"load {p['load_s']:.1f}s"
        )
    print("\nprecision / XLA (images/s):")
    for p in result["precision_xla"]:
        variants = ", ".join(f"{k} {v:.0f}" for k, v in p["images_per_s"].items())
        print(f"  {p['backbone']} {p['image_size']}px {p['stage']}: {variants}; fastest {p['fastest']}")
    print("\ntargets:")
    for t in result["targets"]:
        print(
            f"  {t['id']:<7} {'MET' if t['met'] else 'NOT MET':<7} worst {t['worst']:.3g} "
            f"(threshold {t['threshold']}): {t['target']}"
        )
    print(f"\nwall time {result['wall_s']:.0f}s; JSON: {result['settings']['out']}")


# ----------------------------------------------------------------------------------------------
# GPU check (--gpu; tools/gpu_check.sh): kft's defaults on one GPU, as ratios, in one run.

# Host-transfer instructions in HLO: any of these in the train step means a round trip.
HOST_TRANSFER = {
    "send": r"\bsend\(",
    "recv": r"\brecv\(",
    "infeed": r"\binfeed\(",
    "outfeed": r"\boutfeed\(",
    "host_transfer_flag": r"is_host_transfer=true",
    "host_custom_call": r'custom_call_target="[^"]*[Hh]ost',
}


def device_info() -> dict:
    """The GPUs TF sees (name, compute capability) and the CUDA/cuDNN it was built with."""
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(
            {
                "device": device.name,
                "name": details.get("device_name", "unknown"),
                "compute_capability": ".".join(map(str, capability)) if capability else None,
            }
        )
    build = dict(tf.sysconfig.get_build_info())
    return {
        "gpus": gpus,
        "built_with_cuda": tf.test.is_built_with_cuda(),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
    }


def augment_hlo_check(tuner: finetuner.FineTuner, image_size: int, batch_size: int, device: str) -> dict:
    """Lowers `tuner`'s train step, as Model.compile(jit_compile=True) wraps it, to HLO for
    `device` and checks that every augmentation op is in it and that nothing goes to the host.

    Each op of kft.augment runs under a name scope of its name, which TF keeps in the HLO's
    op_name metadata; the step had to lower to XLA as a whole (jit_compile=True never falls
    back to TF kernels), so what is in the HLO runs on the device.
    """
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32))
    step = tf.function(tuner.train_step, jit_compile=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # TF suggests platform_name instead; device_name lowers for the actual device.
        warnings.filterwarnings("ignore", message="device_name is being deprecated")
        hlo = step.experimental_get_compiler_ir((images, labels))(stage="hlo", device_name=device)
    lower_s = time.perf_counter() - started
    return {"device": device, "stage": "hlo", "lower_s": lower_s, "hlo_chars": len(hlo), **analyse_hlo(hlo)}


def analyse_hlo(hlo: str) -> dict:
    """Per augmentation op, the HLO instructions whose op_name metadata lies in its name scope
    inside the Augmenter layer; and the host transfers in the module."""
    names = re.findall(r'op_name="([^"]*)"', hlo)
    in_augmenter = [n for n in names if re.search(r"(^|/)augmenter[^/]*/", n)]
    ops = {op: sum(1 for n in in_augmenter if re.search(rf"/{op}(_\d+)?/", n)) for op in augment.OPS}
    host = {name: len(re.findall(pattern, hlo)) for name, pattern in HOST_TRANSFER.items()}
    return {
        "instructions_with_op_name": len(names),
        "augmenter_instructions": len(in_augmenter),
        "instructions_per_op": ops,
        "all_ops_in_hlo": all(ops.values()),
        "host_transfers": host,
        "no_host_round_trip": not any(host.values()),
    }


def gpu_check_rows(
    backbone: str,
    size: int,
    bs: int,
    warm: int,
    steps: int,
    auto_precision: str,
    auto_jit: bool,
    device: str,
    log: Callable[[str], None],
) -> tuple[dict, dict]:
    """Builds and times every row of the GPU check (all-blocks stage, L2-SP on, as kft's defaults).

    Returns the runners by name and the augmentation HLO check.
    """
    spec = "all:1@1e-5"
    runners: dict[str, Runner] = {}
    log("[gpu check] plain Keras baseline (compile's default jit_compile)")
    runners["baseline"] = baseline_runner(backbone, size, bs, "all", warm)
    builds = {}
    for precision in ("none", "bfloat16", "float16"):
        # The auto precision in both XLA settings; float32 in both (for the like-for-like
        # baseline comparison); the third precision at auto's XLA setting only.
        jits = [auto_jit, not auto_jit] if precision in (auto_precision, "none") else [auto_jit]
        log(f"[gpu check] kft {POLICY[precision]}, XLA {jits}")
        made, builds[precision] = kft_stage_runners(
            backbone, size, bs, [(spec, j) for j in jits], precision=precision, warmup_steps=warm
        )
        for jit, runner in zip(jits, made):
            runners[f"{POLICY[precision]}{' + XLA' if jit else ''}"] = runner
    log(f"[gpu check] kft {POLICY[auto_precision]} + every augmentation op ({','.join(augment.OPS)})")
    (aug,), aug_build = kft_stage_runners(
        backbone,
        size,
        bs,
        [(spec, auto_jit)],
        precision=auto_precision,
        augment_ops=augment.OPS,
        warmup_steps=warm,
        share=builds[auto_precision],
    )
    runners["augment"] = aug
    log("[gpu check] lowering the XLA train step with every augmentation op to HLO")
    hlo = augment_hlo_check(aug_build.tuner, size, bs, device)
    log(f"[gpu check] timing {len(runners)} rows x {steps} interleaved steps")
    measure(list(runners.values()), steps)
    return runners, hlo


def gpu_check(args, log: Callable[[str], None]) -> tuple[dict, int]:
    """kft's defaults on one GPU (or, with --smoke, tiny sizes on whatever device there is).

    Returns the result and the exit status: 2 without a GPU (unless --smoke), 1 when the
    augmentation is not all in the compiled step or it moves data to the host, else 0.
    """
    info = device_info()
    if not info["gpus"] and not args.smoke:
        print(
            "gpu_check: error: no GPU found: tf.config.list_physical_devices('GPU') is empty "
            f"(TensorFlow {tf.__version__}, built with CUDA: {info['built_with_cuda']}); "
            "run it on a GPU machine, or pass --smoke for the tiny CPU run",
            file=sys.stderr,
        )
        return {"device": info, "error": "no GPU found"}, 2
    backbone, size, bs = args.backbones[0], args.image_sizes[0], args.batch_size
    device = "/device:GPU:0" if info["gpus"] else "/device:CPU:0"
    decision = runtime.precision_decision("auto", backbone, size)
    auto_precision, auto_jit = decision.precision, runtime.resolve_jit_compile("auto")
    log(
        f"[gpu check] {backbone} {size}px batch {bs} on {device}: --mixed_precision=auto -> "
        f"{auto_precision} ({decision.reason}); --jit_compile=auto -> {auto_jit}"
    )
    runners, hlo = gpu_check_rows(
        backbone, size, bs, args.warmup_steps, args.steps, auto_precision, auto_jit, device, log
    )
    auto_name = f"{POLICY[auto_precision]}{' + XLA' if auto_jit else ''}"
    xla = " + XLA" if auto_jit else ""
    auto, fp32 = runners[auto_name], runners[f"float32{xla}"]
    other_jit = runners[f"{POLICY[auto_precision]}{'' if auto_jit else ' + XLA'}"]
    base = runners["baseline"]
    base_jit = base.meta["jit_compile"]
    fp32_like_base = runners[f"float32{' + XLA' if base_jit else ''}"]
    precisions = {
        POLICY[p]: paired_speedup(_as_row(runners[f"{POLICY[p]}{xla}"]), _as_row(fp32))
        for p in ("none", "bfloat16", "float16")
    }
    fastest = max(precisions, key=precisions.get)
    ratios = {
        "mixed_precision_auto": {
            "choice": auto_precision,
            "policy": POLICY[auto_precision],
            "reason": decision.reason,
            "auto_vs_float32": precisions[POLICY[auto_precision]],
            "each_vs_float32": precisions,
            "fastest": fastest,
            "auto_is_fastest": precisions[fastest] <= precisions[POLICY[auto_precision]] * (1 + NOISE),
            "xla": auto_jit,
        },
        "jit_compile_auto": {
            "choice": auto_jit,
            "reason": runtime.jit_compile_reason("auto"),
            "auto_vs_other": paired_speedup(_as_row(auto), _as_row(other_jit)),
            "precision": POLICY[auto_precision],
        },
        "kft_vs_keras_baseline": {
            "baseline": "keras-io transfer-learning guide, all layers trainable, BatchNorm frozen, float32, "
            f"compile's default jit_compile (here XLA {'on' if base_jit else 'off'})",
            "baseline_jit_compile": base_jit,
            "kft_defaults_vs_baseline": paired_speedup(_as_row(auto), _as_row(base)),
            "kft_float32_same_xla_vs_baseline": paired_speedup(_as_row(fp32_like_base), _as_row(base)),
        },
        "augmentation_on_device": {
            "ops": list(augment.OPS),
            "all_ops_in_hlo": hlo["all_ops_in_hlo"],
            "no_host_round_trip": hlo["no_host_round_trip"],
            "augmented_vs_plain_step": paired_speedup(_as_row(runners["augment"]), _as_row(auto)),
        },
    }
    rows = []
    for name, runner in runners.items():
        rows.append(
            {
                "row": name,
                "precision": runner.meta["precision"],
                "jit_compile": runner.meta["jit_compile"],
                "augment": runner.meta["augment"],
                "impl": runner.meta["impl"],
                "step_s_median": runner.median,
                "step_s": runner.times,
                "images_per_s": bs / runner.median,
                "first_step_s": runner.first_step_s,
                "setup_s": runner.setup_s,
            }
        )
    result = {
        "device": info,
        "backbone": backbone,
        "image_size": size,
        "batch_size": bs,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "smoke": args.smoke,
        "stage": "all blocks, L2-SP alpha=beta=0.01, BatchNorm frozen (kft's defaults)",
        "ratios": ratios,
        "hlo": hlo,
        "rows": rows,
    }
    ok = hlo["all_ops_in_hlo"] and hlo["no_host_round_trip"]
    return result, 0 if ok else 1


def _as_row(runner: Runner) -> dict:
    return {"step_s": runner.times}


def gpu_check_markdown(result: dict) -> str:
    """The GPU check as the tables BENCHMARKS.md takes."""
    r, m = result["ratios"], result["machine"]
    gpus = (
        ", ".join(f"{g['name']} (compute capability {g['compute_capability']})" for g in result["device"]["gpus"])
        or "no GPU (smoke run)"
    )
    prec, jit, base, aug = (
        r["mixed_precision_auto"],
        r["jit_compile_auto"],
        r["kft_vs_keras_baseline"],
        r["augmentation_on_device"],
    )
    hlo = result["hlo"]
    lines = [
        f"GPU check: {gpus}; {m['cpu_model']}, {m['cores']} cores; TF {m['tensorflow']}, Keras {m['keras']}, "
        f"CUDA {result['device']['cuda_version']}, cuDNN {result['device']['cudnn_version']}; commit {m['commit']}.",
        f"{result['backbone']} {result['image_size']} px, batch {result['batch_size']}, {result['stage']}; "
        f"ratios are throughput ratios, the median over {result['steps']} interleaved rounds.",
        "",
        "| check | kft picks | measured |",
        "|---|---|---|",
        f"| `--mixed_precision=auto` | {prec['policy']} | {prec['auto_vs_float32']:.2f}x float32 "
        f"(bfloat16 {prec['each_vs_float32']['mixed_bfloat16']:.2f}x, float16 "
        f"{prec['each_vs_float32']['mixed_float16']:.2f}x; XLA {'on' if prec['xla'] else 'off'}); fastest: "
        f"{prec['fastest']} |",
        f"| `--jit_compile=auto` | XLA {'on' if jit['choice'] else 'off'} | {jit['auto_vs_other']:.2f}x XLA "
        f"{'off' if jit['choice'] else 'on'} ({jit['precision']}) |",
        f"| kft defaults vs plain Keras | {prec['policy']}, XLA {'on' if jit['choice'] else 'off'} | "
        f"{base['kft_defaults_vs_baseline']:.2f}x the baseline (float32, XLA "
        f"{'on' if base['baseline_jit_compile'] else 'off'}) |",
        f"| kft float32 vs plain Keras, same XLA | | {base['kft_float32_same_xla_vs_baseline']:.2f}x |",
        f"| every augmentation op in the XLA step ({', '.join(aug['ops'])}) | | "
        f"{'all in the HLO' if aug['all_ops_in_hlo'] else 'MISSING: ' + str(hlo['instructions_per_op'])}; "
        f"{'no host transfer' if aug['no_host_round_trip'] else 'HOST TRANSFERS: ' + str(hlo['host_transfers'])}; "
        f"augmented step {aug['augmented_vs_plain_step']:.2f}x the plain one |",
        "",
        "| row | precision | XLA | augment | img/s | step ms (median) | first step s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['row']} | {row['precision']} | {'on' if row['jit_compile'] else 'off'} | "
            f"{'all ops' if row['augment'] else ''} | {row['images_per_s']:.0f} | "
            f"{1e3 * row['step_s_median']:.1f} | {row['first_step_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Main.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbones",
        default=None,
        help="comma list of keras.applications names (default ResNet50,MobileNetV2; VGG16 with --quick)",
    )
    parser.add_argument("--image_sizes", default=None, help="comma list of sizes (default 32,96)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 64")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per row, interleaved across rows (default 3)"
    )
    parser.add_argument(
        "--warmup_steps",
        type=int,
        default=None,
        help="untimed steps per row, the first through fit (traces) (default 1)",
    )
    parser.add_argument("--pipeline_images", type=int, default=None, help="images per pipeline source (default 512)")
    parser.add_argument(
        "--extended",
        action="store_true",
        help="every variant in every group: the as-written guide baseline, "
        "bfloat16 and XLA (float32 and bfloat16) for head and all blocks, "
        "crop,flip, alpha=0 (XLA compiles take ~1 min each here)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: VGG16, 32 px, batch 8, 2 steps, 64 pipeline images"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU check instead (tools/gpu_check.sh): one backbone, all blocks, "
        "kft's auto precision and XLA against the alternatives and plain Keras, "
        "the augmented XLA step's HLO; JSON to --out and a markdown table beside it "
        "(default ResNet50, 224 px, batch 64, 20 steps); exits 2 without a GPU",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="with --gpu: tiny sizes (VGG16, 32 px, batch 4, 2 steps) on whatever "
        "device there is, CPU included (tests/test_bench.py)",
    )
    parser.add_argument("--out", default=None, help="JSON output path (default bench.json, gpu_check.json)")
    args = parser.parse_args(argv)
    if args.smoke and not args.gpu:
        parser.error("--smoke goes with --gpu (the benchmark's smoke run is --quick)")
    quick = args.quick
    defaults = dict(
        backbones="VGG16" if quick else "ResNet50,MobileNetV2",
        image_sizes="32" if quick else "32,96",
        batch_size=8 if quick else 64,
        steps=2 if quick else 3,
        warmup_steps=1,
        pipeline_images=64 if quick else 512,
        out="bench.json",
    )
    if args.gpu:
        smoke = args.smoke
        defaults.update(
            backbones="VGG16" if smoke else "ResNet50",
            image_sizes="32" if smoke else "224",
            batch_size=4 if smoke else 64,
            steps=2 if smoke else 20,
            warmup_steps=1 if smoke else 3,
            out="gpu_check.json",
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if quick:
        args.backbones = args.backbones[:1]
    args.image_sizes = [int(s) for s in str(args.image_sizes).split(",") if s.strip()]
    for name in args.backbones:
        backbones.get(name)  # Raises naming the valid backbones.
    if args.steps < 1 or args.warmup_steps < 1 or args.batch_size < 1:
        parser.error("--steps, --warmup_steps and --batch_size must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.gpu:
        return run_gpu_check(args, argv)
    started = time.time()
    # Everything imported so far lives to the end: keep it out of the per-group collections.
    gc.freeze()
    # Per-model retracing notices and tfds deprecation notes would bury the progress lines.
    tf.get_logger().setLevel("ERROR")
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    keras.utils.set_random_seed(0)

    def log(message):
        print(f"{time.time() - started:6.0f}s {message}", file=sys.stderr, flush=True)

    machine = machine_info()
    result = {
        "machine": machine,
        "command": " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "backbones": args.backbones,
            "image_sizes": args.image_sizes,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "pipeline_images": args.pipeline_images,
            "extended": args.extended,
            "quick": args.quick,
            "num_classes": NUM_CLASSES,
            "l2sp_alpha": L2SP_ALPHA,
            "l2sp_beta": L2SP_BETA,
            "out": args.out,
        },
        "flops": {},
        "train": [],
        "feature_cache": [],
        "stage_change": [],
        "precision_xla": [],
        "pipeline": [],
    }
    for backbone, size, plan in group_plans(args):
        group = bench_group(backbone, size, args, plan, machine, log)
        gc.collect()
        keras.backend.clear_session()
        log(f"[{backbone} {size}px] done; {_rss_gib():.1f} GiB resident")
        result["flops"][f"{backbone}@{size}"] = group["flops"]
        result["train"].extend(group["rows"])
        result["feature_cache"].append(feature_cache_estimate(group["rows"], args.batch_size))
        result["stage_change"].extend(stage_change_rows(group["rows"], args.batch_size))
        result["precision_xla"].extend(precision_xla_rows(group["rows"]))
    log("groups done")
    result["pipeline"] = bench_pipelines(args.image_sizes, args.batch_size, args.pipeline_images, log)
    pipeline_ratios(result["pipeline"], result["train"])
    result["targets"] = evaluate_targets(result)
    result["wall_s"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print_report(result)
    return result


def run_gpu_check(args, argv) -> dict:
    """--gpu: runs gpu_check, writes its JSON and markdown, exits non-zero when a check fails."""
    started = time.time()
    tf.get_logger().setLevel("ERROR")
    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # before anything touches the GPU
    keras.utils.set_random_seed(0)

    def log(message):
        print(f"{time.time() - started:6.0f}s {message}", file=sys.stderr, flush=True)

    result, status = gpu_check(args, log)
    if status == 2:
        sys.exit(status)
    result["machine"] = machine_info()
    result["command"] = " ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])])
    result["wall_s"] = time.time() - started
    markdown = os.path.splitext(args.out)[0] + ".md"
    result["markdown"] = markdown
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    table = gpu_check_markdown(result)
    with open(markdown, "w") as f:
        f.write(table)
    print(table)
    print(f"wall time {result['wall_s']:.0f}s; JSON: {args.out}; markdown: {markdown}")
    if status:
        print(
            "gpu_check: error: the augmentation is not all inside the compiled step, or it moves "
            f"data to the host: {result['hlo']}",
            file=sys.stderr,
        )
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
