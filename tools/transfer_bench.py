#!/usr/bin/env python
"""Transfer benchmark: kft's defaults against hand-written recipes on held-out test images.

Commands (BENCHMARKS.md, "Transfer benchmark", holds the results and what they mean):

    python tools/transfer_bench.py                                  # everything (many hours)
    python tools/transfer_bench.py --methods=linear_probe,keras_guide,seed_head_only,seed_all_sgd
    python tools/transfer_bench.py --methods=kft_default --rerun=kft_default   # after kft changes
    python tools/transfer_bench.py --quick --work_dir=/tmp/tb      # smoke run, ~2 min (tests/)

--quick (tests/test_transfer_bench.py) runs digits, 5 images per class, VGG16, one seed, one
epoch per recipe, pretraining one step, the kft method with --stages=head:1@1e-3 (kft's
defaults train hundreds of steps), no kft_tune: it checks the plumbing, not the numbers.

Everything is offline and real images only. Tasks (a source task to pretrain on, a different
target task to transfer to), written as PNG image folders under WORK_DIR/data/TASK/:

* digits: scikit-learn's 8x8 handwritten digits (they ship in its wheel), upsampled to 32x32
  RGB. Source: digits 0-4 (all images). Target: digits 5-9.
* textures: scikit-image's bundled photographs (no download), grayscale, as 32x32 patches.
  Source: which of 8 photographs (astronaut, camera, ...) a random patch comes from.
  Target: brick vs grass vs gravel, the three texture images: training patches from the top
  half of each image, test patches from the bottom half (no pixel is in both).
* faces: scikit-image's bundled `lfw_subset` (100 Labeled Faces in the Wild crops and 100
  patches of other photographs, 25x25 grayscale, upsampled to 32x32): face vs non-face, a
  natural-image target whose weights come from the textures task's source (photograph
  patches), so it has no source folder of its own.

Each target task has a fixed, seeded held-out `test/` folder that no training ever reads, and
flat class folders `train_5/`, `train_10/`, `train_50/`, `train_full/` (images per class; each
a prefix of the next). kft gets the train folder as a user would (`folder:PATH`, flat: kft
carves its own validation split from it); the hand-written recipes train on all of it.
Those folders are the same for every seed, so a few-shot cell's seeds vary only the training's
randomness. The drawn sizes `5d`, `10d`, `50d` vary the images too: seed s trains on its own
random draw of N per class from train_full (seed 0 on train_N), written to
`draws/train_N_seedS/`; the test folder stays the same. The drawn size `lt` is long-tailed, as
users' folders often are: its classes get 40, 20, 10, 5 and 2 images (2 for any further class),
in an order each seed draws anew, so every seed has its own rare class; the balanced test
folder then weighs the rare classes as much as the common ones.

Pretrained weights: each backbone is trained from random init on the source task with
`python -m kft.train --weights=none --stages=all:15@1e-3:bn=train --augment=crop
--l2sp_alpha=0 --mixed_precision=none` (cached in WORK_DIR/pretrain/TASK/BACKBONE/, whose
backbone.weights.h5 every method starts from; pretrain.json has the source val accuracy).

Methods, each on the same data, weights and 32 px images, each seed a separate run:

* kft_default: `python -m kft.train --dataset=folder:TRAIN --backbone=B --weights=FILE
  --image_size=32 --model_dir=RUN --seed=S --export_dir=none` (kft's defaults; the export is
  skipped: it does not change the weights evaluated), then `python -m kft.evaluate
  --model_dir=RUN --dataset=folder:TEST`; the accuracy is read from RUN/eval/eval.json.
* kft_tune: `python -m kft.tune` with the same flags plus --tune_dir, --max_trials (this
  tool's --tune_trials, default 4) and --tuner (--tune_tuner, default random: at 4 trials
  Hyperband would train none of them in full, and kft.tune warns so), then `python -m
  kft.train --flagfile=TUNE/best.cfg --model_dir=RUN --export_dir=none`, evaluated the same way.
* linear_probe: scikit-learn LogisticRegression on the frozen backbone's global-average-pooled
  features (standardized), C chosen from 1e-4..1e3 (one per decade) by stratified 5-fold
  cross-validation on the training images only (fewer folds when a class has fewer than 5).
* keras_guide: the keras-io transfer-learning guide's recipe (RandomFlip + RandomRotation(0.1),
  backbone called with training=False, GlobalAveragePooling2D, Dropout(0.2), Dense; 20 epochs
  head-only with Adam 1e-3, then 10 epochs everything with Adam 1e-5, batch 32 or the
  set's size if smaller; the loss on the Dense layer's logits). Keras 3
  ignores the nested training=False once the outer model trains (keras-team/keras#20285: the
  BatchNorm layers would train), so the second stage also sets every BatchNormalization layer
  trainable=False, the Keras 3 way to get the inference-mode BatchNorm the guide asks for.
* seed_head_only: the tutorials' recipe 1 (shared/seeds/): a new linear head on the frozen
  backbone, SGD lr 1e-3 momentum 0.9, 10 epochs, batch 100 (or the set's size if smaller).
* seed_all_sgd: the tutorials' recipe 2: everything trainable (BatchNorm in training mode, as
  PyTorch's model.train()), SGD lr 1e-3 momentum 0.9, weight decay 5e-4 as PyTorch applies it
  (coupled: an L2 term 2.5e-4 * sum of squares of every trainable variable added to the loss,
  so it flows through the momentum), 10 epochs, batch 100. BatchNorm statistics are updated
  with torch's momentum (0.1, Keras 0.9), not keras.applications' 0.99/0.999, with which the
  statistics used at test time lagged the trained weights and the model scored chance.
  Both tutorial recipes use their data pipeline: pad 4 + random 32 px crop, horizontal flip.

Hand-written recipes read the folders with `keras.utils.image_dataset_from_directory` and use
the backbone's own `keras.applications.<module>.preprocess_input`, inside the model.

Results are cached per (task, size, backbone, method, seed) in WORK_DIR/results.json, each
with a fingerprint of what it depends on (the recipe's settings and code version, the weights'
and the data's hashes); a rerun computes only what is missing or stale, and a run that fails
is reported and retried by the next invocation. kft's defaults change with its code, which no
fingerprint sees: `--rerun=kft_default` recomputes those runs.
"""

