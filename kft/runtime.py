"""Device-level choices: distribution strategy, XLA, mixed precision, determinism.

`--jit_compile=auto` turns XLA on only where an accelerator is present: on a 2-core CPU, XLA
made training 2.4x (ResNet50) to ~7x (MobileNetV3Small) slower than TensorFlow's default oneDNN
path (TF 2.21, batch 64, 32 px; see BENCHMARKS.md), while on a GPU it fuses the on-device
augmentation and the model into few kernels.
"""

import keras
import tensorflow as tf

from kft import backbones


def has_accelerator() -> bool:
    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def resolve_jit_compile(choice: str) -> bool:
    """Maps --jit_compile (auto|true|false) to a bool for Model.compile."""
    if choice == "auto":
        return has_accelerator()
    return choice == "true"


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU has AMX bfloat16 tiles (Linux /proc/cpuinfo flag amx_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_precision(choice: str, backbone_name: str) -> str:
    """Maps --mixed_precision=auto to none, bfloat16 or float16 for this device and backbone.

    Measured here (BENCHMARKS.md, 2-core AMX CPU): bfloat16 made ResNet50 steps 1.2-1.7x faster
    and MobileNetV2's 0.5-0.85x as fast, so on CPU auto picks bfloat16 only with AMX and a
    backbone without depthwise convolutions. On accelerators it follows the vendors' advice
    (not measured by kft yet): TPU and GPUs of compute capability 8.0+ bfloat16, 7.x float16.
    """
    if choice != "auto":
        return choice
    if tf.config.list_physical_devices("TPU"):
        return "bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "bfloat16" if capability >= (8, 0) else "float16" if capability >= (7, 0) else "none"
    depthwise = backbones.get(backbone_name).family in backbones.DEPTHWISE_FAMILIES
    return "bfloat16" if cpu_has_amx_bf16() and not depthwise else "none"


def set_precision(choice: str) -> None:
    """Sets Keras's global dtype policy from a resolved --mixed_precision (none|bfloat16|float16)."""
    policy = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[choice]
    keras.mixed_precision.set_global_policy(policy)


def make_strategy(choice: str) -> tf.distribute.Strategy:
    """Builds the tf.distribute strategy named by --strategy.

    auto: TPU if one is attached, MirroredStrategy over several GPUs, else the default
    (single-device) strategy. mirrored: MirroredStrategy over all local GPUs, or the local
    logical CPU devices when there is no GPU. multi_worker: MultiWorkerMirroredStrategy
    configured by the TF_CONFIG environment variable. tpu: TPUStrategy on the TPU named by the
    environment (TPU_NAME, or a local TPU VM).
    """
    if choice == "tpu" or (choice == "auto" and tf.config.list_physical_devices("TPU")):
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if choice == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
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
