"""Push install through the real control plane (issue #14): ``siterecovery machine
install|uninstall`` asks the configuration server, whose job hands the request to the
machine's process server, which logs in over SSH to a real sshd on "another machine"
(tests/sshd.py: its own network, mount and UTS namespaces, every session chrooted in a
minimal Debian 12 tree of its own, a loop device its disk), installs the agent bundle, has
the key made on the machine signed by the CA, and the agent's first heartbeat is
awaited. The target has no systemd: the job says how to start the agent, and the test
starts it over SSH as the operator would.

One configuration server, process server and sshd for the module (each test builds on
the previous one's state, in file order): the install records the host key on first
use; a re-run verifies and changes nothing; the pushed agent replicates the machine's
disk, a loop device, to the process server (its point restores byte-exact); an upgrade to the
next bundle version keeps the agent's state, so its next cycle is a delta (restored
byte-exact too); uninstall removes every file it installed (the machine's own disk
stays) and revokes the agent's certificate; a changed host key (or one the operator's
known_hosts pins) refuses the install with both fingerprints, before anything is written;
so do a refused account and a process server without a bundle, each with its own message.
So do an ssh-key account with a key root does not accept and, with root's key, an OS
other than the inventory's. Then web01's account becomes
alice's, who is not root: without sudo the push stops at the privileges check before
anything is copied; with sudo (her password), Enable protection of the machine, which
has an account and no agent, pushes the agent itself (a failed push fails the job with
the install's message) and the item becomes protected; enabled again, the agent it finds
up to date is not reinstalled; an agent older than its process server is upgraded by
Enable protection and keeps its maps (the next cycle a delta, restored byte-exact). The
unit the install wrote passes systemd-analyze verify (this target has no systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import pytest_asyncio

from configserver.server import ConfigServer
from procserver.installreq import BUNDLE_NAME
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.backends import missing_backend
from tests.helpers import REPO, sha256
from tests.installsite import install_servers, new_point, restored
from tests.sitehelpers import AgentSite, step, wait_job
from tests.sshd import CHROOT, HOST_ADDR, Sshd, agent_bundle, missing
from tests.test_deploy import systemd_analyze, verify_problems

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT_PW, ALICE_PW = "root-secret-3", "alice-secret-4"
DISK_BYTES = 8 << 20
AGENT = "/opt/siterecovery-agent/bin/siterecovery-agent"


@dataclass
class Site:
    cs: ConfigServer
    ps: ProcServer
    api: ApiClient
    sshd: Sshd
    token_file: Path
    push: list[str]  # the CLI options every push verb of the tests takes
    agent_pid: list[int]
    root_key: str  # a private key root's authorized_keys on the target lists
    disk: str  # the machine's disk: a loop device (/dev/loopN) in its /dev


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    if why := missing():
        missing_backend("a real sshd", why)
    tmp = tmp_path_factory.mktemp("install")
    bundle = agent_bundle(tmp_path_factory)
    root_key = asyncssh.generate_private_key("ssh-ed25519")
    async with Sshd(tmp / "sshd", passwords={"root": ROOT_PW, "alice": ALICE_PW},
                    authorized={"root": root_key.export_public_key("openssh").decode().strip()}
                    ) as sshd:
        disk = sshd.attach_disk(tmp / "sda.img", DISK_BYTES)
        # The agent on the target reaches both servers at the host's end of its link; the
        # site port is a fixed one, so the site URL Enable protection gives a pushed agent
        # (site_names and site_port) is the listener's.
        async with install_servers(tmp, bundle.path, ROOT_PW, site_host="0.0.0.0",
                                   agent_host=HOST_ADDR, ps_host=HOST_ADDR) as (cs, ps, api):
            pids: list[int] = []
            try:
                await api.post("/api/v1/machines", {
                    "name": "web01", "ip": sshd.host, "os_type": "linux",
                    "os_name": "debian", "os_version": "12", "account": "rootpw",
                    "process_server": "ps1", "disks": [{"name": "sda", "path": disk}]})
                push = ["--api", cs.url, "--token-file", str(cs.cfg.token_path), "--json",
                        "--site-url", f"https://{HOST_ADDR}:{cs.site_port}",
                        "--heartbeat-timeout", "120"]
                yield Site(cs, ps, api, sshd, cs.cfg.token_path, push, pids,
                           root_key.export_private_key("openssh").decode(), disk)
            finally:
                for pid in pids:  # an agent the uninstall did not stop (a failed test)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


async def _cli(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else {}, err.decode()


async def _ssh(s: Site, command: str) -> str:
    async with asyncssh.connect(s.sshd.host, username="root", password=ROOT_PW,
                                known_hosts=None, config=None, agent_path=None) as conn:
        return str((await conn.run(command, check=True)).stdout)


async def _latest(s: Site, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(60), s.cs.changed:
        while not (jobs := (await s.api.get("/api/v1/jobs", target="web01",
                                            kind=kind))["jobs"]):
            await s.cs.changed.wait()
    first: dict[str, Any] = jobs[0]
    return first


def _program_files(s: Site) -> list[str]:
    return [f for f in s.sshd.files() if f.startswith(("opt/", "etc/")) and
            "__pycache__" not in f]


async def test_install_records_the_host_key_and_the_agent_checks_in(site: Site) -> None:
    cli = asyncio.create_task(_cli("machine", "install", "web01", *site.push))
    job = await _latest(site, "agent_install")
    job = await wait_job(site.api, job["id"], lambda j: step(j, "start")["state"] == "succeeded"
                         or j["state"] in ("succeeded", "failed", "cancelled"), timeout=120)
    assert job["state"] == "running", job
    how = step(job, "start")["message"]
    assert "does not run systemd" in how and f"'{AGENT} run --config" in how
    # the operator starts it as the job says
    pid = await _ssh(site, f"setsid {AGENT} run --config /etc/siterecovery/mobility.toml "
                           "</dev/null >/var/tmp/agent.log 2>&1 & echo $!")
    site.agent_pid.append(int(pid))
    assert os.readlink(f"/proc/{pid.strip()}/root") == CHROOT  # it runs in the machine's root
    code, doc, err = await asyncio.wait_for(cli, 120)
    assert code == 0, (doc, err)
    assert doc["state"] == "succeeded" and doc["kind"] == "agent_install"
    assert [s["name"] for s in doc["steps"]] == ["validate", "prerequisites", "install",
                                                 "enroll", "start", "first_heartbeat"]
    assert "Wait for the agent's first heartbeat: running" in err  # followed step by step
    assert "checked in" in step(doc, "first_heartbeat")["message"]
    prereq = step(doc, "prerequisites")["message"]
    fp = asyncssh.import_public_key(site.sshd.host_key).get_fingerprint("sha256")
    assert f"host key {fp} recorded (trust on first use)" in prereq
    key = await site.api.get("/api/v1/machines/web01/host-key")
    assert (key["fingerprint"], key["source"]) == (fp, "tofu")
    assert key["host_key"] == site.sshd.host_key
    files = _program_files(site)
    assert {"etc/siterecovery/agent.key", "etc/siterecovery/agent.pem",
            "etc/siterecovery/mobility.toml",
            "opt/siterecovery-agent/bin/siterecovery-agent"} <= set(files)
    # all of it in the machine's root, none of it on the host
    assert not any(Path(p).exists() for p in ("/opt/siterecovery-agent", "/etc/siterecovery",
                                              "/etc/systemd/system/siterecovery-agent.service"))
    # the certificate is the CA's, for web01, recorded; the key never left the machine
    certs = (await site.api.get("/api/v1/certificates", subject="web01"))["certificates"]
    assert [c["state"] for c in certs] == ["valid"]
    machine = await site.api.get("/api/v1/machines/web01")
    assert machine["agent_version"] and machine["last_contact"]


async def test_a_rerun_verifies_and_changes_nothing(site: Site) -> None:
    before = {f: (site.sshd.root / f).stat().st_mtime_ns for f in _program_files(site)}
    code, doc, err = await _cli("machine", "install", "web01", *site.push)
    assert code == 0, (doc, err)
    assert "already installed" in step(doc, "install")["message"]
    assert "already enrolled" in step(doc, "enroll")["message"]
    assert "the agent runs" in step(doc, "start")["message"]
    assert "recorded" not in step(doc, "prerequisites")["message"]
    after = {f: (site.sshd.root / f).stat().st_mtime_ns for f in _program_files(site)}
    assert after == before
    certs = (await site.api.get("/api/v1/certificates", subject="web01"))["certificates"]
    assert len(certs) == 1  # no second enrollment




def _received(s: Site) -> float:
    return s.ps.metrics.registry.get_sample_value(
        "siterecovery_procserver_received_bytes_total") or 0.0


async def _new_point(s: Site, old: str | None, protected: bool = True) -> str:
    """The item's latest point once it is not ``old`` (and the item protected)."""
    return await new_point(s.cs, s.api, "web01", old, 90,
                           lambda: _ssh(s, "tail -n 30 /var/tmp/agent.log"), protected)


