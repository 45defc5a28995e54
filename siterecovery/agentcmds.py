"""``siterecovery mobility …``: enroll, replicate once, run as a daemon."""

from __future__ import annotations

import argparse
import json
import platform
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from common.fs import atomic_write
from mobility.agent import Agent
from mobility.config import MobilityConfig
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.errors import CliError, UsageError
from siterecovery.progress import Progress
from siterecovery.tomlconfig import load


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _refused(what: str, body: Any) -> CliError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    return CliError(f"{what} refused: {err.get('message', body)}"
                    + (f"\nhint: {err['hint']}" if err.get("hint") else ""))


def local_machine(machine: str) -> dict[str, Any]:
    """This machine as the inventory wants it (/etc/os-release, uname -r): the admin
    path enrolls the machine it runs on, which is the configuration server's own host."""
    release: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                release[k.strip()] = v.strip().strip('"')
    except OSError:
        pass
    doc: dict[str, Any] = {"name": machine, "ip": "127.0.0.1", "os_type": "linux",
                           "kernel": platform.release()}
    if release.get("ID") and release.get("VERSION_ID"):
        doc.update(os_name=release["ID"], os_version=release["VERSION_ID"])
    return doc


def _checked(server: str, disks: list[str]) -> tuple[str, int, list[str]]:
    """--server and --disk, checked before anything is asked of the server."""
    disk_lines = []
    for spec in disks:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--disk wants NAME=PATH, got {spec!r}")
        disk_lines.append(f"  {{ name = {_toml_str(name)}, path = {_toml_str(path)} }},")
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--server wants HOST:PORT, got {server!r}")
    return host, int(port), disk_lines


def write_agent(out: Path, issued: dict[str, Any], machine: str, server: str,
                disks: list[str], site_url: str = "") -> Path:
    """Write ca.pem, agent.pem, agent.key (0600) and mobility.toml into ``out``."""
    host, port, disk_lines = _checked(server, disks)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out / "ca.pem").write_text(issued["ca"])
    (out / "agent.pem").write_text(issued["cert"])
    key = out / "agent.key"
    atomic_write(key, issued["key"])
    cfg = out / "mobility.toml"
    cfg.write_text(f"""# siterecovery Mobility agent — written by 'siterecovery mobility enroll'
machine = {_toml_str(machine)}
server_host = {_toml_str(host)}
server_port = {port}
# The configuration server's site listener: settings, heartbeats and progress ("": none).
site_url = {_toml_str(site_url)}
tls_ca = {_toml_str(str((out / 'ca.pem').resolve()))}
tls_cert = {_toml_str(str((out / 'agent.pem').resolve()))}
tls_key = {_toml_str(str(key.resolve()))}
state_dir = {_toml_str(str((out / 'state').resolve()))}
interval_seconds = 30.0
# none: live reads, points labelled 'inconsistent'; fsfreeze: crash-consistent;
# lvm: LVM snapshots of the disks (logical volumes); script: app-consistent with
# pre_script/post_script.
snapshot = "none"
disks = [
{chr(10).join(disk_lines)}
]
""")
    return cfg


async def enroll(api: str, token: str, machine: str, server: str, disks: list[str],
                 out: Path, site_url: str = "") -> Path:
    """The admin path: with the admin token (loopback API, so on the configuration
    server's host), add this machine to the inventory if it is not there yet, get its
    client certificate and write the agent's config."""
    _checked(server, disks)
    async with ApiClient(api, token, timeout=30) as c:
        try:
            await c.get(f"/api/v1/machines/{machine}")
        except ApiCallError as e:
            if e.api_code != "machine_not_found":
                raise
            await c.post("/api/v1/machines", local_machine(machine))
        issued = await c.post("/api/v1/certificates/agent", {"machine": machine})
    return write_agent(out, issued, machine, server, disks, site_url)