import argparse
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("kft_default", "kft_tune", "linear_probe", "keras_guide", "seed_head_only", "seed_all_sgd")
KFT_METHODS = ("kft_default", "kft_tune")
BASELINES = tuple(m for m in METHODS if m not in KFT_METHODS)
TASKS = ("digits", "textures", "faces")
# A task pretrained on another task's source shares its weights (pretrain/SOURCE/BACKBONE).
SOURCE_TASK = {"faces": "textures"}
SIZES = ("5", "10", "50", "full")
# The few-shot sizes again, each seed training on its own random draw of that many images per
# class from the train pool (seed 0 on the fixed train_N): "5d" is 5 per class, a draw per seed.
# With a fixed draw the seeds vary only the training's randomness, so one unlucky (or lucky)
# set of 10 images decides a whole cell; few-shot results are usually averaged over draws.
# "lt": a long-tailed draw per seed, LONG_TAIL images for the classes in a seeded order.
LONG_TAIL = (40, 20, 10, 5, 2)
DRAWN_SIZES = (*(f"{size}d" for size in SIZES if size != "full"), "lt")
BACKBONES = ("MobileNetV2", "ResNet50", "EfficientNetB0")
IMAGE_SIZE = 32
# Seeds the test/train split of the target images: fixed, so every run sees the same folders.
DATA_SEED = 0
# Bump when the generated images change, so cached folders and results are rebuilt.
DATA_VERSION = 1
# Fraction of each target class held out as the test folder (digits, faces; textures: bottom half).
TEST_FRACTION = 0.5

# Textures task: the three texture images are the target; patches of these photographs (all
# bundled in scikit-image's wheel) the source task.
TEXTURE_CLASSES = ("brick", "grass", "gravel")
PHOTO_CLASSES = ("astronaut", "camera", "cell", "chelsea", "coffee", "hubble_deep_field", "retina", "rocket")
PHOTO_FILES = {
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}  # the others are NAME.png
PHOTO_PATCHES = 150  # random patches per photograph (source task)
PHOTO_SHORT_SIDE = 256  # photographs are downscaled to this short side before cropping
# Bump a recipe's number when its code changes what it computes: its cached results are redone.
RECIPE_VERSIONS = {
    "linear_probe": 1,
    "keras_guide": 1,
    "seed_head_only": 1,
    "seed_all_sgd": 2,
    "kft_default": 2,  # 2: the finished model averages its test views (--test_views)
    "kft_tune": 2,
}
# torch.nn.BatchNorm2d's default momentum (weight of the new batch in the running statistics).
TORCH_BN_MOMENTUM = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
    """Epochs, batches and search sizes of every recipe; --quick shrinks them."""

    pretrain_epochs: int = 15
    pretrain_batch: int = 64
    pretrain_limit_per_class: int = 0  # 0 = every source image
    guide_head_epochs: int = 20
    guide_all_epochs: int = 10
    guide_batch: int = 32
    seed_epochs: int = 10
    seed_batch: int = 100
    seed_lr: float = 1e-3
    seed_momentum: float = 0.9
    seed_weight_decay: float = 5e-4
    probe_cs: tuple = tuple(10.0**k for k in range(-4, 4))  # 1e-4 .. 1e3, one per decade
    probe_folds: int = 5
    tune_trials: int = 4
    tune_tuner: str = "random"
    # Flags added to every kft.train/kft.tune command of the kft methods: none, kft's defaults.
    kft_flags: tuple = ()

    def for_method(self, method: str) -> dict:
        """The settings a method's result depends on (part of its cache fingerprint)."""
        prefixes = {
            "keras_guide": ("guide_",),
            "seed_head_only": ("seed_",),
            "seed_all_sgd": ("seed_",),
            "linear_probe": ("probe_",),
            "kft_default": ("kft_",),
            "kft_tune": ("tune_", "kft_"),
        }[method]
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefixes)}


# --quick: seconds per recipe, for the smoke test. kft's defaults train hundreds of steps, so
# the kft methods get one head-only epoch instead.
QUICK = Settings(
    pretrain_epochs=1,
    pretrain_batch=40,
    pretrain_limit_per_class=8,
    guide_head_epochs=1,
    guide_all_epochs=1,
    seed_epochs=1,
    probe_cs=(0.01, 1.0),
    probe_folds=2,
    tune_trials=1,
    kft_flags=("--stages=head:1@1e-3",),
)
# The quick backbone: VGG16's train step traces in ~4 s of CPU here, MobileNetV2's in ~18 s and
# ResNet50's in ~37 s (every all-trainable model pays it once), which would dominate a smoke run.
QUICK_BACKBONE = "VGG16"


def log(message: str) -> None:
    """A progress line on stderr, stamped with seconds since start."""
    print(f"{time.time() - _STARTED:7.0f}s {message}", file=sys.stderr, flush=True)


_STARTED = time.time()


# ----------------------------------------------------------------------------------------------
# The machine and the code measured.


def machine_info() -> dict:
    """CPU model, cores and the library versions (cheap; no TensorFlow import)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cores": cores, "python": platform.python_version(), "platform": platform.platform()}


def git_state() -> dict:
    """`git rev-parse HEAD` and whether tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


# ----------------------------------------------------------------------------------------------
# Data: real images written as class folders.


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_png(path: str, gray_or_rgb: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(gray_or_rgb).convert("RGB")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG")


def _upsample(gray: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))


