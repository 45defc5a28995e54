"""Which agent certificates the configuration server still trusts.

TLS proves that a client certificate comes from the CA. That is not enough: a
machine may since have been disabled or removed from the inventory, or its
certificate revoked. With ``configserver_url`` set, the process server keeps the
configuration server's trust list (``GET /api/v1/internal/trust``, a long poll that
answers as soon as the list changes) and refuses, at HELLO, a certificate that

- was revoked (``certificate_revoked``),
- belongs to a machine that is not in the inventory (``machine_unknown``) or is
  disabled (``machine_disabled``),
- is not one the configuration server issued to that machine, or expired
  (``certificate_unknown``);

and refuses, at BEGIN and BASIS, a disk the inventory does not list for the machine
(``disk_not_allowed``): a machine may write only its own disks. A machine whose
inventory lists no disks is not restricted by name.

A refusal first re-fetches the list once (a machine enrolled a moment ago may be
newer than our copy), so only a current "no" refuses. The list is persisted in
``data_dir/trust.json``: while the configuration server is unreachable the last
known list applies (``trust_refresh_failed`` is logged). Before any list is known a
session waits up to ``FIRST_LIST_TIMEOUT`` seconds for one, then is refused
(``trust_unavailable``). Without ``configserver_url``, or when the list speaks for
another CA than our ``tls_ca`` (``trust_list_not_applicable``), the CA alone decides.

The list's ``revoked`` also holds revoked server certificates. When this process
server's own (``tls_cert``) is among them, it logs ``certificate_revoked`` at error
level (again at most once a minute while it refuses) and refuses every session at HELLO
(``server_certificate_revoked``) until a new certificate is in its ``tls_cert`` file
(served from the next handshake on, ``listener.server_ssl_context``): agents learn the
revocation from their settings and refuse its handshake anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.backoff import Backoff
from common.fs import atomic_write
from common.logthrottle import LogThrottle
from procserver.csclient import ConfigServerClient
from wire.protocol import ProtocolError

log = structlog.get_logger("procserver.trust")

FIRST_LIST_TIMEOUT = 10.0
LONG_POLL_SECONDS = 25
REFRESH_TIMEOUT = 5.0
MAX_LIST_BYTES = 16 << 20


def _ca_fingerprints(path: str) -> set[str]:
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError):
        return set()
    return {hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
            for c in certs}


def _serial_of(path: str) -> str | None:
    """The serial of the certificate in ``path`` as the configuration server spells it
    (lowercase hex, no leading zeros); None if it cannot be read."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return format(cert.serial_number, "x")


def _valid_doc(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("version"), str)
            and isinstance(doc.get("ca_sha256"), str)
            and isinstance(doc.get("revoked"), list)
            and isinstance(doc.get("machines"), list)
            and all(isinstance(m, dict) and isinstance(m.get("name"), str)
                    and isinstance(m.get("enabled"), bool)
                    and isinstance(m.get("serials"), list) for m in doc["machines"]))


