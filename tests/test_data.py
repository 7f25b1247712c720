"""Tests for kft.data: spec parsing, the three sources, and the shared image ops."""

import dataclasses
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from kft import data, data_digits, data_folder, data_tfds

SIZE = 16


def _batches(dataset):
    """All (images, labels) of one pass, concatenated as numpy."""
    images, labels = [], []
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _check_batch_types(dataset):
    x, y = next(iter(dataset))
    assert x.dtype == tf.uint8 and y.dtype == tf.int32
    assert x.shape[1:] == (SIZE, SIZE, 3) and x.shape[0] == y.shape[0]


# ----------------------------------------------------------------------------------------------
# Spec parsing and argument checks.


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tfds:cifar10", data_tfds.TfdsSpec("cifar10")),
        ("tfds:mnist:3.*.*,val=test", data_tfds.TfdsSpec("mnist:3.*.*", val="test")),
        (
            "tfds:cifar10,train=train[:20%],val=train[20%:30%],test=test",
            data_tfds.TfdsSpec("cifar10", "train[:20%]", "train[20%:30%]", "test"),
        ),
        ("folder:/data/pets", data_folder.FolderSpec("/data/pets")),
        ("folder:/odd,name:x", data_folder.FolderSpec("/odd,name:x")),
        ("digits", data_digits.DigitsSpec(tuple(range(10)))),
        ("digits:", data_digits.DigitsSpec(tuple(range(10)))),
        ("digits:5-9", data_digits.DigitsSpec((5, 6, 7, 8, 9))),
        ("digits:7,1,3", data_digits.DigitsSpec((1, 3, 7))),
        ("digits:0-2,9", data_digits.DigitsSpec((0, 1, 2, 9))),
    ],
)
def test_parse_spec_accepts(spec, expected):
    assert data.parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "cifar10",
        "tfds:",
        "tfds:cifar10,val",
        "tfds:cifar10,foo=bar",
        "tfds:a,val=x,val=y",
        "folder:",
        "digits:0",
        "digits:3-1",
        "digits:1,1",
        "digits:a",
        "digits:0-10",
        "imagenet:x",
    ],
)
def test_parse_spec_rejects_with_one_line_naming_value(spec):
    with pytest.raises(ValueError) as error:
        data.parse_spec(spec)
    message = str(error.value)
    assert repr(spec.strip()) in message and "\n" not in message
    assert "folder:PATH" in message  # Lists the allowed forms.


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(batch_size=0), "batch_size=0"),
        (dict(image_size=4), "image_size=4"),
        (dict(val_fraction=-0.1), "val_fraction=-0.1"),
        (dict(val_fraction=1.0), "val_fraction=1.0"),
        (dict(train_limit_per_class=0), "train_limit_per_class=0"),
    ],
)
def test_load_rejects_bad_arguments(kwargs, needle):
    args = dict(image_size=SIZE, batch_size=4) | kwargs
    with pytest.raises(ValueError, match=needle):
        data.load("digits", **args)


# ----------------------------------------------------------------------------------------------
# Image ops: eagerly and inside tf.data give the same result.


