"""The agent's one client of the configuration server's site listener (HTTPS, port 9441).

Enrollment (the passphrase, no client certificate yet), certificate renewal, settings,
heartbeats and replication progress all go through ``SiteClient``. Every failure is a
``SiteError``: ``SiteRefused`` (the listener answered with an error), ``SiteUnreachable``
(no answer: connection, TLS or timeout; ``SiteCertificateUnverified`` when the listener's
certificate does not verify against the CA file), ``SiteBadAnswer`` (a success
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


def tls_context(tls_ca: str, tls_cert: str | None = None,
                tls_key: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the listener against ``tls_ca`` and, given both,
    authenticates with ``tls_cert``/``tls_key``. Raises ``SiteTLSFilesError``."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_ca)
        if tls_cert and tls_key:
            ctx.load_cert_chain(tls_cert, tls_key)
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

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Settings:
        policy = doc.get("policy") or {}
        ps = doc.get("process_server") or {}
        return cls(
            replicate=bool(doc["replicate"]), item_state=doc.get("item_state"),
            resync_required=bool(doc.get("resync_required")),
            disks=list(doc.get("disks") or []), process_server=ps.get("address"),
            crash_interval_seconds=policy.get("crash_consistent_interval_seconds"),
            app_frequency_seconds=policy.get("app_consistent_frequency_seconds"),
            block_size=policy.get("block_size"),
            heartbeat_interval_seconds=float(doc.get("heartbeat_interval_seconds", 60)),
            shutdown_request=doc.get("shutdown_request") or None)


class SiteClient:
    """The site listener at ``site_url``, verified against ``tls_ca``; with
    ``tls_cert``/``tls_key``, authenticated as this machine (mutual TLS).

    Use as ``async with SiteClient(...) as site``. The TLS files are loaded at
    construction (``SiteTLSFilesError``); every call has ``timeout`` seconds."""

    def __init__(self, site_url: str, tls_ca: str, tls_cert: str | None = None,
                 tls_key: str | None = None, timeout: float = 30.0) -> None:
        self.site_url, self.tls_ca = site_url.rstrip("/"), tls_ca
        self._ctx = tls_context(tls_ca, tls_cert, tls_key)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    def use_cert(self, tls_cert: str, tls_key: str) -> None:
        """Authenticate with this certificate from the next call on (after a renewal)."""
        self._ctx = tls_context(self.tls_ca, tls_cert, tls_key)

    async def __aenter__(self) -> SiteClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, body: Any = None,
                    expect: int | None = None) -> Any:
        """The answer's JSON. A success is any 2xx status, or exactly ``expect``."""
        assert self._http is not None, "use 'async with SiteClient(...)'"
        try:
            async with self._http.request(method, self.site_url + path, json=body,
                                          ssl=self._ctx) as r:
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
        return await self._doc("POST", "/api/v1/agent/renew", {}, expect=201)

    async def settings(self) -> Settings:
        return Settings.from_doc(await self._doc("GET", "/api/v1/agent/settings"))

    async def heartbeat(self) -> dict[str, Any]:
        return await self._doc("POST", "/api/v1/agent/heartbeat",
                               {"agent_version": AGENT_VERSION})

    async def progress(self, disks: dict[str, float], resync: bool = False) -> None:
        await self._call("POST", "/api/v1/agent/progress", {"disks": disks, "resync": resync})

    async def report_shutdown(self, request: str, stage: str, cycle: str | None,
                              error: str | None) -> None:
        """Answer a failover's shutdown request: ``shutting_down`` after the last cycle
        (its id, or the error that stopped it), ``shutdown_failed`` if the command
        failed."""
        await self._call("POST", "/api/v1/agent/shutdown", {
            "request": request, "stage": stage, "cycle": cycle,
            "error": None if error is None else error[:2000]})