async def _restores_to_the_disk(s: Site, point_id: str, out: Path) -> None:
    # the device's bytes
    assert await restored(s.ps, point_id, out) == {"sda": sha256(Path(s.disk))}


async def test_the_pushed_agent_replicates_and_its_point_restores_byte_exact(
        site: Site, tmp_path: Path) -> None:
    await _ssh(site, f"head -c {DISK_BYTES} /dev/urandom > {site.disk}")
    await site.api.post("/api/v1/replication/enable", {"machine": "web01"})
    await _restart_agent(site)  # its first round: settings, then the initial copy
    point = await _new_point(site, None)
    assert _received(site) >= DISK_BYTES * 0.9
    await _restores_to_the_disk(site, point, tmp_path)


def _next_version(path: Path, out: Path) -> str:
    """The bundle at ``path`` as the next version would ship it: its manifest's version
    and the agent's own (mobility/__init__.py, its checksum in the manifest) say
    ``+next``, every other file the same; that version."""
    with tarfile.open(path, "r:gz") as src:
        members = [(m, f.read() if (f := src.extractfile(m)) is not None else None)
                   for m in src]
    init = next(m for m, _ in members if m.name.endswith("/lib/mobility/__init__.py"))
    new_init = re.sub(rb'(?m)^AGENT_VERSION = "([^"]*)"', rb'AGENT_VERSION = "\1+next"',
                      next(b for m, b in members if m is init) or b"", count=1)
    with tarfile.open(out, "w:gz", compresslevel=1) as dst:
        for member, body in members:
            if member is init:
                body = new_init
            elif member.name.endswith("/MANIFEST.json") and body is not None:
                doc = json.loads(body)
                version = str(doc["agent_version"]) + "+next"
                doc["agent_version"] = version
                doc["files"][init.name.split("/", 1)[1]] = hashlib.sha256(new_init).hexdigest()
                body = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
            if body is not None:
                member.size = len(body)
            dst.addfile(member, io.BytesIO(body) if body is not None else None)
    return version


