"""The all-in-one embedded installation: configuration + process server in one process.

Layout of a data directory::

    DATA_DIR/vault/            the local-folder vault (the default)
    DATA_DIR/vault.url         the vault this installation serves, when it is not the
                               default (``serve --vault azure://…`` on first start)
    DATA_DIR/vault.key         its key file (0600)
    DATA_DIR/configserver/     catalog (SQLite), CA, api-token, internal-token
    DATA_DIR/procserver/       HRL cache, bookkeeping (SQLite), TLS certificate

The vault: ``serve --vault URL`` (any store URL, credentials as for every verb) with
``--key-file`` and/or ``--passphrase-file`` / ``--passphrase-env``; without ``--vault``,
the one the data directory already serves, else ``DATA_DIR/vault``. A store that holds
no vault yet gets one on first start (a key file, plus a passphrase slot if one is
given), as the local folder always has. The URL is remembered in ``DATA_DIR/vault.url``:
the cache holds cycles that build on that vault's points, so a later start naming
another vault is refused.

The configuration server is given the vault and its key file (``vault_url``,
``vault_key_file``): it registers itself with the vault at start
(``configserver/selfregister.py``), so drills and failovers need no registration step.

The process server's certificate names the hosts agents reach it by (``--listen``'s
host, this machine's names when it listens everywhere, loopback); it is issued again at
start whenever those names change, or it does not match its key or the CA.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from common.fs import atomic_write
from configserver.ca import CertificateAuthority, write_bundle
from configserver.config import ConfigServerConfig
from procserver.config import ProcServerConfig
from siterecovery.daemon import StopSignals, settled
from siterecovery.errors import UsageError
from siterecovery.vaultopts import add_passphrase_args, passphrase
from vault.errors import NotFoundError
from vault.keyslots import KeyMaterial, new_keyfile, read_keyfile
from vault.repo import Vault
from vault.store.open import open_store

if TYPE_CHECKING:  # the servers are imported when they are started: the CLI's other verbs
    from configserver.server import ConfigServer  # do not pay for them
    from procserver.server import ProcServer

log = structlog.get_logger("siterecovery")


@dataclass(frozen=True)
class VaultChoice:
    """The vault ``serve`` was told to use: a store URL (None: the data directory's) and
    the key sources, as every vault verb names them. The passphrase options are passed
    on to the process server as they are (it reads them itself)."""

    url: str | None = None
    key_file: str | None = None
    passphrase_file: str | None = None
    passphrase_env: str | None = None


def add_serve_vault_args(p: argparse.ArgumentParser) -> None:
    """``serve``'s ``--vault``, ``--key-file``, ``--passphrase-file``/``--passphrase-env``."""
    p.add_argument("--vault", metavar="URL",
                   help="the vault to serve, e.g. azure://CONTAINER/PREFIX (credentials as for "
                        "every verb: ?connection_string_file=… or the environment); created on "
                        "first start if the store holds none. Default: the one DATA_DIR serves, "
                        "else the local folder DATA_DIR/vault")
    p.add_argument("--key-file", metavar="FILE",
                   help="the vault key file (default: DATA_DIR/vault.key, created with a new "
                        "vault)")
    add_passphrase_args(p)


def vault_choice(args: argparse.Namespace) -> VaultChoice:
    """The ``VaultChoice`` of ``serve``'s command line (a ``UsageError`` for a bad one)."""
    passphrase(args)  # both given, an unreadable file, an unset variable: usage errors now
    return VaultChoice(args.vault, args.key_file, args.passphrase_file, args.passphrase_env)


@dataclass
class Embedded:
    config: ConfigServer
    proc: ProcServer
    data_dir: Path
    vault_url: str
    key_file: str  # "" when the passphrase alone opens the vault


def _remembered_url(data_dir: Path) -> str | None:
    try:
        return (data_dir / "vault.url").read_text().strip() or None
    except FileNotFoundError:
        return None


def resolve_vault(data_dir: Path, choice: VaultChoice) -> tuple[str, str, bool]:
    """The vault URL and key file (``""``: none, the passphrase alone) to serve, and
    whether this data directory served that vault before. ``UsageError`` if
    ``choice.url`` is not the vault this data directory already serves."""
    default = f"file://{data_dir / 'vault'}"
    known = _remembered_url(data_dir)
    if known is None and (data_dir / "procserver").exists():
        known = default  # started before, on the default vault
    url = choice.url or known or default
    if known is not None and url != known:
        raise UsageError(
            f"the data directory {data_dir} serves the vault {known}; its cache and catalog "
            f"belong to that vault, not {url}. Use another --data-dir for another vault")
    has_pass = bool(choice.passphrase_file or choice.passphrase_env)
    key = choice.key_file or ("" if has_pass and not (data_dir / "vault.key").exists()
                              else str(data_dir / "vault.key"))
    return url, key, known is not None


async def ensure_vault(data_dir: Path, choice: VaultChoice = VaultChoice()) -> tuple[str, str]:
    """Create the vault on first start if its store holds none: a key slot for the key
    file (created, 0600, if missing; one left by an interrupted first start is used) and
    one for the passphrase if given; then remember its URL (``DATA_DIR/vault.url``, only
    once the vault is there: a first start that fails, e.g. on a mistyped URL or bad
    credentials, binds the data directory to nothing). Returns the URL and key file."""
    url, key, served = resolve_vault(data_dir, choice)
    if served and not url.startswith("file://"):
        # Served before: storage that does not answer now must not stop serve (the
        # process server takes agents into its cache and opens the vault when it can).
        return url, key
    store = open_store(url)
    try:
        try:
            await store.stat("config")
        except NotFoundError:
            key = key or str(data_dir / "vault.key")  # a new vault always gets its key file
            path = Path(key)
            # A crash between the key file and the vault leaves the key: use it.
            kek = read_keyfile(path) if path.exists() else new_keyfile(path)
            kms = [KeyMaterial(keyfile=kek)]
            secret = passphrase(argparse.Namespace(passphrase_file=choice.passphrase_file,
                                                   passphrase_env=choice.passphrase_env),
                                new=True)
            if secret is not None:
                kms.append(KeyMaterial(passphrase=secret))
            await Vault.create(store, kms)  # closed with its store, below
            log.info("vault_created", vault=store.url, key_file=key,
                     passphrase_slot=secret is not None)
    finally:
        await store.close()
    if not served and url != f"file://{data_dir / 'vault'}":
        atomic_write(data_dir / "vault.url", (url + "\n").encode(), mode=0o600)
    return url, key


def server_hosts(listen_host: str, site_names: list[str]) -> list[str]:
    """The names the process server's certificate must hold: loopback, the listen host,
    and this machine's names when it listens everywhere."""
    names = {"127.0.0.1", "localhost", listen_host, *site_names}
    return sorted(names - {"0.0.0.0", "::", ""})


def _cert_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return ips | set(san.get_values_for_type(x509.DNSName))


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def needs_server_cert(tls: Path, hosts: list[str], ca: CertificateAuthority) -> str | None:
    """Why the certificate in ``tls`` must be issued (again), or None if it is right:
    missing, unreadable, not for exactly ``hosts``, not signed by ``ca``, or not the
    certificate of ``server.key`` (a crash between writing the two)."""
    try:
        cert = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
        key = serialization.load_pem_private_key((tls / "server.key").read_bytes(), None)
    except FileNotFoundError:
        return "missing"
    except ValueError:
        return "unreadable"
    if _cert_names(cert) != {_normal(h) for h in hosts}:
        return "names changed"
    if cert.issuer != ca.cert.subject:
        return "another CA"
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return "another CA"
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.PEM, pub) != \
            key.public_key().public_bytes(serialization.Encoding.PEM, pub):
        return "key mismatch"
    return None


