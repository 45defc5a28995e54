"""``siterecovery prune`` and ``siterecovery vault unlock``: retention and locks."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from siterecovery.errors import UsageError
from siterecovery.memoryopts import add_memory_args
from siterecovery.output import add_json_arg, notes, show
from siterecovery.vaultopts import add_vault_args, open_vault
from vault.locks import list_locks, locked, remove_locks
from vault.prune import prune
from vault.retention import Retention


async def cmd_prune(args: argparse.Namespace) -> int:
    policy = Retention(args.keep_all_hours, args.hourly_hours, args.two_hourly_hours,
                       args.retention_hours)
    try:
        policy.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    v = await open_vault(args)
    try:
        async with locked(v, "exclusive", "prune", wait=args.wait):
            with ThreadPoolExecutor(2) as ex:
                report = await prune(v, policy, ex, dry_run=args.dry_run,
                                     progress=notes("prune", quiet=args.json),
                                     memory=args.memory_mib << 20, index_dir=args.index_dir,
                                     temp_dir=args.temp_dir)
    finally:
        await v.close()
    verb = "would forget" if args.dry_run else "forgot"
    return show(report.__dict__, args,
                f"{verb} {len(report.forgotten)} point(s), kept {len(report.kept)}; "
                f"rebased {len(report.rebased)}; deleted {report.packs_deleted} pack(s) and "
                f"{report.maps_deleted} map(s), {report.bytes_deleted / 1e6:.1f} MB")


async def cmd_unlock(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        if args.list:
            locks, bad = await list_locks(v)
            now = time.time()
            rows = [{"id": lk.id, "kind": lk.kind, "holder": lk.holder, "purpose": lk.purpose,
                     "stale": lk.stale(now)} for lk in locks]
            return show({"locks": rows, "unreadable": bad}, args, "\n".join(
                f"{str(r['id'])[:16]}  {r['kind']:<9}  {r['holder']:<30}  "
                f"{r['purpose']:<12}  {'STALE' if r['stale'] else 'live'}" for r in rows)
                or "no locks")
        gone = await remove_locks(v, all_locks=args.all)
    finally:
        await v.close()
    return show({"removed": [lk.id for lk in gone]}, args,
                f"removed {len(gone)} lock(s)" + ("" if args.all else " (stale only)"))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune", help="forget points past retention and collect garbage",
        description="Thin recovery points as ASR does: keep every point of the last "
                    "--keep-all-hours, then one per hour until --hourly-hours, one per 2 hours "
                    "until --two-hourly-hours, one per 4 hours until --retention-hours; the "
                    "newest point and newest app-consistent point of each machine always stay. "
                    "Then delete unreferenced data and repack mostly-empty packs. Holds the "
                    "vault's exclusive lock; safe to interrupt and run again.")
    add_vault_args(p)
    p.add_argument("--keep-all-hours", type=float, default=1.0)
    p.add_argument("--hourly-hours", type=float, default=24.0)
    p.add_argument("--two-hourly-hours", type=float, default=48.0)
    p.add_argument("--retention-hours", type=float, default=72.0)
    p.add_argument("--dry-run", action="store_true", help="show what would be forgotten")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for writers to release the vault (default: 0)")
    add_memory_args(p, temp=True)
    p.add_argument("--index-dir", help="past --memory-mib, keep the block index in a table "
                                       "in this directory (the one 'restore --index-dir' "
                                       "reads), updated in place, not rebuilt by the next "
                                       "run; not the one of a process server that is "
                                       "running (default: a temporary one)")
    add_json_arg(p)
    p.set_defaults(func=cmd_prune)

    u = sub.add_parser(
        "unlock", help="list or remove vault locks",
        description="Remove stale locks (their holder stopped refreshing them), or every "
                    "lock with --all (only when you know no process server or prune runs).")
    add_vault_args(u)
    u.add_argument("--all", action="store_true", help="remove live locks too")
    u.add_argument("--list", action="store_true", help="only list the locks")
    add_json_arg(u)
    u.set_defaults(func=cmd_unlock)
