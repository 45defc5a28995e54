"""Errors a verb reports to the operator: a message and an exit code."""

from __future__ import annotations


class CliError(Exception):
    """A failure with a message for the operator (exit code 1)."""

    code = 1


class UsageError(CliError):
    """The command line was wrong (exit code 2)."""

    code = 2
