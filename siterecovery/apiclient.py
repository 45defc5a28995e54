"""The admin API client: what every CLI verb that talks to the configuration server
uses (and what the tests use, so they go through real HTTP).

Also the CLI plumbing shared by those verbs: ``--api`` / ``--token-file`` /
``--json`` options, and plain tables for humans.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from siterecovery.errors import CliError

DEFAULT_API = "http://127.0.0.1:9440"


class ApiCallError(CliError):
    """The configuration server refused a call; carries its error body."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message}" + (f"\nhint: {hint}" if hint else ""))
        self.status, self.api_code, self.message, self.hint = status, code, message, hint
        self.code = 2 if status in (400, 404, 409, 422) else 1


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


def add_api_args(p: argparse.ArgumentParser) -> None:
    """``--api``, ``--token-file``, ``--json`` for a verb that calls the admin API."""
    p.add_argument("--api", default=os.environ.get("SITERECOVERY_API", DEFAULT_API),
                   help="configuration server admin URL (default: $SITERECOVERY_API or "
                        "%(default)s)")
    p.add_argument("--token-file",
                   help="admin token file (default: $SITERECOVERY_TOKEN_FILE, else "
                        "DATA_DIR/configserver/api-token)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def token_from(args: argparse.Namespace) -> str:
    from siterecovery.embedded import default_data_dir

    path = Path(args.token_file or os.environ.get("SITERECOVERY_TOKEN_FILE")
                or Path(default_data_dir()) / "configserver" / "api-token")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CliError(f"cannot read the admin token: {e}\n"
                       "hint: pass --token-file (the configuration server writes "
                       "DATA_DIR/configserver/api-token at first start)") from None
    if not token:
        raise CliError(f"the admin token file {path} is empty")
    return token


def client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.api, token_from(args))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are (key, header) pairs."""
    if not rows:
        return "(none)"

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}"
        if isinstance(v, (list, dict)):
            return json.dumps(v)
        return str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def show(doc: Any, args: argparse.Namespace, human: str) -> int:
    """Print ``doc`` as JSON with --json, else the human text."""
    print(json.dumps(doc) if args.json else human)
    return 0
