"""``siterecovery mobility …``: enroll, replicate once, run as a daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import aiohttp

from mobility.agent import Agent
from mobility.config import MobilityConfig
from siterecovery.errors import CliError, UsageError
from siterecovery.progress import Progress
from siterecovery.tomlconfig import load


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


async def enroll(api: str, token: str, machine: str, server: str, disks: list[str],
                 out: Path) -> Path:
    """Get a client certificate from the configuration server; write the agent's config."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
            http.post(f"{api.rstrip('/')}/api/v1/certificates/agent", json={"machine": machine},
                      headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json()
        if resp.status != 201:
            err = body.get("error", {})
            raise CliError(f"enrollment refused: {err.get('message')} "
                           f"{err.get('hint', '')}".strip())
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out / "ca.pem").write_text(body["ca"])
    (out / "agent.pem").write_text(body["cert"])
    key = out / "agent.key"
    key.touch(mode=0o600)
    key.write_text(body["key"])
    host, _, port = server.rpartition(":")
    disk_lines = []
    for spec in disks:
        name, sep, path = spec.partition("=")
        if not sep:
            raise UsageError(f"--disk wants NAME=PATH, got {spec!r}")
        disk_lines.append(f"  {{ name = {_toml_str(name)}, path = {_toml_str(path)} }},")
    cfg = out / "mobility.toml"
    cfg.write_text(f"""# siterecovery Mobility agent — written by 'siterecovery mobility enroll'
machine = {_toml_str(machine)}
server_host = {_toml_str(host)}
server_port = {int(port)}
tls_ca = {_toml_str(str((out / 'ca.pem').resolve()))}
tls_cert = {_toml_str(str((out / 'agent.pem').resolve()))}
tls_key = {_toml_str(str(key.resolve()))}
state_dir = {_toml_str(str((out / 'state').resolve()))}
interval_seconds = 30.0
# none: live reads, points labelled 'inconsistent'; fsfreeze: crash-consistent;
# script: app-consistent with pre_script/post_script.
snapshot = "none"
disks = [
{chr(10).join(disk_lines)}
]
""")
    return cfg


async def cmd_enroll(args: argparse.Namespace) -> int:
    token = Path(args.token_file).read_text().strip()
    cfg = await enroll(args.api, token, args.machine, args.server, args.disk, Path(args.out))
    print(f"enrolled {args.machine}; agent config written to {cfg}")
    return 0


async def cmd_replicate(args: argparse.Namespace) -> int:
    agent = Agent(load(MobilityConfig, args.config))
    try:
        r = await agent.replicate_once(Progress("replicate", quiet=args.json))
    finally:
        agent.close()
    if args.json:
        print(json.dumps(r.__dict__))
    else:
        kind = "initial replication" if r.full else "delta cycle"
        print(f"{kind} {r.cycle[:12]} acknowledged: {r.blocks_sent} blocks, "
              f"{r.bytes_sent / 1e6:.1f} MB, {r.consistency}")
    return 0


async def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from siterecovery.embedded import wait_for_signal

    agent = Agent(load(MobilityConfig, args.config))
    task = asyncio.create_task(agent.run_forever())
    try:
        await wait_for_signal()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        agent.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mp = sub.add_parser("mobility", help="the Mobility agent on a protected machine")
    msub = mp.add_subparsers(dest="mobility_cmd", required=True)
    en = msub.add_parser("enroll", help="get a certificate and write the agent's config",
                         description="Ask the configuration server for this machine's client "
                                     "certificate and write ca.pem, agent.pem, agent.key and "
                                     "mobility.toml into --out.")
    en.add_argument("--machine", required=True, help="this machine's name")
    en.add_argument("--api", default="http://127.0.0.1:9440", help="configuration server URL")
    en.add_argument("--token-file", required=True, help="admin API token file")
    en.add_argument("--server", default="127.0.0.1:9443", help="process server HOST:PORT")
    en.add_argument("--disk", action="append", required=True,
                    help="NAME=PATH of a disk to protect (block device or image file)")
    en.add_argument("--out", required=True, help="directory for certificates and config")
    en.set_defaults(func=cmd_enroll)
    rp = msub.add_parser("replicate", help="run one replication cycle and exit",
                         description="Scan the disks, send what changed (everything the first "
                                     "time) and commit once the process server acknowledged.")
    rp.add_argument("--config", required=True, help="mobility.toml")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=cmd_replicate)
    run = msub.add_parser("run", help="replicate continuously (the systemd service)")
    run.add_argument("--config", required=True, help="mobility.toml")
    run.set_defaults(func=cmd_run, daemon=True)
