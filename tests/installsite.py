"""The servers of the push-install tests (tests/test_machine_install.py into an sshd's
chroot, tests/test_machine_install_vm.py into a VM): a configuration server on SQLite
with a site listener the pushed agent reaches, a process server ps1 holding the agent
bundle with a certificate from its CA, registered, and root's password account; and the
waits and restores both make of the replicated machine."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from procserver.config import ProcServerConfig
from procserver.installreq import BUNDLE_NAME
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.helpers import make_vault, open_vault, restore_all


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def install_servers(tmp: Path, bundle: Path, root_pw: str, *, site_host: str,
                          agent_host: str, ps_host: str, advertise: bool = False
                          ) -> AsyncIterator[tuple[ConfigServer, ProcServer, ApiClient]]:
    """The configuration server (its site listener on ``site_host``, a free port, named
    ``agent_host`` too), its admin API client and the running process server ps1 (on
    ``ps_host``: a free port advertised as ``agent_host:port`` if ``advertise``, else any
    port), with ``bundle`` as its agent bundle and account rootpw (root, ``root_pw``)."""
    cs = ConfigServer(ConfigServerConfig(
        data_dir=str(tmp / "cs"), listen_port=0, site_port=free_port(site_host),
        site_host=site_host, site_names=[agent_host],
        database_url=f"sqlite+aiosqlite:///{tmp / 'catalog.db'}"))
    await cs.start()
    try:
        async with ApiClient(cs.url, cs.admin_token) as api:
            tls = tmp / "ps-tls"
            doc = await api.post("/api/v1/certificates/procserver",
                                 {"name": "ps1", "hosts": ["127.0.0.1", agent_host]})
            tls.mkdir()
            for name, key in (("server.pem", "cert"), ("server.key", "key"), ("ca.pem", "ca")):
                (tls / name).write_text(doc[key])
            url, key_file = await make_vault(tmp)
            pdir = tmp / "ps"
            pdir.mkdir()
            shutil.copy(bundle, pdir / BUNDLE_NAME)
            port = free_port(ps_host) if advertise else 0
            ps = ProcServer(ProcServerConfig(
                data_dir=str(pdir), vault_url=url, vault_key_file=str(key_file),
                tls_cert=str(tls / "server.pem"), tls_key=str(tls / "server.key"),
                tls_ca=str(cs.ca.cert_path), listen_host=ps_host, listen_port=port,
                advertise_address=f"{agent_host}:{port}" if advertise else "",
                metrics_port=0, name="ps1", configserver_url=f"https://127.0.0.1:"
                f"{cs.site_port}", configserver_token_file=str(cs.cfg.internal_token_path)))
            try:
                await ps.start()
                async with asyncio.timeout(60), cs.changed:
                    while not (await api.get("/api/v1/procservers"))["procservers"]:
                        await cs.changed.wait()
                await api.post("/api/v1/accounts", {"name": "rootpw", "username": "root",
                                                    "kind": "password", "secret": root_pw})
                yield cs, ps, api
            finally:
                await ps.stop()
    finally:
        await cs.stop()


async def new_point(cs: ConfigServer, api: ApiClient, machine: str, old: str | None,
                    timeout: float, agent_log: Callable[[], Awaitable[str]],
                    protected: bool = True) -> str:
    """``machine``'s latest point once it is not ``old`` (and its item protected, if
    ``protected``); not within ``timeout`` s, an AssertionError with ``agent_log()``."""
    try:
        async with asyncio.timeout(timeout), cs.changed:
            while True:
                item = await api.get(f"/api/v1/items/{machine}")
                if (item["state"] == "protected" or not protected) and \
                        item["latest_point"] not in (None, old):
                    return str(item["latest_point"])
                await cs.changed.wait()
    except TimeoutError:
        log = await agent_log()
        raise AssertionError(f"no new point; the agent's log:\n{log}") from None


async def restored(ps: ProcServer, point_id: str, out: Path) -> dict[str, str]:
    """Point ``point_id`` restored from ``ps``'s vault into ``out``: each disk's sha256."""
    vault = await open_vault(Path(ps.cfg.vault_url.removeprefix("file://")),
                             Path(ps.cfg.vault_key_file))
    try:
        return await restore_all(vault, await vault.read_point(point_id), out)
    finally:
        await vault.close()
