"""``siterecovery mobility failback --point ID``: the agent writes a recovery point back
onto its machine's disks, only the blocks that differ (mobility/inplace.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from common.devicebusy import DeviceInUseError
from mobility.agent import Agent
from mobility.config import MobilityConfig
from mobility.inplace import FailbackError, failback
from siterecovery.errors import CliError
from siterecovery.progress import Progress
from siterecovery.tomlconfig import load


async def cmd_failback(args: argparse.Namespace) -> int:
    agent = Agent(load(MobilityConfig, args.config))
    bars: dict[tuple[str, str], Progress] = {}

    def progress(disk: str, phase: str, done: int, total: int) -> None:
        bar = bars.setdefault((disk, phase), Progress(f"failback {disk} ({phase})",
                                                      quiet=args.json))
        bar(done, total)

    try:
        r = await failback(agent, args.point, progress)
    except (FailbackError, DeviceInUseError) as e:
        raise CliError(str(e)) from None
    finally:
        agent.close()
    if args.json:
        print(json.dumps({"point": r.point, "cycle": r.cycle,
                          "blocks_written": r.blocks_written,
                          "bytes_written": r.bytes_written,
                          "disks": [asdict(d) for d in r.disks]}))
    else:
        for d in r.disks:
            print(f"{d.disk} ({d.path}): {d.blocks_written} of {d.blocks_compared} blocks "
                  f"differed and were written ({d.bytes_written} bytes); digest verified"
                  + (f"; {d.blocks_written_before} of them by an interrupted earlier run"
                     if d.blocks_written_before else "")
                  + (f"; {d.unreadable_blocks} unreadable blocks written whole"
                     if d.unreadable_blocks else ""))
        print(f"the disks hold point {r.point[:16]}; the next cycle is a delta on it")
    return 0


def register(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mobility failback``."""
    fb = msub.add_parser(
        "failback", help="write a recovery point back onto this machine's disks",
        description="Fail back onto this machine: read each disk, compare every block with "
                    "the point's fingerprints (from the process server), fetch and write "
                    "only the blocks that differ, verify each block and the disk digest, "
                    "then make the point the agent's base (the next cycle is a delta, no "
                    "initial copy). A mounted or held disk is refused before anything is "
                    "written. Stop the replication daemon first. Run again after an "
                    "interruption, it writes only what still differs.")
    fb.add_argument("--config", required=True, help="mobility.toml")
    fb.add_argument("--point", required=True, help="the recovery point's id")
    fb.add_argument("--json", action="store_true", help="machine-readable output")
    fb.set_defaults(func=cmd_failback)
