"""The admin API client: what every CLI verb that talks to the configuration server
uses (and what the tests use, so they go through real HTTP). How a verb gets one from
its command line: siterecovery/apiopts.py.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import aiohttp

from siterecovery.errors import EXIT_FAIL, EXIT_USAGE, CliError

DEFAULT_API = "http://127.0.0.1:9440"


class ApiCallError(CliError):
    """The configuration server refused a call; carries its error body."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message}" + (f"\nhint: {hint}" if hint else ""))
        self.status, self.api_code, self.message, self.hint = status, code, message, hint
        self.code = EXIT_USAGE if status in (400, 404, 409, 422) else EXIT_FAIL


class ApiClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._http is not None:
            await self._http.close()

    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None) -> Any:
        assert self._http is not None, "use 'async with ApiClient(...)'"
        q = {k: (str(v).lower() if isinstance(v, bool) else str(v))
             for k, v in (params or {}).items() if v is not None}
        try:
            async with self._http.request(
                    method, self.base_url + path, json=body, params=q,
                    headers={"Authorization": f"Bearer {self.token}"}) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectionError as e:
            raise CliError(f"cannot reach the configuration server at {self.base_url}: {e}\n"
                           "hint: is it running? ('siterecovery serve' or the "
                           "siterecovery-configserver service); see --api") from None
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        if status >= 400:
            err = (doc or {}).get("error", {}) if isinstance(doc, dict) else {}
            raise ApiCallError(status, str(err.get("code", f"http_{status}")),
                               str(err.get("message", text[:200] or f"HTTP {status}")),
                               str(err.get("hint", "")))
        return doc

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params=params)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.call("POST", path, body if body is not None else {})

    async def put(self, path: str, body: Any) -> Any:
        return await self.call("PUT", path, body)

    async def patch(self, path: str, body: Any) -> Any:
        return await self.call("PATCH", path, body)

    async def delete(self, path: str) -> Any:
        return await self.call("DELETE", path)
