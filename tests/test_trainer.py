"""The staged fine-tune: frozen really is frozen, stages train only their blocks, resume works."""

import json
import os

import keras
import numpy as np
import pytest

from kft import backbones, checkpoint, finetuner, l2sp, model, schedule, trainer
from kft.config import Config


def _snapshot(layers):
    return {w.path: np.array(w.numpy()) for layer in layers for w in layer.weights}


def _tuner_for(stage_spec, backbone="MobileNetV2"):
    classifier = model.build_classifier(backbone, 32, None, model.HeadConfig(3))
    blocks = backbones.blocks(classifier.spec, classifier.backbone)
    stage = schedule.parse_stages(stage_spec)[0]
    tuner = finetuner.FineTuner(classifier, None, None)
    names, _ = finetuner.prepare_stage(
        tuner, blocks, stage, 1e-2, optimizer="adam", precision="none", jit_compile=False
    )
    return tuner, blocks, names


def test_head_stage_leaves_backbone_bit_identical(tiny_splits):
    tuner, blocks, names = _tuner_for("head:1@1e-2")
    assert names == []
    before = _snapshot(tuner.classifier.backbone.layers)
    head_before = _snapshot(tuner.classifier.head_layers)
    tuner.fit(tiny_splits.train, epochs=2, verbose=0)
    after = _snapshot(tuner.classifier.backbone.layers)
    assert any("moving_mean" in path for path in before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert any(not np.array_equal(head_before[p], v) for p, v in _snapshot(tuner.classifier.head_layers).items())


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_top_blocks_stage_changes_only_those_blocks(tiny_splits, bn):
    tuner, blocks, names = _tuner_for(f"top2:1@1e-2:bn={bn}")
    assert names == [b.name for b in blocks[-2:]]
    before = {b.name: _snapshot(b.layers) for b in blocks}
    norm_paths = {
        w.path
        for b in blocks
        for layer in b.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in layer.weights
    }
    tuner.fit(tiny_splits.train, epochs=1, verbose=0)
    for block in blocks:
        after = _snapshot(block.layers)
        for path, value in before[block.name].items():
            changed = not np.array_equal(after[path], value)
            if block.name not in names or (path in norm_paths and bn == "frozen"):
                assert not changed, f"{path} in frozen block {block.name} (bn={bn}) changed"
    top = before[names[-1]]
    after_top = _snapshot(blocks[-1].layers)
    assert any(not np.array_equal(after_top[p], v) for p, v in top.items() if "kernel" in p)
    stats_changed = any(not np.array_equal(after_top[p], v) for p, v in top.items() if "moving_" in p)
    affine_changed = any(not np.array_equal(after_top[p], v) for p, v in top.items() if p.endswith(("gamma", "beta")))
    assert stats_changed == affine_changed == (bn == "train")


def _config(tmp_path, **overrides):
    fields = dict(
        dataset="unused",
        backbone="MobileNetV2",
        weights=None,
        image_size=32,
        batch_size=8,
        stages=schedule.parse_stages("head:1@1e-2,top1:2@1e-3"),
        model_dir=str(tmp_path / "run"),
        l2sp_alpha=0.01,
        augment=("flip",),
        verbose=0,
        deterministic=True,
    )
    fields.update(overrides)
    return Config(**fields)


def test_train_writes_outputs_and_tensorboard(tmp_path, tiny_splits):
    config = _config(tmp_path)
    metrics = trainer.train(config, tiny_splits, flagfile_text="--backbone=MobileNetV2\n")
    run = tmp_path / "run"
    for name in ("metrics.json", "model.weights.h5", "backbone.weights.h5", "anchors.npz", "classes.json", "flags.cfg"):
        assert (run / name).exists(), name
    assert [s["epochs"] for s in metrics["stages"]] == [1, 2]
    assert 0.0 <= metrics["best_val_accuracy"] <= 1.0
    from tensorboard.backend.event_processing import event_accumulator

    train_events = event_accumulator.EventAccumulator(str(run / "tb" / "train"), size_guidance={"tensors": 0})
    train_events.Reload()
    tags = set(train_events.Tags()["tensors"])
    for tag in ("loss", "accuracy", "learning_rate", "l2sp", "stage", "stages", "augmented_training_images"):
        assert tag in tags, (tag, tags)
    assert any(t.startswith("drift/") for t in tags)
    val_events = event_accumulator.EventAccumulator(str(run / "tb" / "validation"), size_guidance={"tensors": 0})
    val_events.Reload()
    assert {"accuracy", "loss", "confusion_matrix"} <= set(val_events.Tags()["tensors"])
    # The written backbone weights are the next run's --weights.
    again = model.build_classifier("MobileNetV2", 32, str(run / "backbone.weights.h5"), model.HeadConfig(5))
    best = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    best.load_weights(str(run / "model.weights.h5"))
    for a, b in zip(again.backbone.weights, best.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_file_for_another_backbone_fails_clearly(tmp_path):
    classifier = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(2))
    path = str(tmp_path / "backbone.weights.h5")
    checkpoint.save_backbone_weights(classifier.backbone, "MobileNetV2", 32, path)
    with pytest.raises(ValueError, match="holds MobileNetV2 weights, but --backbone=ResNet50"):
        model.build_classifier("ResNet50", 32, path, model.HeadConfig(2))


def test_resume_continues_at_same_stage_and_epoch(tmp_path, tiny_splits, monkeypatch):
    reference = trainer.train(_config(tmp_path / "ref"), tiny_splits)
    config = _config(tmp_path)
    real_save = checkpoint.ResumeCheckpoints.save

    class Killed(Exception):
        pass

    def save_then_die(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        if index == 2:  # stage 2, after its first epoch
            raise Killed()

    monkeypatch.setattr(checkpoint.ResumeCheckpoints, "save", save_then_die)
    with pytest.raises(Killed):
        trainer.train(config, tiny_splits)
    state = json.load(open(tmp_path / "run" / "ckpt" / "epoch-2" / "state.json"))
    assert (state["stage"], state["epoch"]) == (1, 1)
    monkeypatch.setattr(checkpoint.ResumeCheckpoints, "save", real_save)
    resumed = trainer.train(config, tiny_splits)
    assert [s["epochs"] for s in resumed["stages"]] == [s["epochs"] for s in reference["stages"]] == [1, 2]
    history = json.load(open(tmp_path / "run" / "ckpt" / "latest".replace("latest", "epoch-3") / "state.json"))[
        "history"
    ]
    ref_history = json.load(open(tmp_path / "ref" / "run" / "ckpt" / "epoch-3" / "state.json"))["history"]
    # A finished run keeps its newest checkpoint alone (the one before was a write fallback).
    assert sorted(os.listdir(tmp_path / "run" / "ckpt")) == sorted(os.listdir(tmp_path / "ref" / "run" / "ckpt"))
    assert sorted(os.listdir(tmp_path / "run" / "ckpt")) == ["epoch-3", "latest"]
    # The optimizer's step counter came back: the learning rate continues exactly.
    assert [h["learning_rate"] for h in history] == pytest.approx([h["learning_rate"] for h in ref_history])
    # The anchors are the weights as first loaded, not as resumed.
    first = checkpoint.load_arrays(str(tmp_path / "run" / "anchors.npz"))
    fresh = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    assert set(first) == {w.path for w in l2sp.backbone_parameters(fresh.backbone)}


def test_checkpoint_round_trips_optimizer_state(tmp_path, tiny_splits):
    tuner, _, _ = _tuner_for("all:1@1e-2")
    tuner.fit(tiny_splits.train, epochs=1, verbose=0)
    ckpts = checkpoint.ResumeCheckpoints(str(tmp_path))
    ckpts.save(1, tuner, tuner.optimizer, {"stage": 0})
    saved = [np.array(v.numpy()) for v in tuner.optimizer.variables]
    other, _, _ = _tuner_for("all:1@1e-2")
    other.optimizer.build(other.trainable_variables)
    ckpts.restore(other, other.optimizer)
    for value, variable in zip(saved, other.optimizer.variables):
        np.testing.assert_array_equal(value, variable.numpy())
    for a, b in zip(tuner.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch-1", "latest"]


def test_validation_step_is_traced_once_for_all_stages(tmp_path, tiny_splits, monkeypatch):
    traced_with = []
    original = finetuner.FineTuner.test_step

    def spy(self, batch):
        # Python runs only while tracing; the stage shows in how many variables train.
        traced_with.append(len(self.trainable_variables))
        return original(self, batch)

    monkeypatch.setattr(finetuner.FineTuner, "test_step", spy)
    config = _config(tmp_path, stages=schedule.parse_stages("head:1@1e-2,top1:1@1e-3,all:1@1e-4"))
    metrics = trainer.train(config, tiny_splits)
    assert all(m["final_val_accuracy"] is not None for m in metrics["stages"])
    # Traced in the head stage only (its kernel and bias train), reused by the later stages.
    assert traced_with and set(traced_with) == {2}, traced_with


def test_probe_head_is_the_start_and_the_kept_model_when_nothing_else_trains(tmp_path, tiny_splits):
    # A random ResNet50's features vary with the input (a random MobileNetV2's are ~1e-12).
    config = _config(tmp_path, backbone="ResNet50", stages=schedule.parse_stages("probe"), checkpoint_selection="best")
    metrics = trainer.train(config, tiny_splits)
    assert metrics["probe_val_accuracy"] is not None and metrics["stages"][0]["epochs"] == 0
    # The kept model is the probe: its validation accuracy, recomputed from the saved weights.
    assert metrics["best_model_val_accuracy"] == pytest.approx(metrics["probe_val_accuracy"])
    assert metrics["best_val_accuracy"] == pytest.approx(metrics["probe_val_accuracy"])
    # Coloured squares are linearly separable on any features: the probe fits them.
    assert metrics["probe_val_accuracy"] == 1.0


def test_steps_stage_runs_its_steps_in_rounds_after_the_probe(tmp_path, tiny_splits):
    # 24 training images at batch 8: 3 steps per pass; 8 steps in 2 rounds of 4 cross passes.
    config = _config(tmp_path, stages=schedule.parse_stages("probe,top1:8steps@1e-3:rounds=2:warmup=0.25"))
    metrics = trainer.train(config, tiny_splits)
    state = json.load(open(tmp_path / "run" / "ckpt" / "epoch-2" / "state.json"))
    rounds = [h for h in state["history"] if h["stage"] == 2]
    assert [h["epoch"] for h in rounds] == [1, 2]
    lr = schedule.WarmupCosine(1e-3, 8, 2)
    # The rate logged after each round is the one of its last step: steps 4 and 8.
    assert [h["learning_rate"] for h in rounds] == pytest.approx([float(lr(3)), float(lr(7))])
    assert [s["epochs"] for s in metrics["stages"]] == [0, 2]
    # 8 validation images cannot rank checkpoints: the end of the schedule is kept.
    assert metrics["checkpoint_selection"] == "last"
    assert metrics["best_val_accuracy"] == pytest.approx(rounds[-1]["val_accuracy"])


def test_without_a_validation_split_the_run_keeps_the_end_of_its_schedule(tmp_path, tiny_splits):
    import dataclasses

    splits = dataclasses.replace(tiny_splits, val=None, num_val=0)
    config = _config(
        tmp_path,
        backbone="ResNet50",
        # The head stage trains on cached features: no validation features either.
        stages=schedule.parse_stages("probe,head:1@1e-2,top1:4steps@1e-3:rounds=2"),
        val_fraction=0.0,
        cache_features=True,
    )
    metrics = trainer.train(config, splits)
    assert metrics["checkpoint_selection"] == "last" and metrics["num_val"] == 0
    for name in ("best_val_accuracy", "probe_val_accuracy", "final_val_accuracy", "best_model_val_accuracy"):
        assert metrics[name] is None, name
    assert [s["epochs"] for s in metrics["stages"]] == [0, 1, 2]
    assert os.path.exists(tmp_path / "run" / "model.weights.h5")
    with pytest.raises(ValueError, match="--checkpoint_selection=best needs a validation split"):
        trainer.train(dataclasses.replace(config, checkpoint_selection="best"), splits)


def test_resume_after_the_probe_does_not_fit_it_again(tmp_path, tiny_splits, monkeypatch):
    from kft import probe

    fits = []
    real_fit = probe.fit
    monkeypatch.setattr(probe, "fit", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    real_save = checkpoint.ResumeCheckpoints.save

    class Killed(Exception):
        pass

    def save_then_die(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        raise Killed()

    config = _config(tmp_path, stages=schedule.parse_stages("probe,top1:2@1e-3"))
    monkeypatch.setattr(checkpoint.ResumeCheckpoints, "save", save_then_die)
    with pytest.raises(Killed):
        trainer.train(config, tiny_splits)
    head_after_probe = model.build_classifier("MobileNetV2", 32, None, model.HeadConfig(3))
    # With checkpoint selection "last" the kept model right after the probe is the probe's.
    head_after_probe.load_weights(str(tmp_path / "run" / "model.weights.h5"))
    monkeypatch.setattr(checkpoint.ResumeCheckpoints, "save", real_save)
    restored = []
    real_restore = checkpoint.ResumeCheckpoints.restore

    def restore_and_record(self, tuner, optimizer):
        real_restore(self, tuner, optimizer)
        restored.append(tuner.classifier.classify.get_weights()[0].copy())

    monkeypatch.setattr(checkpoint.ResumeCheckpoints, "restore", restore_and_record)
    metrics = trainer.train(config, tiny_splits)
    assert len(fits) == 1 and metrics["probe_val_accuracy"] is not None
    assert [s["epochs"] for s in metrics["stages"]] == [0, 2]
    # The second invocation started stage 2 from the probe's head, read back from the checkpoint.
    assert len(restored) == 1
    np.testing.assert_array_equal(restored[0], head_after_probe.classify.get_weights()[0])
