"""Verbs that work from the vault and its key alone: no database, no server."""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from siterecovery.errors import CliError, UsageError
from siterecovery.keycmds import (
    add_passphrase_args,
    key_file_path,
    open_vault_args,
    passphrase,
    vault_url,
)
from siterecovery.progress import Progress
from vault import names
from vault.errors import NotFoundError, VaultError
from vault.keys import list_slots
from vault.keyslots import KeyMaterial, new_keyfile
from vault.materialize import materialize
from vault.point import Point
from vault.repo import DEFAULT_BLOCK_SIZE, Vault
from vault.store.open import open_store
from vault.store.protocol import BlobStore


def add_vault_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vault", help="vault URL, e.g. file:///srv/vault (default: DATA_DIR/vault)")
    p.add_argument("--key-file", help="vault key file (default: DATA_DIR/vault.key)")
    add_passphrase_args(p)
    p.add_argument("--data-dir", help="an embedded 'siterecovery serve' data directory")


async def open_vault(args: argparse.Namespace) -> Vault:
    return await open_vault_args(args)  # --key-file and/or --passphrase-file/--passphrase-env


async def cmd_vault_init(args: argparse.Namespace) -> int:
    url = vault_url(args)
    secret = passphrase(args, new=True)  # read first: a usage error leaves nothing behind
    key = key_file_path(args, init=True)  # None: a passphrase only
    if key is not None and os.path.exists(key):
        raise CliError(f"key file {key} already exists; refusing to overwrite it")
    store = open_store(url)
    try:
        try:
            await store.stat(names.CONFIG)
        except NotFoundError:
            pass
        else:
            raise CliError(f"{url} already holds a vault; refusing to overwrite it")
        kms = [KeyMaterial(keyfile=new_keyfile(key))] if key is not None else []
        if secret is not None:
            kms.append(KeyMaterial(passphrase=secret))
        try:
            v = await Vault.create(store, kms, args.block_size)
        except VaultError:
            if key is not None and not await _holds_vault(store):
                os.unlink(key)  # keep it if the vault may exist after all
            raise
        slots = await list_slots(v)
    finally:
        await store.close()
    out = {"vault": url, "key_file": key, "passphrase": secret is not None,
           "vault_id": v.config.vault_id, "block_size": v.config.block_size,
           "slots": [{"slot": s.slot, "kind": s.kind} for s in slots]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"created vault {v.config.vault_id} at {url}")
    if key is not None:
        print(f"key file: {key} (keep a copy off-site: without it the vault cannot be read)")
    if secret is not None:
        print("passphrase slot added" + ("; the key file or the passphrase opens the vault"
                                         if key is not None else
                                         ": without the passphrase the vault cannot be read"))
    return 0


async def _holds_vault(store: BlobStore) -> bool:
    """Whether the vault config exists; True when that cannot be told."""
    try:
        await store.stat(names.CONFIG)
    except NotFoundError:
        return False
    except VaultError:
        return True
    return True


def select_point(points: list[Point], which: str, machine: str | None) -> Point:
    if machine:
        points = [p for p in points if p.machine == machine]
    machines = sorted({p.machine for p in points})
    if which.startswith("latest") and len(machines) > 1:
        raise UsageError(f"the vault holds several machines ({', '.join(machines)}); "
                         "pick one with --machine")
    if which == "latest":
        cands = points
    elif which == "latest-app-consistent":
        cands = [p for p in points if p.consistency == "app"]
    elif which == "latest-crash-consistent":
        cands = [p for p in points if p.consistency in ("app", "crash")]
    else:
        cands = [p for p in points if p.id == which or p.id.startswith(which)]
        if len(cands) > 1:
            raise UsageError(f"point id prefix {which!r} is ambiguous")
    if not cands:
        raise CliError(f"no recovery point matches {which!r}"
                         + (f" for machine {machine!r}" if machine else ""))
    return cands[-1]


