"""What every command shares: a user error is one line on stderr starting with `error:`, and exit status 2;
a closed pipe (`| head`) ends the command quietly, with exit status 0."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from trainables.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (`error: ...`) and exit status 2, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; print a `UserError` as `error: <message>` and return 2 (130 on Ctrl-C); a reader
    that went away (`| head`) ends the command with 0 and no traceback."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not broken_pipe(err):
            raise
        quiet_stdout()
        return 0


def broken_pipe(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from (Ray wraps what a callback raised), is a closed pipe."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BrokenPipeError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again
    (the recipe of Python's documentation of SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
