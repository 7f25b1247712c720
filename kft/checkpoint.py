"""Files kft writes and reads back: atomic writes, resume checkpoints, backbone weights, anchors.

Every file is written to a temporary name in the same directory and renamed into place, so a
run killed at any moment leaves either the old file or the new one, never half of one.
A resume checkpoint is a directory (model weights, optimizer state, trainer state) that is
complete before it is renamed to `ckpt/epoch-N`; `ckpt/latest` names the newest complete one.
Nothing is unpickled: weights are HDF5 read by Keras, arrays are `.npz` read with
allow_pickle=False, state is JSON.
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
import zipfile

import h5py
import keras
import numpy as np
from absl import logging

from kft import rundir

_BACKBONE_ATTR = "kft_backbone"
_SIZE_ATTR = "kft_image_size"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path beside `path`; renames it onto `path` if the block succeeds.

    The file at `path` is never written in place: a failure (a full disk in the middle of an
    HDF5 write, say) leaves the old file as it was, removes the temporary one and raises an
    OSError naming `path` (not the temporary name).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        rundir.default_mode(tmp)  # mkstemp made it 0600; a plain open() follows the umask.
        os.replace(tmp, path)
    except OSError as e:
        named = _write_error(e, path)
        if named is None:
            raise
        raise named from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# HDF5 reports a failed write as an OSError without errno, its C errno inside a paragraph.
_ERRNO_WORDS = ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "Disk quota"), (errno.EFBIG, "File too large"))


def _write_error(error: OSError, path: str) -> OSError | None:
    """`error` as an OSError with its errno, short reason and `path`; None if it has no errno."""
    code = error.errno
    if code is None:
        code = next((number for number, words in _ERRNO_WORDS if words in str(error)), None)
    return OSError(code, os.strerror(code), path) if code else None


def remove_temporaries(directory: str) -> None:
    """Deletes the `.tmp-*` files and directories an interrupted write left in `directory`."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """Writes JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_json_or_fail(path: str, what: str = "file"):
    """`read_json`, with a truncated or corrupt file reported as one line naming it.

    Raises:
      ValueError: the file cannot be read or is not JSON.
    """
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{what} {path} is unreadable or corrupt ({_reason(e)}); remove it, or rerun with --overwrite to start over"
        ) from None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def save_model_weights(model: keras.Model, path: str) -> None:
    """Saves a model's weights (`.weights.h5`) atomically."""
    with atomic_path(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)


def load_model_weights(model: keras.Model, path: str) -> None:
    """Loads a `.weights.h5` file kft wrote into `model`.

    Raises:
      ValueError: one line naming the file, if it is missing, truncated or corrupt.
    """
    try:
        model.load_weights(path)
    except Exception as e:  # h5py and Keras raise several types for a damaged file.
        raise ValueError(
            f"{path} cannot be loaded ({_reason(e)}); it is truncated or corrupt: rerun with --overwrite to train again"
        ) from None


