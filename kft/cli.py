"""Shared plumbing for the `python -m kft.*` entry points: one-line errors, non-zero exits."""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_tensorflow_quietly() -> None:
    """Imports TF and Keras with stderr held back, replayed only if the import fails.

    TensorFlow's C++ runtime writes a few log lines at import, before TF_CPP_MIN_LOG_LEVEL
    takes effect; they would bury a one-line error about a bad flag.
    """
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_import_tensorflow_quietly()

from absl import app, flags  # noqa: E402


class UsageError(Exception):
    """Bad input found before any work: printed as one line, exit status 2."""


def _program(argv: list[str]) -> str:
    """The entry point's name as the user typed it: kft.train, kft.tune, ..."""
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    return main_module.name if main_module else os.path.basename(argv[0] if argv else "kft")


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    prog = _program(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # absl's own message names the flag and the value; keep it to one line.
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def fail(message: str, status: int) -> None:
    """Ends the program with one line, `PROGRAM: error: message`, and exit `status`."""
    print(f"{_program(sys.argv)}: error: {message}", file=sys.stderr)
    sys.exit(status)


def run(main) -> None:
    """Runs `main(argv)` under absl with flag errors and UsageError as one line and exit 2."""

    def guarded(argv):
        try:
            return main(argv)
        except UsageError as e:
            fail(str(e), 2)

    app.run(guarded, flags_parser=_parse_flags_or_exit)
