"""What every command shares: a user error is one line on stderr starting with `error:`, and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from trainables.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (`error: ...`) and exit status 2, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; print a `UserError` as `error: <message>` and return 2 (130 on Ctrl-C)."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