def _digits_images() -> dict:
    """{"source": {class: [(name, uint8 32x32)]}, "target": {...}} from sklearn's digits."""
    from sklearn.datasets import load_digits  # Ships in scikit-learn's wheel: no download.

    digits = load_digits()
    # Pixel values are 0..16; stretched to 0..255 as kft's built-in digits dataset does.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    out = {"source": {}, "target": {}}
    for index, (image, label) in enumerate(zip(images, digits.target)):
        part = "source" if label < 5 else "target"
        out[part].setdefault(str(label), []).append((f"d{index:04d}", _upsample(image)))
    return out


def _skimage_file(filename: str, task: str) -> str:
    """The path of a file bundled in scikit-image's wheel (never downloaded); exits with one
    line naming it when scikit-image or the file is missing."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    folder = os.path.join(os.path.dirname(spec.origin), "data") if spec and spec.origin else ""
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise SystemExit(
            f"transfer_bench: error: the {task} task reads {path!r}, bundled in scikit-image's "
            "wheel; install it: pip install -e '.[bench]'"
        )
    return path


def _photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled images, as uint8 grayscale (PIL's ITU-R 601-2 luma for the
    colour ones)."""
    from PIL import Image

    with Image.open(_skimage_file(PHOTO_FILES.get(name, f"{name}.png"), "textures")) as image:
        return np.asarray(image.convert("L"))


def _grid_patches(image: np.ndarray, rows: range, size: int = IMAGE_SIZE) -> list:
    """Non-overlapping size x size patches whose top rows are in `rows`, left to right."""
    return [
        (f"r{r:03d}c{c:03d}", image[r : r + size, c : c + size])
        for r in rows
        for c in range(0, image.shape[1] - size + 1, size)
    ]


def _textures_images() -> dict:
    """Target: 32 px patches of brick/grass/gravel (top half train pool, bottom half test).
    Source: random 32 px patches of downscaled photographs, labelled by photograph."""
    from PIL import Image

    target_pool, target_test = {}, {}
    for name in TEXTURE_CLASSES:
        image = _photo(name)
        half = image.shape[0] // 2
        # Patches never straddle the middle row: the two halves share no pixel.
        target_pool[name] = _grid_patches(image, range(0, half - IMAGE_SIZE + 1, IMAGE_SIZE))
        target_test[name] = _grid_patches(image, range(half, image.shape[0] - IMAGE_SIZE + 1, IMAGE_SIZE))
    rng = np.random.default_rng(DATA_SEED)
    source = {}
    for name in PHOTO_CLASSES:
        image = Image.fromarray(_photo(name))
        scale = PHOTO_SHORT_SIDE / min(image.size)
        image = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR))
        tops = rng.integers(0, image.shape[0] - IMAGE_SIZE + 1, PHOTO_PATCHES)
        lefts = rng.integers(0, image.shape[1] - IMAGE_SIZE + 1, PHOTO_PATCHES)
        source[name] = [
            (f"p{i:03d}", image[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE])
            for i, (top, left) in enumerate(zip(tops, lefts))
        ]
    return {"source": source, "target_pool": target_pool, "target_test": target_test}


def _faces_images() -> dict:
    """{"target": {"face": [...], "nonface": [...]}} from scikit-image's lfw_subset.npy."""
    images = np.load(_skimage_file("lfw_subset.npy", "faces"))  # (200, 25, 25), 0..1 floats
    images = np.round(images * 255.0).astype(np.uint8)
    # scikit-image documents the order: the first 100 are faces, the other 100 are not.
    return {
        "target": {
            "face": [(f"f{i:03d}", _upsample(image)) for i, image in enumerate(images[:100])],
            "nonface": [(f"n{i:03d}", _upsample(image)) for i, image in enumerate(images[100:])],
        }
    }


def _remove_tree(path: str, root: str) -> None:
    """Deletes `path`, a folder the benchmark wrote under `root`, refusing one that a link takes
    outside it: a work dir that links to another's pretrain/ or data/ folders must not delete
    that one's weights or images (session 17 lost a pretraining that way)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise SystemExit(
            f"transfer_bench: error: {path} leads to {real}, outside {root}; the benchmark deletes only "
            "what it wrote there. Give it a --work_dir of its own, without links to another one"
        )
    shutil.rmtree(path, ignore_errors=True)


def _shuffled(items: list, index: int) -> list:
    """`items` in a seeded random order (class `index` gets its own stream)."""
    order = np.random.default_rng([DATA_SEED, index]).permutation(len(items))
    return [items[i] for i in order]


def _split_target(target: dict) -> tuple[dict, dict]:
    """Seeded per-class split of {class: [(name, image)]} into (train pool, test).

    The pool keeps its shuffled order, so train_N (its first N) is a seeded random subset and
    each size contains the smaller ones.
    """
    pool, test = {}, {}
    for index, name in enumerate(sorted(target)):
        items = _shuffled(target[name], index)
        num_test = int(round(len(items) * TEST_FRACTION))
        test[name], pool[name] = items[:num_test], items[num_test:]
    return pool, test


def _size_count(size: str) -> int | None:
    """Images per class of a train size; None (all of the pool) for "full"."""
    return None if size == "full" else int(size)


def _train_count(manifest: dict, size: str) -> int:
    """Training images of a size, from the manifest (a drawn size has its fixed size's count)."""
    if size == "lt":
        return sum(drawn_counts(size, manifest["target_classes"], seed=0).values())
    return sum(manifest["counts"][f"train_{size.removesuffix('d')}"].values())


def drawn_counts(size: str, class_names, seed: int) -> dict:
    """Images per class of a drawn size for `seed`: N each for "Nd"; for "lt", LONG_TAIL's
    counts (then 2s) down a seeded order of the classes."""
    names = sorted(class_names)
    if size != "lt":
        return {name: int(size.removesuffix("d")) for name in names}
    order = np.random.default_rng([DATA_SEED, len(names), seed]).permutation(len(names))
    return {names[i]: LONG_TAIL[min(rank, len(LONG_TAIL) - 1)] for rank, i in enumerate(order)}


def draw_path(data_dir: str, size: str, seed: int) -> str:
    """Where draw_folder writes the training folder of a drawn size ("5d") for `seed`."""
    return os.path.join(data_dir, "draws", f"train_{size.removesuffix('d')}_seed{seed}")


def draw_folder(data_dir: str, size: str, seed: int) -> tuple[str, str]:
    """The training folder of a drawn size ("5d") for `seed`, written on first use; returns
    (its path, a hash of the files drawn).

    Seed 0 draws train_N's images (the fixed draw); seed s > 0 draws N per class at random from
    train_full (the whole train pool, so never a test image), seeded by (DATA_SEED, class, s).
    The long-tailed size "lt" draws `drawn_counts` from the pool for every seed, seed 0 too.
    The images are copied, not linked: a user's folder holds files, and kft reads it as such.
    """
    pool = os.path.join(data_dir, "train_full")
    path = draw_path(data_dir, size, seed)
    names = sorted(os.listdir(pool))
    counts = drawn_counts(size, names, seed)
    chosen = {}
    for index, name in enumerate(names):
        if seed == 0 and size != "lt":
            chosen[name] = sorted(os.listdir(os.path.join(data_dir, f"train_{counts[name]}", name)))
        else:
            files = sorted(os.listdir(os.path.join(pool, name)))
            if counts[name] > len(files):
                raise ValueError(f"size {size}: class {name!r} has {len(files)} images in its pool, not {counts[name]}")
            picked = np.random.default_rng([DATA_SEED, index, seed]).choice(len(files), counts[name], replace=False)
            chosen[name] = sorted(files[i] for i in picked)
    listing = json.dumps(chosen, sort_keys=True)
    draw_hash = hashlib.sha256(listing.encode()).hexdigest()[:16]
    if os.path.isdir(path):
        present = {n: sorted(os.listdir(os.path.join(path, n))) for n in os.listdir(path) if n != "draw.json"}
        if present == chosen:
            return path, draw_hash
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".draw-")
    for name, files in chosen.items():
        os.makedirs(os.path.join(staging, name))
        for file in files:
            shutil.copyfile(os.path.join(pool, name, file), os.path.join(staging, name, file))
    with open(os.path.join(staging, "draw.json"), "w") as f:
        f.write(listing)
    if os.path.exists(path):
        _remove_tree(path, data_dir)
    os.replace(staging, path)
    return path, draw_hash