async def start_embedded(
    data_dir: str | Path, *, admin_port: int = 9440, site_port: int = 9441,
    listen_host: str = "127.0.0.1",
    listen_port: int = 9443, metrics_port: int = 9444, cache_quota_bytes: int = 8 << 30,
    vault: VaultChoice = VaultChoice(),
    procserver: Mapping[str, Any] | None = None,
) -> Embedded:
    """``procserver``: settings of the process server beyond these (``ProcServerConfig``
    fields, e.g. ``pack_zstd_level``)."""
    from configserver.certs import record_pem
    from configserver.server import ConfigServer
    from procserver.server import ProcServer

    d = Path(data_dir).resolve()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    url, key = await ensure_vault(d, vault)
    wildcard = listen_host in ("0.0.0.0", "::")
    # Listening everywhere: agents will reach us by this machine's names.
    site_names = sorted({socket.gethostname(), socket.getfqdn()}) if wildcard else []
    # It holds the vault's key file: it registers itself with the vault (selfregister.py)
    cs = ConfigServer(ConfigServerConfig(data_dir=str(d / "configserver"),
                                         listen_port=admin_port, site_port=site_port,
                                         site_host=listen_host, site_names=site_names,
                                         vault_key_file=str(Path(key).resolve()) if key else "",
                                         vault_url=url if key else ""))
    await cs.start()
    tls = d / "procserver" / "tls"
    ca = CertificateAuthority.load_or_create(cs.cfg.ca_dir)
    hosts = server_hosts(listen_host, site_names)
    why = needs_server_cert(tls, hosts, ca)
    if why is not None:
        # Agents check the name they connect to: a certificate without the listen host
        # (it changed since the first start) would fail every handshake.
        write_bundle(tls, "server", ca.issue_server("procserver", hosts), ca.cert_pem)
        log.info("server_certificate_issued", hosts=hosts, reason=why)
    await record_pem(cs.services, (tls / "server.pem").read_bytes(), "procserver")  # in cert list
    pcfg = ProcServerConfig(
        data_dir=str(d / "procserver"), vault_url=url, vault_key_file=key,
        vault_passphrase_file=vault.passphrase_file or "",
        vault_passphrase_env=vault.passphrase_env or "", tls_cert=str(tls / "server.pem"),
        tls_key=str(tls / "server.key"), tls_ca=str(cs.cfg.ca_dir / "ca.pem"),
        listen_host=listen_host, listen_port=listen_port, metrics_port=metrics_port,
        configserver_url=cs.url, configserver_token_file=str(cs.cfg.internal_token_path),
        cache_quota_bytes=cache_quota_bytes,
    )
    if procserver:
        pcfg = dataclasses.replace(pcfg, **procserver)
    ps = ProcServer(pcfg)
    try:
        await ps.start()
    except BaseException:
        await cs.stop()
        raise
    return Embedded(cs, ps, d, url, key)


