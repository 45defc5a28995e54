"""How every vault verb names its vault and key on the command line: ``--vault``,
``--key-file``, ``--passphrase-file`` / ``--passphrase-env``, ``--data-dir``; and how it
turns them into a store URL, key material and an open vault.

Passphrases are read from a file or an environment variable, never from the command
line (where other users see it in the process list), and never printed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from siterecovery.errors import UsageError
from vault.keyslots import KeyMaterial, read_keyfile
from vault.repo import Vault
from vault.store.open import open_store

MIN_PASSPHRASE = 8
MAX_PASSPHRASE_FILE = 4096  # bytes; a passphrase is a line of text


def add_passphrase_args(p: argparse.ArgumentParser) -> None:
    """``--passphrase-file`` / ``--passphrase-env``: the vault passphrase, instead of (or
    with an explicit --key-file, as well as) the key file."""
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="read the vault passphrase from FILE (a trailing newline is dropped); "
                        "replaces the default key file unless --key-file is given too")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help="read the vault passphrase from environment variable VAR")


def add_vault_args(p: argparse.ArgumentParser) -> None:
    """``--vault``, ``--key-file``, the passphrase options and ``--data-dir``."""
    p.add_argument("--vault", help="vault URL, e.g. file:///srv/vault (default: DATA_DIR/vault)")
    p.add_argument("--key-file", help="vault key file (default: DATA_DIR/vault.key)")
    add_passphrase_args(p)
    p.add_argument("--data-dir", help="an embedded 'siterecovery serve' data directory")


def read_secret(file: str | None, env: str | None, flags: str, *, new: bool = False
                ) -> str | None:
    """A passphrase from ``file`` or environment variable ``env`` (at most one given);
    None if neither is. ``new``: it is about to protect a vault, so it must be at least
    MIN_PASSPHRASE characters. Every problem is a UsageError naming the source."""
    if file and env:
        raise UsageError(f"give one of {flags}, not both")
    if file:
        try:
            # Bounded: a mistaken path (a disk image, /dev/urandom) is not read whole.
            with open(file, "rb") as f:
                raw = f.read(MAX_PASSPHRASE_FILE + 1)
            if len(raw) > MAX_PASSPHRASE_FILE:
                raise UsageError(f"passphrase file {file} is larger than "
                                 f"{MAX_PASSPHRASE_FILE} bytes: is it the right file?")
            text = raw.decode()
        except OSError as e:
            raise UsageError(f"cannot read passphrase file {file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"passphrase file {file} is not UTF-8 text") from None
        text = text.removesuffix("\n").removesuffix("\r")
        source = f"passphrase file {file}"
    elif env:
        value = os.environ.get(env)
        if value is None:
            raise UsageError(f"environment variable {env} is not set")
        text, source = value, f"environment variable {env}"
    else:
        return None
    if not text:
        raise UsageError(f"the passphrase in {source} is empty")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"the passphrase in {source} is not valid UTF-8") from None
    if new and len(text) < MIN_PASSPHRASE:
        raise UsageError(f"the passphrase in {source} is shorter than {MIN_PASSPHRASE} "
                         "characters; a vault passphrase must resist guessing")
    return text


def passphrase(args: argparse.Namespace, *, new: bool = False) -> str | None:
    """The vault passphrase the command line gives, if any."""
    return read_secret(getattr(args, "passphrase_file", None),
                       getattr(args, "passphrase_env", None),
                       "--passphrase-file and --passphrase-env", new=new)


def _has_passphrase(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "passphrase_file", None) or getattr(args, "passphrase_env", None))


def vault_url(args: argparse.Namespace) -> str:
    """--vault; else, with --data-dir, the vault that data directory serves (its
    ``vault.url``, written by ``serve --vault``) or DATA_DIR/vault; else a UsageError."""
    if args.vault:
        return str(args.vault)
    if args.data_dir:
        d = Path(args.data_dir).resolve()
        try:
            return (d / "vault.url").read_text().strip() or f"file://{d / 'vault'}"
        except FileNotFoundError:
            return f"file://{d / 'vault'}"
    raise UsageError("give --vault and --key-file (and/or --passphrase-file or "
                     "--passphrase-env), or --data-dir of an embedded installation")


def key_file_path(args: argparse.Namespace, *, init: bool = False) -> str | None:
    """--key-file; else DATA_DIR/vault.key with --data-dir, unless a passphrase is given
    (a passphrase replaces the default key file; at init the embedded installation
    always gets its key file, which its process server needs)."""
    if getattr(args, "key_file", None):
        return str(args.key_file)
    if args.data_dir and (init or not _has_passphrase(args)):
        return str(Path(args.data_dir).resolve() / "vault.key")
    return None


def key_material(args: argparse.Namespace) -> KeyMaterial:
    """The key material the command line gives to open a vault: a key file, a
    passphrase, or both (any slot either opens will do)."""
    vault_url(args)  # the usage error about --vault comes first
    secret = passphrase(args)
    key = key_file_path(args)
    if key is None and secret is None:
        raise UsageError("give --key-file, --passphrase-file or --passphrase-env to open the "
                         "vault")
    return KeyMaterial(keyfile=read_keyfile(key) if key is not None else None,
                       passphrase=secret)


async def open_vault(args: argparse.Namespace) -> Vault:
    """Open the vault the command line names with the key material it gives; the caller
    closes it."""
    km = key_material(args)
    store = open_store(vault_url(args))
    try:
        return await Vault.open(store, km)
    except BaseException:
        await store.close()
        raise