async def _restart_agent(s: Site) -> None:
    for pid in s.agent_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    started = await _ssh(s, f"setsid {AGENT} run --config /etc/siterecovery/mobility.toml "
                            "</dev/null >/var/tmp/agent.log 2>&1 & echo $!")
    s.agent_pid.append(int(started))


async def test_upgrade_replaces_the_program_and_keeps_the_state(site: Site,
                                                                tmp_path: Path) -> None:
    state = site.sshd.root / "var/lib/siterecovery-mobility"
    before = (await site.api.get("/api/v1/items/web01"))["latest_point"]
    await _ssh(site, f"dd if=/dev/urandom of={site.disk} bs=64K count=1 seek=5 conv=notrunc")
    marker = await _ssh(site, "mkdir -p /var/lib/siterecovery-mobility && echo maps > "
                              "/var/lib/siterecovery-mobility/marker && echo ok")
    assert marker.strip() == "ok"
    bundle = Path(site.ps.cfg.data_dir) / BUNDLE_NAME
    old = bundle.with_name("previous.tar.gz")
    shutil.copy(bundle, old)
    version = await asyncio.to_thread(_next_version, old, tmp_path / "next.tar.gz")
    shutil.copy(tmp_path / "next.tar.gz", bundle)
    try:
        key = (site.sshd.root / "etc/siterecovery/agent.key").read_bytes()
        cli = asyncio.create_task(_cli("machine", "upgrade", "web01", *site.push))
        job = await _latest(site, "agent_upgrade")
        job = await wait_job(site.api, job["id"], lambda j: step(j, "start")["state"] ==
                             "succeeded" or j["state"] in ("succeeded", "failed"), timeout=120)
        assert "restart it: its files changed" in step(job, "start")["message"], job
        received = _received(site)
        await _restart_agent(site)  # as the job says (no systemd here)
        code, doc, err = await asyncio.wait_for(cli, 120)
        assert code == 0, (doc, err)
        assert f"-> installed siterecovery agent {version}" in step(doc, "install")["message"]
        assert "already enrolled" in step(doc, "enroll")["message"]
        manifest = json.loads((site.sshd.root / "opt/siterecovery-agent/MANIFEST.json")
                              .read_text())
        assert manifest["agent_version"] == version
        assert (state / "marker").read_text() == "maps\n"  # the agent's state is kept
        assert (site.sshd.root / "etc/siterecovery/agent.key").read_bytes() == key
        listed = (site.sshd.root / "opt/siterecovery-agent/INSTALLED").read_text().split()
        assert "/var/lib/siterecovery-mobility" in listed and \
            "/etc/siterecovery/agent.key" in listed  # uninstall still removes them
        # the upgraded agent's next cycle is a delta: its maps were kept
        point = await _new_point(site, before)
        assert _received(site) - received < DISK_BYTES / 2
        await _restores_to_the_disk(site, point, tmp_path / "out")
    finally:
        shutil.copy(old, bundle)


