"""Machines and the support matrix through the real admin API, site listener and CLI, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from configserver.server import ConfigServer
from siterecovery.apiclient import ApiCallError, ApiClient
from tests.helpers import run_cli
from tests.sitehelpers import AgentSite, add_procserver

WEB01: dict[str, Any] = {
    "name": "web01", "ip": "10.0.0.5", "os_type": "linux", "os_name": "ubuntu",
    "os_version": "22.04", "kernel": "5.15.0-91-generic",
    "disks": [{"name": "sda", "path": "/dev/sda", "size_bytes": 1 << 30},
              {"name": "data", "path": "/var/lib/images/data.img"}]}


async def _refused(coro: Any, status: int, code: str) -> ApiCallError:
    with pytest.raises(ApiCallError) as e:
        await coro
    assert (e.value.status, e.value.api_code) == (status, code), e.value
    assert e.value.message and e.value.hint
    return e.value


async def _account(api: ApiClient, name: str = "installer") -> None:
    await api.post("/api/v1/accounts", {"name": name, "username": "root", "kind": "password",
                                        "secret": "correct horse battery staple"})


async def test_add_list_show_update_remove(cs: ConfigServer, api: ApiClient) -> None:
    await add_procserver(cs.url, cs.internal_token, "ps1")
    await _account(api)
    m = await api.post("/api/v1/machines", {**WEB01, "process_server": "ps1",
                                            "account": "installer"})
    assert m == {**WEB01, "ssh_port": 22,
                 "disks": [{"name": "sda", "path": "/dev/sda", "size_bytes": 1 << 30},
                           {"name": "data", "path": "/var/lib/images/data.img",
                            "size_bytes": None}],
                 "process_server": "ps1", "account": "installer", "enabled": True,
                 "created": m["created"], "last_contact": None, "agent_version": None,
                 "host_id": None, "replication": None}
    assert m["created"].endswith("Z")
    # Other spellings of a distribution are stored as its os-release ID; IPs normalized.
    other = await api.post("/api/v1/machines", {"name": "db01", "ip": "fd00:0::0005",
                                                "os_type": "linux", "os_name": "Rocky Linux",
                                                "os_version": "9.3"})
    assert (other["os_name"], other["os_version"], other["ip"]) == ("rocky", "9.3", "fd00::5")
    assert other["kernel"] is None and other["disks"] == []
    listed = (await api.get("/api/v1/machines"))["machines"]
    assert [x["name"] for x in listed] == ["db01", "web01"]
    assert listed[1] == m == await api.get("/api/v1/machines/web01")
    assert (await api.get("/api/v1/accounts/installer"))["machines"] == ["web01"]

    u = await api.patch("/api/v1/machines/web01", {
        "ip": "10.0.0.6", "disks": [{"name": "sdb", "path": "/dev/sdb"}], "ssh_port": 2222,
        "process_server": None, "account": None, "os_version": "24.04", "kernel": "6.8.0-31"})
    assert (u["ip"], u["ssh_port"], u["process_server"], u["account"], u["os_version"],
            u["kernel"]) == ("10.0.0.6", 2222, None, None, "24.04", "6.8.0-31")
    assert u["disks"] == [{"name": "sdb", "path": "/dev/sdb", "size_bytes": None}]
    assert await api.get("/api/v1/machines/web01") == u
    assert (await api.get("/api/v1/accounts/installer"))["machines"] == []

    assert await api.delete("/api/v1/machines/web01") == {"deleted": "web01"}
    await _refused(api.get("/api/v1/machines/web01"), 404, "machine_not_found")
    await _refused(api.delete("/api/v1/machines/web01"), 404, "machine_not_found")
    await _refused(api.patch("/api/v1/machines/web01", {"enabled": False}), 404,
                   "machine_not_found")
    assert [x["name"] for x in (await api.get("/api/v1/machines"))["machines"]] == ["db01"]


async def test_support_matrix(api: ApiClient) -> None:
    doc = await api.get("/api/v1/support-matrix")
    dists = {d["os_name"]: [v["os_version"] for v in d["versions"]]
             for d in doc["distributions"]}
    assert dists == {"ubuntu": ["20.04", "22.04", "24.04"], "debian": ["11", "12", "13"],
                     **{k: ["8", "9"] for k in ("rhel", "rocky", "almalinux", "centos", "ol")}}
    rhel8 = next(d for d in doc["distributions"] if d["os_name"] == "rhel")["versions"][0]
    assert rhel8 == {"os_version": "8", "min_kernel": "4.18"}
    windows = next(t for t in doc["os_types"] if t["os_type"] == "windows")
    assert windows["supported"] is False and "not supported yet" in windows["note"]


async def test_windows_is_refused_clearly(api: ApiClient) -> None:
    for body in ({"name": "win01", "ip": "10.0.0.9", "os_type": "windows"},
                 {"name": "win01", "ip": "10.0.0.9", "os_type": "windows",
                  "os_name": "windows-server", "os_version": "2022"}):
        e = await _refused(api.post("/api/v1/machines", body), 422, "unsupported_os")
        assert "Windows machines are not supported yet" in e.message
        assert "Ubuntu (ubuntu) 20.04, 22.04, 24.04" in e.hint
        assert "support-matrix" in e.hint
    assert (await api.get("/api/v1/machines"))["machines"] == []


@pytest.mark.parametrize("os_name,os_version,kernel,why", [
    ("ubuntu", "18.04", None, "Ubuntu 18.04 is not supported"),
    ("ubuntu", "23.10", None, "supported: 20.04, 22.04, 24.04"),
    ("debian", "10", None, "Debian 10 is not supported"),
    ("rhel", "7.9", None, "Red Hat Enterprise Linux 7.9 is not supported"),
    ("centos", "7", None, "CentOS Stream 7 is not supported"),
    ("fedora", "40", None, "distribution 'fedora' is not supported"),
    ("rhel", "8.9", "4.14.0-1.el8", "older than Red Hat Enterprise Linux 8's 4.18"),
    ("rocky", "9", "4.18.0-513.el8.x86_64", "older than Rocky Linux 9's 5.14"),
    ("debian", "12", "5.10.0-28-amd64", "older than Debian 12's 6.1"),
    ("ubuntu", "jammy", None, "not a version number"),
    (None, None, None, "needs os_name and os_version"),
])
async def test_outside_the_matrix_is_refused(api: ApiClient, os_name: str | None,
                                             os_version: str | None, kernel: str | None,
                                             why: str) -> None:
    body: dict[str, Any] = {"name": "m1", "ip": "10.0.0.5", "os_type": "linux"}
    body.update({k: v for k, v in (("os_name", os_name), ("os_version", os_version),
                                   ("kernel", kernel)) if v is not None})
    e = await _refused(api.post("/api/v1/machines", body), 422, "unsupported_os")
    assert why in e.message
    assert "Debian (debian) 11, 12, 13" in e.hint
    assert (await api.get("/api/v1/machines"))["machines"] == []


@pytest.mark.parametrize("os_name,os_version,kernel,stored", [
    ("ubuntu", "24.04", "6.8.0-31-generic", ("ubuntu", "24.04")),
    ("Ubuntu", "20.04.6", "5.4.0-150-generic", ("ubuntu", "20.04.6")),
    ("debian", "13", "6.12.9-amd64", ("debian", "13")),
    ("debian", "11", None, ("debian", "11")),
    ("Red Hat Enterprise Linux", "9.4", "5.14.0-427.13.1.el9_4.x86_64", ("rhel", "9.4")),
    ("almalinux", "8.9", "4.18.0-513.5.1.el8_9.x86_64", ("almalinux", "8.9")),
    ("CentOS Stream", "9", "5.14.0-391.el9.x86_64", ("centos", "9")),
    ("ol", "8.9", "5.15.0-200.131.27.el8uek.x86_64", ("ol", "8.9")),
])
async def test_inside_the_matrix_is_accepted(api: ApiClient, os_name: str, os_version: str,
                                            kernel: str | None,
                                            stored: tuple[str, str]) -> None:
    m = await api.post("/api/v1/machines", {"name": "m1", "ip": "10.0.0.5", "os_type": "linux",
                                            "os_name": os_name, "os_version": os_version,
                                            "kernel": kernel})
    assert (m["os_name"], m["os_version"], m["kernel"]) == (*stored, kernel)


@pytest.mark.parametrize("change,status,code,says", [
    ({"ip": "10.0.0.300"}, 422, "invalid_ip", "not an IPv4 or IPv6 address"),
    ({"ip": "224.0.0.1"}, 422, "invalid_ip", "multicast"),
    ({"ip": "0.0.0.0"}, 422, "invalid_ip", "unspecified"),
    ({"ssh_port": 0}, 422, "invalid_request", "ssh_port"),
    ({"ssh_port": 65536}, 422, "invalid_request", "ssh_port"),
    ({"ssh_port": "22"}, 422, "invalid_request", "ssh_port"),
    ({"disks": [{"name": "sda", "path": "/dev/sda"}, {"name": "sda", "path": "/dev/sdb"}]},
     422, "invalid_disks", "disk name 'sda' is given twice"),
    ({"disks": [{"name": "a", "path": "/dev/sda"}, {"name": "b", "path": "/dev/sda"}]},
     422, "invalid_disks", "given for two disks"),
    ({"disks": [{"name": "a", "path": "dev/sda"}]}, 422, "invalid_disks", "absolute"),
    ({"disks": [{"name": "a", "path": "/dev/../etc/passwd"}]}, 422, "invalid_disks",
     "normalized"),
    ({"disks": [{"name": "../x", "path": "/dev/sda"}]}, 422, "invalid_request", "disks/0/name"),
    ({"disks": [{"name": "a", "path": "/dev/sda", "size_bytes": 0}]}, 422, "invalid_request",
     "size_bytes"),
    ({"kernel": "linux-five"}, 422, "invalid_kernel", "not a Linux kernel release"),
    ({"process_server": "nope"}, 422, "unknown_process_server", "'nope'"),
    ({"account": "nope"}, 422, "unknown_account", "'nope'"),
    ({"enabled": "no"}, 422, "invalid_request", "enabled"),
    ({"colour": "blue"}, 422, "invalid_request", "colour"),
])
async def test_bad_input_is_refused_and_changes_nothing(
        api: ApiClient, change: dict[str, Any], status: int, code: str, says: str) -> None:
    await api.post("/api/v1/machines", WEB01)
    before = await api.get("/api/v1/machines")
    if "enabled" not in change:  # a new machine with the bad field
        e = await _refused(api.post("/api/v1/machines", {**WEB01, "name": "m2", **change}),
                           status, code)
        assert says in e.message, e.message
    e = await _refused(api.patch("/api/v1/machines/web01", change), status, code)
    assert says in e.message, e.message
    assert await api.get("/api/v1/machines") == before


async def test_duplicate_machine_is_refused(api: ApiClient) -> None:
    first = await api.post("/api/v1/machines", WEB01)
    e = await _refused(api.post("/api/v1/machines", {**WEB01, "ip": "10.9.9.9"}), 409,
                       "machine_exists")
    assert "machine update web01" in e.hint
    assert await api.get("/api/v1/machines/web01") == first


async def test_disabling_a_machine_refuses_its_certificate(cs: ConfigServer, api: ApiClient,
                                                           tmp_path: Path) -> None:
    await api.post("/api/v1/machines", WEB01)
    agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                   tmp_path / "agent")
    async with agent:
        status, doc = await agent.settings()
        assert status == 200 and doc["machine"] == "web01"
        m = await api.patch("/api/v1/machines/web01", {"enabled": False})
        assert m["enabled"] is False
        status, doc = await agent.settings()
        assert status == 401
        m = await api.patch("/api/v1/machines/web01", {"enabled": True})
        assert m["enabled"] is True and m["last_contact"] is not None
        status, _ = await agent.settings()
        assert status == 200


async def test_removed_machine_certificates_stay_revoked(cs: ConfigServer, api: ApiClient,
                                                         tmp_path: Path) -> None:
    await api.post("/api/v1/machines", WEB01)
    agent = await AgentSite.enroll(cs.site_url, cs.ca.cert_path, "web01", cs.passphrase,
                                   tmp_path / "agent")
    async with agent:
        assert (await agent.settings())[0] == 200
        await api.delete("/api/v1/machines/web01")
        assert (await agent.settings())[0] == 401
        # Added again under the same name, the old certificate does not come back to life.
        await api.post("/api/v1/machines", WEB01)
        assert (await agent.settings())[0] == 401
    certs = (await api.get("/api/v1/certificates"))["certificates"]
    mine = [c for c in certs if c.get("subject") == "web01"]
    assert mine and all(c.get("revoked_at") for c in mine), mine


async def test_protected_machine_cannot_be_removed(cs: ConfigServer, api: ApiClient) -> None:
    await api.post("/api/v1/machines", WEB01)
    await api.post("/api/v1/replication/enable", {"machine": "web01"})
    before = await api.get("/api/v1/machines/web01")
    assert before["replication"] is not None
    e = await _refused(api.delete("/api/v1/machines/web01"), 409, "machine_protected")
    assert "replication disable web01" in e.hint
    assert (await api.get("/api/v1/machines/web01"))["name"] == "web01"
    # Disabled (the machine, not replication) it is still protected: still refused.
    await api.patch("/api/v1/machines/web01", {"enabled": False})
    await _refused(api.delete("/api/v1/machines/web01"), 409, "machine_protected")
    await api.post("/api/v1/replication/disable", {"machine": "web01"})
    async with asyncio.timeout(60), cs.changed:  # Disable protection removes the item
        while (await api.get("/api/v1/machines/web01"))["replication"] is not None:
            await cs.changed.wait()
    assert await api.delete("/api/v1/machines/web01") == {"deleted": "web01"}


# The CLI is the same over either catalog (the API tests run on both): SQLite only.
@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
async def test_machine_cli(cs: ConfigServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(cs.admin_token)
    api = ["--api", cs.url, "--token-file", str(token)]

    def cli(*args: str) -> Any:
        return asyncio.to_thread(run_cli, *args)

    r = await cli("machine", "add", "web01", "--ip", "10.0.0.5", "--os-name", "debian",
                  "--os-version", "12", "--kernel", "6.1.0-18-amd64", "--disk", "sda=/dev/sda",
                  "--disk", "data=/srv/data.img", "--ssh-port", "2222", *api)
    assert r.returncode == 0, r.stderr
    assert "OS:              linux debian 12" in r.stdout and "  data: /srv/data.img" in r.stdout
    assert "SSH port:        2222" in r.stdout
    r = await cli("machine", "show", "web01", "--json", *api)
    doc = json.loads(r.stdout)
    assert [d["name"] for d in doc["disks"]] == ["sda", "data"] and doc["enabled"] is True
    r = await cli("machine", "list", *api)
    header, row = r.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "IP", "OS", "KERNEL"]
    assert row.split()[:6] == ["web01", "10.0.0.5", "debian", "12", "6.1.0-18-amd64",
                               "sda,data"]
    r = await cli("machine", "update", "web01", "--disable", "--disk", "sdb=/dev/sdb",
                  "--json", *api)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["enabled"] is False and doc["disks"][0]["path"] == "/dev/sdb"

    r = await cli("machine", "add", "win01", "--ip", "10.0.0.9", "--os-type", "windows", *api)
    assert r.returncode == 2 and "not supported yet" in r.stderr and "hint:" in r.stderr
    r = await cli("machine", "add", "m2", "--ip", "10.0.0.9", "--os-name", "ubuntu",
                  "--os-version", "22.04", "--disk", "sda", *api)
    assert r.returncode == 2 and "NAME=PATH" in r.stderr
    r = await cli("machine", "update", "web01", *api)
    assert r.returncode == 2 and "nothing to change" in r.stderr
    r = await cli("machine", "update", "web01", "--ssh-port", "0", *api)
    assert r.returncode == 2 and "'0' is not a TCP port (1-65535)" in r.stderr
    r = await cli("machine", "update", "web01", "--ssh-port", "22", "--json", *api)
    assert r.returncode == 0 and json.loads(r.stdout)["ssh_port"] == 22
    r = await cli("machine", "update", "web01", "--account", "ghost", *api)
    assert r.returncode == 2 and "no account named 'ghost'" in r.stderr
    r = await cli("machine", "list", "--json", *api)
    assert [m["name"] for m in json.loads(r.stdout)["machines"]] == ["web01"]

    r = await cli("machine", "support-matrix", *api)
    assert r.returncode == 0, r.stderr
    assert "windows: not supported" in r.stdout
    assert "Ubuntu" in r.stdout and "22.04 (kernel 5.15+)" in r.stdout
    r = await cli("machine", "support-matrix", "--json", *api)
    assert "distributions" in json.loads(r.stdout)

    r = await cli("machine", "remove", "web01", *api)
    assert r.returncode == 0 and "removed" in r.stdout
    r = await cli("machine", "show", "web01", *api)
    assert r.returncode == 2 and "no machine named 'web01'" in r.stderr