def test_to_rgb_and_resize_eager_and_in_tf_data():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (5, 7, 1), dtype=np.uint8),  # gray
        rng.integers(0, 256, (9, 4, 2), dtype=np.uint8),  # gray + alpha
        rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
        rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),  # RGBA
    ]

    def op(image):
        return data.resize_uint8(data.to_rgb(image), SIZE)

    for image in images:
        eager = op(tf.constant(image)).numpy()
        in_data = next(iter(tf.data.Dataset.from_tensors(image).map(op))).numpy()
        # Channel count unknown at trace time: the dynamic branch of to_rgb.
        dynamic = tf.function(op, input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
        assert eager.dtype == np.uint8 and eager.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(eager, in_data)
        np.testing.assert_array_equal(eager, dynamic(image).numpy())
        if image.shape[-1] < 3:
            np.testing.assert_array_equal(eager[..., 0], eager[..., 2])
    # Rounding, not truncation: a flat image keeps its exact value through resizing.
    flat = np.full((11, 13, 3), 201, np.uint8)
    assert np.all(op(tf.constant(flat)).numpy() == 201)
    # Same size in and out is the identity.
    same = images[2]
    np.testing.assert_array_equal(data.resize_uint8(same, 6).numpy(), same)


# ----------------------------------------------------------------------------------------------
# TFDS under mock_data.

_TFDS_SIZES = {"train": 40, "test": 12}


def _fake_as_dataset(requested):
    """A mock `_as_dataset` that honours split slicing: train example i has pixels = i,
    test example i has pixels = 200 + i, so every example says where it came from."""

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        del self, decoders, read_config, kwargs
        split = str(split)
        requested.append(split)
        infos = {
            name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=None)
            for name, n in _TFDS_SIZES.items()
        }
        (instruction,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        size = _TFDS_SIZES[instruction.splitname]
        start = instruction.from_ or 0
        stop = size if instruction.to is None else instruction.to
        offset = 200 if instruction.splitname == "test" else 0
        index = np.arange(start, stop)
        images = [tf.io.encode_png(np.full((32, 32, 3), offset + i, np.uint8)) for i in index]
        return tf.data.Dataset.from_tensor_slices(
            {"image": tf.stack(images), "label": (index % 10).astype(np.int64), "id": [f"{split}-{i}" for i in index]}
        )

    return as_dataset


def test_tfds_cifar10_splits_sizes_and_test_untouched():
    requested = []
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(requested)):
        splits = data.load("tfds:cifar10", image_size=SIZE, batch_size=8, val_fraction=0.25)
        load_requests = list(requested)
        train_x, train_y = _batches(splits.train)
        val_x, val_y = _batches(splits.val)
        _check_batch_types(splits.train)
        _check_batch_types(splits.val)

        requested.clear()
        test, names, skipped = data.load_eval("tfds:cifar10", image_size=SIZE, batch_size=5)
        test_x, test_y = _batches(test)

    # CIFAR-10 fills in its label names while downloading; the mock has only the count.
    assert splits.class_names == tuple(str(i) for i in range(10)) and names == splits.class_names
    assert (splits.num_train, splits.num_val, splits.skipped) == (30, 10, 0)
    assert len(train_y) == 24  # 30 examples -> 3 full batches of 8, partial batch dropped.
    assert len(val_y) == 10  # Validation keeps the partial batch.
    assert not any("test" in split for split in load_requests), load_requests
    # The val carve-out is the tail of train, disjoint from what train reads.
    assert sorted(np.unique(val_x)) == list(range(30, 40))
    assert set(np.unique(train_x)) <= set(range(30))
    np.testing.assert_array_equal(val_y, np.arange(30, 40) % 10)  # Val order is fixed.
    # load_eval reads the test split, in order.
    assert requested and all(split == "test" for split in requested)
    assert skipped == 0
    np.testing.assert_array_equal(test_x[:, 0, 0, 0], 200 + np.arange(12))
    np.testing.assert_array_equal(test_y, np.arange(12) % 10)


def test_tfds_grayscale_and_train_limit_with_plain_mock():
    # Plain mock_data: TFDS knows no split sizes, every split yields num_examples.
    with tfds.testing.mock_data(num_examples=40):
        splits = data.load("tfds:mnist", image_size=SIZE, batch_size=64, train_limit_per_class=2)
        x, y = _batches(splits.train)
        again = _batches(splits.train)[1]
    assert x.shape == (splits.num_train, SIZE, SIZE, 3)  # 1-channel MNIST -> RGB.
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    assert np.bincount(y, minlength=10).max() <= 2
    assert splits.num_train == len(y) == len(again)
    assert sorted(y) == sorted(again)  # The limit keeps the same examples every epoch.