def _agent_site(s: Site, where: Path) -> AgentSite:
    """The agent's side of the site listener with the certificate and key it has now."""
    where.mkdir(exist_ok=True)
    for name in ("agent.pem", "agent.key"):
        shutil.copy(s.sshd.root / "etc/siterecovery" / name, where / name)
    return AgentSite(f"https://127.0.0.1:{s.cs.site_port}", s.cs.ca.cert_path,
                     where / "agent.pem", where / "agent.key")


async def test_uninstall_removes_everything_it_installed_and_revokes_the_certificate(
        site: Site, tmp_path: Path) -> None:
    agent = _agent_site(site, tmp_path / "old")
    async with agent:
        assert (await agent.settings())[0] == 200
    serials = [c["serial"] for c in (await site.api.get(
        "/api/v1/certificates", subject="web01"))["certificates"] if c["state"] == "valid"]
    assert len(serials) == 1
    code, doc, err = await _cli("machine", "uninstall", "web01", "--api", site.cs.url,
                                "--token-file", str(site.token_file), "--json")
    assert code == 0, (doc, err)
    message = step(doc, "uninstall")["message"]
    assert "each checked gone" in message and "/etc/siterecovery/agent.key" in message
    assert message.endswith(f"; agent certificate(s) revoked: {serials[0]}"), message
    certs = (await site.api.get("/api/v1/certificates", subject="web01"))["certificates"]
    assert [c["state"] for c in certs] == ["revoked"]
    async with agent:  # a copy of the uninstalled agent's key is refused
        status, refused = await agent.settings()
    assert status == 401, refused
    assert "/var/lib/siterecovery-mobility" in message
    assert site.sshd.files() == []  # nothing of the agent's left (the disk is a device)
    for pid in site.agent_pid:  # the agent was stopped
        assert not Path(f"/proc/{pid}").exists() or \
            b"agent.py" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    # again: nothing to remove
    code, doc, _ = await _cli("machine", "uninstall", "web01", "--api", site.cs.url,
                              "--token-file", str(site.token_file), "--json")
    assert code == 0 and step(doc, "uninstall")["message"] == (
        "no agent installed: nothing to remove; no agent certificate left to revoke")


