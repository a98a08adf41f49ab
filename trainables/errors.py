"""The one exception type for mistakes a user can make (bad data, bad flags, unknown names)."""


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits 2."""
