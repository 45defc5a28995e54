"""Errors a verb reports to the operator, and the exit code of every error a verb lets out.

Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 the vault holds damaged
data, 4 the key does not open the vault.
"""

from __future__ import annotations

from procserver.supervisor import TaskCrashedError
from siterecovery.tomlconfig import ConfigError
from vault.errors import AmbiguousPointError, IntegrityError, VaultError, WrongKeyError
from wire.protocol import ProtocolError, RemoteError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CORRUPT, EXIT_KEY = 0, 1, 2, 3, 4


class CliError(Exception):
    """A failure with a message for the operator (exit code 1)."""

    code = EXIT_FAIL


class UsageError(CliError):
    """The command line was wrong (exit code 2)."""

    code = EXIT_USAGE


def exit_code(e: BaseException) -> int | None:
    """The exit code for an error a verb raised, printed as ``error: <e>``; None for an
    error that is a bug (let it show its traceback)."""
    if isinstance(e, CliError):
        return e.code
    if isinstance(e, ConfigError):
        return EXIT_USAGE
    if isinstance(e, WrongKeyError):
        return EXIT_KEY
    if isinstance(e, IntegrityError):
        return EXIT_CORRUPT
    if isinstance(e, AmbiguousPointError):
        return EXIT_USAGE  # the operator must say more: --machine, a longer id
    if isinstance(e, (VaultError, OSError, ProtocolError, RemoteError, TaskCrashedError)):
        return EXIT_FAIL
    return None