class TrustList:
    """The configuration server's trust list (through ``client``), kept current and
    saved in ``data_dir``; it applies when it speaks for the CA in ``tls_ca``. With
    ``tls_cert`` (our own certificate), it also says whether that one was revoked."""

    def __init__(self, client: ConfigServerClient, data_dir: Path, tls_ca: str,
                 tls_cert: str = "") -> None:
        self.client, self.tls_ca = client, tls_ca
        self.tls_cert = tls_cert
        self.own_serial = _serial_of(tls_cert) if tls_cert else None
        self.own_revoked = False  # our own certificate is on the list: refuse sessions
        self._own_log = LogThrottle(60.0)
        self.enabled = client.enabled
        self.path = Path(data_dir) / "trust.json"
        self.version: str | None = None
        self.applies = False  # the list speaks for our tls_ca
        self._machines: dict[str, tuple[bool, frozenset[str]]] = {}
        self._revoked: frozenset[str] = frozenset()
        self._disks: dict[str, frozenset[str]] = {}
        self._known = asyncio.Event()
        self.changed = asyncio.Condition()
        self._fetch: asyncio.Task[None] | None = None
        self._fetch_wait = 0
        self._urgent = False
        self._poke = asyncio.Event()
        self._fetched = asyncio.Condition()  # notified when a request ends
        self._done_started = float("-inf")  # when the last request that ended had started
        self._fail_logged = 0.0

    # -- the list ---------------------------------------------------------------------
    def _apply(self, doc: dict[str, Any], source: str) -> bool:
        if doc["version"] == self.version:
            return False
        self.applies = doc["ca_sha256"] in _ca_fingerprints(self.tls_ca)
        self._machines = {m["name"]: (m["enabled"], frozenset(str(s) for s in m["serials"]))
                          for m in doc["machines"]}
        self._revoked = frozenset(str(s) for s in doc["revoked"])
        self._disks = {m["name"]: frozenset(str(d) for d in m.get("disks") or [])
                       for m in doc["machines"]}
        self.version = doc["version"]
        self._check_own(source)
        self._known.set()
        if not self.applies:
            log.warning("trust_list_not_applicable", source=source,
                        hint="the configuration server's CA is not this process server's "
                             "tls_ca: the CA alone decides which agents may connect")
        else:
            log.info("trust_list_updated", version=self.version, source=source,
                     machines=len(self._machines), revoked=len(self._revoked))
        return True

    def _check_own(self, source: str) -> None:
        revoked = self.applies and self.own_serial is not None and \
            self.own_serial in self._revoked
        if revoked and not self.own_revoked:
            self._log_own_revoked(source)
        elif self.own_revoked and not revoked:
            log.warning("certificate_revocation_lifted", serial=self.own_serial,
                        source=source, hint="accepting agents again")
        self.own_revoked = revoked

    def _log_own_revoked(self, source: str) -> None:
        suppressed = self._own_log.admit("own")
        if suppressed is not None:
            log.error("certificate_revoked", serial=self.own_serial, source=source,
                      refused_since_last=suppressed,
                      hint="this process server's own certificate was revoked: it refuses "
                           "every agent until it has a new one (siterecovery cert procserver "
                           "--name NAME --host HOST --out DIR --force into its tls_cert and "
                           "tls_key; no restart needed)")

    def _load_saved(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("trust_list_unreadable", path=str(self.path), error=str(e))
            return
        if _valid_doc(doc):
            self._apply(doc, "saved")

    def _save(self, doc: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(doc))

    async def _get(self, wait: int) -> None:
        """One request; apply and save the answer if it is new."""
        params = {"wait": str(wait)} if self.version is None else \
            {"version": self.version, "wait": str(wait)}
        answer = await self.client.get("/api/v1/internal/trust", params=params,
                                       timeout=LONG_POLL_SECONDS + 15,
                                       max_bytes=MAX_LIST_BYTES)
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {answer.body[:200]!r}")
        doc = answer.json()
        if not _valid_doc(doc):
            raise RuntimeError("the answer is not a trust list")
        if self._apply(doc, "configserver"):
            await asyncio.to_thread(self._save, doc)
            async with self.changed:
                self.changed.notify_all()

    async def run(self) -> None:
        """Keep the list current. This loop makes every request, one at a time: a long
        poll, or an immediate request when a session asked for one (``_refresh``), with
        backoff while the configuration server is unreachable."""
        if not self.enabled:
            return
        await asyncio.to_thread(self._load_saved)
        async with self.changed:  # waiters may accept the saved list
            self.changed.notify_all()
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            urgent, self._urgent = self._urgent, False
            started = loop.time()
            self._fetch_wait = 0 if urgent else LONG_POLL_SECONDS
            self._fetch = asyncio.create_task(self._get(self._fetch_wait))
            failed: Exception | None = None
            try:
                await self._fetch
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the process server stops (awaiting it cancelled the fetch)
                continue  # a long poll interrupted for an immediate request
            except Exception as e:  # any failure: keep the last list
                failed = e
            async with self._fetched:
                self._done_started = started
                self._fetched.notify_all()
            if failed is None:
                backoff.reset()
                continue
            first = backoff.failures == 0
            delay = backoff.next()
            self._failed(failed, delay, first)
            self._poke.clear()
            if not self._urgent:
                try:
                    async with asyncio.timeout(delay):
                        await self._poke.wait()
                except TimeoutError:
                    pass

    def _failed(self, e: BaseException, delay: float, first: bool) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._fail_logged >= 60 or first:  # at most once a minute
            self._fail_logged = loop.time()
            log.warning("trust_refresh_failed", error=str(e) or type(e).__name__,
                        known=self.version, retry_in_seconds=round(delay, 2),
                        hint="the last known trust list applies until the configuration "
                             "server answers")

    def _ask_now(self) -> None:
        """Have the loop make an immediate request (interrupting a long poll)."""
        self._urgent = True
        self._poke.set()
        if self._fetch is not None and not self._fetch.done() and self._fetch_wait:
            self._fetch.cancel()

    def wake(self) -> None:
        """Re-fetch now (the configuration server asked for a refresh)."""
        self._ask_now()

    async def _refresh(self, since: float) -> None:
        """Wait until a request that started after ``since`` has been answered (or has
        failed), at most ``REFRESH_TIMEOUT`` seconds."""
        self._ask_now()
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT), self._fetched:
                await self._fetched.wait_for(lambda: self._done_started >= since)
        except TimeoutError:
            log.warning("trust_refresh_slow", timeout_seconds=REFRESH_TIMEOUT,
                        hint="the last known trust list applies")

    # -- the check --------------------------------------------------------------------
    def _reason(self, machine: str, serial: str) -> tuple[str, str] | None:
        if serial in self._revoked:
            return "certificate_revoked", f"certificate {serial} of {machine!r} was revoked"
        entry = self._machines.get(machine)
        if entry is None:
            return "machine_unknown", (f"machine {machine!r} is not in the configuration "
                                       "server's inventory (removed, or never added)")
        enabled, serials = entry
        if not enabled:
            return "machine_disabled", f"machine {machine!r} is disabled"
        if serial not in serials:
            return "certificate_unknown", (f"certificate {serial} is not one the configuration "
                                           f"server issued to {machine!r}, or it expired")
        return None

    async def authorize(self, machine: str, peercert: dict[str, Any] | None) -> None:
        """Raise ``ProtocolError`` if the configuration server no longer trusts this
        client certificate; return if it does (or if only the CA decides)."""
        if not self.enabled:
            return
        serial = str((peercert or {}).get("serialNumber", "")).lower().lstrip("0")
        loop = asyncio.get_running_loop()
        since = loop.time()
        if not self._known.is_set():
            try:
                async with asyncio.timeout(FIRST_LIST_TIMEOUT):
                    await self._known.wait()
            except TimeoutError:
                raise ProtocolError(
                    "trust_unavailable", "this process server has not yet received the "
                    "configuration server's trust list; try again later") from None
        if not self.applies:
            return
        if self.own_revoked and (serial_now := _serial_of(self.tls_cert)) is not None \
                and serial_now != self.own_serial:  # a new certificate was installed
            self.own_serial = serial_now
            self._check_own("certificate_file")
        if self.own_revoked:
            self._log_own_revoked("session")
            raise ProtocolError(
                "server_certificate_revoked", f"this process server's certificate "
                f"{self.own_serial} was revoked: it accepts no session until it has a new "
                "one")
        if self._reason(machine, serial) is None:
            return
        await self._refresh(since)
        if not self.applies:
            return
        why = self._reason(machine, serial)
        if why is not None:
            raise ProtocolError(*why)

    def _foreign(self, machine: str, disks: list[str]) -> list[str]:
        own = self._disks.get(machine)
        if not self.applies or not own:
            return []
        return sorted(set(disks) - own)

    async def authorize_disks(self, machine: str, disks: list[str]) -> None:
        """Raise ``ProtocolError`` if any of ``disks`` is not one of the machine's own."""
        if not self.enabled or not self._foreign(machine, disks):
            return
        await self._refresh(asyncio.get_running_loop().time())  # added a moment ago?
        foreign = self._foreign(machine, disks)
        if foreign:
            raise ProtocolError(
                "disk_not_allowed", f"machine {machine!r} may write only its own disks "
                f"({', '.join(sorted(self._disks.get(machine, ())))}); not "
                f"{', '.join(foreign)}: add them to the machine in the inventory first")

    async def wait_until(self, predicate: Callable[[TrustList], bool],
                         timeout: float = 60.0) -> None:
        """Wait until ``predicate(self)`` holds (tests, and whoever needs a fresh list)."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: predicate(self))

    def allows(self, machine: str, serial: str) -> bool:
        return not self.applies or self._reason(machine, serial) is None