def save_backbone_weights(backbone: keras.Model, backbone_name: str, image_size: int, path: str) -> None:
    """Saves backbone weights tagged with the backbone name and input size, for `--weights=PATH`."""
    with atomic_path(path, suffix=".weights.h5") as tmp:
        backbone.save_weights(tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs[_BACKBONE_ATTR] = backbone_name
            f.attrs[_SIZE_ATTR] = image_size


def load_backbone_weights(backbone: keras.Model, backbone_name: str, image_size: int, path: str) -> None:
    """Loads a backbone weights file, checking it was written for this backbone.

    Args:
      backbone: the freshly built backbone.
      backbone_name: its keras.applications class name.
      image_size: its input size (weights of a convolutional backbone transfer across sizes;
        the size is reported, not enforced, unless the weights themselves differ).
      path: a `.weights.h5` file written by kft (or by Keras for this architecture).

    Raises:
      ValueError: one line naming the file and the mismatch.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--weights={path}: no such file; allowed: imagenet, none, or a backbone.weights.h5 file")
    try:
        with h5py.File(path, "r") as f:
            saved_name = f.attrs.get(_BACKBONE_ATTR)
            saved_size = f.attrs.get(_SIZE_ATTR)
    except OSError:
        raise ValueError(f"--weights={path}: not an HDF5 weights file") from None
    if saved_name is not None and str(saved_name) != backbone_name:
        raise ValueError(f"--weights={path} holds {saved_name} weights, but --backbone={backbone_name}")
    try:
        if path.endswith(".weights.h5"):
            backbone.load_weights(path)
        else:
            # Keras picks the reader by the file name: another name would be read as a legacy
            # .h5 model ("0 saved layers"), so read it under the name Keras expects.
            with tempfile.TemporaryDirectory() as tmp:
                alias = os.path.join(tmp, "backbone.weights.h5")
                os.symlink(os.path.abspath(path), alias)
                backbone.load_weights(alias)
    except Exception as e:  # Keras raises several types for a structure mismatch.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        size = f" (saved at image_size {int(saved_size)})" if saved_size is not None else ""
        raise ValueError(
            f"--weights={path} does not fit {backbone_name} at image_size {image_size}{size}: {detail}"
        ) from None


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Saves named arrays to `.npz` atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file kft wrote (never unpickled).

    Raises:
      ValueError: one line naming the file, if it is truncated or corrupt.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is truncated or corrupt ({_reason(e)}); remove it, or rerun with --overwrite to start over"
        ) from None


class ResumeCheckpoints:
    """`MODEL_DIR/ckpt/epoch-N` directories holding everything needed to continue a run."""

    def __init__(self, model_dir: str, keep: int = 2):
        self.root = os.path.join(model_dir, "ckpt")
        self.keep = keep
        # A run owns its directory: temporaries here were left by a killed earlier invocation.
        remove_temporaries(model_dir)
        remove_temporaries(self.root)

    def save(self, index: int, model: keras.Model, optimizer: keras.optimizers.Optimizer | None, state: dict) -> None:
        """Writes checkpoint `index` (a running epoch count) and points `latest` at it; without an
        optimizer (after the probe stage) its state file is empty."""
        os.makedirs(self.root, exist_ok=True)
        final = os.path.join(self.root, f"epoch-{index}")
        tmp = tempfile.mkdtemp(dir=self.root, prefix=".tmp-")
        rundir.default_mode(tmp)  # mkdtemp made it 0700; mkdir follows the umask.
        try:
            model.save_weights(os.path.join(tmp, "model.weights.h5"))
            np.savez(
                os.path.join(tmp, "optimizer.npz"),
                **{f"v{i:05d}": v.numpy() for i, v in enumerate(optimizer.variables if optimizer else [])},
            )
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=2, sort_keys=True)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        write_text(os.path.join(self.root, "latest"), f"epoch-{index}\n")
        self._prune(index, self.keep)

    def _prune(self, newest: int, keep: int) -> None:
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            elif name.startswith("epoch-") and name[6:].isdigit() and int(name[6:]) <= newest - keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def finish(self) -> None:
        """Keeps only the newest checkpoint of a finished run: the one before it is a fallback
        for a newest one cut off mid-write, and this one is checked complete first. The newest
        stays, so rerunning with a longer --stages continues from it. (A ResNet50 checkpoint
        with Adam's state is about 280 MB.)"""
        directory = self._latest_dir()
        if directory is not None:
            self._prune(int(os.path.basename(directory)[6:]), keep=1)

    def latest_state(self) -> dict | None:
        """The trainer state of the newest complete checkpoint, or None when there is none.

        Raises:
          ValueError: checkpoints exist but none of them is complete (one line).
        """
        directory = self._latest_dir()
        return read_json(os.path.join(directory, "state.json")) if directory else None

    def _numbered(self) -> list[tuple[int, str]]:
        """(N, path) of every `epoch-N` directory, newest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            if name.startswith("epoch-") and name[6:].isdigit():
                found.append((int(name[6:]), os.path.join(self.root, name)))
        return sorted(found, reverse=True)

    @staticmethod
    def _problem(directory: str) -> str | None:
        """Why a checkpoint directory cannot be resumed from, or None if it is complete."""
        try:
            state = read_json(os.path.join(directory, "state.json"))
            if not isinstance(state, dict):
                return "state.json holds no state"
            with h5py.File(os.path.join(directory, "model.weights.h5"), "r"):
                pass
            with np.load(os.path.join(directory, "optimizer.npz"), allow_pickle=False) as arrays:
                _ = arrays.files  # Reads the zip directory at the end: a truncated file fails here.
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            return _reason(e)
        return None

    def _latest_dir(self) -> str | None:
        """The newest complete checkpoint: `ckpt/latest` is only a hint (a run killed between
        finishing `epoch-N` and updating it, or a lost `latest`, must not lose epoch N), and an
        incomplete or corrupt checkpoint falls back to the one before it."""
        numbered = self._numbered()
        problems = []
        for _, directory in numbered:
            problem = self._problem(directory)
            if problem is None:
                if problems:
                    logging.warning(
                        "skipping unusable checkpoints (%s); resuming from %s", "; ".join(problems), directory
                    )
                return directory
            problems.append(f"{directory}: {problem}")
        if problems:
            raise ValueError(
                f"no complete resume checkpoint in {self.root} ({problems[0]}); rerun with "
                "--overwrite to start the run over"
            )
        return None

    def restore(self, model: keras.Model, optimizer: keras.optimizers.Optimizer | None) -> None:
        """Loads the newest checkpoint's weights and, if given, optimizer state (already built)."""
        directory = self._latest_dir()
        weights = os.path.join(directory, "model.weights.h5")
        try:
            model.load_weights(weights)
        except Exception as e:  # h5py and Keras raise several types for a damaged file.
            raise ValueError(
                f"checkpoint {weights} cannot be loaded ({_reason(e)}); rerun with --overwrite to start the run over"
            ) from None
        if optimizer is None:
            return
        saved = load_arrays(os.path.join(directory, "optimizer.npz"))
        if len(saved) != len(optimizer.variables):
            raise ValueError(
                f"checkpoint {directory} has {len(saved)} optimizer variables, this stage has "
                f"{len(optimizer.variables)}; was --optimizer or --stages changed?"
            )
        for i, variable in enumerate(optimizer.variables):
            variable.assign(saved[f"v{i:05d}"])