def test_tfds_fixed_size_images_stay_at_their_size_for_a_larger_model():
    # CIFAR-10 for a 224 px backbone: kept at 32 px (and cached); the model upsamples.
    # 20 train + 20 val images fit a 200 kB cache at 32 px (123 kB), not at 224 px (6 MB).
    with tfds.testing.mock_data(num_examples=20):
        splits = data.load("tfds:cifar10", image_size=224, batch_size=8, val_fraction=0.25, cache_bytes=200_000)
        test, _, _ = data.load_eval("tfds:cifar10", image_size=224, batch_size=8)
        for dataset in (splits.train, splits.val, test):
            assert next(iter(dataset))[0].shape[1:] == (32, 32, 3)
        assert b"CacheDataset" in splits.train._as_serialized_graph().numpy()
        images = next(iter(splits.train))[0]
    from kft import model

    classifier = model.build_classifier("MobileNetV2", 224, None, model.HeadConfig(10))
    assert classifier(images).shape == (8, 10)
    assert classifier.feature_map(images).shape[1:3] == (7, 7)  # 224 px features


@pytest.mark.parametrize(
    "cache_bytes,cached,warned", [(0, False, False), (4 * 1024, False, True), (123 * 1024, True, False)]
)
def test_cache_bytes_decides_the_memory_cache(tmp_path, caplog, cache_bytes, cached, warned):
    # digits:0-1 at 8 px: 360 images x 192 bytes = 69 kB decoded.
    with caplog.at_level("WARNING"):
        splits = data.load("digits:0-1", image_size=8, batch_size=8, cache_bytes=cache_bytes)
    for dataset in (splits.train, splits.val):
        assert (b"CacheDataset" in dataset._as_serialized_graph().numpy()) == cached
    # A set over a limit it was given is named (0 = never cache, asked for: nothing to say).
    message = "data digits:0-1: its decoded images (0.0 GiB at 8 px) exceed the cache limit (0.0 GiB, kft.train's --cache_gb), so they are decoded again every epoch"
    assert (message in caplog.text) == warned


def test_tfds_split_choice():
    spec = data_tfds.TfdsSpec("x")
    # (train, validation, whether validation is carved out of train)
    assert data_tfds._train_val_splits(spec, {"train", "validation", "test"}, 0.1) == ("train", "validation", False)
    assert data_tfds._train_val_splits(spec, {"train", "test"}, 0.1) == ("train[:90%]", "train[90%:]", True)
    assert data_tfds._train_val_splits(spec, {"train", "test"}, 0.125) == ("train[:87.5%]", "train[87.5%:]", True)
    assert data_tfds._train_val_splits(spec, {"train", "test"}, 0.0) == ("train", None, False)
    assert data_tfds._train_val_splits(spec, {"train", "validation"}, 0.0) == ("train", "validation", False)
    assert data_tfds._train_val_splits(data_tfds.TfdsSpec("x", val="extra"), {"train"}, 0.1) == (
        "train",
        "extra",
        False,
    )
    with pytest.raises(ValueError, match="'training'"):
        data_tfds._train_val_splits(data_tfds.TfdsSpec("x", train="training"), {"train"}, 0.1)
    with pytest.raises(ValueError, match=r"train\[:50%\]"):
        data_tfds._train_val_splits(data_tfds.TfdsSpec("x", train="train[:50%]"), {"train"}, 0.1)
    assert data_tfds._eval_split(spec, {"train", "validation", "test"}) == "test"
    assert data_tfds._eval_split(spec, {"train", "validation"}) == "validation"
    assert data_tfds._eval_split(data_tfds.TfdsSpec("x", test="extra"), {"train"}) == "extra"
    with pytest.raises(ValueError, match="test=SPLIT"):
        data_tfds._eval_split(spec, {"train"})


# ----------------------------------------------------------------------------------------------
# Image folders.

_COLORS = {"cat": (200, 40, 30), "dog": (20, 180, 60), "fox": (40, 60, 220)}


def _solid(color, size=(14, 10)):
    return Image.new("RGB", size, color)


