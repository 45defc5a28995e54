"""``siterecovery check`` and ``siterecovery rebuild-index``: verify and repair a vault.

Exit codes (siterecovery/errors.py): 0 nothing wrong (warnings allowed), 3 damaged or
missing data found, 4 the key opens no key slot.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from siterecovery.errors import EXIT_CORRUPT, EXIT_KEY, EXIT_OK, UsageError
from siterecovery.memoryopts import add_memory_args
from siterecovery.output import add_json_arg, notes
from siterecovery.progress import Progress
from siterecovery.vaultopts import add_vault_args, key_material, open_vault, vault_url
from vault.check import check_vault
from vault.checkreport import CheckReport
from vault.locks import locked
from vault.rebuild import rebuild_index
from vault.store.open import open_store


def parse_percent(text: str) -> float:
    """``"10%"`` or ``"10"`` -> 10.0; more than 0, at most 100."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise UsageError(f"--subset {text!r} is not a percentage such as 10%") from None
    if not 0 < value <= 100:
        raise UsageError(f"--subset {text!r} must be more than 0% and at most 100%")
    return value


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(report: CheckReport) -> str:
    c = report.counts
    if report.wrong_key:
        return (f"the key given opens none of the {_plural(c['key_slots'], 'key slot')}: "
                "nothing else was checked (check --key-file / the passphrase)")
    if report.read_data:
        what = (f"checked {_plural(c['packs_read'], 'pack')}"
                + (f" ({report.subset:g}% of {c['packs']})" if report.subset is not None else "")
                + f", {_plural(c['blocks_read'], 'block')}, {_plural(c['points'], 'point')}"
                + f" ({_plural(c['digests_verified'], 'disk digest')} verified"
                + (f", {c['digests_skipped']} skipped: not every block was read"
                   if c["digests_skipped"] else "") + ")")
    else:
        what = (f"checked {_plural(c['packs'], 'pack')}, {_plural(c['blocks'], 'block')}, "
                f"{_plural(c['points'], 'point')} (structure only; --read-data reads the data)")
    errors, warnings = len(report.errors), len(report.warnings)
    result = _plural(errors, "problem") if errors else "no problems"
    if warnings:
        result += f", {_plural(warnings, 'warning')}"
    return f"{what}: {result}"


async def cmd_check(args: argparse.Namespace) -> int:
    if args.subset is not None and not args.read_data:
        raise UsageError("--subset needs --read-data")
    subset = parse_percent(args.subset) if args.subset is not None else None
    km = key_material(args)
    store = open_store(vault_url(args))
    progress = Progress("check --read-data", quiet=args.json) if args.read_data else None
    try:
        with ThreadPoolExecutor(2) as ex:
            report = await check_vault(store, km, read_data=args.read_data, subset=subset,
                                       executor=ex, progress=progress, wait=args.wait,
                                       memory=args.memory_mib << 20, temp_dir=args.temp_dir)
    finally:
        await store.close()
    code = EXIT_KEY if report.wrong_key else EXIT_CORRUPT if report.errors else EXIT_OK
    if args.json:
        print(json.dumps({**report.to_json(), "exit_code": code}))
        return code
    for p in report.problems:
        label = "WARNING" if p.severity == "warning" else "ERROR"
        print(f"{label}: {p.object}: {p.kind}: {p.reason}")
    print(summary(report))
    return code


async def cmd_rebuild_index(args: argparse.Namespace) -> int:
    v = await open_vault(args)
    try:
        async with locked(v, "exclusive", "rebuild-index", wait=args.wait):
            report = await rebuild_index(v, progress=notes("rebuild-index", quiet=args.json),
                                         memory=args.memory_mib << 20)
    finally:
        await v.close()
    code = EXIT_CORRUPT if report.skipped else EXIT_OK
    if args.json:
        print(json.dumps({"packs_indexed": report.packs_indexed, "blocks": report.blocks,
                          "skipped": [{"object": k, "reason": r}
                                      for k, r in sorted(report.skipped.items())],
                          "carried_over": report.carried_over,
                          "index_written": report.index_written,
                          "index_deleted": report.index_deleted,
                          "unreadable_index": report.unreadable_index,
                          "exit_code": code}))
        return code
    for name, reason in sorted(report.skipped.items()):
        kept = " (its entries in the old index were kept)" if name in report.carried_over \
            else ""
        print(f"ERROR: {name}: damaged: {reason}; skipped{kept}")
    print(f"indexed {_plural(report.packs_indexed, 'pack')} "
          f"({_plural(report.blocks, 'block')}) in "
          f"{_plural(len(report.index_written), 'new index object')}; deleted "
          f"{_plural(len(report.index_deleted), 'old index object')}"
          + (f"; {_plural(len(report.skipped), 'damaged pack')} skipped" if report.skipped
             else ""))
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "check", help="verify a vault: structure, and with --read-data every block",
        description="Check that every object of a vault authenticates and that every "
                    "recovery point has what it needs: key slots, config, index, manifests, "
                    "maps and delta chains, and that every pack the index names exists, is "
                    "long enough and has a trailer that authenticates under its name (a "
                    "swapped or damaged pack is caught without reading its blocks). "
                    "--read-data also reads the packs: every block authenticates, every block "
                    "hashes to its id, and every point's disks give their recorded digests "
                    "(nothing is written). Holds a shared vault lock while it reads (process "
                    "servers may go on writing; prune and rebuild-index wait, or it waits "
                    "for them with --wait). Needs only the vault and its key. Exit code 0: "
                    "all good (warnings allowed); 1: the vault is locked by a prune or "
                    "rebuild-index; 3: damaged or missing data, each bad object named; 4: "
                    "the key opens no key slot.")
    add_vault_args(c)
    c.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for a prune, rebuild-index or process server "
                        "retention run to release the vault (default: 60)")
    c.add_argument("--read-data", action="store_true",
                   help="read and verify every pack and every point's disk digests")
    c.add_argument("--subset", metavar="P%",
                   help="with --read-data: read only P%% of the packs, chosen "
                        "deterministically from their ids (every point's structure is "
                        "still checked)")
    add_memory_args(c, temp=True)
    add_json_arg(c)
    c.set_defaults(func=cmd_check)

    r = sub.add_parser(
        "rebuild-index", help="rebuild the vault's index from the packs' trailers",
        description="Read the trailer of every pack, write new index objects listing every "
                    "pack whose trailer authenticates, then delete the old index objects "
                    "(in that order: an interrupted run leaves an index; run it again). "
                    "Packs whose trailer is damaged are reported and skipped (entries a "
                    "readable old index object gives for them are kept). Holds the vault's "
                    "exclusive lock. Exit code 3 if a pack was skipped.")
    add_vault_args(r)
    r.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for writers to release the vault (default: 0)")
    add_memory_args(r)
    add_json_arg(r)
    r.set_defaults(func=cmd_rebuild_index)
