"""Shared plumbing for the `python -m kft.*` entry points: one-line errors, non-zero exits."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402


class UsageError(Exception):
    """Bad input found before any work: printed as one line, exit status 2."""


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    prog = os.path.basename(argv[0]) if argv else "kft"
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # absl's own message names the flag and the value; keep it to one line.
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """Runs `main(argv)` under absl with flag errors and UsageError as one line and exit 2."""

    def guarded(argv):
        try:
            return main(argv)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=_parse_flags_or_exit)
