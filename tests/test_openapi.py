"""The admin API's OpenAPI document, checked by schemathesis against the running server."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiClient

# Every check schemathesis has, among them unsupported_method (405 with Allow, ST204),
# allow_header_conformance (ST205) and positive_data_acceptance (schema-valid data is
# accepted, ST202: the cross-field rules are in the schema or listed as x-refusals).
CHECKS = "all"
# What positive_data_acceptance accepts by default, and 422 for the operations whose
# refusals no schema can state (x-refusals, listed in their descriptions).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


# Slower than this is a failure (max_response_time), but for the documented long polls.
RESPONSE_SECONDS = 10
# Examples per operation: every check on SQLite; on PostgreSQL fewer (what differs there
# is the database's own refusals: lengths, integer ranges, encodings), for the suite's time.
EXAMPLES = {"sqlite": 15, "postgresql": 8}


def schemathesis_config(doc: dict[str, Any]) -> str:
    """schemathesis.toml from the document: 422 also counts as accepting schema-valid data
    for exactly the operations that document refusals beyond their schema, and a long poll
    may take the ``wait`` it documents."""
    lines = []
    for ops in doc["paths"].values():
        for op in ops.values():
            settings = []
            if op.get("x-refusals"):
                settings.append("checks.positive_data_acceptance.expected-statuses = "
                                + json.dumps([*ACCEPTED, "422"]))
            wait = [p["schema"]["maximum"] for p in op.get("parameters", [])
                    if p["name"] == "wait"]
            if wait:
                settings.append(f"checks.max_response_time = {wait[0] + RESPONSE_SECONDS}")
                settings.append(f"request-timeout = {wait[0] + RESPONSE_SECONDS}")
            if settings:
                lines += ["[[operations]]",
                          f"include-operation-id = {json.dumps(op['operationId'])}",
                          *settings, ""]
    return "\n".join(lines)


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
    async with ApiClient(cs.url, cs.admin_token) as api:
        config = cwd / "schemathesis.toml"
        config.write_text(schemathesis_config(await api.get("/openapi.json")))
    proc = await asyncio.create_subprocess_exec(
        str(st), "--config-file", str(config), "run", f"{cs.url}/openapi.json",
        "--url", cs.url, *select,
        "-H", f"Authorization: Bearer {token}",
        "--checks", CHECKS, "--max-examples", str(EXAMPLES[cs.engine.dialect.name]),
        "--seed", "20261125",
        "--generation-database", "none", "--workers", "1", "--no-color",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    (cwd / f"schemathesis-{len(list(cwd.glob('schemathesis-*.log')))}.log").write_text(text)
    assert proc.returncode == 0, text[-8000:]
    assert "Authentication failed" not in text, text[-3000:]
    return text


async def test_schemathesis_finds_no_server_errors_or_schema_violations(
        cs: ConfigServer, tmp_path: Path) -> None:
    """Every admin route with the admin token, every internal one with the process servers'
    token: no 5xx, every status and body as documented, schema-invalid input refused."""
    await _schemathesis(cs, tmp_path, cs.admin_token, "--exclude-path-regex", "/internal/")
    await _schemathesis(cs, tmp_path, cs.internal_token, "--include-path-regex", "/internal/")
