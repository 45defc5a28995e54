"""Verbs that work from the vault and its key alone: no database, no server — and
``points catalog``, the same points as the configuration server's catalog lists them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Any

from common.labels import APP
from siterecovery.apiopts import add_api_args, call_and_show
from siterecovery.errors import EXIT_CORRUPT, EXIT_OK, CliError, UsageError
from siterecovery.inplacerestore import refuse_in_use, restore_in_place
from siterecovery.output import add_json_arg, mib, show, table
from siterecovery.progress import Progress
from siterecovery.vaultopts import (
    add_vault_args,
    key_file_path,
    open_vault,
    passphrase,
    vault_url,
)
from vault import names
from vault.errors import AmbiguousPointError, NotFoundError, VaultError
from vault.keys import list_slots
from vault.keyslots import KeyMaterial, new_keyfile
from vault.manifestcache import PointScan
from vault.point import Point
from vault.repo import DEFAULT_BLOCK_SIZE, Vault
from vault.restore import FORMATS, restore_point
from vault.select import SPECS, select_point
from vault.store.open import open_store
from vault.store.protocol import BlobStore


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
    lines = [f"created vault {v.config.vault_id} at {url}"]
    if key is not None:
        lines.append(f"key file: {key} (keep a copy off-site: without it the vault cannot be "
                     "read)")
    if secret is not None:
        lines.append("passphrase slot added" + (
            "; the key file or the passphrase opens the vault" if key is not None else
            ": without the passphrase the vault cannot be read"))
    return show(out, args, "\n".join(lines))


async def _holds_vault(store: BlobStore) -> bool:
    """Whether the vault config exists; True when that cannot be told."""
    try:
        await store.stat(names.CONFIG)
    except NotFoundError:
        return False
    except VaultError:
        return True
    return True


def _disks(p: Point) -> list[dict[str, Any]]:
    return [{"disk": d.disk, "size": d.size} for d in p.disks]


def _select(points: list[Point], spec: str, machine: str | None) -> Point:
    """The point --point and --machine name (vault/select.py), in the CLI's words."""
    try:
        return select_point(points, spec, machine=machine or None)
    except AmbiguousPointError as e:
        if e.machines:
            raise UsageError(f"the vault holds several machines ({', '.join(e.machines)}); "
                             "pick one with --machine") from None
        raise UsageError(str(e)) from None


def _report_damaged(scan: PointScan) -> int:
    """After a listing: name each damaged manifest on stderr (the listing itself went to
    stdout) and return exit code 3 if there is one, else 0."""
    if not scan.damaged:
        return EXIT_OK
    for name, e in scan.damaged:
        print(f"error: {name}: damaged: {e.reason}", file=sys.stderr)
    print(f"error: {len(scan.damaged)} point manifest(s) failed verification and are not "
          "listed as points (their machine cannot be told); the others are intact. Run "
          "'siterecovery check' for what they break; restore another point, or prune to "
          "forget them.", file=sys.stderr)
    return EXIT_CORRUPT


def _damaged_rows(scan: PointScan) -> list[dict[str, Any]]:
    return [{"object": name, "reason": e.reason} for name, e in scan.damaged]


CATALOG_COLUMNS = (("machine", "MACHINE"), ("created", "CREATED"),
                   ("consistency", "CONSISTENCY"), ("id", "POINT"))


async def cmd_points_catalog(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/points", lambda doc: table(
        doc["points"], CATALOG_COLUMNS), machine=args.machine)


