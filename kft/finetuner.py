"""One way to build the fine-tuning model and prepare a stage: kft.train, kft.tune (through
kft.train), kft.lr_find, the benchmarks and the tests all use these.

    classifier, blocks = build_classifier(config, num_classes)      # backbone + new head
    tuner = make_finetuner(config, classifier, anchors)             # + train step, regularizers
    names, optimizer = prepare_stage(tuner, blocks, stage, lr, ...)  # trainable, optimizer, compile

`FineTuner` wraps the classifier with the train step: on-device augmentation, loss, L2-SP
penalty, the --regularizer's feature term, layer-wise learning rates and a weight EMA.
"""

import dataclasses

import keras
import tensorflow as tf

from kft import augment as augment_lib
from kft import backbones, l2sp, model, regularizers, schedule
from kft.config import Config

# BatchNorm momentum while a stage updates statistics (bn=train).
BN_TRAIN_MOMENTUM = 0.9


def build_classifier(config: Config, num_classes: int) -> tuple[model.Classifier, list]:
    """The backbone with its new head, as `config` describes them, and the backbone's blocks."""
    head = model.HeadConfig(num_classes, config.dropout, config.hidden_units)
    classifier = model.build_classifier(config.backbone, config.image_size, config.weights, head)
    return classifier, backbones.blocks(classifier.spec, classifier.backbone)


def check_model(config: Config, num_classes: int) -> None:
    """Builds the model once as kft.trainer.train will (without downloading ImageNet weights:
    their shapes are the architecture's) and checks the stages, the source task's included,
    against its blocks and a --weights file against the backbone; writes nothing.

    Raises:
      ValueError: one line.
    """
    weights = config.weights if config.weights not in (None, "imagenet") else None
    if config.pretrain_dataset:
        weights = None  # The source task's weights do not exist yet.
    try:
        _, blocks = build_classifier(dataclasses.replace(config, weights=weights), num_classes)
        names = [b.name for b in blocks]
        schedule.validate_against_blocks(config.stages, names)
        if config.pretrain_dataset:
            schedule.validate_against_blocks(config.pretrain_stages, names)
    finally:
        keras.backend.clear_session()


def check_weights_reachable(config: Config) -> None:
    """With --weights=imagenet, builds the backbone with them once, so that weights neither in
    Keras's cache nor downloadable stop the run before it writes anything (the download, if
    any, lands in Keras's cache and serves the run).

    Raises:
      backbones.WeightsUnavailableError: one line.
    """
    if config.weights != "imagenet":
        return
    try:
        backbones.build(backbones.get(config.backbone), config.image_size, "imagenet")
    finally:
        keras.backend.clear_session()


def make_finetuner(config: Config, classifier: model.Classifier, anchors: dict) -> "FineTuner":
    """The FineTuner around `classifier`: the regularizers toward `anchors` (theta0), the
    augmentation, label smoothing and EMA that `config` asks for."""
    penalty, feature_regularizer = make_regularizers(config, classifier, anchors)
    augmenter = augment_lib.Augmenter(config.augment, seed=config.seed) if config.augment else None
    return FineTuner(
        classifier,
        augmenter,
        penalty,
        config.label_smoothing,
        config.ema_decay,
        feature_regularizer,
        name="finetuner",
    )


def prepare_stage(
    tuner: "FineTuner",
    blocks: list,
    stage: schedule.Stage,
    learning_rate,
    *,
    optimizer: str,
    precision: str,
    jit_compile: bool,
    layer_lr_decay: float = 1.0,
) -> tuple[list[str], keras.optimizers.Optimizer]:
    """Sets what the stage trains, compiles a fresh optimizer (Keras sees a `trainable` change
    only after compiling again) and builds its slots; call inside the strategy's scope.

    Returns:
      (names of the trainable blocks, the optimizer).
    """
    names = apply_stage(tuner.classifier, blocks, stage)
    stage_optimizer = make_optimizer(optimizer, learning_rate, precision)
    tuner.compile(optimizer=stage_optimizer, jit_compile=jit_compile)
    stage_optimizer.build(tuner.trainable_variables)
    tuner.update_scales = layer_lr_scales(blocks, layer_lr_decay)
    return names, stage_optimizer


