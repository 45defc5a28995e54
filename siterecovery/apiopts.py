"""How a verb reaches the configuration server's admin API from its command line
(``--api``, ``--token-file``, ``--json``), and the call-then-print shape most of those
verbs share."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.apiclient import DEFAULT_API, ApiClient
from siterecovery.datadir import default_data_dir
from siterecovery.errors import CliError, UsageError
from siterecovery.output import show


def add_api_args(p: argparse.ArgumentParser) -> None:
    """``--api``, ``--token-file``, ``--json`` for a verb that calls the admin API."""
    p.add_argument("--api", default=os.environ.get("SITERECOVERY_API", DEFAULT_API),
                   help="configuration server admin URL (default: $SITERECOVERY_API or "
                        "%(default)s)")
    p.add_argument("--token-file",
                   help="admin token file (default: $SITERECOVERY_TOKEN_FILE, else "
                        "DATA_DIR/configserver/api-token)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def token_path(args: argparse.Namespace) -> Path:
    """--token-file, else $SITERECOVERY_TOKEN_FILE, else the embedded installation's
    DATA_DIR/configserver/api-token."""
    return Path(args.token_file or os.environ.get("SITERECOVERY_TOKEN_FILE")
                or Path(default_data_dir()) / "configserver" / "api-token")


def token_given(args: argparse.Namespace) -> bool:
    """Whether a token file is named (option, environment) or the default one exists."""
    return bool(args.token_file or os.environ.get("SITERECOVERY_TOKEN_FILE")) or \
        token_path(args).exists()


def token_from(args: argparse.Namespace) -> str:
    """The admin token (``token_path``); a CliError if unreadable or empty."""
    path = token_path(args)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CliError(f"cannot read the admin token: {e}\n"
                       "hint: pass --token-file (the configuration server writes "
                       "DATA_DIR/configserver/api-token at first start)") from None
    except UnicodeDecodeError:
        raise UsageError(f"the admin token file {path} is not a token (it is not text)\n"
                         "hint: pass the configuration server's DATA_DIR/configserver/"
                         "api-token") from None
    if not token:
        raise CliError(f"the admin token file {path} is empty")
    return token


def client(args: argparse.Namespace) -> ApiClient:
    """A client for the server and token the command line names (use ``async with``)."""
    return ApiClient(args.api, token_from(args))


async def call(args: argparse.Namespace, method: str, path: str, body: Any = None,
               **params: Any) -> Any:
    """One admin-API call; its JSON answer. A refusal raises ApiCallError, a CliError
    with the server's message and hint (exit 2 for 400/404/409/422: a name that does
    not exist, a conflict; else 1). A POST without ``body`` sends ``{}``."""
    if body is None and method == "POST":
        body = {}
    async with client(args) as api:
        return await api.call(method, path, body, params)


async def call_and_show(args: argparse.Namespace, method: str, path: str,
                        render: Callable[[Any], str], body: Any = None, **params: Any) -> int:
    """``call``, then print the answer: as JSON with --json, else ``render(answer)``."""
    doc = await call(args, method, path, body, **params)
    return show(doc, args, render(doc))