async def cmd_points_list(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        scan = await v.scan_points(args.machine)
    finally:
        await v.close()
    points = scan.points
    rows: list[dict[str, Any]] = [
        {"id": p.id, "object": names.POINTS + p.id, "machine": p.machine, "created": p.created,
         "consistency": p.consistency, "disks": _disks(p), "damaged": None} for p in points]
    # A damaged manifest is a row of its own, after the intact ones: its id is its name,
    # everything else in it is unknown.
    rows += [{"id": name[len(names.POINTS):], "object": name, "machine": None,
              "created": None, "consistency": None, "disks": [], "damaged": e.reason}
             for name, e in scan.damaged]
    lines = [f"{'ID':<16}  {'MACHINE':<20}  {'CREATED (UTC)':<27}  {'CONSISTENCY':<12}  DISKS"]
    lines += [f"{p.id[:16]}  {p.machine:<20}  {p.created:<27}  {p.consistency:<12}  "
              + ", ".join(f"{d.disk} ({mib(d.size)})" for d in p.disks) for p in points]
    lines += [f"{name[len(names.POINTS):][:16]}  {'?':<20}  {'?':<27}  {'DAMAGED':<12}  "
              f"{name}" for name, _e in scan.damaged]
    show(rows, args, "\n".join(lines) if rows else "no recovery points")
    return _report_damaged(scan)


async def cmd_machines_list(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        scan = await v.scan_points()
    finally:
        await v.close()
    machines: dict[str, list[Point]] = {}
    for p in scan.points:
        machines.setdefault(p.machine, []).append(p)
    rows: list[dict[str, Any]] = []
    for name, pts in sorted(machines.items()):
        app = [p for p in pts if p.consistency == APP]
        rows.append({"machine": name, "points": len(pts), "oldest": pts[0].created,
                     "latest": pts[-1].created, "latest_point": pts[-1].id,
                     "latest_app_consistent": app[-1].created if app else None,
                     "disks": _disks(pts[-1]), "damaged_points": []})
    lines = [f"{'MACHINE':<20}  {'POINTS':>6}  {'LATEST (UTC)':<27}  "
             f"{'LATEST APP-CONSISTENT':<27}  DISKS"]
    lines += [f"{r['machine']:<20}  {r['points']:>6}  {r['latest']:<27}  "
              f"{r['latest_app_consistent'] or '-':<27}  "
              + ", ".join(f"{d['disk']} ({mib(d['size'])})" for d in r["disks"]) for r in rows]
    if scan.damaged:
        # Damaged manifests cannot be told apart by machine: one row (machine null)
        # holds them all, so that the JSON stays a list of rows of one shape.
        rows.append({"machine": None, "points": 0, "oldest": None, "latest": None,
                     "latest_point": None, "latest_app_consistent": None, "disks": [],
                     "damaged_points": _damaged_rows(scan)})
        lines += [f"{'?':<20}  {'DAMAGED':>6}  {name}" for name, _e in scan.damaged]
    show(rows, args, "\n".join(lines) if rows else "no machines")
    return _report_damaged(scan)


async def cmd_restore(args: argparse.Namespace) -> int:
    if args.in_place:
        refuse_in_use(args.in_place)
    v = await open_vault(args)
    try:
        scan = await v.scan_points()
        for name, e in scan.damaged:
            # A damaged manifest may be the point asked for ('latest' might be it): only
            # a point id it cannot be lets the restore go on without it.
            if args.point in SPECS or name[len(names.POINTS):].startswith(args.point):
                raise e
        point = _select(scan.points, args.point, args.machine)
        if args.in_place:
            return await restore_in_place(args, v, point)
        restored = await restore_point(
            v, point, args.out, fmt=args.format, disks=args.disk,
            progress=lambda disk: Progress(f"restore {disk}", quiet=args.json),
            index_dir=args.index_dir, index_memory=args.index_memory_mib << 20)
    finally:
        await v.close()
    return show({"point": point.id, "machine": point.machine, "created": point.created,
                 "consistency": point.consistency, "format": args.format,
                 "disks": [asdict(r) for r in restored]},
                args, "\n".join(f"restored {point.machine}/{r.disk} at {point.created} "
                                f"({point.consistency}) to {r.path}: verified"
                                for r in restored))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]
             ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add ``vault init``, ``points list``, ``machines list`` and ``restore``; return the
    ``vault`` command's subcommands, for the other ``vault`` verbs."""
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
    add_json_arg(init)
    init.set_defaults(func=cmd_vault_init)

    pp = sub.add_parser("points", help="recovery points")
    psub = pp.add_subparsers(dest="points_cmd", required=True)
    pl = psub.add_parser("list", help="list recovery points from the vault alone",
                         description="List the recovery points in a vault. Needs only the "
                                     "vault and its key: works with the configuration server gone.")
    add_vault_args(pl)
    pl.add_argument("--machine", help="only this machine's points")
    add_json_arg(pl)
    pl.set_defaults(func=cmd_points_list)
    pc = psub.add_parser(
        "catalog", help="list the recovery points the configuration server knows",
        description="List the recovery points in the configuration server's catalog (what "
                    "the process servers reported; GET /api/v1/points), oldest first. "
                    "'points list' reads the vault itself instead.")
    pc.add_argument("--machine", help="only this machine's points")
    add_api_args(pc)
    pc.set_defaults(func=cmd_points_catalog)

    mp = sub.add_parser("machines", help="protected machines")
    msub = mp.add_subparsers(dest="machines_cmd", required=True)
    ml = msub.add_parser("list", help="list the machines in the vault alone",
                         description="List the machines that have recovery points in a vault, "
                                     "with their newest points. Needs only the vault and key.")
    add_vault_args(ml)
    add_json_arg(ml)
    ml.set_defaults(func=cmd_machines_list)

    rp = sub.add_parser(
        "restore", help="materialize a recovery point to raw disk images or fixed VHDs",
        description="Write every disk of a machine at a recovery point to OUT/<disk>.img "
                    "(sparse raw) or OUT/<disk>.vhd (fixed VHD, padded to whole MiB, ready "
                    "for Azure), verifying every block and the end-to-end disk digest; or, "
                    "with --in-place DEVICE, repair one disk (block device or image file) "
                    "by writing only the blocks that differ from the point (a mounted or "
                    "held device is refused). Needs only the vault and its key.")
    add_vault_args(rp)
    rp.add_argument("--machine", help="the protected machine (needed if the vault has several)")
    rp.add_argument("--point", default="latest",
                    help="latest | latest-app-consistent | latest-crash-consistent | ID "
                         "(a unique prefix is enough); default: latest")
    rp.add_argument("--disk", action="append", help="restore only this disk (repeatable)")
    where = rp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output directory")
    where.add_argument("--in-place", metavar="DEVICE",
                       help="repair this block device or image file from the point: read it, "
                            "write only the blocks that differ, verify the disk digest "
                            "(one disk: --disk when the point has several)")
    rp.add_argument("--format", choices=list(FORMATS), default="raw",
                    help="raw: sparse OUT/<disk>.img; vhd: fixed VHD OUT/<disk>.vhd "
                         "(default: raw)")
    rp.add_argument("--index-dir", help="read the block index through a table kept in this "
                    "directory (built once, reused by later restores) when it outgrows "
                    "--index-memory-mib, not from memory")
    rp.add_argument("--index-memory-mib", type=int, default=256,
                    help="with --index-dir: the index is held in memory below this "
                         "estimate (default 256; 0: always on disk)")
    add_json_arg(rp)
    rp.set_defaults(func=cmd_restore)
    return vsub