class FineTuner(keras.Model):
    """Wraps the classifier with the train step: on-device augmentation, loss, L2-SP penalty,
    layer-wise learning rates and a weight EMA."""

    def __init__(
        self,
        classifier: model.Classifier,
        augmenter,
        penalty: l2sp.L2SP | None,
        label_smoothing: float = 0.0,
        ema_decay: float = 0.0,
        feature_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.augmenter = augmenter
        self.penalty = penalty
        self.label_smoothing = label_smoothing
        self.num_classes = classifier.head_config.num_classes
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.l2sp_tracker = keras.metrics.Mean(name="l2sp")
        self.head_l2_tracker = keras.metrics.Mean(name="head_l2")
        self.feature_reg_tracker = keras.metrics.Mean(name="feature_reg")
        # DELTA or BSS (kft.regularizers), or None.
        self.feature_regularizer = feature_regularizer
        # Per-variable multipliers of the optimizer's update (layer-wise learning rates), set
        # per stage by set_layer_lr_scales; read when the step is traced.
        self.update_scales: dict[int, float] = {}
        # True while a head-only stage trains on cached backbone features (--cache_features):
        # batches then hold pooled features instead of images.
        self.on_features = False
        self.ema_decay = float(ema_decay)
        # The averaged weights live beside the model's and are saved with it, so a resumed run
        # continues the same average. BatchNorm statistics are averaged too (as timm does).
        # Every replica computes the same average from the same weights, so each updates its
        # own copy (aggregation "none"): "mean" would all-reduce every variable every step.
        # Integer variables (the sample count of EfficientNet's Normalization layer) are not
        # averaged: they do not train, and a float average of them cannot be assigned back.
        self.averaged = [w for w in classifier.weights if ema_decay and keras.backend.is_float_dtype(w.dtype)]
        self.ema_weights = [
            keras.Variable(w.numpy(), trainable=False, name="ema", aggregation="none") for w in self.averaged
        ]
        # No variables of its own besides those; the classifier arrives built.
        self.built = True

    def swap_ema(self) -> None:
        """Exchanges the model's weights with the averaged ones (call twice to undo)."""
        for weight, average in zip(self.averaged, self.ema_weights):
            current = weight.numpy()
            weight.assign(average.numpy())
            average.assign(current)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.accuracy_tracker,
            self.l2sp_tracker,
            self.head_l2_tracker,
            self.feature_reg_tracker,
        ]

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    def _forward(self, inputs, training):
        """Probabilities and the feature regularizer's value (0 without one)."""
        if self.on_features:
            return self.classifier.head(inputs, training=training), tf.constant(0.0)
        preprocessed, feature_map, pooled, probs = self.classifier.forward_parts(inputs, training=training)
        if self.feature_regularizer is None:
            return probs, tf.constant(0.0)
        return probs, self.feature_regularizer.step_penalty(preprocessed, feature_map, pooled)

    def train_step(self, batch):
        inputs, labels = batch[0], batch[1]  # train_on_batch adds a sample-weight slot.
        labels = tf.cast(labels, tf.int32)
        x = tf.cast(inputs, tf.float32)
        y = tf.one_hot(labels, self.num_classes)
        if self.augmenter is not None and not self.on_features:
            x, y = self.augmenter(x, y)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            probs, feature_reg = self._forward(x, training=True)
            data_loss = tf.reduce_mean(
                keras.losses.categorical_crossentropy(y, probs, label_smoothing=self.label_smoothing)
            )
            sp, head_l2 = self.penalty.penalty(variables) if self.penalty else (tf.constant(0.0), tf.constant(0.0))
            loss = data_loss + sp + head_l2 + feature_reg
            # Each replica holds a slice of the global batch; gradients are summed across them.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled, variables)
        scaled_vars = [(v, self.update_scales[id(v)]) for v in variables if self.update_scales.get(id(v), 1.0) != 1.0]
        before = [tf.identity(v.value) for v, _ in scaled_vars]
        self.optimizer.apply(grads, variables)
        # Layer-wise learning rates without parameter groups: shrink each variable's update
        # by its block's factor. Exact for any optimizer (Adam's update is invariant to
        # gradient scale, so scaling gradients instead would do nothing there).
        for (v, scale), old in zip(scaled_vars, before):
            v.assign(old + scale * (v.value - old))
        if self.ema_weights:
            # TF's ExponentialMovingAverage warmup: early in a stage the average follows the
            # weights closely instead of remembering the stage's starting point.
            steps = tf.cast(self.optimizer.iterations, tf.float32)
            decay = tf.minimum(self.ema_decay, (1.0 + steps) / (10.0 + steps))
            for weight, average in zip(self.averaged, self.ema_weights):
                average.assign(decay * average.value + (1.0 - decay) * tf.cast(weight.value, average.dtype))
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(labels, probs)
        self.l2sp_tracker.update_state(sp)
        self.head_l2_tracker.update_state(head_l2)
        self.feature_reg_tracker.update_state(feature_reg)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, batch):
        inputs, labels = batch[0], batch[1]  # train_on_batch adds a sample-weight slot.
        labels = tf.cast(labels, tf.int32)
        # No regularizer here: DELTA's reference pass would double the validation cost.
        probs = self.classifier.head(inputs) if self.on_features else self.classifier(inputs, training=False)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(labels, probs)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}


