"""The one exception type that means "the user can fix this".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a data record, a model path. The message names where and how to fix."""


def where(path, line: int | None = None) -> str:
    """`FILE:LINE` prefix for messages about a location in a user's file."""
    return f"{path}:{line}" if line is not None else str(path)