async def test_a_changed_host_key_refuses_the_install_with_both_fingerprints(
        site: Site, tmp_path: Path) -> None:
    recorded = (await site.api.get("/api/v1/machines/web01/host-key"))["fingerprint"]
    await site.sshd.stop()
    site.sshd.new_host_key()  # the machine "was reinstalled"
    await site.sshd.start()
    presented = asyncssh.import_public_key(site.sshd.host_key).get_fingerprint("sha256")
    assert presented != recorded
    code, doc, err = await _cli("machine", "install", "web01", *site.push)
    assert code == 1 and doc["state"] == "failed", (doc, err)
    error = doc["error"]
    assert error.startswith("Prerequisites on the machine: host_key:"), error
    assert recorded in error and presented in error and "no credential was sent" in error
    assert site.sshd.files() == []
    assert (await site.api.get("/api/v1/machines/web01/host-key"))["fingerprint"] == recorded

    # an operator's known_hosts pins its key the same way: another key is refused
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh")
    known = tmp_path / "known_hosts"
    known.write_text(f"{site.sshd.host} {other.decode().strip()}\n")
    job = (await site.api.post("/api/v1/machines/web01/install",
                               {"known_hosts": known.read_text()}))["job"]
    job = await wait_job(site.api, job["id"], timeout=60)
    pinned = (await site.api.get("/api/v1/machines/web01/host-key"))
    assert pinned["source"] == "operator" and pinned["fingerprint"] != recorded
    assert job["state"] == "failed" and pinned["fingerprint"] in job["error"]
    assert presented in job["error"] and site.sshd.files() == []


async def test_a_refused_account_or_no_bundle_fails_the_prerequisites_and_changes_nothing(
        site: Site) -> None:
    await site.api.patch("/api/v1/accounts/rootpw", {"secret": "not-the-password"})
    try:
        job = (await site.api.post("/api/v1/machines/web01/install",
                                   {"forget_host_key": True}))["job"]
        job = await wait_job(site.api, job["id"], timeout=60)
    finally:
        await site.api.patch("/api/v1/accounts/rootpw", {"secret": ROOT_PW})
    assert job["state"] == "failed"
    assert job["error"].startswith("Prerequisites on the machine: authentication: ")
    assert "refuses the account 'root' with its password" in job["error"]
    assert "hint: " in job["error"] and site.sshd.files() == []
    # forgotten, and not recorded again: no install got that far
    assert (await site.api.get("/api/v1/machines/web01/host-key"))["host_key"] is None

    bundle = Path(site.ps.cfg.data_dir) / BUNDLE_NAME
    bundle.rename(bundle.with_name("away.tar.gz"))
    try:
        job = (await site.api.post("/api/v1/machines/web01/install", {}))["job"]
        job = await wait_job(site.api, job["id"], timeout=60)
    finally:
        bundle.with_name("away.tar.gz").rename(bundle)
    assert job["state"] == "failed" and f"no agent bundle at {bundle}" in job["error"]
    assert f"siterecovery agent bundle --output {bundle}" in job["error"]


async def _install_fails(s: Site) -> dict[str, Any]:
    job = (await s.api.post("/api/v1/machines/web01/install", {}))["job"]
    job = await wait_job(s.api, job["id"], timeout=60)
    assert job["state"] == "failed", job
    assert s.sshd.files() == []  # nothing written
    return job


