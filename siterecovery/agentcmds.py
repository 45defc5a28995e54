"""``siterecovery mobility …``: enroll, renew, replicate once, run as a daemon.

A thin layer: it parses the arguments, calls ``mobility.*`` and words the outcome
(and the agent's ``SiteError``s) for the operator. The admin path of enrollment,
over the loopback admin API, is the one part that is the CLI's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cryptography import x509

from common.timefmt import iso_seconds
from mobility.agent import Agent
from mobility.agentfile import AgentFileError
from mobility.config import MobilityConfig
from mobility.daemon import ManagedAgent
from mobility.enroll import enroll_with_passphrase, write_agent
from mobility.renewal import renew
from mobility.siteclient import (
    SiteCertificateUnverified,
    SiteClient,
    SiteError,
    SiteRefused,
    SiteTLSFilesError,
    SiteUnreachable,
)
from siterecovery import agentfailback
from siterecovery.apiclient import DEFAULT_API, ApiCallError, ApiClient
from siterecovery.apiopts import token_from, token_given
from siterecovery.daemon import MOBILITY_FILES, require_files, settled, wait_for_signal
from siterecovery.errors import CliError, UsageError
from siterecovery.progress import Progress
from siterecovery.tomlconfig import load


def _refused(what: str, body: Any) -> CliError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    return CliError(f"{what} refused: {err.get('message', body)}"
                    + (f"\nhint: {err['hint']}" if err.get("hint") else ""))


def _site_failed(what: str, site: str, e: SiteError) -> CliError:
    """A failed call to the site listener, worded for the operator of ``what``."""
    if isinstance(e, SiteRefused):
        return _refused(what, e.body)
    if isinstance(e, SiteCertificateUnverified):
        return CliError(f"{what}: the site listener's certificate does not verify against "
                        f"the CA file: {e.certificate_error}\nhint: --ca-file must be the "
                        "configuration server's ca.pem (DATA_DIR/ca/ca.pem)")
    if isinstance(e, SiteUnreachable):
        return CliError(f"{what}: cannot reach the configuration server at {site}: "
                        f"{str(e.cause) or type(e.cause).__name__}\nhint: --site is its "
                        "site listener, https://HOST:9441")
    if isinstance(e, SiteTLSFilesError):
        return CliError(str(e))
    return CliError(f"{what}: {e}")


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


def _checked(server: str, disks: list[str]) -> tuple[str, int, list[tuple[str, str]]]:
    """--server HOST:PORT and --disk NAME=PATH, checked before anything is asked of the
    server: (host, port, [(name, path), ...])."""
    pairs = []
    for spec in disks:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--disk wants NAME=PATH, got {spec!r}")
        pairs.append((name, path))
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--server wants HOST:PORT, got {server!r}")
    return host, int(port), pairs


async def enroll(api: str, token: str, machine: str, server: str, disks: list[str],
                 out: Path, site_url: str = "") -> Path:
    """The admin path: with the admin token (loopback API, so on the configuration
    server's host), add this machine to the inventory if it is not there yet, get its
    client certificate and write the agent's config."""
    host, port, pairs = _checked(server, disks)
    async with ApiClient(api, token, timeout=30) as c:
        try:
            await c.get(f"/api/v1/machines/{machine}")
        except ApiCallError as e:
            if e.api_code != "machine_not_found":
                raise
            await c.post("/api/v1/machines", local_machine(machine))
        issued = await c.post("/api/v1/certificates/agent", {"machine": machine})
    return write_agent(out, issued, machine=machine, server_host=host, server_port=port,
                       disks=pairs, site_url=site_url)


async def _enroll_on_site(site: str, ca_file: str, passphrase: str, machine: str,
                          server: str, disks: list[str], out: Path) -> Path:
    host, port, pairs = _checked(server, disks)
    try:
        async with SiteClient(site, ca_file) as client:
            return await enroll_with_passphrase(client, passphrase, out, machine=machine,
                                                server_host=host, server_port=port,
                                                disks=pairs)
    except SiteError as e:
        raise _site_failed("enrollment", site, e) from None


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
        except UnicodeDecodeError:
            raise UsageError(f"the passphrase file {args.passphrase_file} is not UTF-8 "
                             "text") from None
        if not secret:
            raise UsageError(f"the passphrase file {args.passphrase_file} is empty")
        cfg = await _enroll_on_site(args.site, args.ca_file, secret, args.machine,
                                    args.server, args.disk, out)
    elif token_given(args):
        if args.passphrase_file or args.ca_file:
            raise UsageError("--passphrase-file and --ca-file go with --site")
        cfg = await enroll(args.api, token_from(args), args.machine, args.server, args.disk,
                           out, args.site_url or "")
    else:
        raise UsageError("enroll with the passphrase (--site URL --passphrase-file F "
                         "--ca-file CA) or with the admin token (--token-file F, or "
                         "$SITERECOVERY_TOKEN_FILE)")
    if args.json:
        print(json.dumps(_enrolled(args.machine, cfg)))
    else:
        print(f"enrolled {args.machine}; agent config written to {cfg}")
    return 0


def _enrolled(machine: str, config: Path) -> dict[str, Any]:
    """What ``enroll --json`` prints: the files written and the certificate issued (its
    serial in lowercase hex, as the configuration server's API spells it)."""
    cfg = load(MobilityConfig, config)
    cert = x509.load_pem_x509_certificate(Path(cfg.tls_cert).read_bytes())
    return {"machine": machine, "config": str(config), "cert": cfg.tls_cert,
            "key": cfg.tls_key, "ca": cfg.tls_ca, "serial": format(cert.serial_number, "x"),
            "not_after": iso_seconds(cert.not_valid_after_utc.timestamp()),
            "site_url": cfg.site_url or None,
            "process_server": f"{cfg.server_host}:{cfg.server_port}"}


async def cmd_renew(args: argparse.Namespace) -> int:
    path = Path(args.config)
    cfg = load(MobilityConfig, path)
    try:
        async with SiteClient(args.site, cfg.tls_ca, cfg.tls_cert, cfg.tls_key) as site:
            r = await renew(site, path, cfg.tls_cert, cfg.tls_key)
    except SiteError as e:
        raise _site_failed("renewal", args.site, e) from None
    except AgentFileError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({"machine": r.machine, "serial": r.serial, "not_after": r.not_after,
                          "cert": str(r.cert), "key": str(r.key)}))
    else:
        print(f"renewed the certificate of {r.machine}: serial {r.serial}, valid until "
              f"{r.not_after}; {args.config} now uses {r.cert}")
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


