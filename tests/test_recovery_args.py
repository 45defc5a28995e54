"""The numeric options of the recovery verbs: a 0 or a negative is a bad argument, never
"not given" (which would mean the default: 6 hours for a failback's agent, the server's
timeouts for the others).

- The CLI (``siterecovery failover start|test|change-point|failback``, ``plan``/``group
  failback``) refuses it before any call, exit 2, naming the option; a value it takes
  reaches the job as given.
- The REST API (the item, plan and group verbs) answers 422 naming the field, and
  changes nothing: no job, the item's state as it was.

One server serves the module (SQLite, as tests/test_console_plans.py); the items are put
in their states in the catalog, so no disk or agent is needed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from configserver import db
from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from siterecovery.cli import main
from tests.helpers import REPO, run_cli
from tests.sitehelpers import add_procserver, seed_items, sqlite_configserver

ON_SERVER = pytest.mark.asyncio(loop_scope="module")

STATES = {"fo1": "failed_over", "fo2": "failed_over", "pr1": "protected",
          "pr2": "protected"}
NOWHERE = ("--api", "http://127.0.0.1:9")  # nothing listens: a refusal makes no call
# (CLI words, the option): each option of a recovery verb that takes seconds
SECONDS_OPTIONS = [
    (("failover", "failback", "fo1"), "--agent-timeout"),
    (("failover", "failback", "fo1"), "--shutdown-timeout"),
    (("failover", "start", "pr1"), "--shutdown-timeout"),
    (("failover", "start", "pr1"), "--drain-timeout"),
    (("failover", "test", "pr1"), "--drain-timeout"),
    (("failover", "change-point", "fo1"), "--drain-timeout"),
    (("plan", "failback", "back"), "--agent-timeout"),
    (("plan", "failback", "back"), "--shutdown-timeout"),
    (("group", "failback", "back"), "--agent-timeout"),
    (("group", "failback", "back"), "--shutdown-timeout"),
]
# (path, body, the field the 422 names)
REST_REFUSED = [
    ("/api/v1/items/fo1/failback", {"timeout_seconds": 0}, "timeout_seconds"),
    ("/api/v1/items/fo1/failback", {"timeout_seconds": -60}, "timeout_seconds"),
    ("/api/v1/items/fo1/failback", {"shutdown_timeout_seconds": 0},
     "shutdown_timeout_seconds"),
    ("/api/v1/items/pr1/failover", {"drain_timeout_seconds": 0}, "drain_timeout_seconds"),
    ("/api/v1/items/pr1/failover", {"shutdown_source": True, "shutdown_timeout_seconds": -1},
     "shutdown_timeout_seconds"),
    ("/api/v1/items/pr1/failover", {"instant": True, "hydrate_rate_mbps": -5},
     "hydrate_rate_mbps"),
    ("/api/v1/items/pr1/test-failover", {"drain_timeout_seconds": 0},
     "drain_timeout_seconds"),
    ("/api/v1/items/fo1/change-recovery-point", {"drain_timeout_seconds": -1},
     "drain_timeout_seconds"),
    ("/api/v1/plans/back/failback", {"timeout_seconds": 0}, "timeout_seconds"),
    ("/api/v1/plans/back/failback", {"shutdown_timeout_seconds": -1},
     "shutdown_timeout_seconds"),
    ("/api/v1/plans/fwd/failover", {"drain_timeout_seconds": 0}, "drain_timeout_seconds"),
    ("/api/v1/groups/back/failback", {"timeout_seconds": 0}, "timeout_seconds"),
    ("/api/v1/groups/back/failback", {"timeout_seconds": -1}, "timeout_seconds"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConfigServer]:
    """Items fo1, fo2 failed over, pr1, pr2 protected; plans back (fo1) and fwd (pr1);
    group back (fo1)."""
    d: Path = tmp_path_factory.mktemp("recovery-args")
    async with sqlite_configserver(d) as server:
        await add_procserver(server.url, server.internal_token)
        async with ApiClient(server.url, server.admin_token) as api:
            await seed_items(server, api, STATES, "192.0.2.8")
            await api.post("/api/v1/plans", {"name": "back", "groups": [{"items": ["fo1"]}]})
            await api.post("/api/v1/plans", {"name": "fwd", "groups": [{"items": ["pr1"]}]})
            await api.post("/api/v1/groups", {"name": "back", "members": ["fo1"]})
        yield server


async def _jobs(cs: ConfigServer) -> list[dict[str, Any]]:
    async with ApiClient(cs.url, cs.admin_token) as api:
        jobs: list[dict[str, Any]] = (await api.get("/api/v1/jobs", limit=1000))["jobs"]
    return jobs


async def _states(cs: ConfigServer) -> dict[str, str]:
    async with ApiClient(cs.url, cs.admin_token) as api:
        return {m: (await api.get(f"/api/v1/items/{m}"))["state"] for m in STATES}


async def _cli(cs: ConfigServer, *words: str) -> tuple[int, str, str]:
    """The CLI against the module's server (a subprocess: the server answers meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", *words, "--api", cs.url, "--token-file",
        str(cs.cfg.token_path), "--json", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _refused(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The CLI's parser (in this process) on ``words``: it must exit 2 before any call;
    what it printed."""
    with pytest.raises(SystemExit) as e:
        main([*words, *NOWHERE])
    assert e.value.code == 2, words
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", ["0", "-30", "1.5"])
def test_the_cli_refuses_seconds_that_are_not_at_least_one(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    for words, option in SECONDS_OPTIONS:
        err = _refused(capsys, *words, option, value)
        want = ("is not a whole number of seconds" if "." in value
                else "give a number of seconds from 1")
        assert f"{option}: '{value}'" in err and want in err, (words, option, err)


def test_the_cli_refuses_a_hydrate_rate_that_is_no_rate(
        capsys: pytest.CaptureFixture[str]) -> None:
    for words in (("failover", "start", "pr1"), ("failover", "test", "pr1")):
        for value in ("-1", "fast", "100001"):
            err = _refused(capsys, *words, "--instant", "--hydrate-rate", value)
            assert f"--hydrate-rate: {value!r} is not a rate in Mbit/s" in err, err


# the verbs that follow a job with ``--wait``/``--timeout`` (machine install waits itself)
FOLLOWING = [("failover", "start", "pr1", "--wait"), ("failover", "failback", "fo1", "--wait"),
             ("plan", "failover", "fwd", "--wait"), ("group", "failback", "back", "--wait"),
             ("replication", "enable", "pr1", "--wait"), ("jobs", "wait", "j1"),
             ("verify", "run", "--wait"), ("machine", "install", "pr1")]


@pytest.mark.parametrize("value", ["0", "-5", "never", "inf"])
def test_the_cli_refuses_a_wait_timeout_that_is_not_above_zero(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--timeout 0`` used to stop following at once and a negative one the same: the
    job went on unseen."""
    for words in FOLLOWING:
        err = _refused(capsys, *words, "--timeout", value)
        assert f"--timeout: {value!r}: give a number of seconds above 0" in err, (words, err)
    err = _refused(capsys, "machine", "install", "pr1", "--heartbeat-timeout", "0")
    assert "--heartbeat-timeout: '0': give a number of seconds from 1" in err, err


def test_a_reprotect_reads_a_running_machine_one_way(
        capsys: pytest.CaptureFixture[str]) -> None:
    for words in (("failover", "reprotect", "fo1"), ("plan", "reprotect", "back"),
                  ("group", "reprotect", "back")):
        err = _refused(capsys, *words, "--live", "--pause")
        assert "not allowed with argument" in err, (words, err)


def test_the_command_exits_2_on_an_agent_timeout_of_zero() -> None:
    r = run_cli("failover", "failback", "fo1", "--agent-timeout", "0", *NOWHERE)
    assert r.returncode == 2, r
    assert "--agent-timeout: '0': give a number of seconds from 1" in r.stderr, r.stderr


@ON_SERVER
async def test_the_api_refuses_zero_or_negative_and_changes_nothing(cs: ConfigServer) -> None:
    before = await _states(cs)
    async with ApiClient(cs.url, cs.admin_token) as api:
        for path, body, field in REST_REFUSED:
            with pytest.raises(ApiCallError) as e:
                await api.post(path, body)
            assert e.value.status == 422, (path, body, e.value)
            assert e.value.api_code == "invalid_request", (path, body)
            assert field in e.value.message, (path, body, e.value.message)
        for path in ("/api/v1/items/fo1/reprotect", "/api/v1/plans/back/reprotect",
                     "/api/v1/groups/back/reprotect"):
            with pytest.raises(ApiCallError) as e:
                await api.post(path, {"live": True, "pause": True})
            assert (e.value.status, e.value.api_code) == (422, "conflicting_options"), path
            assert "choose one" in e.value.message, e.value.message
    assert await _jobs(cs) == []
    assert await _states(cs) == before


@ON_SERVER
async def test_what_the_cli_takes_reaches_the_job_as_given(cs: ConfigServer) -> None:
    code, out, err = await _cli(cs, "failover", "failback", "fo2", "--agent-timeout", "1",
                                "--shutdown-timeout", "2")
    assert code == 0, err
    code, out2, err = await _cli(cs, "failover", "start", "pr2", "--point", "latest",
                                 "--drain-timeout", "3", "--shutdown-source",
                                 "--shutdown-timeout", "4")
    assert code == 0, err
    params = {}
    async with cs.services.sessionmaker() as s:
        for jid in (_job_id(out), _job_id(out2)):
            job = await s.get(db.Job, jid)
            assert job is not None, jid
            params[job.target] = job.params
    assert params["fo2"]["timeout_seconds"] == 1
    assert params["fo2"]["shutdown_timeout_seconds"] == 2
    assert params["pr2"]["drain_timeout_seconds"] == 3
    assert params["pr2"]["shutdown_timeout_seconds"] == 4


def _job_id(out: str) -> str:
    doc: dict[str, Any] = json.loads(out)
    return str(doc["id"])