def apply_stage(classifier: model.Classifier, blocks: list, stage: schedule.Stage) -> list[str]:
    """Makes exactly the stage's blocks and the head trainable; sets the BatchNorm policy.

    With bn=frozen the backbone runs in inference mode and every BatchNorm layer stays frozen,
    moving statistics and gamma/beta alike (Detectron2's and timm's FrozenBatchNorm, the Keras
    EfficientNet fine-tuning example): a fixed per-channel affine that TF folds into the
    convolution before it, which made the all-blocks step 4-40% faster than training gamma/beta
    (BENCHMARKS.md). With bn=train the backbone runs in training mode, and the unfrozen blocks'
    BatchNorm layers train gamma/beta and update statistics (a BatchNorm layer with
    trainable=False always runs in inference mode in Keras 3), with momentum BN_TRAIN_MOMENTUM.

    Returns:
      The names of the trainable blocks.
    """
    names = schedule.trainable_block_names(stage, [b.name for b in blocks])
    chosen = set(names)
    classifier.backbone.trainable = True
    for block in blocks:
        for layer in block.layers:
            is_norm = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = block.name in chosen and (stage.bn == "train" or not is_norm)
            if is_norm and stage.bn == "train":
                # Keras's 0.99 suits ImageNet-length training; a stage of a few hundred steps
                # would leave the moving statistics far behind the weights they normalize.
                layer.momentum = BN_TRAIN_MOMENTUM
    classifier.backbone_training = stage.bn == "train"
    return names


def layer_lr_scales(blocks: list, decay: float) -> dict[int, float]:
    """Update multipliers for layer-wise learning rates (timm's layer decay).

    The top block (and the head) get the stage's learning rate, each block below `decay`
    times the one above: block k from the top gets decay**k.

    Returns:
      id(variable) -> multiplier, for backbone variables whose multiplier is not 1.
    """
    scales = {}
    if decay == 1.0:
        return scales
    for depth, block in enumerate(reversed(blocks)):
        for layer in block.layers:
            for w in layer.weights:
                if depth:
                    scales[id(w)] = decay**depth
    return scales


def make_regularizers(config: Config, classifier: model.Classifier, anchors: dict):
    """The L2-SP penalty (its alpha term only for a --regularizer that pulls weights; the head's
    beta term always) and the feature term of the --regularizer (kft.regularizers; or None)."""
    choice = regularizers.get(config.regularizer)
    alpha = config.l2sp_alpha if choice.pulls_weights else 0.0
    penalty = None
    if alpha or config.l2sp_beta:
        head_kernels = [layer.kernel for layer in classifier.head_layers]
        penalty = l2sp.L2SP(classifier.backbone, head_kernels, anchors, alpha, config.l2sp_beta)
    return penalty, choice.from_config(config, classifier.backbone, anchors)


def make_optimizer(name: str, learning_rate, mixed_precision: str) -> keras.optimizers.Optimizer:
    """Adam or SGD with Nesterov momentum 0.9; no weight decay (L2-SP takes its place)."""
    if name == "adam":
        optimizer = keras.optimizers.Adam(learning_rate)
    else:
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
