"""Errors that mean "bad input": the CLI prints them as one line and exits 2."""


class UsageError(ValueError):
    """Bad input (file, line, flag or field named in the message)."""


class TraceError(UsageError):
    """A malformed trace file: the message names file, line and field."""