async def stop_embedded(e: Embedded) -> None:
    await e.proc.stop()
    await e.config.stop()


async def serve(data_dir: str, admin_port: int, listen: str, metrics_port: int,
                site_port: int = 9441, vault: VaultChoice = VaultChoice()) -> int:
    host, _, port = listen.rpartition(":")
    signals = StopSignals()  # before the start: a stop during it is graceful too
    e = await start_embedded(data_dir, admin_port=admin_port, site_port=site_port,
                             listen_host=host or "127.0.0.1",
                             listen_port=int(port), metrics_port=metrics_port, vault=vault)
    settled()
    token = e.config.cfg.token_path
    kind = "local-folder" if e.vault_url.startswith("file://") else "blob-store"
    registration = ("at start, with this vault (siterecovery register --status)" if e.key_file
                    else "by hand: the passphrase alone opens this vault; give it a key "
                         "file (siterecovery vault key add --new-key-file KEYFILE), then "
                         "register with it (siterecovery register --vault-key KEYFILE)")
    keys = " + ".join(k for k, given in (
        (f"key file {e.key_file}", bool(e.key_file)),
        (f"passphrase from {vault.passphrase_file or '$' + str(vault.passphrase_env)}",
         bool(vault.passphrase_file or vault.passphrase_env))) if given)
    print(f"""siterecovery is running (embedded: SQLite + {kind} vault)
  data directory   {e.data_dir}
  vault            {e.proc.vaults.store.url}   {keys}
  registration     {registration}
  admin API        {e.config.url}   token file {token}
  web console      {e.config.url}/console/   (sign in with the token)
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
        await e.proc.serve_until(signals.wait())
    finally:
        await stop_embedded(e)
    return 0
