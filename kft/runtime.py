"""Device-level choices: distribution strategy, XLA, mixed precision, determinism.

`--jit_compile=auto` turns XLA on only where an accelerator is present: on a 2-core CPU, XLA
made training 2.4x (ResNet50) to ~7x (MobileNetV3Small) slower than TensorFlow's default oneDNN
path (TF 2.21, batch 64, 32 px; see BENCHMARKS.md), while on a GPU it fuses the on-device
augmentation and the model into few kernels. `--mixed_precision=auto` follows the vendors'
rules on accelerators and measures on CPUs (kft.calibration), where no flag tells.
"""

import keras
import tensorflow as tf
from absl import logging

from kft import backbones, calibration, multiworker


def has_accelerator() -> bool:
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def resolve_jit_compile(choice: str) -> bool:
    """Maps --jit_compile (auto|true|false) to a bool for Model.compile; auto logs why."""
    if choice == "auto":
        logging.info(jit_compile_reason(choice))
        return has_accelerator()
    return choice == "true"


def jit_compile_reason(choice: str) -> str:
    """One line: what --jit_compile resolves to here, and why."""
    if choice != "auto":
        return f"--jit_compile={choice}"
    if has_accelerator():
        return "--jit_compile=auto: XLA on (an accelerator: XLA fuses the augmentation and the model)"
    return (
        "--jit_compile=auto: XLA off (no GPU or TPU; on CPU XLA made steps 0.12-0.62x as fast as oneDNN, BENCHMARKS.md)"
    )


def precision_decision(
    choice: str, backbone_name: str, image_size: int | None = None, *, measure: "calibration.Measure | None" = None
) -> calibration.Decision:
    """--mixed_precision for this device and backbone, with the reason (see resolve_precision)."""
    if choice != "auto":
        return calibration.Decision(choice, None, f"--mixed_precision={choice}")
    if tf.config.list_physical_devices("TPU"):
        return calibration.Decision("bfloat16", None, "TPU: bfloat16 (its native matmul type)")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        where = f"GPU compute capability {capability[0]}.{capability[1]}"
        if capability >= (8, 0):
            return calibration.Decision("bfloat16", None, f"{where} >= 8.0: bfloat16 (tensor cores, no loss scaling)")
        if capability >= (7, 0):
            return calibration.Decision("float16", None, f"{where} 7.x: float16 with loss scaling (tensor cores)")
        return calibration.Decision("none", None, f"{where} < 7.0: float32 (no tensor cores)")
    spec = backbones.get(backbone_name)
    return calibration.decide(backbone_name, image_size, measure=measure, min_size=spec.min_size)


def resolve_precision(choice: str, backbone_name: str, image_size: int | None = None) -> str:
    """Maps --mixed_precision=auto to none, bfloat16 or float16 for this device and backbone.

    On accelerators the vendors' advice (not measured by kft yet; tools/gpu_check.sh measures
    it): TPU and GPUs of compute capability 8.0+ bfloat16, 7.x float16, older GPUs float32. On a
    CPU no rule held (bfloat16 was 1.1-1.7x faster for ResNet50 on AMX and AVX512-BF16 CPUs,
    0.5-0.85x for MobileNetV2; BENCHMARKS.md), so kft.calibration measures this backbone here
    once, at min(image_size, 96) px, and caches the result: bfloat16 when it is >= 1.15x faster.
    The choice and its reason are logged in one line.
    """
    decision = precision_decision(choice, backbone_name, image_size)
    if choice == "auto":
        logging.info("--mixed_precision=auto: %s; %s", decision.precision, decision.reason)
    return decision.precision


def set_precision(choice: str) -> None:
    """Sets Keras's global dtype policy from a resolved --mixed_precision (none|bfloat16|float16)."""
    policy = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[choice]
    keras.mixed_precision.set_global_policy(policy)


def make_strategy(choice: str) -> tf.distribute.Strategy:
    """Builds the tf.distribute strategy named by --strategy.

    auto: the MultiWorkerMirroredStrategy kft.train started (TF_CONFIG naming several tasks),
    else TPU if one is attached, MirroredStrategy over several GPUs, else the default
    (single-device) strategy. mirrored: MirroredStrategy over all local GPUs, or the local
    logical CPU devices when there is no GPU. multi_worker: the MultiWorkerMirroredStrategy
    configured by the TF_CONFIG environment variable, which kft.train creates at its start
    (kft.multiworker.start: TF allows it only before the first op). tpu: TPUStrategy on the TPU
    named by the environment (TPU_NAME, or a local TPU VM).

    Raises:
      ValueError: multi_worker in a program that did not start it (kft.tune, kft.lr_find).
    """
    if multiworker.started() is not None and choice in ("auto", "multi_worker"):
        return multiworker.started()
    if choice == "multi_worker":
        raise ValueError(
            "--strategy=multi_worker is for kft.train (TF_CONFIG on every worker); "
            "this program trains on one machine: use --strategy=auto or mirrored"
        )
    if choice == "tpu" or (choice == "auto" and tf.config.list_physical_devices("TPU")):
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if choice == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if choice == "auto" and len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and TF; with `deterministic`, also forces deterministic TF ops.

    Exact repeatability holds on CPU. On a GPU, some kernels (e.g. cuDNN backward convolution
    autotuning, atomics in scatter/segment reductions) are only reproducible with
    deterministic ops enabled, which is slower; XLA autotuning can also pick different
    algorithms between runs.
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