def _site_ssl(ca_file: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        if cert and key:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise CliError(f"cannot load the TLS files ({ca_file}"
                       + (f", {cert}, {key}" if cert else "") + f"): {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _site_post(site: str, path: str, body: dict[str, Any], ctx: ssl.SSLContext,
                     what: str) -> dict[str, Any]:
    url = site.rstrip("/") + path
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                         connector=aiohttp.TCPConnector(ssl=ctx)) as http, \
                http.post(url, json=body) as resp:
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                doc = {"error": {"message": f"HTTP {resp.status}"}}
            if resp.status != 201:
                raise _refused(what, doc)
            return dict(doc)
    except aiohttp.ClientConnectorCertificateError as e:
        raise CliError(f"{what}: the site listener's certificate does not verify against "
                       f"the CA file: {e.certificate_error}\nhint: --ca-file must be the "
                       "configuration server's ca.pem (DATA_DIR/ca/ca.pem)") from None
    except (aiohttp.ClientError, TimeoutError) as e:
        raise CliError(f"{what}: cannot reach the configuration server at {site}: "
                       f"{e or type(e).__name__}\nhint: --site is its site listener, "
                       "https://HOST:9441") from None


async def enroll_with_passphrase(site: str, ca_file: str, passphrase: str, machine: str,
                                 server: str, disks: list[str], out: Path) -> Path:
    """The agent path: the configuration server's site listener, the passphrase, a
    machine the operator added to the inventory."""
    _checked(server, disks)
    issued = await _site_post(site, "/api/v1/agent/enroll",
                              {"machine": machine, "passphrase": passphrase},
                              _site_ssl(ca_file), "enrollment")
    return write_agent(out, issued, machine, server, disks, site)


async def renew(cfg_path: Path, site: str) -> dict[str, Any]:
    """Renew the agent's certificate with the current one; switch mobility.toml to the
    new files in one rename, then delete the old files."""
    cfg = load(MobilityConfig, cfg_path)
    issued = await _site_post(site, "/api/v1/agent/renew", {},
                              _site_ssl(cfg.tls_ca, cfg.tls_cert, cfg.tls_key), "renewal")
    old_cert, old_key = Path(cfg.tls_cert), Path(cfg.tls_key)
    d = old_cert.parent
    new_cert, new_key = d / f"agent-{issued['serial'][:16]}.pem", \
        d / f"agent-{issued['serial'][:16]}.key"
    atomic_write(new_key, issued["key"])
    atomic_write(new_cert, issued["cert"])
    text = cfg_path.read_text()
    for field, path in (("tls_cert", new_cert), ("tls_key", new_key)):
        text, n = re.subn(rf"^{field}\s*=.*$", f"{field} = {_toml_str(str(path.resolve()))}",
                          text, count=1, flags=re.M)
        if not n:
            raise CliError(f"{cfg_path} has no '{field} = ...' line to point at {path}")
    atomic_write(cfg_path, text)
    for old in (old_cert, old_key):
        if old not in (new_cert, new_key):
            old.unlink(missing_ok=True)
    return {"machine": issued["machine"], "serial": issued["serial"],
            "not_after": issued["not_after"], "cert": str(new_cert), "key": str(new_key)}


