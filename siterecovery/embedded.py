"""The all-in-one embedded installation: configuration + process server in one process.

Layout of a data directory::

    DATA_DIR/vault/            the local-folder vault
    DATA_DIR/vault.key         its key file (0600)
    DATA_DIR/configserver/     catalog (SQLite), CA, api-token, internal-token
    DATA_DIR/procserver/       HRL cache, bookkeeping (SQLite), TLS certificate
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import structlog

from configserver.ca import CertificateAuthority, write_bundle
from configserver.certs import record_pem
from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from procserver.config import ProcServerConfig
from procserver.server import ProcServer
from siterecovery.daemon import wait_for_signal
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore

log = structlog.get_logger("siterecovery")


@dataclass
class Embedded:
    config: ConfigServer
    proc: ProcServer
    data_dir: Path

    @property
    def vault_url(self) -> str:
        return f"file://{self.data_dir / 'vault'}"


async def ensure_vault(data_dir: Path) -> None:
    key = data_dir / "vault.key"
    if not (data_dir / "vault" / "config").exists():
        # A crash between the key file and the vault leaves the key: use it.
        kek = read_keyfile(key) if key.exists() else new_keyfile(key)
        v = await Vault.create(LocalStore(data_dir / "vault"), KeyMaterial(keyfile=kek))
        log.info("vault_created", vault=str(data_dir / "vault"), key_file=str(key))
        await v.close()


async def start_embedded(
    data_dir: str | Path, *, admin_port: int = 9440, site_port: int = 9441,
    listen_host: str = "127.0.0.1",
    listen_port: int = 9443, metrics_port: int = 9444, cache_quota_bytes: int = 8 << 30,
) -> Embedded:
    d = Path(data_dir).resolve()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    await ensure_vault(d)
    wildcard = listen_host in ("0.0.0.0", "::")
    # Listening everywhere: agents will reach us by this machine's names.
    site_names = sorted({socket.gethostname(), socket.getfqdn()}) if wildcard else []
    cs = ConfigServer(ConfigServerConfig(data_dir=str(d / "configserver"),
                                         listen_port=admin_port, site_port=site_port,
                                         site_host=listen_host, site_names=site_names))
    await cs.start()
    tls = d / "procserver" / "tls"
    if not (tls / "server.pem").exists():
        ca = CertificateAuthority.load_or_create(cs.cfg.ca_dir)
        names = {"127.0.0.1", "localhost", listen_host, *site_names}
        hosts = sorted(names - {"0.0.0.0", "::", ""})
        write_bundle(tls, "server", ca.issue_server("procserver", hosts), ca.cert_pem)
    await record_pem(cs.services, (tls / "server.pem").read_bytes(), "procserver")  # in cert list
    pcfg = ProcServerConfig(
        data_dir=str(d / "procserver"), vault_url=f"file://{d / 'vault'}",
        vault_key_file=str(d / "vault.key"), tls_cert=str(tls / "server.pem"),
        tls_key=str(tls / "server.key"), tls_ca=str(cs.cfg.ca_dir / "ca.pem"),
        listen_host=listen_host, listen_port=listen_port, metrics_port=metrics_port,
        configserver_url=cs.url, configserver_token_file=str(cs.cfg.internal_token_path),
        cache_quota_bytes=cache_quota_bytes,
    )
    ps = ProcServer(pcfg)
    try:
        await ps.start()
    except BaseException:
        await cs.stop()
        raise
    return Embedded(cs, ps, d)


async def stop_embedded(e: Embedded) -> None:
    await e.proc.stop()
    await e.config.stop()


async def serve(data_dir: str, admin_port: int, listen: str, metrics_port: int,
                site_port: int = 9441) -> int:
    host, _, port = listen.rpartition(":")
    e = await start_embedded(data_dir, admin_port=admin_port, site_port=site_port,
                             listen_host=host or "127.0.0.1",
                             listen_port=int(port), metrics_port=metrics_port)
    token = e.config.cfg.token_path
    print(f"""siterecovery is running (embedded: SQLite + local-folder vault)
  data directory   {e.data_dir}
  vault            {e.vault_url}   key file {e.data_dir / 'vault.key'}
  admin API        {e.config.url}   token file {token}
  replication      {host or '127.0.0.1'}:{e.proc.port} (mutual TLS)
  metrics          {e.config.url}/metrics  http://127.0.0.1:{e.proc.metrics_port}/metrics
Protect a machine:
  siterecovery mobility enroll --machine NAME --api {e.config.url} --token-file {token} \\
      --site-url {e.config.site_url} --server {host or '127.0.0.1'}:{e.proc.port} \\
      --disk sda=/dev/sda --out ./agent
  siterecovery mobility run --config ./agent/mobility.toml
  (another machine, once added to the inventory: mobility enroll --site {e.config.site_url}
   --passphrase-file <copy of {e.config.cfg.passphrase_path}>
   --ca-file <copy of {e.config.ca.cert_path}> ...)
Stop with Ctrl-C.""", flush=True)
    try:  # a crashed part of the process server ends the run (TaskCrashedError, exit 1)
        await e.proc.serve_until(wait_for_signal())
    finally:
        await stop_embedded(e)
    return 0
