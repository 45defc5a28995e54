"""The admin API's OpenAPI document, checked by schemathesis against the running server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")


async def test_openapi_document_describes_every_route(cs: ConfigServer) -> None:
    async with ApiClient(cs.url, cs.admin_token) as api:
        doc = await api.get("/openapi.json")
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(r.method, r.path) for r in cs.admin_table.routes}
    assert documented == served
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["summary"] and "default" in op["responses"]


async def _schemathesis(cs: ConfigServer, cwd: Path, token: str, *select: str) -> str:
    st = Path(sys.executable).parent / "schemathesis"
    proc = await asyncio.create_subprocess_exec(
        str(st), "run", f"{cs.url}/openapi.json", "--url", cs.url, *select,
        "-H", f"Authorization: Bearer {token}",
        "--checks", CHECKS, "--max-examples", "25", "--seed", "20261125",
        "--generation-database", "none", "--workers", "1", "--no-color",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    assert "Authentication failed" not in text, text[-3000:]
    return text


async def test_schemathesis_finds_no_server_errors_or_schema_violations(
        cs: ConfigServer, tmp_path: Path) -> None:
    """Every admin route with the admin token, every internal one with the process servers'
    token: no 5xx, every status and body as documented, schema-invalid input refused."""
    await _schemathesis(cs, tmp_path, cs.admin_token, "--exclude-path-regex", "/internal/")
    await _schemathesis(cs, tmp_path, cs.internal_token, "--include-path-regex", "/internal/")
