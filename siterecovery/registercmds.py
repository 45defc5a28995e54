"""CLI verbs: registration with a vault (``register``, ``vault registration-key``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from siterecovery.apiopts import add_api_args, call
from siterecovery.errors import CliError, UsageError
from siterecovery.output import add_json_arg, show
from siterecovery.vaultopts import add_vault_args, open_vault, vault_url
from vault.regkey import VALID_DAYS, make_key, write_key


async def cmd_registration_key(args: argparse.Namespace) -> int:
    if not 1 <= args.valid_days <= VALID_DAYS:
        raise UsageError(f"--valid-days must be 1-{VALID_DAYS}")
    url = vault_url(args)
    v = await open_vault(args)
    try:
        key = make_key(v, url, time.time(), args.valid_days)
    finally:
        await v.close()
    write_key(args.out, key)
    doc = {"key_file": str(args.out), "vault_id": key["vault_id"], "vault_url": url,
           "key_id": key["key_id"], "issued": key["issued"], "expires": key["expires"]}
    return show(doc, args, f"registration key for vault {key['vault_id']} written to "
                           f"{args.out} (valid until {key['expires']})\n"
                           f"register the configuration server with it: siterecovery "
                           f"register --key-file {args.out}")


def _status_text(doc: dict[str, Any]) -> str:
    if not doc["registered"]:
        return "not registered with a vault (siterecovery register --key-file FILE)"
    skew = doc["skew_seconds"]
    clock = "not checked (no reference clock)" if skew is None else \
        f"{skew:+.1f} s from the storage service"
    return (f"registered with vault {doc['vault_id']}\n"
            f"  store          {doc['vault_url']}\n"
            f"  vault key      {doc['vault_key_file']}\n"
            f"  registered at  {doc['registered_at']} (key {doc['key_id']}, "
            f"valid until {doc['key_expires']})\n"
            f"  clock          {clock}")


async def cmd_register(args: argparse.Namespace) -> int:
    if args.status:
        if args.vault_key or args.vault:
            raise UsageError("--status takes no --vault-key or --vault")
        doc = await call(args, "GET", "/api/v1/registration")
        return show(doc, args, _status_text(doc))
    try:
        text = Path(args.key_file).read_text()
    except OSError as e:
        raise CliError(f"cannot read the registration key file: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{args.key_file} is not a registration key file (it is not text); "
                         "make one with 'siterecovery vault registration-key'") from None
    body: dict[str, Any] = {"key": text}
    if args.vault_key:
        body["vault_key_file"] = str(Path(args.vault_key).resolve())
    if args.vault:
        body["vault_url"] = args.vault
    doc = await call(args, "POST", "/api/v1/registration", body)
    if not args.json:
        for w in doc["warnings"]:
            print(f"warning: {w}")
    return show(doc, args, _status_text(doc))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``register`` to the top-level subparsers."""
    rp = sub.add_parser(
        "register", help="register the configuration server with a vault",
        description="Register the configuration server with the vault a registration key "
                    "file names ('siterecovery vault registration-key'). Refused, with "
                    "nothing recorded, when the key is malformed, expired (keys are valid "
                    f"for {VALID_DAYS} days), forged or from another vault, or when this "
                    "machine's clock differs from the storage service's by more than 5 "
                    "minutes. --status shows the registration.")
    what = rp.add_mutually_exclusive_group(required=True)
    what.add_argument("--key-file", help="the registration key file")
    what.add_argument("--status", action="store_true", help="show the current registration")
    rp.add_argument("--vault-key",
                    help="the vault's key file on the configuration server (default: its "
                         "vault_key_file setting); only its path is stored")
    rp.add_argument("--vault", help="reach the vault's store by this URL instead of the one in "
                                    "the key (e.g. another credentials file)")
    add_api_args(rp)
    rp.set_defaults(func=cmd_register)


def register_under(vsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``registration-key`` under the ``vault`` command's subcommands."""
    rk = vsub.add_parser(
        "registration-key", help="make a registration key file for a configuration server",
        description="Write a registration key file that names this vault and its store, "
                    f"valid for {VALID_DAYS} days, authenticated with the vault's key (an "
                    "HMAC-SHA256 only a holder of the key can make). Give it to "
                    "'siterecovery register --key-file FILE' on the configuration server. "
                    "Written with mode 0600.")
    add_vault_args(rk)
    rk.add_argument("--out", required=True, help="the key file to write")
    rk.add_argument("--valid-days", type=int, default=VALID_DAYS,
                    help=f"days the key is valid (1-{VALID_DAYS}; default %(default)s)")
    add_json_arg(rk)
    rk.set_defaults(func=cmd_registration_key)
