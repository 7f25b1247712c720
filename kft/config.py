"""The resolved run configuration: one frozen dataclass built once from the flags.

Library code takes a `Config` (or plain arguments), never absl FLAGS, so every module can be
used and tested without the command line.
"""

import dataclasses

from kft.schedule import Stage


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a fine-tuning run needs. Field meanings are the flags' help texts (kft/flags.py)."""

    dataset: str
    backbone: str
    stages: tuple[Stage, ...]
    model_dir: str
    data_dir: str | None = None
    val_fraction: float = 0.1
    train_limit_per_class: int = 0
    weights: str | None = "imagenet"
    image_size: int = 224
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
    augment: tuple[str, ...] = ()
    pretrain_dataset: str = ""
    pretrain_stages: tuple[Stage, ...] = ()
    pretrain_batch_size: int = 0  # 0 = batch_size
    compare_scratch: bool = False
    export_dir: str = ""
    export_tflite: str = "off"
    jit_compile: str = "auto"
    mixed_precision: str = "auto"
    strategy: str = "auto"
    deterministic: bool = False
    verbose: int = 1

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)
