"""``siterecovery vault migrate``: bring a vault to the newest format (vault/migrate.py).

Exit codes (siterecovery/errors.py): 0 done (or nothing to do), 1 the vault is locked,
3 a damaged manifest or map was left as it was (each named), 4 the key opens no slot.
"""

from __future__ import annotations

import argparse
import json

from siterecovery.errors import EXIT_CORRUPT, EXIT_OK
from siterecovery.output import add_json_arg, notes
from siterecovery.vaultopts import add_vault_args, open_vault
from vault.locks import locked
from vault.migrate import migrate

HELP = ("Bring a vault written by an older siterecovery to format 3, in place: the "
        "config says format 3 first (a program that knows only older formats then refuses "
        "the vault rather than misread it), then each format 1 point's block maps are "
        "written again in chunks, read a range at a time by restores, checks, prunes and "
        "resyncs, and its manifest again under the same id; its old maps are deleted "
        "after. New packs are written in frames of several blocks (a smaller vault); "
        "packs already written and index objects are not touched. Interrupted, every "
        "point is whole at one format or the other and everything restores; run it again "
        "to finish. Holds the vault's exclusive lock (process servers wait; restart them "
        "after, so they write format 3 too). Exit code 3 if a damaged manifest or map was "
        "left as it was.")


async def cmd_vault_migrate(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        async with locked(v, "exclusive", "migrate", wait=args.wait):
            report = await migrate(v, progress=notes("migrate", quiet=args.json))
    finally:
        await v.close()
    code = EXIT_CORRUPT if report.damaged else EXIT_OK
    if args.json:
        print(json.dumps({"from_format": report.from_format, "to_format": report.to_format,
                          "points": report.points, "migrated": report.migrated,
                          "maps_written": report.maps_written,
                          "maps_deleted": report.maps_deleted,
                          "damaged": [{"object": o, "reason": r} for o, r in report.damaged],
                          "exit_code": code}))
        return code
    for name, reason in report.damaged:
        print(f"ERROR: {name}: damaged: {reason}; left as it was")
    if report.from_format >= report.to_format and not report.migrated:
        print(f"the vault is already at format {report.to_format}; nothing to do")
    else:
        print(f"vault at format {report.to_format} (was {report.from_format}): "
              f"{report.migrated} of {report.points} points written again, "
              f"{report.maps_written} maps chunked, {report.maps_deleted} old maps deleted")
    return code


def register_under(vsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` under the ``vault`` command's subcommands."""
    m = vsub.add_parser("migrate", help="bring a vault to the newest format (3: chunked "
                                        "maps, packs of frames), in place", description=HELP)
    add_vault_args(m)
    m.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for writers to release the vault (default: 0)")
    add_json_arg(m)
    m.set_defaults(func=cmd_vault_migrate)
