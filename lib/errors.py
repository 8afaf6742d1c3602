"""User-facing errors and the command-line wrapper that turns them into one clear line."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input (a file, an argument): shown as one line, never a traceback."""


class DataError(UserError):
    """A dataset file is missing, malformed or corrupt; the message names the file (and line)."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line `main`, turning UserError (and Ctrl-C) into one line on stderr and an exit code.

    `--debug` anywhere in argv (or LIB_DEBUG=1) re-raises so the full traceback shows.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LIB_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lib"
    try:
        return int(main(args) or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
