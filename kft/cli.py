"""Shared plumbing for the `python -m kft.*` entry points: one-line errors, non-zero exits."""

import errno
import math
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _held_stderr(step, keep_line=None) -> None:
    """Runs `step()` with stderr (fd 2, C++ included) held back; replayed in full if it raises,
    else only the lines `keep_line` accepts (none without it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            step()
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if keep_line is not None:
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True) if keep_line(line)]
            sys.stderr.write("".join(kept))


def _not_a_missing_cuda_driver(line: str) -> bool:
    # The `tensorflow` wheel is built with CUDA; where NVIDIA's driver library is absent (every
    # CPU-only machine) listing the devices logs `failed call to cuInit: ... UNKNOWN ERROR (303)`
    # at error level. Any other message about the devices (a GPU machine's) is shown.
    return not ("failed call to cuInit" in line and "(303)" in line)


def _import_tensorflow_quietly() -> None:
    """Imports TF and Keras with stderr held back, replayed only if the import fails.

    TensorFlow's C++ runtime writes a few log lines at import, before TF_CPP_MIN_LOG_LEVEL
    takes effect, and one when it first looks for GPUs on a machine without any; they would
    bury a one-line error about a bad flag.
    """

    def import_them():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

    def list_devices():
        import tensorflow as tf

        tf.config.list_physical_devices()  # Cheap, and leaves the runtime unconfigured.

    _held_stderr(import_them)
    _held_stderr(list_devices, keep_line=_not_a_missing_cuda_driver)


_import_tensorflow_quietly()

from absl import app, flags, logging  # noqa: E402

# The most characters of an error line, `kft.PROGRAM: error: ...` included: room for kft's own
# longest messages (a mistyped --backbone lists all 40 names: ~670 characters), not for dumps.
ERROR_LINE_LIMIT = 1000
_CUT = "... [cut; --verbosity=1 logs it all]"


class UsageError(Exception):
    """Bad input found before any work: printed as one line, exit status 2."""


def _program(argv: list[str]) -> str:
    """The entry point's name as the user typed it: kft.train, kft.tune, ..."""
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_module.name if main_module else os.path.basename(argv[0] if argv else "kft")


def _message_text(message: object) -> str:
    """str(message), or what can be said of it when that fails or says nothing."""
    try:
        text = str(message)
    except Exception:  # A broken __str__ must not hide the error being reported.
        text = ""
    if not text.strip() and isinstance(message, BaseException):
        text = type(message).__name__
    return text


def _printable(word: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in word)


def error_line(message: object, program: str | None = None, limit: int = ERROR_LINE_LIMIT) -> str:
    """`PROGRAM: error: MESSAGE` (`error: MESSAGE` without a program) as one line of at most
    `limit` characters, whatever MESSAGE holds: each run of whitespace (newlines included)
    becomes one space, other unprintable characters their escapes, and the end of a longer
    message is cut off with an ellipsis. Every error line the programs print is made here."""
    prefix = f"{program}: error: " if program else "error: "
    text = _message_text(message)
    budget = max(limit - len(prefix), len(_CUT))
    words, size, more = [], -1, False
    for match in re.finditer(r"\S+", text):
        if size >= budget:  # Already too long: one word more only tells that it goes on.
            more = True
            break
        word = _printable(match.group()[: budget + 1])  # A huge word is cut anyway.
        words.append(word)
        size += 1 + len(word)
    body = " ".join(words)
    if more or len(body) > budget:
        body = body[: budget - len(_CUT)].rstrip() + _CUT
    return prefix + body


def _exit_with_error(program: str, message: object, status: int, at_once: bool = False) -> None:
    """Logs the whole message (and the exception's traceback) at debug level, prints its one
    error line, and exits with `status`; `at_once` skips the interpreter's teardown."""
    text = _message_text(message)
    exc_info = message if isinstance(message, BaseException) else None
    logging.debug("%s: error, in full: %s", program, text, exc_info=exc_info)
    print(error_line(text, program), file=sys.stderr)
    if at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


