"""Errors a command reports as one line on stderr with exit code 2."""


class UsageError(Exception):
    """Bad command-line input (a missing file, a malformed token list)."""
