"""``siterecovery agent bundle``: build the Mobility agent's bundle for protected machines."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from siterecovery.agentbundle import BundleError, build
from siterecovery.errors import CliError


async def cmd_bundle(args: argparse.Namespace) -> int:
    try:
        b = await asyncio.to_thread(build, Path(args.output) if args.output else None)
    except (BundleError, OSError) as e:
        raise CliError(f"cannot build the agent bundle: {e}") from None
    m = b.manifest
    size = b.path.stat().st_size
    if args.json:
        doc = {k: v for k, v in m.items() if k != "files"}
        print(json.dumps({"path": str(b.path), "bytes": size, "files": len(m["files"]), **doc}))
        return 0
    t = m["target"]
    print(f"agent bundle {m['agent_version']} written to {b.path} ({size / 1e6:.1f} MB, "
          f"{len(m['files'])} files)")
    python = f"CPython {t['python']}" + (" exactly (its compiled wheels)"
                                         if t["python_exact"] else "")
    print(f"needs on the target: {python}, {t['machine']}"
          + (f", glibc {t['glibc']} or later" if t["glibc"] else ""))
    for s in m["support"]:
        print(f"  {s['os']:<13} {'yes' if s['runs'] else 'no ':<4} {s['note']}")
    print(f"install: tar xzf {b.path.name} && siterecovery-agent-{m['agent_version']}/install.sh")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ap = sub.add_parser("agent", help="the Mobility agent as a deliverable")
    asub = ap.add_subparsers(dest="agent_cmd", required=True)
    b = asub.add_parser(
        "bundle", help="build the agent bundle (offline install on a protected machine)",
        description="Write a .tar.gz with the Mobility agent and only what it imports "
                    "(mobility/, wire/, common/ and their third-party distributions, copied "
                    "from this environment), a launcher, the systemd unit "
                    "siterecovery-agent.service and install.sh/uninstall.sh. The compiled "
                    "wheels are this machine's: the target needs the same CPython minor "
                    "version and architecture; the output says which releases of the support "
                    "matrix can run it. On the target: unpack, run install.sh (it checks the "
                    "interpreter and every file's checksum before it changes anything).")
    b.add_argument("--output", help="bundle file (default: "
                                    "siterecovery-agent-VERSION-cpXY-PLATFORM.tar.gz here)")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bundle)