# The command line as typed, before absl expands --flagfile (None when kft runs in-process).
_typed_argv: list[str] | None = None


def check_typed(name: str) -> None:
    """Refuses a boolean flag that deletes things (--overwrite) unless it was typed on the
    command line: a flagfile copied from someone else, or written by a tool, must never
    delete a run.

    Raises:
      UsageError: the flag is set, but only by a flagfile.
    """
    if _typed_argv is None or not flags.FLAGS[name].value:
        return
    if not any(
        arg in (f"--{name}", f"-{name}") or arg.startswith((f"--{name}=", f"-{name}=")) for arg in _typed_argv[1:]
    ):
        raise UsageError(
            f"--{name} was read from a flagfile; kft deletes files only when --{name} is typed on the command line"
        )


def _non_finite_flag() -> str | None:
    """`flag --NAME=VALUE: ...` for the first float flag whose value is NaN or infinite."""
    for name, flag in flags.FLAGS._flags().items():
        value = flag.value
        if isinstance(value, float) and not math.isfinite(value) and name == flag.name:
            return f"flag --{name}={value}: must be a finite number"
    return None


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    global _typed_argv
    _typed_argv = list(argv)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        # absl's own message names the flag and the value.
        _exit_with_error(_program(argv), e, 2)
    # Every entry point's numeric flags: NaN passes every comparison, so no range check
    # would catch it.
    problem = _non_finite_flag()
    if problem:
        _exit_with_error(_program(argv), problem, 2)
    return remaining


def define_export_image_size() -> None:
    """kft.evaluate's and kft.predict's --image_size."""
    flags.DEFINE_integer(
        "image_size",
        None,
        "Only for an export that does not record the size its model was trained at (older kft, away from its run directory): that size. Images are resized to the model's own size with the resize inside the model, so the probabilities are those a server fed the whole image returns; another size is refused.",
        lower_bound=8,
        upper_bound=2048,
    )


def fail(message: object, status: int) -> None:
    """Ends the program with one line, `PROGRAM: error: message` (see error_line), and exit
    `status`; the whole message, an exception's traceback included, is logged at debug level."""
    _exit_with_error(_program(sys.argv), message, status)


def disk_error_line(e: OSError) -> str:
    """The one line for a write the disk refused. HDF5 reports a full disk as an OSError without
    errno or filename, inside a paragraph naming both: those are what the line says."""
    text = str(e)
    reason = e.strerror or text
    if e.errno == errno.ENOSPC or "No space left" in text:
        reason = os.strerror(errno.ENOSPC)
    path = e.filename
    if not path:
        match = re.search(r"filename = '([^']+)'", text)
        path = match.group(1) if match else None
    where = f" writing {path}" if path else ""
    return (
        f"{reason}{where}; files are as the last complete checkpoint left them "
        "(free space or fix permissions, then rerun the same command to resume)"
    )


def run(main) -> None:
    """Runs `main(argv)` under absl with flag errors and UsageError as one line and exit 2."""

    def guarded(argv):
        try:
            return main(argv)
        except UsageError as e:
            fail(e, 2)
        except KeyboardInterrupt:
            # Ctrl-C is SIGTERM's twin: the last complete checkpoint is kept.
            fail(
                "interrupted; files are as the last complete checkpoint left them (rerun the same command to resume)",
                130,
            )
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES) or any(
                reason in str(e) for reason in ("No space left", "File too large", "Disk quota")
            ):
                logging.debug("the disk refused a write, in full:", exc_info=e)
                # At once: at teardown h5py flushes the files still open onto the full disk and
                # HDF5 aborts the process (seen: a run that had printed its error line then died
                # by a signal).
                _exit_with_error(_program(sys.argv), disk_error_line(e), 1, at_once=True)
            raise

    app.run(guarded, flags_parser=_parse_flags_or_exit)