def _write_good_images(class_dir, color):
    """Every supported format and mode; returns how many files were written."""
    os.makedirs(class_dir, exist_ok=True)
    rgb = _solid(color)
    rgb.save(os.path.join(class_dir, "a.jpg"), quality=98)
    _solid(color, (40, 31)).save(os.path.join(class_dir, "b.JPEG"), quality=98)
    rgb.save(os.path.join(class_dir, "c.png"))
    rgb.save(os.path.join(class_dir, "d.bmp"))
    rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(os.path.join(class_dir, "e.gif"))
    rgb.convert("L").save(os.path.join(class_dir, "f_gray.png"))
    rgb.convert("L").save(os.path.join(class_dir, "f_gray.jpg"))
    rgb.convert("RGBA").save(os.path.join(class_dir, "g_rgba.png"))
    rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(os.path.join(class_dir, "h_pal.png"))
    # TF decodes palette BMPs without their palette (wrong colours): must go through PIL.
    rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(os.path.join(class_dir, "i_pal.bmp"))
    rgb.convert("CMYK").save(os.path.join(class_dir, "j_cmyk.jpg"))
    os.makedirs(os.path.join(class_dir, "nested"), exist_ok=True)
    rgb.save(os.path.join(class_dir, "nested", "k.Png"))
    rgb.save(os.path.join(class_dir, "l.webp"), lossless=True)
    rgb.save(os.path.join(class_dir, "m.tif"))
    # 16-bit grayscale TIFF (scanners, microscopes): the gray value in the top 8 bits.
    gray16 = np.asarray(rgb.convert("L"), np.uint16) * 257
    Image.fromarray(gray16).save(os.path.join(class_dir, "n_gray16.tiff"))
    rgb.save(os.path.join(class_dir, "o.jfif"), format="JPEG", quality=98)
    with open(os.path.join(class_dir, "notes.txt"), "w") as f:  # Not an image extension: said, not counted.
        f.write("ignored")
    # Hidden files (macOS metadata, AppleDouble "._" twins) are neither read nor counted.
    with open(os.path.join(class_dir, ".DS_Store"), "wb") as f:
        f.write(b"\0\0\0\1Bud1")
    with open(os.path.join(class_dir, "._a.jpg"), "wb") as f:
        f.write(b"\0\5\26\7 Mac OS X")
    return 16