async def test_a_key_account_wrong_key_or_os_other_than_the_inventory_is_refused(
        site: Site) -> None:
    """Through the request channel with an ssh-key account: a key root does not accept
    fails the authentication check; root's key passes it, and an OS other than the
    inventory's (checked after it) is refused; neither writes anything."""
    other = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
    for name, secret in (("rootkey", site.root_key), ("otherkey", other.decode())):
        await site.api.post("/api/v1/accounts", {"name": name, "username": "root",
                                                 "kind": "ssh-key", "secret": secret})
    try:
        await site.api.patch("/api/v1/machines/web01", {"account": "otherkey"})
        error = (await _install_fails(site))["error"]
        assert error.startswith("Prerequisites on the machine: authentication: "
                                f"{site.sshd.host} refuses the account 'root' with its key")
        await site.api.patch("/api/v1/machines/web01", {"account": "rootkey",
                                                        "os_version": "11"})
        error = (await _install_fails(site))["error"]
        assert error.startswith(f"Prerequisites on the machine: os: {site.sshd.host} runs "
                                "Debian GNU/Linux 12"), error
        assert "the inventory says debian 11, the machine runs 12" in error
        assert "hint: protect machines of the support matrix only" in error
    finally:
        await site.api.patch("/api/v1/machines/web01", {"account": "rootpw",
                                                        "os_version": "12"})


async def test_an_account_without_sudo_is_refused_before_anything_is_copied(
        site: Site) -> None:
    """From here on web01's account is alice's, who is not root: without sudo the push
    stops at the privileges check, with nothing written on the machine."""
    if shutil.which("sudo") is None:
        missing_backend("sudo", "sudo is not installed (apt-get install sudo)")
    await site.api.post("/api/v1/accounts", {"name": "alicepw", "username": "alice",
                                             "kind": "password", "secret": ALICE_PW})
    await site.api.patch("/api/v1/machines/web01", {"account": "alicepw"})
    before = site.sshd.files()
    job = (await site.api.post("/api/v1/machines/web01/install", {}))["job"]
    job = await wait_job(site.api, job["id"], timeout=60)
    assert job["state"] == "failed" and job["error"].startswith(
        "Prerequisites on the machine: privileges: the account 'alice' is not root and may "
        "not use sudo"), job
    assert "hint: use root, or give the account sudo rights" in job["error"]
    assert [s["state"] for s in job["steps"]][1:] == ["failed"] + ["skipped"] * 4
    assert site.sshd.files() == before
    assert "siterecovery-agent." not in await _ssh(site, "ls -A /var/tmp")  # no upload
    site.sshd.sudoers("alice ALL=(ALL) ALL")  # sudo with her password, for what follows


async def _enable(s: Site) -> dict[str, Any]:
    """Replication of web01 enabled anew (disabled first); the Enable protection job."""
    if (await s.api.get("/api/v1/machines/web01"))["replication"] is not None:
        off = (await s.api.post("/api/v1/replication/disable", {"machine": "web01"}))["job"]
        assert (await wait_job(s.api, off["id"]))["state"] == "succeeded"
    job: dict[str, Any] = (await s.api.post("/api/v1/replication/enable",
                                            {"machine": "web01"}))["job"]
    return job


