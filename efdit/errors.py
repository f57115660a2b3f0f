"""One exception type for bad user input: the CLI prints its message on one line, no traceback."""


class EfditError(Exception):
    """A clear, user-facing error (bad input, missing file, wrong checkpoint shape, NaN loss)."""
