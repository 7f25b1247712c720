"""What kft owns on disk and how it shares it: the run marker, locks, `--overwrite`, file modes.

A directory is kft's when it holds the marker file `.kft-run` (written first, before any other
file of a run or search) or, for runs written before the marker existed, a `flags.cfg` that
kft wrote. `--overwrite` removes only the names kft writes in such a directory, and refuses a
directory that holds anything else. One process at a time works in a run, tune or export
directory: each holds an exclusive `flock` on a lock file there, which the kernel releases when
the process ends, however it ends (kill -9 included), so a lock is never left stuck.

Files and directories kft creates follow the umask, as `open()` and `mkdir` do: temporary files
(0600) and directories (0700) are given the modes a plain `open`/`mkdir` would have given them
before they are renamed into place, so TF Serving or a teammate can read what kft writes.
"""

import fcntl
import json
import os
import shutil
import threading
import time

from kft import __version__

MARKER = ".kft-run"
LOCK = ".kft-lock"
# An export base is locked as a directory (flock on it), adding no file TF Serving would see.
EXPORT_LOCK = None

# Names kft.train writes in MODEL_DIR (kft.trainer, kft.experiment, kft.tflite, kft.evaluate,
# kft.lr_find). `--overwrite` removes these and nothing else.
RUN_NAMES = frozenset(
    {
        MARKER,
        LOCK,
        "flags.cfg",
        "run.json",
        "metrics.json",
        "classes.json",
        "model.weights.h5",
        "backbone.weights.h5",
        "anchors.npz",
        "delta_attention.npz",
        "ckpt",
        "tb",
        "export",
        "tflite",
        "pretrain",
        "scratch",
        "eval",
        "lr_find",
    }
)
# Names kft.tune writes in TUNE_DIR (kft.search_files).
TUNE_NAMES = frozenset(
    {
        MARKER,
        LOCK,
        "search.json",
        "oracle",
        "trials",
        "pretrain",
        "tb",
        "trials.csv",
        "best.cfg",
        "best",
    }
)
# Names a run may hold before its marker: what kft.lr_find and kft.evaluate write into a
# MODEL_DIR that has not trained yet.
_UNMARKED_NAMES = frozenset({"lr_find", "eval", LOCK})
_TMP_PREFIX = ".tmp-"

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read without changing it for other threads)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(path: str) -> None:
    """Gives `path` the mode `open()` (files) or `mkdir` (directories) would have: 0666 or
    0777 minus the umask. For what tempfile.mkstemp (0600) and mkdtemp (0700) create."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())


def default_modes_under(root: str) -> None:
    """`default_mode` for `root` and everything below it."""
    default_mode(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            default_mode(os.path.join(dirpath, name))


class Busy(ValueError):
    """Another process holds the directory's lock."""