async def test_enable_protection_pushes_the_agent_and_the_item_becomes_protected(
        site: Site) -> None:
    # web01 has an account and no agent (uninstalled, its certificate revoked). A failed
    # push fails the step with the install's message:
    bundle = Path(site.ps.cfg.data_dir) / BUNDLE_NAME
    bundle.rename(bundle.with_name("away.tar.gz"))
    try:
        job = await wait_job(site.api, (await _enable(site))["id"], timeout=60)
    finally:
        bundle.with_name("away.tar.gz").rename(bundle)
    assert job["state"] == "failed" and job["error"].startswith(
        "Prepare the Mobility agent: Prerequisites on the machine: this process server has "
        f"no agent bundle at {bundle}"), job
    assert (await site.api.get("/api/v1/items/web01"))["state"] == "enable_failed"
    job = await _enable(site)  # again, with the bundle
    job = await wait_job(site.api, job["id"], lambda j: "waiting for the Mobility agent to "
                         "check in" in step(j, "prepare_agent")["message"]
                         or j["state"] not in ("queued", "running"), timeout=120)
    shown = step(job, "prepare_agent")["message"]
    assert job["state"] == "running" and "Start the agent: the machine does not run " \
        "systemd: start the agent with" in shown, job
    await _restart_agent(site)  # as the step says (no systemd here)
    try:
        job = await wait_job(site.api, job["id"], timeout=120)
    except TimeoutError:
        log = await _ssh(site, "tail -n 30 /var/tmp/agent.log")
        raise AssertionError(f"{job}\nthe agent's log:\n{log}") from None
    assert job["state"] == "succeeded", job
    lines = step(job, "prepare_agent")["message"].split("\n")
    assert lines[0] == "push install of the agent by its process server"
    assert "authentication: alice; sftp: enabled; privileges: sudo" in lines[1]  # not root
    assert [line.split(": ")[0] for line in lines[1:5]] == [
        "Prerequisites on the machine", "Copy and install the agent bundle",
        "Enroll the agent (its key made on the machine)", "Start the agent"]
    assert "recorded (trust on first use)" in lines[1]  # the new key (forgotten before)
    assert "installed siterecovery agent" in lines[2] and "key made on web01" in lines[3]
    assert lines[5].startswith("agent ") and " checked in at " in lines[5]
    point = await _new_point(site, None)
    assert (await site.api.get("/api/v1/items/web01"))["state"] == "protected"
    certs = (await site.api.get("/api/v1/certificates", subject="web01"))["certificates"]
    assert sorted(c["state"] for c in certs) == ["revoked", "valid"]  # enrolled anew
    assert point


async def test_enable_protection_again_does_not_reinstall_a_current_agent(
        site: Site) -> None:
    before = {f: (site.sshd.root / f).stat().st_mtime_ns for f in _program_files(site)}
    job = await _enable(site)
    await _restart_agent(site)  # its next round checks in now, not at its next heartbeat
    job = await wait_job(site.api, job["id"], lambda j: step(j, "prepare_agent")["state"]
                         in ("succeeded", "failed", "skipped"), timeout=120)
    lines = step(job, "prepare_agent")["message"].split("\n")
    assert step(job, "prepare_agent")["state"] == "succeeded", job
    assert lines[0].endswith("installed and up to date: not reinstalled"), lines
    assert " checked in at " in lines[1] and len(lines) == 2
    after = {f: (site.sshd.root / f).stat().st_mtime_ns for f in _program_files(site)}
    assert after == before
    certs = (await site.api.get("/api/v1/certificates", subject="web01"))["certificates"]
    assert sorted(c["state"] for c in certs) == ["revoked", "valid"]  # no new enrollment


async def _wait_machine(s: Site, until: Any, what: str) -> None:
    try:
        async with asyncio.timeout(90), s.cs.changed:
            while not until(await s.api.get("/api/v1/machines/web01")):
                await s.cs.changed.wait()
    except TimeoutError:
        raise AssertionError(f"no {what} within 90 s") from None