def build_task(task: str, data_dir: str) -> dict:
    """Writes (or reuses) the task's folders; returns its manifest.

    Layout under data_dir: source/, test/, train_SIZE/ for each of SIZES, each with one
    subfolder of PNGs per class; manifest.json records classes, counts and file hashes.
    """
    manifest_path = os.path.join(data_dir, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("version") == DATA_VERSION:
            return manifest
    _remove_tree(data_dir, os.path.dirname(data_dir))
    if task == "digits":
        images = _digits_images()
        pool, test = _split_target(images["target"])
    elif task == "textures":
        images = _textures_images()
        # Held out in space (bottom halves); the pool is shuffled so sizes are random subsets.
        pool = {
            name: _shuffled(items, index) for index, (name, items) in enumerate(sorted(images["target_pool"].items()))
        }
        test = images["target_test"]
    elif task == "faces":
        images = _faces_images()
        pool, test = _split_target(images["target"])
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    folders = {"test": test}
    if "source" in images:
        folders["source"] = images["source"]
    for size in SIZES:
        folders[f"train_{size}"] = {k: v[: _size_count(size)] for k, v in pool.items()}
    counts, hashes = {}, {}
    for folder, classes in folders.items():
        for name, items in classes.items():
            for stem, image in items:
                path = os.path.join(data_dir, folder, name, f"{stem}.png")
                _write_png(path, image)
                hashes.setdefault(folder, []).append(_sha256(path))
        counts[folder] = {name: len(items) for name, items in classes.items()}
    train_hashes = set().union(*(hashes[f"train_{s}"] for s in SIZES))
    if train_hashes & set(hashes["test"]):  # A split bug must never reach the numbers.
        raise RuntimeError(f"{task}: a test image is also in a train folder")
    manifest = {
        "version": DATA_VERSION,
        "task": task,
        "counts": counts,
        "target_classes": sorted(test),
        "source_classes": sorted(images.get("source", {})),
        "data_hash": hashlib.sha256(
            "".join(sorted(train_hashes | set(hashes["test"]) | set(hashes.get("source", [])))).encode()
        ).hexdigest()[:16],
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ----------------------------------------------------------------------------------------------
# Running kft as a user does.


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(args: list[str], log_path: str) -> None:
    """Runs `python -m <args>` in the repository root; output to log_path; raises on failure."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log_path, "a") as out:
        out.write("$ python -m " + " ".join(args) + "\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"python -m {' '.join(args[:1])} failed ({proc.returncode}); log {log_path}:\n{tail}")


def pretrain(task: str, backbone: str, work_dir: str, settings: Settings) -> dict:
    """Trains `backbone` from random init on the task's source folder (cached); returns
    {"weights", "sha", "val_accuracy", "wall_s", "cpu_s", "command"}."""
    run_dir = os.path.join(work_dir, "pretrain", task, backbone)
    weights = os.path.join(run_dir, "backbone.weights.h5")
    args = [
        "kft.train",
        f"--dataset=folder:{os.path.join(work_dir, 'data', task, 'source')}",
        f"--backbone={backbone}",
        "--weights=none",
        f"--image_size={IMAGE_SIZE}",
        f"--stages=all:{settings.pretrain_epochs}@1e-3:bn=train",
        f"--batch_size={settings.pretrain_batch}",
        f"--train_limit_per_class={settings.pretrain_limit_per_class}",
        # L2-SP would pull toward the random init; float32 so the weights reproduce on any
        # CPU; no flips (mirrored digits are other glyphs).
        "--l2sp_alpha=0",
        # The source's validation accuracy is reported: kept even where the recipe would train
        # on a split too small to rank checkpoints (digits' source: 90 images).
        "--val_fraction=0.1",
        "--mixed_precision=none",
        "--augment=crop",
        "--export_dir=none",
        "--seed=0",
        "--verbose=2",
        f"--model_dir={run_dir}",
    ]
    info_path = os.path.join(run_dir, "pretrain.json")
    if os.path.isfile(info_path) and os.path.isfile(weights):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("command") == args and info.get("sha") == _sha256(weights):
            return info
    _remove_tree(run_dir, work_dir)
    log(f"pretraining {backbone} on {task}/source ({settings.pretrain_epochs} epochs)")
    wall, cpu = time.time(), _child_cpu_s()
    run_cli(args, os.path.join(work_dir, "logs", f"pretrain-{task}-{backbone}.log"))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    info = {
        "weights": weights,
        "sha": _sha256(weights),
        "command": args,
        "val_accuracy": metrics["best_val_accuracy"],
        "wall_s": time.time() - wall,
        "cpu_s": _child_cpu_s() - cpu,
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    log(f"pretrained {backbone} on {task}: source val accuracy {info['val_accuracy']:.3f} ({info['wall_s']:.0f}s)")
    return info


def kft_evaluate(run_dir: str, test_dir: str, log_path: str) -> dict:
    """`python -m kft.evaluate --model_dir=RUN --dataset=folder:TEST`; returns its eval.json."""
    run_cli(["kft.evaluate", f"--model_dir={run_dir}", f"--dataset=folder:{test_dir}"], log_path)
    with open(os.path.join(run_dir, "eval", "eval.json")) as f:
        return json.load(f)


def _fresh(job: "Job") -> None:
    """Removes an earlier (or interrupted) run of this job and its log."""
    _remove_tree(job.run_dir, job.work_dir)
    if os.path.exists(job.run_dir + ".log"):
        os.remove(job.run_dir + ".log")


def _kft_job_flags(job: "Job") -> list[str]:
    """The flags kft.train and kft.tune share for a job: its data, backbone, weights, size, seed."""
    return [
        f"--dataset=folder:{job.train_dir}",
        f"--backbone={job.backbone}",
        f"--weights={job.weights}",
        f"--image_size={IMAGE_SIZE}",
        f"--seed={job.seed}",
        *job.settings.kft_flags,
    ]


def run_kft_default(job: "Job") -> dict:
    """kft.train with its defaults (plus --export_dir=none), then kft.evaluate on the test folder."""
    _fresh(job)
    log_path = job.run_dir + ".log"  # beside it: kft.train wants an empty or kft-made dir
    args = ["kft.train", *_kft_job_flags(job), f"--model_dir={job.run_dir}", "--export_dir=none"]
    run_cli(args, log_path)
    result = kft_evaluate(job.run_dir, job.test_dir, log_path)
    return {"accuracy": result["accuracy"], "num_test": result["num_examples"], "commands": [args]}


def run_kft_tune(job: "Job") -> dict:
    """kft.tune with kft's defaults, --max_trials and --tuner, kft.train --flagfile=best.cfg, kft.evaluate."""
    _fresh(job)
    tune_dir = os.path.join(job.run_dir, "tune")
    model_dir = os.path.join(job.run_dir, "best")
    log_path = job.run_dir + ".log"  # beside it: kft.train wants an empty or kft-made dir
    tune = [
        "kft.tune",
        *_kft_job_flags(job),
        f"--tune_dir={tune_dir}",
        f"--max_trials={job.settings.tune_trials}",
        f"--tuner={job.settings.tune_tuner}",
    ]
    train = [
        "kft.train",
        f"--flagfile={os.path.join(tune_dir, 'best.cfg')}",
        f"--model_dir={model_dir}",
        "--export_dir=none",
    ]
    run_cli(tune, log_path)
    run_cli(train, log_path)
    result = kft_evaluate(model_dir, job.test_dir, log_path)
    return {"accuracy": result["accuracy"], "num_test": result["num_examples"], "commands": [tune, train]}


# ----------------------------------------------------------------------------------------------
# Hand-written recipes, in plain Keras, in this process.


def _keras():
    import keras

    return keras


def load_folder(path: str, batch_size: int, shuffle: bool, seed: int):
    """A class folder as a user loads it: uint8-valued float32 images and int labels."""
    keras = _keras()
    return keras.utils.image_dataset_from_directory(
        path,
        labels="inferred",
        label_mode="int",
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        verbose=False,
    )


def pretrained_base(backbone: str, weights: str):
    """keras.applications backbone (include_top=False) with the source-task weights, and its
    own preprocess_input."""
    keras = _keras()
    constructor = getattr(keras.applications, backbone)
    base = constructor(include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base.load_weights(weights)
    # keras.applications.resnet50.preprocess_input for ResNet50, and so on.
    module = getattr(keras.applications, constructor.__module__.rsplit(".", 1)[-1])
    return base, module.preprocess_input


def _num_images(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _test_accuracy(model, test_dir: str) -> tuple[float, int]:
    """Top-1 accuracy of `model` (logits) on the test folder."""
    test = load_folder(test_dir, batch_size=256, shuffle=False, seed=0)
    labels = np.concatenate([y.numpy() for _, y in test])
    logits = model.predict(test, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == labels)), int(len(labels))


def _features(base, preprocess, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Global-average-pooled features of the frozen backbone (inference mode) and labels."""
    keras = _keras()
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(base(preprocess(inputs), training=False))
    extractor = keras.Model(inputs, pooled)
    dataset = load_folder(path, batch_size=256, shuffle=False, seed=0)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    return extractor.predict(dataset, verbose=0), labels


def run_linear_probe(job: "Job") -> dict:
    """Logistic regression on frozen features; C by stratified CV on the training images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    base, preprocess = pretrained_base(job.backbone, job.weights)
    x_train, y_train = _features(base, preprocess, job.train_dir)
    x_test, y_test = _features(base, preprocess, job.test_dir)
    folds = min(job.settings.probe_folds, int(np.bincount(y_train).min()))
    # The scaler sits inside the pipeline, so each CV fold standardizes with its own train part.
    search = GridSearchCV(
        # newton-cg: the same L2 multinomial optimum as lbfgs, ~5x faster here on these
        # 1280-2048 dimensional features (lbfgs took 200+ iterations at mid-range C).
        make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=1000)),
        {"logisticregression__C": list(job.settings.probe_cs)},
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=job.seed),
        n_jobs=1,
    )
    search.fit(x_train, y_train)
    accuracy = float(np.mean(search.predict(x_test) == y_test))
    return {
        "accuracy": accuracy,
        "num_test": int(len(y_test)),
        "chosen_c": float(search.best_params_["logisticregression__C"]),
        "cv_accuracy": float(search.best_score_),
    }


def run_keras_guide(job: "Job") -> dict:
    """The keras-io transfer-learning guide's two-stage recipe, as a careful reader writes it."""
    keras = _keras()
    keras.utils.set_random_seed(job.seed)
    base, preprocess = pretrained_base(job.backbone, job.weights)
    batch = min(job.settings.guide_batch, _num_images(job.train_dir))
    # Reshuffled every epoch; 32 px PNGs decode faster than a step, so no cache.
    train = load_folder(job.train_dir, batch, shuffle=True, seed=job.seed).prefetch(10)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    base.trainable = False
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = preprocess(augmentation(inputs))
    x = base(x, training=False)  # The guide: inference mode, BatchNorm statistics untouched.
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(job.num_classes)(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(), loss=loss, metrics=["accuracy"])
    model.fit(train, epochs=job.settings.guide_head_epochs, verbose=0)
    base.trainable = True
    # Keras 3 lets the outer fit's training=True override training=False above
    # (keras-team/keras#20285); a frozen BatchNormalization layer runs in inference mode.
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5), loss=loss, metrics=["accuracy"]
    )  # Recompile: trainable changed.
    history = model.fit(train, epochs=job.settings.guide_all_epochs, verbose=0)
    accuracy, num_test = _test_accuracy(model, job.test_dir)
    return {"accuracy": accuracy, "num_test": num_test, "final_train_loss": float(history.history["loss"][-1])}


