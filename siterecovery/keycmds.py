"""``siterecovery vault key ...``: list, add, remove and change the vault's key slots.

New passphrases, like every passphrase (siterecovery/vaultopts.py), are read from a
file or an environment variable, never from the command line, and never printed.
"""

from __future__ import annotations

import argparse
import os

from siterecovery.errors import CliError, UsageError
from siterecovery.output import add_json_arg, show
from siterecovery.vaultopts import (
    MIN_PASSPHRASE,
    add_vault_args,
    open_vault,
    read_secret,
    vault_url,
)
from vault.keys import SlotInfo, add_slot, change_passphrase, list_slots, remove_slot
from vault.keyslots import KeyMaterial, new_keyfile

KEY_HELP = (
    "Manage the key slots that unlock a vault. Each slot holds the vault's master key "
    "wrapped by one key-encryption key (KEK): a key file or a passphrase; any slot's key "
    "opens the vault. These commands rotate KEKs only: they re-wrap the master key, which "
    "stays the same, and never re-encrypt data. A removed key file or passphrase no longer "
    "opens the vault as it is stored now, but whoever copied the old slot object with its "
    "key, or the master key, can still read it: to shut out a leaked master key, create a "
    "new vault and replicate again. Every command authenticates with an existing key "
    "(--key-file, --passphrase-file or --passphrase-env).")


def _new_passphrase(args: argparse.Namespace) -> str | None:
    """The new passphrase ``--new-passphrase-file`` / ``--new-passphrase-env`` give."""
    return read_secret(args.new_passphrase_file, args.new_passphrase_env,
                       "--new-passphrase-file and --new-passphrase-env", new=True)


def _new_key(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The key 'vault key add' adds: ``(new passphrase, None)`` or ``(None, new key file
    path)``; checked before the vault is opened, so a usage error costs no KDF run."""
    secret = _new_passphrase(args)
    if args.new_key_file:
        if secret is not None:
            raise UsageError("give one new key: --new-key-file or a new passphrase, not both")
        path = str(args.new_key_file)
        if os.path.exists(path):
            raise CliError(f"key file {path} already exists; refusing to overwrite it "
                           "(a new slot gets a new key file)")
        return None, path
    if secret is None:
        raise UsageError("give the new key: --new-key-file FILE, --new-passphrase-file FILE "
                         "or --new-passphrase-env VAR")
    return secret, None


def _kdf_text(s: SlotInfo) -> str:
    if s.kdf.get("name") == "scrypt":
        return f"scrypt n={s.kdf['n']} r={s.kdf['r']} p={s.kdf['p']}"
    return str(s.kdf.get("name", "-"))


async def cmd_key_list(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        slots = await list_slots(v)
    finally:
        await v.close()
    lines = [f"{'SLOT':<16}  {'KIND':<10}  {'KDF':<24}  CREATED (UTC)"]
    for s in slots:
        note = "  (used to open the vault now)" if s.in_use else ""
        if s.error:
            note += f"  {s.error}"
        lines.append(f"{s.slot:<16}  {s.kind:<10}  {_kdf_text(s):<24}  "
                     f"{s.created or '-':<27}{note}".rstrip())
    return show({"vault": vault_url(args), "vault_id": v.config.vault_id,
                 "slots": [s.to_json() for s in slots]}, args, "\n".join(lines))


async def cmd_key_add(args: argparse.Namespace) -> int:
    secret, key_path = _new_key(args)
    v = await open_vault(args)
    try:
        if key_path is not None:
            km = KeyMaterial(keyfile=new_keyfile(key_path))
            try:
                slot = await add_slot(v, km)
            except BaseException:
                # Without its slot the file opens nothing. (A slot stored without the
                # confirmation is an extra slot nobody can open; 'remove' deletes it.)
                os.unlink(key_path)
                raise
        else:
            slot = await add_slot(v, KeyMaterial(passphrase=secret))
    finally:
        await v.close()
    return show({"added": slot.to_json(), "key_file": key_path}, args,
                f"added key-file slot {slot.slot}; key file: {key_path} (keep a copy off-site)"
                if key_path is not None else f"added passphrase slot {slot.slot}")


async def cmd_key_remove(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        removed = await remove_slot(v, args.slot, force=args.force)
        left = await list_slots(v)
    finally:
        await v.close()
    return show({"removed": removed.to_json(), "remaining": [s.to_json() for s in left]}, args,
                f"removed {removed.kind} slot {removed.slot}; {len(left)} key slot(s) left. "
                "Its key no longer opens the vault; the master key is unchanged.")


async def cmd_key_passwd(args: argparse.Namespace) -> int:
    secret = _new_passphrase(args)
    if secret is None:
        raise UsageError("give the new passphrase: --new-passphrase-file FILE or "
                         "--new-passphrase-env VAR")
    v = await open_vault(args)
    try:
        new, old = await change_passphrase(v, secret, args.slot)
    finally:
        await v.close()
    return show({"added": new.to_json(), "removed": old.to_json()}, args,
                f"passphrase changed: new passphrase slot {new.slot}, removed slot {old.slot}")


def _new_passphrase_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-passphrase-file", metavar="FILE",
                   help="read the new passphrase from FILE (a trailing newline is dropped; "
                        f"at least {MIN_PASSPHRASE} characters)")
    p.add_argument("--new-passphrase-env", metavar="VAR",
                   help="read the new passphrase from environment variable VAR")


def register_under(vsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``key ...`` under the ``vault`` command's subcommands."""
    kp = vsub.add_parser("key", help="list, add, remove and change vault keys (KEK rotation)",
                         description=KEY_HELP)
    ksub = kp.add_subparsers(dest="key_cmd", required=True)

    def verb(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ksub.add_parser(
            name, help=summary, description=f"{description} {KEY_HELP}")
        add_vault_args(p)  # --vault, --key-file, --passphrase-file/-env, --data-dir
        return p

    ls = verb("list", "list the key slots",
              "List the vault's key slots: id, kind (key file or passphrase), KDF "
              "parameters and creation time (slots made before it was recorded show '-').")
    add_json_arg(ls)
    ls.set_defaults(func=cmd_key_list)

    add = verb("add", "add a key file or passphrase slot",
               "Add a key slot: a new key file (created, mode 0600; refuses to overwrite) or "
               "a new passphrase, wrapping the same master key.")
    add.add_argument("--new-key-file", metavar="FILE", help="create this key file for the slot")
    _new_passphrase_args(add)
    add_json_arg(add)
    add.set_defaults(func=cmd_key_add)

    rm = verb("remove", "remove a key slot",
              "Remove a key slot, so its key file or passphrase no longer opens the vault. "
              "Refuses to remove the last usable slot, and the slot that the key given to "
              "this command opens unless --force.")
    rm.add_argument("slot", metavar="SLOT", help="slot id (or a unique prefix), from 'list'")
    rm.add_argument("--force", action="store_true",
                    help="remove the slot even if it is the one this command was opened with")
    add_json_arg(rm)
    rm.set_defaults(func=cmd_key_remove)

    pw = verb("passwd", "change a passphrase",
              "Change a passphrase: add a slot for the new passphrase, then remove the old "
              "passphrase's slot, in that order, so an interruption leaves both working, "
              "never neither. Give the old passphrase with --passphrase-file/--passphrase-env "
              "(or open with a key file and name the passphrase slot with --slot).")
    _new_passphrase_args(pw)
    pw.add_argument("--slot", help="the passphrase slot to replace (default: the one the "
                                   "given passphrase opens)")
    add_json_arg(pw)
    pw.set_defaults(func=cmd_key_passwd)
