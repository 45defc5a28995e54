"""The agent's one client of the configuration server's site listener (HTTPS, port 9441).

Enrollment (the passphrase, no client certificate yet), certificate renewal, settings,
heartbeats and replication progress all go through ``SiteClient``. Every failure is a
``SiteError``: ``SiteRefused`` (the listener answered with an error), ``SiteUnreachable``
(no answer: connection, TLS or timeout; ``SiteCertificateUnverified`` when the listener's
certificate does not verify against the CA file, ``SiteCertificateRevoked`` when it is on
the CA's revocation list the last settings carried), ``SiteBadAnswer`` (a success
that is not a JSON object) or ``SiteTLSFilesError`` (the local CA,
certificate or key file cannot be loaded). The exceptions carry the parts, so that the
CLI can word them for an operator and the daemon can log them.

The agent replicates on its own configuration when the site listener cannot be
reached; settings, heartbeats and progress steer and report, they never gate the data
path.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from common.pacing import Schedule
from mobility import AGENT_VERSION


class SiteError(Exception):
    """A call to the site listener failed."""


class SiteTLSFilesError(SiteError):
    """The CA file, or the client certificate and key, cannot be loaded."""


class SiteRefused(SiteError):
    """The site listener answered with an error status.

    ``body`` is the answer's JSON (``{"error": {"message": "HTTP <status>"}}`` when it
    was not JSON); ``code``, ``message`` and ``hint`` are its ``error`` fields."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        self.status, self.body = status, body
        self.code = str(err.get("code", ""))
        self.message, self.hint = str(err.get("message", "")), str(err.get("hint", ""))
        super().__init__(f"{method} {path}: HTTP {status} {self.code}: {self.message} "
                         f"{self.hint}".strip())


class SiteUnreachable(SiteError):
    """No usable answer: the connection, the TLS handshake or the timeout failed.
    ``cause`` is the underlying error."""

    def __init__(self, method: str, path: str, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"{method} {path}: {type(cause).__name__}: {cause}")


class SiteBadAnswer(SiteError):
    """The listener answered success with something that is not a JSON object."""

    def __init__(self, method: str, path: str, why: str) -> None:
        super().__init__(f"{method} {path}: {why}")


class SiteCertificateUnverified(SiteUnreachable):
    """The listener's certificate does not verify against the CA file
    (``certificate_error`` says why)."""

    def __init__(self, method: str, path: str,
                 cause: aiohttp.ClientConnectorCertificateError) -> None:
        super().__init__(method, path, cause)
        self.certificate_error = cause.certificate_error


class SiteCertificateRevoked(SiteCertificateUnverified):
    """The listener presented a certificate on the CA's revocation list: the handshake
    was refused, nothing was sent."""

    def __str__(self) -> str:
        return (f"{super().__str__()} (the site listener's certificate was revoked; the "
                "configuration server gives its listener a new one when it is revoked or "
                "restarted)")


# OpenSSL's X509_V_ERR_CERT_REVOKED
CERT_REVOKED = 23
CHANGES_MAX_WAIT = 55.0  # the configuration server answers a long poll within this long