def _torch_augment(image, label):
    """torchvision's RandomCrop(32, padding=4) (zero padding) + RandomHorizontalFlip, on the
    raw 0..255 image before normalization, as the tutorials' transforms.Compose does."""
    import tensorflow as tf

    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.random_crop(image, [IMAGE_SIZE, IMAGE_SIZE, 3])
    return tf.image.random_flip_left_right(image), label


def _tutorial_model(job: "Job", head_only: bool):
    """The PyTorch tutorials' model in Keras: backbone, global pooling, a linear head."""
    keras = _keras()
    import tensorflow as tf
    from keras import ops

    settings = job.settings
    weight_decay = 0.0 if head_only else settings.seed_weight_decay

    class CoupledL2(keras.Model):
        """Adds PyTorch's SGD weight_decay as a loss term: wd/2 * ||theta||^2 over everything
        trainable (its gradient wd * theta is what torch adds to each gradient)."""

        # Traced as written (see _run_tutorial); `training` is a Python bool here.
        @tf.autograph.experimental.do_not_convert
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
            if weight_decay and training:
                loss = loss + 0.5 * weight_decay * ops.sum(
                    ops.stack([ops.sum(ops.square(v)) for v in self.trainable_variables])
                )
            return loss

    base, preprocess = pretrained_base(job.backbone, job.weights)
    base.trainable = not head_only
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # torch's BatchNorm default, momentum 0.1 (Keras: 0.9). keras.applications use 0.99
            # or 0.999: after the few dozen steps of a small set the moving statistics would
            # still be the source task's, and the model, trained on batch statistics, scored
            # chance in inference mode (digits/full/MobileNetV2: 0.20 vs 0.60 with 0.9).
            layer.momentum = 1.0 - TORCH_BN_MOMENTUM
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = base(preprocess(inputs))  # torch's model.train(): BatchNorm trains when it is trainable.
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = CoupledL2(inputs, keras.layers.Dense(job.num_classes)(x))
    model.compile(
        optimizer=keras.optimizers.SGD(settings.seed_lr, momentum=settings.seed_momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _run_tutorial(job: "Job", head_only: bool) -> dict:
    keras = _keras()
    keras.utils.set_random_seed(job.seed)
    model = _tutorial_model(job, head_only)
    import tensorflow as tf

    batch = min(job.settings.seed_batch, _num_images(job.train_dir))
    # Per-image augmentation in the input pipeline, as torchvision transforms run.
    train = load_folder(job.train_dir, None, shuffle=True, seed=job.seed)
    # Traced as written: autograph would re-read this file's source, wrong if it was edited
    # while a long benchmark runs.
    augment = tf.autograph.experimental.do_not_convert(_torch_augment)
    train = train.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
    history = model.fit(train, epochs=job.settings.seed_epochs, verbose=0)
    accuracy, num_test = _test_accuracy(model, job.test_dir)
    return {"accuracy": accuracy, "num_test": num_test, "final_train_loss": float(history.history["loss"][-1])}


def run_seed_head_only(job: "Job") -> dict:
    """Recipe 1: a new linear head on the frozen backbone, SGD 1e-3 momentum 0.9."""
    return _run_tutorial(job, head_only=True)


def run_seed_all_sgd(job: "Job") -> dict:
    """Recipe 2: everything trainable, SGD 1e-3 momentum 0.9, coupled weight decay 5e-4."""
    return _run_tutorial(job, head_only=False)


RUNNERS = {
    "kft_default": run_kft_default,
    "kft_tune": run_kft_tune,
    "linear_probe": run_linear_probe,
    "keras_guide": run_keras_guide,
    "seed_head_only": run_seed_head_only,
    "seed_all_sgd": run_seed_all_sgd,
}


# ----------------------------------------------------------------------------------------------
# The grid, the cache and the table.


@dataclasses.dataclass(frozen=True)
class Job:
    """One (task, size, backbone, method, seed) run and everything it reads."""

    task: str
    size: str
    backbone: str
    method: str
    seed: int
    work_dir: str
    weights: str
    num_classes: int
    settings: Settings

    @property
    def key(self) -> str:
        return "|".join([self.task, self.size, self.backbone, self.method, str(self.seed)])

    @property
    def train_dir(self) -> str:
        if self.size in DRAWN_SIZES:  # Written by draw_folder before the job runs.
            return draw_path(os.path.join(self.work_dir, "data", self.task), self.size, self.seed)
        return os.path.join(self.work_dir, "data", self.task, f"train_{self.size}")

    @property
    def test_dir(self) -> str:
        return os.path.join(self.work_dir, "data", self.task, "test")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.work_dir, "runs", self.task, self.size, self.backbone, self.method, f"seed{self.seed}")


def fingerprint(job: Job, weights_sha: str, data_hash: str) -> dict:
    """What a cached result depends on, besides kft's code (see --rerun)."""
    fields = {
        "recipe_version": RECIPE_VERSIONS[job.method],
        "settings": job.settings.for_method(job.method),
        "weights_sha": weights_sha[:16],
        "data_hash": data_hash,
    }
    return json.loads(json.dumps(fields))  # As the cache file holds it (tuples become lists).


class Cache:
    """results.json in the work dir: {"runs": {key: entry}}, written atomically after each run.

    Several processes may share a work dir (e.g. one running the baselines, one kft's rows):
    each write re-reads the file under a lock and adds its entry, so none loses another's.
    """

    def __init__(self, path: str):
        self.path = path
        self.runs = self._read()

    def _read(self) -> dict:
        if not os.path.isfile(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f).get("runs", {})

    def get(self, key: str, expected: dict) -> dict | None:
        entry = self.runs.get(key)
        return entry if entry and entry.get("fingerprint") == expected else None

    def put(self, key: str, entry: dict) -> None:
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
            self.runs = {**self._read(), key: entry}
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump({"runs": self.runs}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def run_job(job: Job, cache: Cache, expected: dict, rerun: set) -> dict | None:
    """The cached entry of `job`, computing it first if missing, stale or asked to rerun.

    A run that fails is logged and returns None (nothing is cached, so the next invocation
    tries again): one diverging recipe should not end a run of several hours.
    """
    cached = cache.get(job.key, expected)
    if cached and job.method not in rerun:
        return cached
    wall, cpu = time.time(), time.process_time() + _child_cpu_s()
    try:
        result = RUNNERS[job.method](job)
    except Exception as e:  # noqa: BLE001 -- reported and counted; main() exits 1.
        log(
            f"{job.task}/{job.size}/{job.backbone} {job.method} seed {job.seed}: FAILED: "
            f"{type(e).__name__}: {str(e).strip()[-1500:]}"
        )
        return None
    entry = {
        **result,
        "wall_s": round(time.time() - wall, 2),
        "cpu_s": round(time.process_time() + _child_cpu_s() - cpu, 2),
        "fingerprint": expected,
        "commit": git_state(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    cache.put(job.key, entry)
    if job.method not in KFT_METHODS:
        _keras().backend.clear_session()  # Each hand-written run builds a new model.
        gc.collect()
    log(
        f"{job.task}/{job.size}/{job.backbone} {job.method} seed {job.seed}: test accuracy "
        f"{entry['accuracy']:.3f} ({entry['wall_s']:.1f}s wall, {entry['cpu_s']:.1f}s CPU)"
    )
    return entry


def summarize(entries: dict, methods: list[str]) -> list[dict]:
    """One row per (task, size, backbone): per method mean/std/n of test accuracy and time,
    and kft_default's margin over the best hand-written baseline."""
    groups = {}
    for key, entry in entries.items():
        task, size, backbone, method, _ = key.split("|")
        groups.setdefault((task, size, backbone), {}).setdefault(method, []).append(entry)
    rows = []
    for (task, size, backbone), by_method in groups.items():
        row = {"task": task, "size": size, "backbone": backbone, "methods": {}}
        for method in methods:
            runs = by_method.get(method, [])
            if not runs:
                continue
            accuracies = [r["accuracy"] for r in runs]
            row["methods"][method] = {
                "mean": statistics.fmean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "n": len(accuracies),
                "accuracies": accuracies,
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            }
        baselines = {m: v["mean"] for m, v in row["methods"].items() if m in BASELINES}
        if "kft_default" in row["methods"] and baselines:
            best = max(baselines, key=baselines.get)
            row["best_baseline"] = best
            row["kft_default_margin"] = row["methods"]["kft_default"]["mean"] - baselines[best]
        rows.append(row)
    order = {s: i for i, s in enumerate(SIZES + DRAWN_SIZES)}
    rows.sort(key=lambda r: (r["task"], order.get(r["size"], 99), r["backbone"]))
    return rows


def format_table(rows: list[dict], methods: list[str]) -> str:
    """Rows task/size/backbone, columns methods, cells `mean ± std` test accuracy."""
    header = ["task", "size", "backbone", *methods, "kft_default - best baseline"]
    lines = [header]
    for row in rows:
        cells = [row["task"], row["size"], row["backbone"]]
        for method in methods:
            stats = row["methods"].get(method)
            cells.append(f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats else "-")
        margin = row.get("kft_default_margin")
        cells.append(f"{margin:+.3f} ({row['best_baseline']})" if margin is not None else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def timing_summary(entries: dict, methods: list[str]) -> dict:
    """Mean wall and CPU seconds per run: {method: {backbone: {size: {...}}}} (all tasks)."""
    out = {}
    for key, entry in entries.items():
        _, size, backbone, method, _ = key.split("|")
        if method in methods:
            runs = out.setdefault(method, {}).setdefault(backbone, {}).setdefault(size, [])
            runs.append((entry["wall_s"], entry["cpu_s"]))
    return {
        m: {
            b: {
                s: {
                    "runs": len(v),
                    "wall_s_mean": round(statistics.fmean(w for w, _ in v), 1),
                    "cpu_s_mean": round(statistics.fmean(c for _, c in v), 1),
                }
                for s, v in by_size.items()
            }
            for b, by_size in by_backbone.items()
        }
        for m, by_backbone in out.items()
    }


# ----------------------------------------------------------------------------------------------
# Main.


def _list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        raise SystemExit(f"transfer_bench: error: --{what}={value!r}: choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: digits, size 5, VGG16, 1 seed, 1 epoch per recipe "
        "(kft: --stages=head:1@1e-3), pretraining 1 step, no kft_tune",
    )
    parser.add_argument("--out", default="transfer_bench.json", help="summary JSON path")
    parser.add_argument(
        "--work_dir",
        default=None,
        help="data, pretrained weights, runs and the results cache "
        "(default runs/transfer_bench, runs/transfer_bench_quick with --quick)",
    )
    parser.add_argument("--tasks", default=None, help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma list of 5, 10, 50, full (images per class; the same images for every seed), "
        "or 5d, 10d, 50d (that many per class, a new draw from the train pool for each seed), "
        "or lt (long-tailed: 40, 20, 10, 5, 2 per class, a new draw and class order for each seed)",
    )
    parser.add_argument("--backbones", default=None, help=f"keras.applications names (default {','.join(BACKBONES)})")
    parser.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per method (default 3)")
    parser.add_argument(
        "--rerun",
        default="",
        help="methods to recompute even if cached (e.g. kft_default after kft's defaults changed), or all",
    )
    parser.add_argument("--tune_trials", type=int, default=None, help="kft_tune's --max_trials (default 4)")
    parser.add_argument(
        "--tune_tuner",
        choices=("random", "bayesian", "hyperband"),
        default=None,
        help="kft_tune's --tuner (default random)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.tasks = _list(args.tasks or ("digits" if quick else ",".join(TASKS)), TASKS, "tasks")
    args.sizes = _list(args.sizes or ("5" if quick else ",".join(SIZES)), SIZES + DRAWN_SIZES, "sizes")
    args.backbones = _list(args.backbones or (QUICK_BACKBONE if quick else ",".join(BACKBONES)), None, "backbones")
    default_methods = [m for m in METHODS if not (quick and m == "kft_tune")]
    args.methods = _list(args.methods or ",".join(default_methods), METHODS, "methods")
    args.rerun = set(METHODS) if args.rerun == "all" else set(_list(args.rerun, METHODS, "rerun") if args.rerun else [])
    args.seeds = args.seeds or (1 if quick else 3)
    args.work_dir = os.path.abspath(
        args.work_dir or os.path.join(REPO, "runs", "transfer_bench_quick" if quick else "transfer_bench")
    )
    settings = QUICK if quick else Settings()
    if args.tune_trials:
        settings = dataclasses.replace(settings, tune_trials=args.tune_trials)
    if args.tune_tuner:
        settings = dataclasses.replace(settings, tune_tuner=args.tune_tuner)
    args.settings = settings
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # fit() notes that a tf.data input is not reshuffled by it; the datasets shuffle themselves.
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    os.makedirs(args.work_dir, exist_ok=True)
    cache = Cache(os.path.join(args.work_dir, "results.json"))
    machine, git = machine_info(), git_state()
    log(
        f"work dir {args.work_dir}; {machine['cpu_model']}, {machine['cores']} cores; "
        f"commit {git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}"
    )
    pretrained, selected, failed = {}, {}, []
    for task in args.tasks:
        manifest = build_task(task, os.path.join(args.work_dir, "data", task))
        log(
            f"{task}: target {manifest['counts']['test']} test images per class, "
            f"train sizes {[_train_count(manifest, size) for size in args.sizes]}"
        )
        source = SOURCE_TASK.get(task, task)
        if source != task:
            build_task(source, os.path.join(args.work_dir, "data", source))
        for backbone in args.backbones:
            info = pretrain(source, backbone, args.work_dir, args.settings)
            pretrained[f"{task}/{backbone}"] = info
            for size in args.sizes:
                for method in args.methods:
                    for seed in range(args.seeds):
                        job = Job(
                            task,
                            size,
                            backbone,
                            method,
                            seed,
                            args.work_dir,
                            info["weights"],
                            len(manifest["target_classes"]),
                            args.settings,
                        )
                        data_hash = manifest["data_hash"]
                        if size in DRAWN_SIZES:
                            _, draw_hash = draw_folder(os.path.join(args.work_dir, "data", task), size, seed)
                            data_hash = f"{data_hash}/{draw_hash}"
                        expected = fingerprint(job, info["sha"], data_hash)
                        entry = run_job(job, cache, expected, args.rerun)
                        if entry is None:
                            failed.append(job.key)
                        else:
                            selected[job.key] = entry
    rows = summarize(selected, args.methods)
    table = format_table(rows, args.methods)
    result = {
        "machine": machine,
        "git": git,
        "command": " ".join(["python", "tools/transfer_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "quick": args.quick,
            "tasks": args.tasks,
            "sizes": args.sizes,
            "backbones": args.backbones,
            "methods": args.methods,
            "seeds": args.seeds,
            "work_dir": args.work_dir,
            "image_size": IMAGE_SIZE,
            "recipes": dataclasses.asdict(args.settings),
        },
        "pretrain": pretrained,
        "rows": rows,
        "timing": timing_summary(selected, args.methods),
        "runs": selected,
        "failed": failed,
        "wall_s": time.time() - _STARTED,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"test accuracy (mean ± std over {args.seeds} seeds) on held-out test folders; work dir {args.work_dir}")
    print(table)
    print(f"\nwall time {result['wall_s']:.0f}s; JSON: {args.out}")
    if failed:
        print(f"{len(failed)} runs failed (see the log above; rerun to retry): {', '.join(failed)}")
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