def _is_marked(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _legacy_kft_run(path: str, kind: str) -> bool:
    """A run (or search) kft wrote before it wrote markers."""
    if kind == "tune":
        return os.path.isfile(os.path.join(path, "search.json"))
    flags_cfg = os.path.join(path, "flags.cfg")
    if not os.path.isfile(flags_cfg):
        return False
    with open(flags_cfg, errors="replace") as f:
        return f.readline().startswith("# Resolved kft.train flags")


def _entries(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def check_owned(path: str, flag: str, kind: str = "run", overwrite: bool = False) -> None:
    """Checks that kft may work in `path` (reads only): missing, empty, or kft's own.

    Args:
      path: the directory.
      flag: how the user named it, e.g. "--model_dir=runs/r50", for messages.
      kind: "run" (kft.train) or "tune" (kft.tune).
      overwrite: whether `remove_owned` will be asked to clear it.

    Raises:
      ValueError: one line: `path` is a file, or holds files kft did not write.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} is a file, not a directory")
    names = _entries(path)
    if not names:
        return
    own = RUN_NAMES if kind == "run" else TUNE_NAMES
    what = "kft run" if kind == "run" else "kft search"
    if not (_is_marked(path) or _legacy_kft_run(path, kind)):
        if all(name in _UNMARKED_NAMES or name.startswith(_TMP_PREFIX) for name in names) and kind == "run":
            return
        raise ValueError(
            f"{flag} is not empty and holds no {what} (no {MARKER}): kft never writes into or "
            f"deletes a directory it did not create; use a new or empty directory"
        )
    if overwrite:
        foreign = [name for name in names if name not in own and not name.startswith(_TMP_PREFIX)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(
                f"{flag}: --overwrite refused, the directory holds files kft did not write "
                f"({shown}); move them out or use another directory"
            )


# What a run has produced; a run that holds any of them resumes from a checkpoint or not at all.
RESULT_NAMES = ("model.weights.h5", "backbone.weights.h5", "metrics.json")


def check_resumable(path: str, flag: str) -> None:
    """Refuses a run directory holding results but no resume checkpoint (`ckpt/` deleted or
    lost): training it again from the start would silently replace them.

    Raises:
      ValueError: one line naming the results and the missing checkpoint directory.
    """
    results = [name for name in RESULT_NAMES if os.path.exists(os.path.join(path, name))]
    if not results:
        return
    ckpt = os.path.join(path, "ckpt")
    if any(name.startswith("epoch-") and name[6:].isdigit() for name in _entries(ckpt)):
        return  # kft.checkpoint resumes from the newest complete one, or refuses.
    raise ValueError(
        f"{flag} holds {', '.join(results)} but no resume checkpoint ({ckpt} is missing "
        "or empty); kft will not train over those results from the start: pass "
        "--overwrite to train again, or use another --model_dir"
    )


def remove_owned(path: str, kind: str = "run") -> list[str]:
    """Removes what kft wrote in `path` (a directory `check_owned` accepted), except its lock.

    Returns:
      The names removed.
    """
    own = RUN_NAMES if kind == "run" else TUNE_NAMES
    removed = []
    for name in _entries(path):
        if name == LOCK or not (name in own or name.startswith(_TMP_PREFIX)):
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
        removed.append(name)
    return removed


def mark(path: str, kind: str = "run") -> None:
    """Writes the marker that makes `path` kft's (once; an existing marker is kept)."""
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        return
    os.makedirs(path, exist_ok=True)
    from kft import checkpoint  # checkpoint imports this module.

    checkpoint.write_text(marker, json.dumps({"kft_version": __version__, "kind": kind}) + "\n")


class DirLock:
    """An exclusive flock on `path/name`, held until `release()` or the process ends."""

    def __init__(self, path: str, flag: str, name: str = LOCK, wait: float = 0.0):
        """Takes the lock, waiting up to `wait` seconds for another holder to finish.

        Raises:
          Busy: one line, if another process still holds it.
          OSError: the directory cannot be created or written.
        """
        os.makedirs(path, exist_ok=True)
        # name=None locks the directory itself and adds no file to it (an export base, which
        # TF Serving lists).
        self.file = os.path.join(path, name) if name else path
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666) if name else os.open(path, os.O_RDONLY)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                os.close(fd)
                holder = _read_holder(self.file)
                waited = f" (waited {wait:.0f}s)" if wait else ""
                raise Busy(
                    f"{flag} is in use by another kft process{holder}{waited}; wait for it "
                    "to finish or use another directory"
                ) from None
        self.fd = fd
        if name:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # Closing the descriptor releases the flock.
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(path: str) -> str:
    if os.path.isdir(path):
        return ""
    try:
        with open(path) as f:
            pid = f.read().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def is_inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies below it, after resolving links and relative parts."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_writable_dir(path: str, flag: str) -> None:
    """Checks `path` is a directory kft can create or write, without creating anything.

    Raises:
      ValueError: one line naming `flag`.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} is not writable: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} is not writable: no write permission on {probe}")


def absolute_path_value(name: str, value: str, resolve=os.path.abspath) -> str:
    """A path-valued flag's value with its path made absolute (`resolve`), so a flags.cfg read
    from another directory names the same data; other values unchanged. Used by kft.train's
    resume check and kft.tune's search record alike."""
    if name in ("dataset", "pretrain_dataset") and value.startswith("folder:"):
        return "folder:" + resolve(os.path.expanduser(value[len("folder:") :].strip()))
    if (name == "weights" and value not in ("imagenet", "none")) or (name == "data_dir" and value):
        return resolve(os.path.expanduser(value))
    return value
