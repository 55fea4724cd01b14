"""One exception type for every mistake a user can make.

The CLI prints an `AlignloopError` as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class AlignloopError(Exception):
    """A user-facing error: bad recipe, unknown model, missing file, offline hub download, ..."""
