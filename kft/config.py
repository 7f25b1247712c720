"""The resolved run configuration: one frozen dataclass built once from the flags.

Library code takes a `Config` (or plain arguments), never absl FLAGS, so every module can be
used and tested without the command line. A run records its Config as `MODEL_DIR/run.json`
(`to_json`, `from_json`): grouped in sections, versioned, stages stored exactly (not as the
rounded `--stages` text).
"""

import dataclasses

from kft.schedule import Stage

# run.json's format; from_json refuses others.
RUN_JSON_VERSION = 1

# run.json's sections: every Config field in exactly one (a test checks).
SECTIONS = {
    "data": (
        "dataset",
        "data_dir",
        "val_fraction",
        "train_limit_per_class",
        "batch_size",
        "seed",
        "cache_gb",
        "augment",
        "pretrain_dataset",
        "pretrain_batch_size",
    ),
    "model": ("backbone", "weights", "image_size", "dropout", "hidden_units", "test_views"),
    "schedule": (
        "stages",
        "pretrain_stages",
        "checkpoint_selection",
        "lr_scale",
        "optimizer",
        "label_smoothing",
        "layer_lr_decay",
        "ema_decay",
        "cache_features",
    ),
    "regularizer": (
        "regularizer",
        "l2sp_alpha",
        "l2sp_beta",
        "delta_alpha",
        "delta_weighting",
        "delta_attention_batches",
        "bss_eta",
        "bss_k",
    ),
    "runtime": ("jit_compile", "mixed_precision", "strategy", "deterministic", "verbose"),
    "outputs": ("model_dir", "export_dir", "export_tflite", "compare_scratch"),
}
_STAGE_FIELDS = ("stages", "pretrain_stages")
_TUPLE_FIELDS = ("augment", "test_views")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a fine-tuning run needs. Field meanings and defaults are the flags' (kft/flags.py;
    a test checks that the defaults agree)."""

    dataset: str
    backbone: str
    stages: tuple[Stage, ...]
    model_dir: str
    data_dir: str | None = None
    val_fraction: float = 0.1
    train_limit_per_class: int = 0
    weights: str | None = "imagenet"
    image_size: int = 0  # 0: the backbone's own input size (resolved on construction)
    batch_size: int = 64
    seed: int = 0
    checkpoint_selection: str = "auto"
    lr_scale: float = 1.0
    optimizer: str = "adam"
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    regularizer: str = "l2sp"
    delta_alpha: float = 0.01
    delta_weighting: str = "attention"
    delta_attention_batches: int = 10
    bss_eta: float = 0.001
    bss_k: int = 1
    label_smoothing: float = 0.0
    layer_lr_decay: float = 1.0
    ema_decay: float = 0.0
    cache_features: bool = False
    cache_gb: float = 2.0
    dropout: float = 0.2
    hidden_units: int = 0
    augment: tuple[str, ...] = ("crop", "flip")
    test_views: tuple[str, ...] = ()
    pretrain_dataset: str = ""
    pretrain_stages: tuple[Stage, ...] = (Stage("all", 5, 1e-3, bn="train"),)
    pretrain_batch_size: int = 0  # 0 = batch_size
    compare_scratch: bool = False
    export_dir: str = ""
    export_tflite: str = "off"
    jit_compile: str = "auto"
    mixed_precision: str = "auto"
    strategy: str = "auto"
    deterministic: bool = False
    verbose: int = 1

    def __post_init__(self):
        if self.image_size == 0:
            from kft import backbones  # Imported here: config sits below the model code.

            object.__setattr__(self, "image_size", backbones.get(self.backbone).default_size)

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def to_json(self) -> dict:
        """The Config as run.json's plain JSON object: {"version", section: {field: value}}."""
        values = dataclasses.asdict(self)  # Stages become dicts of their fields.
        out: dict = {"version": RUN_JSON_VERSION}
        for section, names in SECTIONS.items():
            out[section] = {name: list(values[name]) if name in _TUPLE_FIELDS else values[name] for name in names}
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "Config":
        """The Config `to_json` wrote.

        Raises:
          ValueError: another version, or fields this kft does not know (one line).
        """
        if not isinstance(obj, dict) or obj.get("version") != RUN_JSON_VERSION:
            version = obj.get("version") if isinstance(obj, dict) else None
            raise ValueError(f"run.json version {version!r}: this kft reads version {RUN_JSON_VERSION}")
        values, known = {}, {f.name for f in dataclasses.fields(cls)}
        for section in SECTIONS:
            values.update(obj.get(section, {}))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"run.json has fields this kft does not know: {', '.join(unknown)}")
        for name in _STAGE_FIELDS:
            if name in values:
                values[name] = tuple(Stage(**stage) for stage in values[name])
        for name in _TUPLE_FIELDS:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