async def test_enable_protection_upgrades_an_older_agent_and_keeps_its_maps(
        site: Site, tmp_path: Path) -> None:
    """web01's agent reports 0.0.9 (the previous version: its installed manifest and
    version say so), older than its process server: Enable protection pushes an upgrade
    (through sudo: the account is alice's) that replaces the program and keeps the
    agent's key, config and state, so the next cycle is a delta; restored byte-exact."""
    old = "0.0.9"
    await _ssh(site, f"cd /opt/siterecovery-agent && sed -i 's/\"agent_version\": \"[^\"]*\"/"
                     f"\"agent_version\": \"{old}\"/' MANIFEST.json && sed -i 's/^AGENT_VERSION = "
                     f"\"[^\"]*\"/AGENT_VERSION = \"{old}\"/' lib/mobility/__init__.py")
    latest = (await site.api.get("/api/v1/items/web01"))["latest_point"]
    await _restart_agent(site)
    await _wait_machine(site, lambda m: m["agent_version"] == old, "the old agent's heartbeat")
    item = await site.api.get("/api/v1/items/web01")
    assert item["agent"]["outdated"] is True, item["agent"]
    # the old agent's own cycle at its start, so the next point is the upgraded one's
    before, received = await _new_point(site, latest, protected=False), _received(site)
    await _ssh(site, f"dd if=/dev/urandom of={site.disk} bs=64K count=1 seek=9 conv=notrunc")
    key = (site.sshd.root / "etc/siterecovery/agent.key").read_bytes()
    job = await _enable(site)
    job = await wait_job(site.api, job["id"], lambda j: "waiting for the Mobility agent to "
                         "check in" in step(j, "prepare_agent")["message"]
                         or j["state"] not in ("queued", "running"), timeout=120)
    assert job["state"] == "running", job
    await _restart_agent(site)  # as the step says (no systemd here)
    job = await wait_job(site.api, job["id"], lambda j: step(j, "prepare_agent")["state"]
                         != "running", timeout=120)
    assert step(job, "prepare_agent")["state"] == "succeeded", job
    lines = step(job, "prepare_agent")["message"].split("\n")
    assert lines[0] == "push upgrade of the agent by its process server", lines
    assert "privileges: sudo" in lines[1]
    assert f"{old} -> installed siterecovery agent " in lines[2]
    assert "already enrolled: its key, certificate and config are kept" in lines[3]
    assert "restart it: its files changed" in lines[4]
    # (the check-in counted may be the old process's, if it heartbeated before it was
    # restarted: no systemd here to restart it)
    await _wait_machine(site, lambda m: m["agent_version"] != old, "the new agent's heartbeat")
    item = await site.api.get("/api/v1/items/web01")
    assert not item["agent"]["outdated"]
    assert (site.sshd.root / "etc/siterecovery/agent.key").read_bytes() == key
    # a point the upgraded agent made: one recorded after its first heartbeat (the old
    # agent's last cycle, begun before the write above, may be recorded late)
    point = await _new_point(site, item["latest_point"] or before, protected=False)
    assert _received(site) - received < DISK_BYTES / 2  # a delta: the maps were kept
    await _restores_to_the_disk(site, point, tmp_path)
    # Its Enable protection job stays in Initial replication: a delta reports no copy
    # progress. Disabling replication ends it.
    off = (await site.api.post("/api/v1/replication/disable", {"machine": "web01"}))["job"]
    assert (await wait_job(site.api, off["id"]))["state"] == "succeeded"


async def test_the_installed_unit_passes_systemd_analyze_verify(site: Site,
                                                                tmp_path: Path) -> None:
    """The systemd branch cannot run on this target (no systemd in its namespace): the
    unit the install wrote is checked with systemd-analyze verify, ExecStart pointing at
    the launcher the install wrote (verify needs the binary where it runs)."""
    exe = systemd_analyze()
    installed = site.sshd.root / "etc/systemd/system/siterecovery-agent.service"
    text = installed.read_text()
    start = f"ExecStart={AGENT} run --config /etc/siterecovery/mobility.toml"
    assert start in text and "WantedBy=multi-user.target" in text
    unit = tmp_path / installed.name
    unit.write_text(text.replace(f"ExecStart={AGENT}", f"ExecStart={site.sshd.root}{AGENT}"))
    assert verify_problems(exe, unit) == []
