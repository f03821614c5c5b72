"""Exceptions that reach the error boundary in dispatch.py.

Failure carries the one line oned shows the operator. Anything else is a bug:
its traceback goes to the log file and the operator sees a short line.
"""


class Failure(Exception):
    """An action cannot be done; the message is the one line the operator sees."""

    exit_code = 1


class Invalid(Failure):
    """Input from a template, argv or config failed validation (nothing was run)."""


class NotSupported(Failure):
    """The driver does not implement this action."""


class UsageError(Exception):
    """Unknown program name or bad launcher arguments (exit 2)."""