async def _until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until SIGTERM/SIGINT, then cancel it and wait for it to end."""
    task = asyncio.create_task(work)
    try:
        await wait_for_signal()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(MobilityConfig, args.config)
    require_files(cfg, args.config, MOBILITY_FILES)  # exit 2 now, not retries forever
    if not cfg.site_url:
        agent = Agent(cfg)
        settled()
        try:
            await _until_signal(agent.run_forever())
        finally:
            agent.close()
        return 0
    try:
        site = SiteClient(cfg.site_url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    except SiteError as e:
        raise CliError(str(e)) from None
    async with site:
        managed = ManagedAgent(cfg, site, config=Path(args.config),
                               renew_before_days=args.renew_before_days)
        settled()
        try:
            await _until_signal(managed.run_forever())
        finally:
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
    en.add_argument("--api", default=os.environ.get("SITERECOVERY_API", DEFAULT_API),
                    help="admin API URL, with the token (default: $SITERECOVERY_API or "
                         "%(default)s)")
    en.add_argument("--token-file",
                    help="admin API token file, the admin path (default: "
                         "$SITERECOVERY_TOKEN_FILE, else DATA_DIR/configserver/api-token "
                         "when it exists)")
    en.add_argument("--site-url",
                    help="with --token-file: the site listener the agent will report to "
                         "(https://HOST:9441); with --site it is --site")
    en.add_argument("--server", default="127.0.0.1:9443", help="process server HOST:PORT")
    en.add_argument("--disk", action="append", required=True,
                    help="NAME=PATH of a disk to protect (block device or image file)")
    en.add_argument("--out", required=True, help="directory for certificates and config")
    en.add_argument("--json", action="store_true",
                    help="machine-readable output: the files written, the certificate's "
                         "serial and expiry")
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
    agentfailback.register(msub)
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
