"""The process server's one client of the configuration server's internal API.

Used by the point reporter and heartbeats (``reporter.py``), the policy pull and the
forgotten-points outbox (``policies.py``, ``retention.py``) and the trust list
(``trust.py``). It knows the base URL (``configserver_url``), the internal token
(``configserver_token_file``, read at each request so a replaced token is picked up),
the TLS context (the site listener is served under our own CA, ``tls_ca``), a timeout
per request and a size cap per answer.

Error contract: every request either returns an ``Answer`` (any HTTP status: what a
status means is the caller's business) or raises ``ConfigServerError`` —
``ConfigServerUnavailableError`` when the server could not be asked (connection,
timeout, unreadable token file), ``AnswerTooLargeError`` (also a ``ValueError``: a
malformed answer) when the body passes the cap. Cancellation passes through.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from common.backoff import Backoff

log = structlog.get_logger("procserver.csclient")

TIMEOUT = 30.0
MAX_ANSWER_BYTES = 16 << 20


class ConfigServerError(Exception):
    """A request to the configuration server did not produce an answer we can use."""


class ConfigServerUnavailableError(ConfigServerError):
    """The configuration server could not be asked (network, timeout, token file)."""


class AnswerTooLargeError(ConfigServerError, ValueError):
    """The configuration server's answer is larger than the request's size cap."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)

    def excerpt(self, n: int = 500) -> str:
        """The start of the body, for error messages."""
        return self.body[:n].decode(errors="replace")


class ConfigServerClient:
    """Requests to ``url`` with the internal token; one connection pool for all users."""

    def __init__(self, url: str, token_file: str, ca_file: str, *,
                 timeout: float = TIMEOUT, max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.url = url.rstrip("/")
        self.token_file = Path(token_file)
        self.ca_file = ca_file
        self.timeout, self.max_bytes = timeout, max_bytes
        self._http: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        """Whether a configuration server is configured at all."""
        return bool(self.url)

    def _tls(self) -> ssl.SSLContext | bool:
        if self.url.startswith("https:"):
            return ssl.create_default_context(cafile=self.ca_file)  # the site listener
        return True

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._tls()))
        return self._http

    async def _headers(self) -> dict[str, str]:
        try:
            token = await asyncio.to_thread(self.token_file.read_text)
        except OSError as e:
            raise ConfigServerUnavailableError(f"cannot read token file: {e}") from e
        return {"Authorization": f"Bearer {token.strip()}"}

    async def wait_token(self, blocked_event: str) -> None:
        """Return once the token file can be read; until then log ``blocked_event`` and
        retry with back-off (a configuration server installed after us writes it)."""
        backoff = Backoff(jitter=False)
        while True:
            try:
                await self._headers()
                return
            except ConfigServerUnavailableError as e:
                delay = backoff.next()
                log.error(blocked_event, error=str(e),
                          hint="configserver_token_file must name the configuration "
                               "server's internal-token file", retry_in_seconds=delay)
                await asyncio.sleep(delay)

    async def request(self, method: str, path: str, *, doc: Any = None,
                      params: dict[str, str] | None = None, timeout: float | None = None,
                      max_bytes: int | None = None) -> Answer:
        """``method`` ``path`` (below the base URL) with ``doc`` as a JSON body."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        headers = await self._headers()
        try:
            async with self._session().request(
                    method, self.url + path, json=doc, params=params, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as resp:
                body = bytearray()
                while chunk := await resp.content.readany():
                    body += chunk
                    if len(body) > cap:
                        raise AnswerTooLargeError(f"the answer to {method} {path} is larger "
                                                  f"than {cap} bytes")
                return Answer(resp.status, bytes(body))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ConfigServerUnavailableError(
                f"{method} {path}: {str(e) or type(e).__name__}") from e

    async def get(self, path: str, **kw: Any) -> Answer:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, doc: Any, **kw: Any) -> Answer:
        return await self.request("POST", path, doc=doc, **kw)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
