"""Push install across restarts (issue #14): the configuration server and the process
server run as real daemons and each is killed with SIGKILL while an install request is
claimed and running against a real sshd on "another machine" (tests/sshd.py).

The process server is killed just after the prerequisites were reported (the bundle on
its way): the restarted one lists the request it had claimed, claims it again and runs it
from its first step (an install is idempotent; the upload the killed run left in /var/tmp
is removed). The configuration server is killed just after the install step was
reported: the process server's next call (the certificate request of the enrollment) is
retried until the restarted server answers, which resumed the job where it was. The agent
checks in, the job succeeds with every step once, one certificate is issued, nothing of
the killed runs is left on the machine, and a re-run verifies and changes nothing.

A process server that stops for good with a request claimed fails the job's step once it
has not heartbeated for 15 minutes (the configuration server's clock moved), saying so;
the request ends with it: coming back, that process server is told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from configserver.installjob import STALE_PROCSERVER_SECONDS
from procserver.installreq import BUNDLE_NAME
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.backends import missing_backend
from tests.csclock import Clock, clocked_configserver
from tests.helpers import Daemon, make_vault, write_toml
from tests.sitehelpers import add_machine, add_procserver, step, wait_job
from tests.sshd import HOST_ADDR, Sshd, agent_bundle, missing

ROOT_PW = "root-secret-5"
AGENT = "/opt/siterecovery-agent/bin/siterecovery-agent"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


async def _ssh(sshd: Sshd, command: str) -> str:
    async with asyncssh.connect(sshd.host, username="root", password=ROOT_PW,
                                known_hosts=None, config=None, agent_path=None) as conn:
        return str((await conn.run(command, check=True)).stdout)


def _step_reported(name: str) -> Any:
    return lambda ev: ev.get("step") == name


async def _event(d: Daemon, name: str, where: Any, timeout: float = 120) -> None:
    """Wait until ``d`` logged an event ``name`` for which ``where(event)`` holds."""
    count = 1
    async with asyncio.timeout(timeout):
        while True:
            found = await d.wait_events(name, count, timeout=timeout)
            if any(where(ev) for ev in found):
                return
            count = len(found) + 1


async def test_install_survives_kill9_of_the_process_server_and_the_configuration_server(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if why := missing():
        missing_backend("a real sshd", why)
    bundle = agent_bundle(tmp_path_factory)
    admin, site_port = _free_port(), _free_port()
    data = tmp_path / "cs"
    cs_args = ["configserver", "run", "--config", str(write_toml(
        tmp_path / "configserver.toml", {
            "data_dir": str(data), "listen_port": admin, "site_port": site_port,
            "site_host": "0.0.0.0", "site_names": [HOST_ADDR],
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"}))]
    daemons: list[Daemon] = []
    agent_pids: list[int] = []

    async def start(args: list[str], ready: str) -> Daemon:
        d = Daemon(args, ready)
        daemons.append(d)
        await d.start()
        return d

    async with Sshd(tmp_path / "sshd", passwords={"root": ROOT_PW}) as sshd:
        try:
            cs = await start(cs_args, "configserver_started")
            url = f"http://127.0.0.1:{admin}"
            token = (data / "api-token").read_text().strip()
            async with ApiClient(url, token) as api:
                tls = tmp_path / "ps-tls"
                tls.mkdir()
                doc = await api.post("/api/v1/certificates/procserver",
                                     {"name": "ps1", "hosts": ["127.0.0.1", HOST_ADDR]})
                for name, key in (("server.pem", "cert"), ("server.key", "key"),
                                  ("ca.pem", "ca")):
                    (tls / name).write_text(doc[key])
                vault_url, vault_key = await make_vault(tmp_path)
                pdir = tmp_path / "ps"
                pdir.mkdir()
                shutil.copy(bundle.path, pdir / BUNDLE_NAME)
                ps_args = ["procserver", "run", "--config", str(write_toml(
                    tmp_path / "procserver.toml", {
                        "data_dir": str(pdir), "vault_url": vault_url,
                        "vault_key_file": str(vault_key), "tls_cert": str(tls / "server.pem"),
                        "tls_key": str(tls / "server.key"), "tls_ca": str(tls / "ca.pem"),
                        "listen_host": HOST_ADDR, "listen_port": 0, "metrics_port": 0,
                        "name": "ps1", "configserver_url": f"https://127.0.0.1:{site_port}",
                        "configserver_token_file": str(data / "internal-token")}))]
                ps = await start(ps_args, "procserver_started")
                await cs.wait_events("procserver_registered", 1)
                await api.post("/api/v1/accounts", {"name": "rootpw", "username": "root",
                                                    "kind": "password", "secret": ROOT_PW})
                await api.post("/api/v1/machines", {
                    "name": "web01", "ip": sshd.host, "os_type": "linux",
                    "os_name": "debian", "os_version": "12", "account": "rootpw",
                    "process_server": "ps1",
                    "disks": [{"name": "sda", "path": "/var/lib/disk.img"}]})
                body = {"site_url": f"https://{HOST_ADDR}:{site_port}",
                        "heartbeat_timeout_seconds": 120}
                jid = (await api.post("/api/v1/machines/web01/install", body))["job"]["id"]

                # the process server dies with the request claimed, the bundle on its way
                await _event(cs, "agent_push_step", _step_reported("prerequisites"))
                await ps.kill9()
                assert ps.events("install_request_done") == []
                assert (await api.get(f"/api/v1/jobs/{jid}"))["state"] == "running"
            ps2 = await start(ps_args, "procserver_started")
            await _event(ps2, "install_request_started", lambda ev: ev.get("job") == jid)

            # the configuration server dies while the process server goes on
            await _event(ps2, "install_step_reported", _step_reported("install"))
            await cs.kill9()
            assert cs.events("job_succeeded") == []
            cs2 = await start(cs_args, "configserver_started")
            (resumed,) = await cs2.wait_events("job_resumed", 1)
            assert resumed["job"] == jid
            async with ApiClient(url, token) as api:
                job = await wait_job(api, jid, lambda j: step(j, "start")["state"] ==
                                     "succeeded" or j["state"] != "running", timeout=120)
                assert job["state"] == "running", job
                started = await _ssh(sshd, f"setsid {AGENT} run --config /etc/siterecovery/"
                                       "mobility.toml </dev/null >/dev/null 2>&1 & echo $!")
                agent_pids.append(int(started))
                job = await wait_job(api, jid, timeout=120)
                assert job["state"] == "succeeded" and job["attempts"] == 2, job
                assert [s["state"] for s in job["steps"]] == ["succeeded"] * 6
                assert "checked in" in step(job, "first_heartbeat")["message"]
                assert ps2.events("install_request_done")
                certs = (await api.get("/api/v1/certificates", subject="web01"))[
                    "certificates"]
                assert [c["state"] for c in certs] == ["valid"]  # enrolled once

                # nothing of the killed runs is left: no upload, no half-swapped tree
                assert "siterecovery-agent." not in await _ssh(sshd, "ls -A /var/tmp")
                files = sshd.files()
                assert not [f for f in files if f.startswith(("opt/siterecovery-agent.",))]
                listed = (sshd.root / "opt/siterecovery-agent/INSTALLED").read_text().split()
                assert len(listed) == len(set(listed)) and \
                    "/etc/siterecovery/agent.key" in listed

                # a re-run verifies and changes nothing
                again = (await api.post("/api/v1/machines/web01/install", body))["job"]
                again = await wait_job(api, again["id"], timeout=120)
                assert again["state"] == "succeeded", again
                assert "already installed" in step(again, "install")["message"]
                assert "already enrolled" in step(again, "enroll")["message"]
                assert "the agent runs" in step(again, "start")["message"]
                assert [f for f in sshd.files() if "__pycache__" not in f] == \
                    [f for f in files if "__pycache__" not in f]
        finally:
            for pid in agent_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for d in daemons:
                if d.proc is not None and d.proc.returncode is None:
                    await d.stop()


async def test_a_process_server_gone_for_good_fails_the_claimed_request_with_the_reason(
        tmp_path: Path) -> None:
    clock = Clock()
    async with clocked_configserver(tmp_path / "cs", f"sqlite+aiosqlite:///{tmp_path}/c.db",
                                    clock) as cs, \
            ApiClient(cs.url, cs.admin_token) as api, \
            ApiClient(cs.url, cs.internal_token) as internal:
        await add_procserver(cs.url, cs.internal_token)
        await add_machine(api, "web01")
        await api.post("/api/v1/accounts", {"name": "rootpw", "username": "root",
                                            "kind": "password", "secret": ROOT_PW})
        await api.patch("/api/v1/machines/web01", {"account": "rootpw",
                                                   "process_server": "ps1"})
        jid = (await api.post("/api/v1/machines/web01/install",
                              {"site_url": "https://192.0.2.1:9441"}))["job"]["id"]
        await wait_job(api, jid, lambda j: step(j, "prerequisites")["state"] == "running")
        base = f"/api/v1/internal/install-requests/{jid}"
        claimed = await internal.post(f"{base}/claim", {"procserver": "ps1"})
        assert claimed["account"]["secret"] == ROOT_PW  # ps1 runs it ... and stops for good
        clock.now = time.time() + STALE_PROCSERVER_SECONDS + 60
        await add_procserver(cs.url, cs.internal_token, name="ps2")  # any change wakes jobs
        job = await wait_job(api, jid)
        assert job["state"] == "failed", job
        assert job["error"].startswith("Prerequisites on the machine: process server ps1 "
                                       "stopped while running the request (no heartbeat for "), job
        assert "run this again once it is back" in job["error"]
        # back after all: its report is answered 'stop', its claim refused, nothing listed
        answer = await internal.post(f"{base}/report", {
            "procserver": "ps1", "step": "prerequisites", "state": "succeeded"})
        assert answer["state"] == "failed"
        with pytest.raises(ApiCallError) as refused:
            await internal.post(f"{base}/claim", {"procserver": "ps1"})
        assert refused.value.status == 409 and "already ended" in refused.value.message
        listed = await internal.get("/api/v1/internal/procservers/ps1/install-requests")
        assert listed["requests"] == []