def tls_context(tls_ca: str, tls_cert: str | None = None, tls_key: str | None = None,
                revocation_list: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the listener against ``tls_ca`` and, given both,
    authenticates with ``tls_cert``/``tls_key``; with ``revocation_list`` (the path of a
    CRL from the CA, PEM) a listener certificate on it fails the handshake. Raises
    ``SiteTLSFilesError``."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_ca)
        if tls_cert and tls_key:
            ctx.load_cert_chain(tls_cert, tls_key)
        if revocation_list:
            ctx.load_verify_locations(cafile=revocation_list)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as e:
        raise SiteTLSFilesError(f"cannot load the TLS files ({tls_ca}"
                                + (f", {tls_cert}, {tls_key}" if tls_cert else "")
                                + f"): {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class Settings:
    """What the configuration server wants this machine to do."""

    replicate: bool
    item_state: str | None
    resync_required: bool
    disks: list[dict[str, Any]]
    process_server: str | None  # HOST:PORT
    crash_interval_seconds: float | None
    app_frequency_seconds: float | None  # None or 0: no app-consistent points
    block_size: int | None
    heartbeat_interval_seconds: float
    shutdown_request: str | None = None  # a failover wants a last cycle and a shutdown
    # A failback wants this point written onto the disks: {"request", "point"}.
    failback_request: dict[str, str] | None = None
    # The policy's send limit (None: the policy has none, mobility.toml's applies).
    send_limit: Schedule | None = None
    # Serials (lowercase hex) of revoked server certificates, and the CA's CRL of them.
    revoked_servers: frozenset[str] = frozenset()
    revocation_list: str | None = None
    # The machine's consistency group: name, members, interval_seconds,
    # barrier_timeout_seconds (None: in no group).
    group: dict[str, Any] | None = None
    # "recovered": this agent runs in the machine a failover recovered (its host id is
    # not the original's); "original" otherwise (configserver/hostroles.py).
    role: str = "original"
    # The recovered machine re-protected through its agent: the point its first cycle
    # compares the disks with (a resync by basis; afterwards deltas on its own maps).
    basis_point: str | None = None
    # What the agent acts on at once, hashed by the configuration server: the since of
    # ``SiteClient.changes`` (None: a server without the long poll).
    digest: str | None = None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Settings:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a malformed document."""
        policy = doc.get("policy") or {}
        ps = doc.get("process_server") or {}
        bw = doc.get("bandwidth")
        limit = None if bw is None else Schedule.from_mbps(
            float(bw["work_mbps"]), float(bw["off_mbps"]), str(bw["work_days"]),
            str(bw["work_hours"]))
        return cls(
            replicate=bool(doc["replicate"]), item_state=doc.get("item_state"),
            resync_required=bool(doc.get("resync_required")),
            disks=list(doc.get("disks") or []), process_server=ps.get("address"),
            crash_interval_seconds=policy.get("crash_consistent_interval_seconds"),
            app_frequency_seconds=policy.get("app_consistent_frequency_seconds"),
            block_size=policy.get("block_size"),
            heartbeat_interval_seconds=float(doc.get("heartbeat_interval_seconds", 60)),
            shutdown_request=doc.get("shutdown_request") or None, send_limit=limit,
            failback_request={"request": str(doc["failback_request"]["request"]),
                              "point": str(doc["failback_request"]["point"])}
            if doc.get("failback_request") else None,
            revoked_servers=frozenset(str(x).lower().lstrip("0")
                                      for x in doc.get("revoked_server_certificates") or ()),
            revocation_list=str(doc["server_revocation_list"])
            if doc.get("server_revocation_list") else None,
            group={"name": str(g["name"]), "members": [str(m) for m in g["members"]],
                   "interval_seconds": float(g["interval_seconds"]),
                   "barrier_timeout_seconds": float(g["barrier_timeout_seconds"])}
            if (g := doc.get("group")) else None,
            role=str(doc.get("role") or "original"),
            basis_point=str(doc["basis_point"]) if doc.get("basis_point") else None,
            digest=str(doc["digest"]) if doc.get("digest") else None)


class SiteClient:
    """The site listener at ``site_url``, verified against ``tls_ca``; with
    ``tls_cert``/``tls_key``, authenticated as this machine (mutual TLS).

    Use as ``async with SiteClient(...) as site``. The TLS files are loaded at
    construction (``SiteTLSFilesError``); every call has ``timeout`` seconds."""

    def __init__(self, site_url: str, tls_ca: str, tls_cert: str | None = None,
                 tls_key: str | None = None, timeout: float = 30.0) -> None:
        self.site_url, self.tls_ca = site_url.rstrip("/"), tls_ca
        self._cert, self._key = tls_cert, tls_key
        self.revocation_list: str | None = None  # the path of the CA's CRL, if any
        # The machine's SMBIOS UUID (mobility/hostid.py), sent with settings requests,
        # heartbeats and progress: it tells the original machine from its recovered copy.
        self.host_id: str | None = None
        self._ctx = tls_context(tls_ca, tls_cert, tls_key)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    def use_cert(self, tls_cert: str, tls_key: str) -> None:
        """Authenticate with this certificate from the next call on (after a renewal)."""
        self._cert, self._key = tls_cert, tls_key
        self._ctx = tls_context(self.tls_ca, tls_cert, tls_key, self.revocation_list)

    def use_revocation_list(self, revocation_list: str | None) -> None:
        """Refuse listener certificates on the CRL in this file (PEM; None: none) from the
        next call on (the file is read now)."""
        self._ctx = tls_context(self.tls_ca, self._cert, self._key, revocation_list)
        self.revocation_list = revocation_list

    async def __aenter__(self) -> SiteClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, body: Any = None,
                    expect: int | None = None, timeout: float | None = None) -> Any:
        """The answer's JSON. A success is any 2xx status, or exactly ``expect``.
        ``timeout``: this call's, instead of the client's."""
        assert self._http is not None, "use 'async with SiteClient(...)'"
        # (never None: aiohttp takes that as no timeout at all)
        limit = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._http.request(method, self.site_url + path, json=body,
                                          ssl=self._ctx, timeout=limit) as r:
                ok = r.status == expect if expect is not None else 200 <= r.status < 300
                try:
                    doc = await r.json(content_type=None)
                except ValueError as e:
                    if ok:
                        raise SiteBadAnswer(method, path, f"not JSON: {e}") from None
                    doc = {"error": {"message": f"HTTP {r.status}"}}
                if not ok:
                    raise SiteRefused(method, path, r.status, doc)
                return doc
        except aiohttp.ClientConnectorCertificateError as e:
            err = e.certificate_error
            if isinstance(err, ssl.SSLCertVerificationError) and \
                    err.verify_code == CERT_REVOKED:
                raise SiteCertificateRevoked(method, path, e) from None
            raise SiteCertificateUnverified(method, path, e) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise SiteUnreachable(method, path, e) from None

    async def _doc(self, method: str, path: str, body: Any = None,
                   expect: int | None = None) -> dict[str, Any]:
        doc = await self._call(method, path, body, expect)
        if not isinstance(doc, dict):
            raise SiteBadAnswer(method, path, f"not a JSON object: {doc!r:.200}")
        return doc

    async def enroll(self, machine: str, passphrase: str) -> dict[str, Any]:
        """This machine's first certificate, for the enrollment passphrase (no client
        certificate needed): ``{"ca", "cert", "key", "serial", ...}``."""
        return await self._doc("POST", "/api/v1/agent/enroll",
                               {"machine": machine, "passphrase": passphrase}, expect=201)

    async def renew(self) -> dict[str, Any]:
        """A new certificate for the one this client authenticates with:
        ``{"machine", "cert", "key", "serial", "not_after", ...}``."""
        path = "/api/v1/agent/renew"
        return await self._doc("POST", f"{path}?host_id={self.host_id}" if self.host_id
                               else path, {}, expect=201)

    async def settings(self) -> Settings:
        path = "/api/v1/agent/settings"
        host_id = self.host_id
        doc = await self._doc("GET", f"{path}?host_id={host_id}" if host_id else path)
        try:
            settings = Settings.from_doc(doc)
        except (KeyError, TypeError, ValueError) as e:
            raise SiteBadAnswer("GET", path, f"not agent settings: {e}") from None
        return settings

    async def changes(self, since: str, wait: float) -> str:
        """The machine's digest once it is not ``since`` (its settings' ``digest``), or
        after ``wait`` seconds (a long poll; ``SiteRefused`` 404 from a server without
        it)."""
        wait = max(0.0, min(wait, CHANGES_MAX_WAIT))
        doc = await self._call("GET", f"/api/v1/agent/settings/changes?since={since}"
                                      f"&wait={wait:.1f}", timeout=wait + 30.0)
        if not isinstance(doc, dict) or not isinstance(doc.get("digest"), str):
            raise SiteBadAnswer("GET", "/api/v1/agent/settings/changes",
                                f"not a digest: {doc!r:.200}")
        return str(doc["digest"])

    async def heartbeat(self, trackers: dict[str, dict[str, Any]] | None = None
                        ) -> dict[str, Any]:
        """``trackers``: per disk, its change tracker and its last verification."""
        body: dict[str, Any] = {"agent_version": AGENT_VERSION}
        if trackers is not None:
            body["trackers"] = trackers
        if self.host_id:
            body["host_id"] = self.host_id
        return await self._doc("POST", "/api/v1/agent/heartbeat", body)

    async def progress(self, disks: dict[str, float], resync: bool = False) -> None:
        await self._call("POST", "/api/v1/agent/progress", {
            "disks": disks, "resync": resync,
            **({"host_id": self.host_id} if self.host_id else {})})

    async def report_failback(self, request: str, point: str, error: str | None,
                              counts: dict[str, int]) -> None:
        """Answer a failback's request: the point written (``counts``: blocks_compared,
        blocks_written, bytes_written) or the error that stopped it."""
        await self._call("POST", "/api/v1/agent/failback", {
            "request": request, "point": point,
            "error": None if error is None else error[:2000], **counts})

    async def report_failback_progress(self, request: str, point: str,
                                       percent: float) -> None:
        """How far a failback's compare and writes are (0-100)."""
        await self._call("POST", "/api/v1/agent/failback", {
            "request": request, "point": point, "stage": "writing", "percent": percent})

    async def report_shutdown(self, request: str, stage: str, cycle: str | None,
                              error: str | None) -> None:
        """Answer a failover's shutdown request: ``shutting_down`` after the last cycle
        (its id, or the error that stopped it), ``shutdown_failed`` if the command
        failed."""
        await self._call("POST", "/api/v1/agent/shutdown", {
            "request": request, "stage": stage, "cycle": cycle,
            "error": None if error is None else error[:2000]})
