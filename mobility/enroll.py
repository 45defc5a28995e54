"""Enrollment: this machine's first certificate, and the agent's files written from it.

``enroll_with_passphrase`` is the agent's own path (the site listener and the
enrollment passphrase, for a machine the operator added to the inventory);
``write_agent`` writes what any issuance returned (the admin path gets it over the
admin API and writes it the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.fs import atomic_write
from mobility import agentfile
from mobility.siteclient import SiteClient


def write_agent(out: Path, issued: dict[str, Any], *, machine: str, server_host: str,
                server_port: int, disks: list[tuple[str, str]], site_url: str = "") -> Path:
    """Write ca.pem, agent.pem, agent.key (0600) and mobility.toml into ``out`` (created
    0700 if missing) from ``issued`` (``ca``, ``cert``, ``key``); return mobility.toml.

    Each file is replaced whole (``atomic_write``); mobility.toml comes last, so it never
    names files that are not there yet."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca, cert, key = out / "ca.pem", out / "agent.pem", out / "agent.key"
    atomic_write(ca, issued["ca"], mode=0o644)
    atomic_write(cert, issued["cert"], mode=0o644)
    atomic_write(key, issued["key"])
    cfg = out / "mobility.toml"
    atomic_write(cfg, agentfile.render(
        machine=machine, server_host=server_host, server_port=server_port,
        site_url=site_url, tls_ca=str(ca.resolve()), tls_cert=str(cert.resolve()),
        tls_key=str(key.resolve()), state_dir=str((out / "state").resolve()), disks=disks),
        mode=0o644)
    return cfg


async def enroll_with_passphrase(site: SiteClient, passphrase: str, out: Path, *,
                                 machine: str, server_host: str, server_port: int,
                                 disks: list[tuple[str, str]]) -> Path:
    """Enroll ``machine`` with the passphrase over ``site`` (verified against the CA,
    no client certificate) and write the agent's files into ``out``, with ``site``'s
    URL as the listener the agent reports to. Raises ``SiteError``; nothing is written
    unless the certificate was issued."""
    issued = await site.enroll(machine, passphrase)
    return write_agent(out, issued, machine=machine, server_host=server_host,
                       server_port=server_port, disks=disks, site_url=site.site_url)
