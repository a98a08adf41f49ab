"""What every command shares: a user error is one line on stderr and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from trainables.errors import UserError


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