def _write_bad_images(class_dir):
    """Files with image extensions that cannot be decoded; returns how many."""
    jpeg = os.path.join(class_dir, "a.jpg")
    with open(jpeg, "rb") as f:
        content = f.read()
    with open(os.path.join(class_dir, "bad_truncated.jpg"), "wb") as f:
        f.write(content[: len(content) // 2])
    with open(os.path.join(class_dir, "bad_corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with open(os.path.join(class_dir, "bad_text.jpg"), "w") as f:
        f.write("this is not a JPEG")
    open(os.path.join(class_dir, "bad_empty.gif"), "wb").close()
    return 4


def _expected_colors(color):
    gray = Image.new("RGB", (1, 1), color).convert("L").getpixel((0, 0))
    return np.array([color, (gray, gray, gray)], np.float32)


def _assert_class_colors(images, labels, class_names):
    for image, label in zip(images, labels):
        expected = _expected_colors(_COLORS[class_names[label]])
        mean = image.reshape(-1, 3).mean(0)
        assert image.std(axis=(0, 1)).max() < 3, "a solid image came out not solid"
        assert np.abs(expected - mean).max(axis=1).min() < 6, (class_names[label], mean)


def test_folder_formats_modes_and_skipped(tmp_path, caplog):
    good = sum(_write_good_images(tmp_path / name, color) for name, color in _COLORS.items())
    bad = _write_bad_images(tmp_path / "dog")
    with caplog.at_level(logging.WARNING):
        splits = data.load(f"folder:{tmp_path}", image_size=SIZE, batch_size=4, val_fraction=0.25)
    assert splits.class_names == ("cat", "dog", "fox")
    assert splits.skipped == bad
    assert splits.num_train + splits.num_val == good
    assert (splits.num_train, splits.num_val) == (36, 12)  # 16 per class, 4 val each.
    assert f"skipped {bad} of {good + bad}" in caplog.text and "bad_" in caplog.text
    assert "ignored 3 files in" in caplog.text and "(.txt 3; it reads .jpg" in caplog.text
    # Loaded again (as the recipe does without the validation split): counted, not said twice.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert data.load(f"folder:{tmp_path}", image_size=SIZE, batch_size=4, val_fraction=0).skipped == bad
    assert "could not be decoded" not in caplog.text and "ignored" not in caplog.text
    _check_batch_types(splits.train)
    for dataset, count in ((splits.train, 36), (splits.val, 12)):
        images, labels = _batches(dataset)
        assert len(labels) == count
        _assert_class_colors(images, labels, splits.class_names)
    # load_eval on a folder without train/val/test: every usable image, class by class.
    images, labels = _batches(data.load_eval(f"folder:{tmp_path}", image_size=SIZE, batch_size=5)[0])
    assert len(labels) == good and list(labels) == sorted(labels)
    _assert_class_colors(images, labels, splits.class_names)


def _write_numbered(root, counts):
    """Class c gets counts[c] PNGs whose pixel value is a unique id; returns nothing."""
    uid = 0
    for name, count in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for _ in range(count):
            Image.new("RGB", (8, 8), (uid, uid, uid)).save(root / name / f"{uid:03d}.png")
            uid += 1


def _ids(dataset):
    images, labels = _batches(dataset)
    return images[:, 0, 0, 0].tolist(), labels.tolist()


def test_linked_folders_are_read_and_a_link_loop_ends(tmp_path):
    # A dataset assembled from links: a linked class folder, a linked subfolder inside a class,
    # and a link back up the tree.
    _write_numbered(tmp_path / "store", {"cat": 3, "dog": 2})  # ids cat 0-2, dog 3-4.
    _write_numbered(tmp_path / "extra", {"more_cats": 4})  # ids 0-3 again: count, not ids.
    os.makedirs(tmp_path / "data")
    os.symlink(tmp_path / "store" / "cat", tmp_path / "data" / "cat", target_is_directory=True)
    os.symlink(tmp_path / "store" / "dog", tmp_path / "data" / "dog", target_is_directory=True)
    os.symlink(tmp_path / "extra" / "more_cats", tmp_path / "store" / "cat" / "more", target_is_directory=True)
    os.symlink(tmp_path / "store" / "cat", tmp_path / "store" / "cat" / "loop", target_is_directory=True)
    splits = data.load(f"folder:{tmp_path / 'data'}", image_size=SIZE, batch_size=16, val_fraction=0)
    assert splits.class_names == ("cat", "dog")
    assert np.bincount(_ids(splits.train)[1]).tolist() == [7, 2]
    assert data_folder.folder_identity(f"folder:{tmp_path / 'data'}").endswith("/9files")


def test_the_up_front_check_of_a_large_folder_shows_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(data_folder, "PROGRESS_SECONDS", 0)
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        for i in range(300):
            Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(tmp_path / name / f"{i}.png")
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / name / f"{i}.tif")  # TF rejects TIFF: PIL decodes it.
    with caplog.at_level(logging.INFO):
        splits = data.load(f"folder:{tmp_path}", image_size=SIZE, batch_size=8, val_fraction=0)
    assert splits.num_train == 606
    assert re.search(r"checking image files: \d+ of 606 \(", caplog.text)
    assert re.search(r"checking image files with PIL: \d of 6 \(", caplog.text)


def test_folder_split_is_seeded_stratified_and_limit_applies(tmp_path):
    _write_numbered(tmp_path, {"a": 10, "b": 20, "c": 30})

    def load(seed, **kwargs):
        return data.load(f"folder:{tmp_path}", image_size=SIZE, batch_size=100, val_fraction=0.2, seed=seed, **kwargs)

    first, again, other = load(0), load(0), load(1)
    val_ids, val_labels = _ids(first.val)
    assert _ids(again.val) == (val_ids, val_labels)  # Same seed, same split and order.
    assert sorted(_ids(other.val)[0]) != sorted(val_ids)  # Another seed, another split.
    assert np.bincount(val_labels).tolist() == [2, 4, 6]  # Stratified.
    train_ids, train_labels = _ids(first.train)
    assert set(train_ids).isdisjoint(val_ids) and len(set(train_ids) | set(val_ids)) == 60
    # Train order: seeded, and reshuffled each epoch.
    assert _ids(again.train)[0] == train_ids and _ids(first.train)[0] != train_ids
    # In order: every training image once, classes interleaved at their shares (the recipe's
    # checks read the first images), each class in its listing's order (the probe's folds).
    in_order_ids, in_order_labels = _ids(first.train_in_order)
    assert sorted(in_order_ids) == sorted(train_ids)
    assert np.bincount(in_order_labels[:12]).tolist() == [2, 4, 6]
    for label in range(3):
        members = [i for i, y in zip(in_order_ids, in_order_labels) if y == label]
        assert members == sorted(members)

    limited = load(0, train_limit_per_class=3)
    ids, labels = _ids(limited.train)
    assert limited.num_train == 9 and np.bincount(labels).tolist() == [3, 3, 3]
    assert set(ids) <= set(train_ids)
    assert _ids(limited.val) == (val_ids, val_labels)  # Validation is never limited.
    assert sorted(_ids(load(0, train_limit_per_class=3).train)[0]) == sorted(ids)


def test_a_class_too_small_to_hold_an_image_out_trains_on_all_of_them(tmp_path):
    # Users' folders are uneven: a rare class of a few images, or a few images per class.
    _write_numbered(tmp_path / "uneven", {"a": 20, "b": 4, "c": 1})  # ids a 0-19, b 20-23, c 24.

    def load(name, fraction):
        return data.load(f"folder:{tmp_path / name}", image_size=SIZE, batch_size=64, val_fraction=fraction)

    uneven = load("uneven", 0.1)
    val_ids, val_labels = _ids(uneven.val)
    train_ids = _ids(uneven.train)[0]
    assert val_labels == [0, 0] and set(val_ids) < set(range(20))
    assert sorted(train_ids + val_ids) == list(range(25))  # b and c train whole.
    assert uneven.classes_not_in_val == ("b", "c") and uneven.val_carved
    # A large fraction still leaves every class a training image.
    most = load("uneven", 0.8)
    assert np.bincount(_ids(most.val)[1]).tolist() == [16, 3]
    assert np.bincount(_ids(most.train)[1]).tolist() == [4, 1, 1]
    assert most.classes_not_in_val == ("c",)
    # No class can spare one: no validation split, as with --val_fraction=0.
    _write_numbered(tmp_path / "few", {"a": 4, "b": 3})
    few = load("few", 0.1)
    assert (few.num_train, few.num_val, few.val, few.val_carved) == (7, 0, None, False)
    assert few.classes_not_in_val == ("a", "b")
    assert load("few", 0.0).classes_not_in_val == ()


def test_val_fraction_zero_holds_out_nothing_from_a_source_without_a_validation_split(tmp_path):
    _write_numbered(tmp_path / "flat", {"a": 3, "b": 4})
    flat = data.load(f"folder:{tmp_path / 'flat'}", image_size=SIZE, batch_size=8, val_fraction=0.0)
    assert (flat.num_train, flat.num_val, flat.val, flat.val_carved) == (7, 0, None, False)
    assert sorted(_ids(flat.train)[0]) == list(range(7))
    assert data.load(f"folder:{tmp_path / 'flat'}", image_size=SIZE, batch_size=8, val_fraction=0.3).val_carved
    # A split layout's own val/ stays whatever val_fraction says.
    _write_numbered(tmp_path / "split" / "train", {"a": 3, "b": 4})
    _write_numbered(tmp_path / "split" / "val", {"b": 2})
    own = data.load(f"folder:{tmp_path / 'split'}", image_size=SIZE, batch_size=8, val_fraction=0.0)
    assert (own.num_train, own.num_val, own.val_carved) == (7, 2, False)
    digits = data.load("digits:0-1", image_size=SIZE, batch_size=64, val_fraction=0.0)
    assert digits.val is None and digits.num_train == 360
    with tfds.testing.mock_data(num_examples=40):
        tfds_splits = data.load("tfds:mnist", image_size=SIZE, batch_size=8, val_fraction=0.0)
    assert tfds_splits.val is None and tfds_splits.num_train == 40
    with pytest.raises(ValueError, match="val_fraction=0 holds out no digits to evaluate on"):
        data.load_eval("digits:0-1", image_size=SIZE, batch_size=8, val_fraction=0.0)


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_folder_train_val_layout_and_eval(tmp_path, val_name):
    _write_numbered(tmp_path / "train", {"a": 3, "b": 4})
    _write_numbered(tmp_path / val_name, {"b": 2})
    splits = data.load(f"folder:{tmp_path}", image_size=SIZE, batch_size=8)
    assert splits.class_names == ("a", "b")
    assert (splits.num_train, splits.num_val) == (7, 2)
    _, labels = _batches(splits.train)
    assert len(labels) == 7  # Fewer examples than a batch: the partial batch is kept.
    assert _batches(splits.val)[1].tolist() == [1, 1]  # 'b' keeps train's label 1.
    # load_eval uses val/, then prefers test/ once it exists.
    dataset, names, skipped = data.load_eval(f"folder:{tmp_path}", image_size=SIZE, batch_size=8)
    assert names == ("a", "b") and skipped == 0 and _batches(dataset)[1].tolist() == [1, 1]
    _write_numbered(tmp_path / "test", {"a": 1, "b": 1})
    dataset, _, _ = data.load_eval(f"folder:{tmp_path}", image_size=SIZE, batch_size=8)
    assert _batches(dataset)[1].tolist() == [0, 1]
    # With the model's class names, labels index those names.
    dataset, names, _ = data.load_eval(
        f"folder:{tmp_path / 'test'}", image_size=SIZE, batch_size=8, class_names=["z", "b", "a"]
    )
    assert names == ("z", "b", "a") and _batches(dataset)[1].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\['a'\].*not among.*\['b', 'c'\]"):
        data.load_eval(f"folder:{tmp_path / 'test'}", image_size=SIZE, batch_size=8, class_names=["b", "c"])


def test_folder_errors_name_the_value(tmp_path):
    def load(path, **kwargs):
        return data.load(f"folder:{path}", image_size=SIZE, batch_size=4, **kwargs)

    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"'{missing}' does not exist"):
        load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class subfolders"):
        load(tmp_path / "empty")
    _write_numbered(tmp_path / "one", {"only": 3})
    with pytest.raises(ValueError, match="only one class folder \\('only'\\)"):
        load(tmp_path / "one")
    _write_numbered(tmp_path / "hollow", {"a": 3, "b": 3})
    os.makedirs(tmp_path / "hollow" / "c")
    _write_bad_images_only(tmp_path / "hollow" / "c")
    with pytest.raises(ValueError, match="class folder '.*hollow/c' has no usable images"):
        load(tmp_path / "hollow")
    _write_numbered(tmp_path / "split" / "train", {"a": 2, "b": 2})
    _write_numbered(tmp_path / "split" / "val", {"a": 1, "x": 1})
    with pytest.raises(ValueError, match=r"classes \['x'\] .* not among .*\['a', 'b'\]"):
        load(tmp_path / "split")
    _write_numbered(tmp_path / "notrain" / "val", {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no train/ subfolder"):
        load(tmp_path / "notrain")
    _write_numbered(tmp_path / "two" / "train", {"a": 2, "b": 2})
    for name in ("val", "valid"):
        _write_numbered(tmp_path / "two" / name, {"a": 1, "b": 1})
    for read in (load, lambda path: data.load_eval(f"folder:{path}", image_size=SIZE, batch_size=4)):
        with pytest.raises(ValueError, match="has val/ and valid/; keep one validation folder"):
            read(tmp_path / "two")


def _write_bad_images_only(class_dir):
    with open(os.path.join(class_dir, "x.jpg"), "w") as f:
        f.write("not an image")


# ----------------------------------------------------------------------------------------------
# The built-in digits.


def test_digits_subsets_values_limit_and_seed():
    kwargs = dict(image_size=SIZE, batch_size=32)
    low = data.load("digits:0-4", train_limit_per_class=7, **kwargs)
    high = data.load("digits:5-9", **kwargs)
    assert low.class_names == ("0", "1", "2", "3", "4")
    assert high.class_names == ("5", "6", "7", "8", "9")
    assert low.num_train == 35 and low.skipped == 0
    _, low_labels = _batches(low.train)
    assert len(low_labels) == 32  # 35 -> one full batch; the remainder is dropped.
    _check_batch_types(low.train)
    images, labels = _batches(high.val)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4]  # 5..9 remapped to 0..4.
    assert images.min() == 0 and images.max() == 255  # 0..16 really stretched to 0..255.
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Gray -> RGB.
    assert high.num_val == len(labels) and high.num_train + high.num_val == 1797 - 901

    full = data.load("digits", **kwargs)
    assert full.num_train + full.num_val == 1797
    # A class gets the same validation images whatever other classes are loaded.
    full_x, full_y = _batches(full.val)
    np.testing.assert_array_equal(full_x[full_y >= 5], images)
    np.testing.assert_array_equal(full_y[full_y >= 5] - 5, labels)
    # Reproducible for a seed, different for another.
    np.testing.assert_array_equal(_batches(data.load("digits:5-9", **kwargs).val)[0], images)
    other = _batches(data.load("digits:5-9", seed=3, **kwargs).val)[0]
    assert other.shape != images.shape or np.any(other != images)
    # load_eval gives the same held-out split.
    eval_x, eval_y = _batches(data.load_eval("digits:5-9", **kwargs)[0])
    np.testing.assert_array_equal(eval_x, images)
    with pytest.raises(ValueError, match=r"has classes \['5'.*trained on \['0'"):
        data.load_eval("digits:5-9", class_names=low.class_names, **kwargs)


def test_digits_outside_training_is_everything_training_never_sees():
    splits = data.load("digits:5-9", image_size=8, batch_size=4, seed=2, train_limit_per_class=10)
    trained, trained_labels = _batches(splits.train_in_order)
    outside, labels, names = data_digits.digits_outside_training(
        "digits:5-9", val_fraction=0.1, seed=2, train_limit_per_class=10
    )
    assert names == splits.class_names and len(trained) == 50
    assert len(outside) + len(trained) == 1797 - 901  # The two together are all of digits 5-9.
    assert np.bincount(labels).min() >= 150  # Far more than the 89 validation images.
    seen = {image[..., 0].tobytes() for image in trained}
    assert not seen & {image[..., 0].tobytes() for image in outside}
    with pytest.raises(ValueError, match=r"takes digits\[:CLASSES\] only"):
        data_digits.digits_outside_training("folder:/x", val_fraction=0.1, seed=0, train_limit_per_class=None)


def test_a_new_data_source_is_one_registered_class():
    @data.register_source("evens")
    @dataclasses.dataclass(frozen=True)
    class Evens:
        form = "evens"

        @classmethod
        def parse(cls, spec, rest):
            return cls()

        def load(self, spec, **kwargs):
            return data_digits.DigitsSpec((0, 2, 4)).load(spec, **kwargs)

        def load_eval(self, spec, **kwargs):
            return data_digits.DigitsSpec((0, 2, 4)).load_eval(spec, **kwargs)

    try:
        assert data.load("evens", image_size=8, batch_size=4).class_names == ("0", "2", "4")
        assert data.load_eval("evens", image_size=8, batch_size=4)[1] == ("0", "2", "4")
        with pytest.raises(ValueError, match=r"unknown source 'odds'; expected tfds:NAME.* \| evens$"):
            data.parse_spec("odds:1")
        with pytest.raises(ValueError, match="data source 'evens' is registered twice"):
            data.register_source("evens")(Evens)
    finally:
        del data.SOURCES["evens"]
    assert list(data.SOURCES) == ["tfds", "folder", "digits"]


def test_sources_are_listed_in_one_order_whichever_module_is_imported_first():
    for first in ("data_digits", "data_folder", "data_tfds"):
        code = f"from kft import {first}; from kft import data; print(data.spec_forms())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.startswith("tfds:NAME") and out.index("folder:PATH") < out.index("digits["), (first, out)