async def cmd_enroll(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.site:
        if args.token_file or not (args.passphrase_file and args.ca_file):
            raise UsageError("with --site give --passphrase-file and --ca-file (and no "
                             "--token-file)")
        try:
            secret = Path(args.passphrase_file).read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the passphrase file: {e}") from None
        if not secret:
            raise UsageError(f"the passphrase file {args.passphrase_file} is empty")
        cfg = await enroll_with_passphrase(args.site, args.ca_file, secret, args.machine,
                                           args.server, args.disk, out)
    elif args.token_file:
        if args.passphrase_file or args.ca_file:
            raise UsageError("--passphrase-file and --ca-file go with --site")
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the admin token file: {e}") from None
        cfg = await enroll(args.api, token, args.machine, args.server, args.disk, out,
                           args.site_url or "")
    else:
        raise UsageError("enroll with the passphrase (--site URL --passphrase-file F "
                         "--ca-file CA) or with the admin token (--token-file F)")
    print(f"enrolled {args.machine}; agent config written to {cfg}")
    return 0


async def cmd_renew(args: argparse.Namespace) -> int:
    r = await renew(Path(args.config), args.site)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"renewed the certificate of {r['machine']}: serial {r['serial']}, valid until "
              f"{r['not_after']}; {args.config} now uses {r['cert']}")
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

    cfg = load(MobilityConfig, args.config)
    if not cfg.site_url:
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run_forever())
        try:
            await wait_for_signal()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            agent.close()
        return 0
    from mobility.control import ControlPlane
    from mobility.daemon import ManagedAgent

    async def renewed() -> MobilityConfig:
        await renew(Path(args.config), cfg.site_url)
        return load(MobilityConfig, args.config)

    async with ControlPlane(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as control:
        managed = ManagedAgent(cfg, control, renew=renewed,
                               renew_before_days=args.renew_before_days)
        task = asyncio.create_task(managed.run_forever())
        try:
            await wait_for_signal()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            managed.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mp = sub.add_parser("mobility", help="the Mobility agent on a protected machine")
    msub = mp.add_subparsers(dest="mobility_cmd", required=True)
    en = msub.add_parser(
        "enroll", help="get a certificate and write the agent's config",
        description="Get this machine's client certificate from the configuration server and "
                    "write ca.pem, agent.pem, agent.key and mobility.toml into --out. Two ways: "
                    "with the enrollment passphrase over the site listener (--site, "
                    "--passphrase-file, --ca-file; the operator added the machine to the "
                    "inventory first), or with the admin token over the loopback admin API "
                    "(--token-file; on the configuration server's own host, which is added "
                    "to the inventory if it is not there yet).")
    en.add_argument("--machine", required=True, help="this machine's name in the inventory")
    en.add_argument("--site", help="configuration server site listener, https://HOST:9441")
    en.add_argument("--passphrase-file",
                    help="file holding the enrollment passphrase (the configuration server's "
                         "DATA_DIR/enrollment-passphrase)")
    en.add_argument("--ca-file", help="the configuration server's CA certificate "
                                      "(DATA_DIR/ca/ca.pem), to verify the site listener")
    en.add_argument("--api", default="http://127.0.0.1:9440",
                    help="admin API URL, with --token-file")
    en.add_argument("--token-file", help="admin API token file (the admin path)")
    en.add_argument("--site-url",
                    help="with --token-file: the site listener the agent will report to "
                         "(https://HOST:9441); with --site it is --site")
    en.add_argument("--server", default="127.0.0.1:9443", help="process server HOST:PORT")
    en.add_argument("--disk", action="append", required=True,
                    help="NAME=PATH of a disk to protect (block device or image file)")
    en.add_argument("--out", required=True, help="directory for certificates and config")
    en.set_defaults(func=cmd_enroll)
    rn = msub.add_parser(
        "renew", help="renew the agent's certificate before it expires",
        description="Get a new certificate with the current one over the site listener, "
                    "point mobility.toml at it and delete the old files. The old certificate "
                    "stays valid for one hour (if this command dies half way, run it again).")
    rn.add_argument("--config", required=True, help="mobility.toml")
    rn.add_argument("--site", required=True,
                    help="configuration server site listener, https://HOST:9441")
    rn.add_argument("--json", action="store_true", help="machine-readable output")
    rn.set_defaults(func=cmd_renew)
    rp = msub.add_parser("replicate", help="run one replication cycle and exit",
                         description="Scan the disks, send what changed (everything the first "
                                     "time) and commit once the process server acknowledged.")
    rp.add_argument("--config", required=True, help="mobility.toml")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=cmd_replicate)
    run = msub.add_parser(
        "run", help="replicate continuously (the systemd service)",
        description="Replicate every interval_seconds. With site_url in mobility.toml the "
                    "agent is managed: it takes its settings from the configuration server, "
                    "heartbeats, reports progress and renews its certificate before it "
                    "expires (rewriting mobility.toml to the new files).")
    run.add_argument("--config", required=True, help="mobility.toml")
    run.add_argument("--renew-before-days", type=float, default=30.0,
                     help="renew the certificate when it has fewer days left (default 30)")
    run.set_defaults(func=cmd_run, daemon=True)
