"""The one exception type for mistakes a user can make (bad data, bad flags, unknown names)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits 2."""


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception message (at most `limit` characters), or its type's name when
    the message is empty: the reason a one-line UserError quotes."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def last_line(text: str, limit: int = 500) -> str:
    """The last non-blank line of a traceback (the exception itself), at most `limit` characters, or "failed":
    the one-line error cell of trials.csv."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else "failed"
