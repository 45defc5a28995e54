"""CLI verbs: push-install accounts (``siterecovery account add|list|show|update|remove``).

Secrets are read from files (or standard input with ``-``), never from the command
line, where other users could read them in the process list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from siterecovery.apiopts import add_api_args, call_and_show
from siterecovery.errors import UsageError
from siterecovery.output import table

COLUMNS = [("name", "NAME"), ("username", "USER"), ("kind", "KIND"),
           ("machines", "MACHINES"), ("updated", "UPDATED")]


def read_secret(args: argparse.Namespace) -> tuple[str, str] | None:
    """(kind, secret) from --password-file / --ssh-key-file, or None if neither."""
    path, kind = ((args.password_file, "password") if args.password_file
                  else (args.ssh_key_file, "ssh-key") if args.ssh_key_file else (None, ""))
    if path is None:
        return None
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {kind} from {path}: {e}") from None
    if kind == "password":  # the password is the first line, without its line break
        text = text.split("\n", 1)[0].removesuffix("\r")
        if not text:
            raise UsageError(f"the password file {path} is empty (the password is its "
                             "first line)")
    return kind, text


def describe(a: dict[str, Any]) -> str:
    return "\n".join([
        f"account:   {a['name']}",
        f"user:      {a['username']}",
        f"kind:      {a['kind']} (stored sealed; never shown)",
        f"key id:    {a['key_id'] or '-'}",
        f"machines:  {', '.join(a['machines']) or 'none'}",
        f"created:   {a['created']}",
        f"updated:   {a['updated']}",
    ])


async def cmd_add(args: argparse.Namespace) -> int:
    got = read_secret(args)
    assert got is not None  # the argument group is required
    kind, secret = got
    return await call_and_show(args, "POST", "/api/v1/accounts", describe,
                               {"name": args.name, "username": args.username, "kind": kind,
                                "secret": secret})


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/accounts", lambda doc: table(
        [{**a, "machines": ",".join(a["machines"]) or None} for a in doc["accounts"]],
        COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/accounts/{args.name}", describe)


async def cmd_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.username is not None:
        body["username"] = args.username
    got = read_secret(args)
    if got is not None:
        body["kind"], body["secret"] = got
    if not body:
        raise UsageError("nothing to change: give --username, --password-file or "
                         "--ssh-key-file")
    return await call_and_show(args, "PATCH", f"/api/v1/accounts/{args.name}", describe,
                               body)


async def cmd_remove(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"/api/v1/accounts/{args.name}",
                               lambda _: f"account {args.name} removed")


def _secret_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password ('-': standard input)")
    g.add_argument("--ssh-key-file", metavar="FILE",
                   help="unencrypted private key file, OpenSSH or PEM ('-': standard input)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    p = sub.add_parser("account", help="push-install accounts (SSH user + password or key)",
                       description="Accounts the process server uses to log in to a machine "
                                   "over SSH and install the Mobility agent. Secrets are "
                                   "sealed under the configuration server's secrets.key, "
                                   "never shown and never logged.")
    asub = p.add_subparsers(dest="account_cmd", required=True, metavar="VERB")
    a = asub.add_parser("add", help="add an account")
    a.add_argument("name", help="account name (what machines refer to)")
    a.add_argument("--username", required=True, help="user to log in as (root or sudoer)")
    _secret_options(a, required=True)
    a.set_defaults(func=cmd_add)
    ls = asub.add_parser("list", help="list accounts")
    ls.set_defaults(func=cmd_list)
    s = asub.add_parser("show", help="show one account (never its secret)")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    u = asub.add_parser("update", help="change the user name or rotate the secret")
    u.add_argument("name")
    u.add_argument("--username", help="new user name")
    _secret_options(u, required=False)
    u.set_defaults(func=cmd_update)
    r = asub.add_parser("remove", help="remove an account (refused while a machine uses it)")
    r.add_argument("name")
    r.set_defaults(func=cmd_remove)
    for verb in (a, ls, s, u, r):
        add_api_args(verb)