async def cmd_points_list(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        points = await v.list_points(args.machine)
    finally:
        await v.close()
    if args.json:
        print(json.dumps([{"id": p.id, "machine": p.machine, "created": p.created,
                           "consistency": p.consistency,
                           "disks": [{"disk": d.disk, "size": d.size} for d in p.disks]}
                          for p in points]))
        return 0
    if not points:
        print("no recovery points")
        return 0
    print(f"{'ID':<16}  {'MACHINE':<20}  {'CREATED (UTC)':<27}  {'CONSISTENCY':<12}  DISKS")
    for p in points:
        disks = ", ".join(f"{d.disk} ({d.size / 2**20:.0f} MiB)" for d in p.disks)
        print(f"{p.id[:16]}  {p.machine:<20}  {p.created:<27}  {p.consistency:<12}  {disks}")
    return 0


async def cmd_machines_list(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        points = await v.list_points()
    finally:
        await v.close()
    machines: dict[str, list[Point]] = {}
    for p in points:
        machines.setdefault(p.machine, []).append(p)
    rows: list[dict[str, Any]] = []
    for name, pts in sorted(machines.items()):
        app = [p for p in pts if p.consistency == "app"]
        rows.append({"machine": name, "points": len(pts), "oldest": pts[0].created,
                     "latest": pts[-1].created, "latest_point": pts[-1].id,
                     "latest_app_consistent": app[-1].created if app else None,
                     "disks": [{"disk": d.disk, "size": d.size} for d in pts[-1].disks]})
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no machines")
    else:
        print(f"{'MACHINE':<20}  {'POINTS':>6}  {'LATEST (UTC)':<27}  {'LATEST APP-CONSISTENT':<27}"
              "  DISKS")
        for r in rows:
            disks = ", ".join(f"{d['disk']} ({d['size'] / 2**20:.0f} MiB)" for d in r["disks"])
            print(f"{r['machine']:<20}  {r['points']:>6}  {r['latest']:<27}  "
                  f"{r['latest_app_consistent'] or '-':<27}  {disks}")
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    from vault.vhd import materialize_vhd

    write = materialize_vhd if args.format == "vhd" else materialize
    ext = "vhd" if args.format == "vhd" else "img"
    v = await open_vault(args)
    try:
        point = select_point(await v.list_points(), args.point, args.machine)
        index = await v.load_index()
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        with ThreadPoolExecutor(2) as ex:
            for d in point.disks:
                if args.disk and d.disk not in args.disk:
                    continue
                target = str(out_dir / f"{d.disk}.{ext}")
                digest = await write(
                    v, point, d.disk, target, index=index, executor=ex,
                    progress=Progress(f"restore {d.disk}", quiet=args.json))
                results.append({"disk": d.disk, "path": target, "size": d.size,
                                "digest": digest})
    finally:
        await v.close()
    if args.json:
        print(json.dumps({"point": point.id, "machine": point.machine, "created": point.created,
                          "consistency": point.consistency, "format": args.format,
                          "disks": results}))
    else:
        for r in results:
            print(f"restored {point.machine}/{r['disk']} at {point.created} "
                  f"({point.consistency}) to {r['path']}: verified")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vp = sub.add_parser("vault", help="create and manage vaults")
    vsub = vp.add_subparsers(dest="vault_cmd", required=True)
    init = vsub.add_parser(
        "init", help="create a vault with a key file and/or a passphrase",
        description="Create an encrypted vault in a blob store, with a new random master key "
                    "that is stored only wrapped in key slots: one for a new key file "
                    "(--key-file, or DATA_DIR/vault.key; the default) and/or one for a "
                    "passphrase (--passphrase-file or --passphrase-env; never on the command "
                    "line). A passphrase alone replaces the key file unless --key-file or "
                    "--data-dir is given too. Manage keys later with 'siterecovery vault key'.")
    add_vault_args(init)
    init.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                      help="default block size in bytes (64 KiB - 1 MiB, power of two)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(func=cmd_vault_init)
    from siterecovery.registercmds import register_under  # 'vault registration-key'

    register_under(vsub, add_vault_args)

    pp = sub.add_parser("points", help="recovery points")
    psub = pp.add_subparsers(dest="points_cmd", required=True)
    pl = psub.add_parser("list", help="list recovery points from the vault alone",
                         description="List the recovery points in a vault. Needs only the "
                                     "vault and its key: works with the configuration server gone.")
    add_vault_args(pl)
    pl.add_argument("--machine", help="only this machine's points")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_points_list)

    mp = sub.add_parser("machines", help="protected machines")
    msub = mp.add_subparsers(dest="machines_cmd", required=True)
    ml = msub.add_parser("list", help="list the machines in the vault alone",
                         description="List the machines that have recovery points in a vault, "
                                     "with their newest points. Needs only the vault and key.")
    add_vault_args(ml)
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    ml.set_defaults(func=cmd_machines_list)

    rp = sub.add_parser(
        "restore", help="materialize a recovery point to raw disk images or fixed VHDs",
        description="Write every disk of a machine at a recovery point to OUT/<disk>.img "
                    "(sparse raw) or OUT/<disk>.vhd (fixed VHD, padded to whole MiB, ready "
                    "for Azure), verifying every block and the end-to-end disk digest. Needs "
                    "only the vault and its key.")
    add_vault_args(rp)
    rp.add_argument("--machine", help="the protected machine (needed if the vault has several)")
    rp.add_argument("--point", default="latest",
                    help="latest | latest-app-consistent | latest-crash-consistent | ID "
                         "(a unique prefix is enough); default: latest")
    rp.add_argument("--disk", action="append", help="restore only this disk (repeatable)")
    rp.add_argument("--out", required=True, help="output directory")
    rp.add_argument("--format", choices=["raw", "vhd"], default="raw",
                    help="raw: sparse OUT/<disk>.img; vhd: fixed VHD OUT/<disk>.vhd "
                         "(default: raw)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=cmd_restore)
