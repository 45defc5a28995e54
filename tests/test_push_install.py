"""Push-install prerequisites (issue #14) against a real sshd on "another machine"
(tests/sshd.py: its own network and mount namespaces, its sessions chrooted in a
minimal Debian 12 tree of its own): every check passes on a good target, and each
failure is its own clear error that changes nothing on the target."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.tomlconfig import load
from configserver.ca import CertificateAuthority
from configserver.support import BadKernel, Unsupported, check
from mobility.config import MobilityConfig
from mobility.localenroll import request
from procserver.pushinstall import InstallFailed, enroll, install, uninstall
from procserver.sshprereq import (
    HostKeyChanged,
    PrerequisiteFailed,
    SshTarget,
    check_target,
    connect,
    hosts_gaps,
)
from siterecovery.agentbundle import Bundle
from tests.backends import missing_backend
from tests.helpers import REPO
from tests.sshd import HOST_ADDR, TARGET_ADDR, Sshd, agent_bundle, missing
from tests.targetroot import MARKER, PACKAGES, choices, key

ROOT_PW, ALICE_PW = "root-secret-1", "alice-secret-2"
BUNDLE_TARGET = {"implementation": "cpython", "python": "3.11", "python_exact": True,
                 "machine": "x86_64"}
NEED = 64 * 2**20


def matrix(release: dict[str, str], kernel: str) -> str | None:
    try:
        check("linux", release.get("ID"), release.get("VERSION_ID"), kernel)
    except (Unsupported, BadKernel) as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def root_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return agent_bundle(tmp_path_factory)


@pytest.fixture
async def sshd(tmp_path: Path, root_key: asyncssh.SSHKey) -> AsyncIterator[Sshd]:
    if why := missing():
        missing_backend("a real sshd", why)
    authorized = {"root": root_key.export_public_key("openssh").decode().strip()}
    async with Sshd(tmp_path / "sshd", passwords={"root": ROOT_PW, "alice": ALICE_PW},
                    authorized=authorized) as s:
        yield s


async def _probe(s: Sshd, need: int = NEED, os_check: Any = matrix, **kw: Any) -> Any:
    t = SshTarget(s.host, port=s.port, timeout=5, **{"username": "root", **kw})
    return await check_target(t, bundle_target=BUNDLE_TARGET, need_bytes=need,
                              os_check=os_check)


async def _fails(s: Sshd, check_name: str, **kw: Any) -> PrerequisiteFailed:
    with pytest.raises(PrerequisiteFailed) as e:
        await _probe(s, **kw)
    assert e.value.check == check_name, str(e.value)
    assert "hint: " in str(e.value) and e.value.remediation
    assert s.files() == []  # nothing written on the target
    return e.value


async def test_every_prerequisite_passes_on_a_good_target(sshd: Sshd,
                                                          root_key: asyncssh.SSHKey) -> None:
    p = await _probe(sshd, password=ROOT_PW)
    assert [name for name, _ in p.passed] == ["ssh_port", "host_key", "authentication", "sftp",
                                              "privileges", "hosts", "os", "python",
                                              "free_space"]
    assert p.host_key == sshd.host_key  # what trust on first use records
    assert p.sudo == "" and p.os_release["ID"] == "debian" and p.python.endswith("3.11")
    assert p.free_bytes >= NEED
    # with the key instead of a password, and the recorded host key
    key = root_key.export_private_key("openssh").decode()
    again = await _probe(sshd, private_key=key, known_host_key=p.host_key)
    assert again.fingerprint == p.fingerprint
    assert sshd.files() == []


async def test_wrong_password(sshd: Sshd) -> None:
    e = await _fails(sshd, "authentication", password="not-it")
    assert "refuses the account 'root' with its password" in e.message


async def test_wrong_key(sshd: Sshd) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()
    e = await _fails(sshd, "authentication", private_key=other)
    assert "with its key" in e.message


async def test_not_root_and_no_sudo(sshd: Sshd) -> None:
    e = await _fails(sshd, "privileges", username="alice", password=ALICE_PW)
    assert "'alice' is not root and may not use sudo" in e.message


async def test_etc_hosts_without_the_machine_address(sshd: Sshd) -> None:
    name = sshd.hostname  # its own, not the host's
    mapped = sshd.hosts.read_text()
    sshd.hosts.write_text("".join(line for line in mapped.splitlines(keepends=True)
                                  if not line.startswith(TARGET_ADDR)))
    e = await _fails(sshd, "hosts", password=ROOT_PW)
    assert e.message == f"/etc/hosts on {TARGET_ADDR} does not map its host name {name!r} " \
        f"to {TARGET_ADDR}"
    assert e.remediation == f"add to /etc/hosts on the machine: '{TARGET_ADDR} {name}'"
    sshd.hosts.write_text(mapped)  # the fix the remediation names: the check passes
    assert ("hosts", f"{name} mapped to its addresses") in (
        await _probe(sshd, password=ROOT_PW)).passed


def test_hosts_gaps_reads_both_address_listings() -> None:
    hosts = "127.0.0.1 localhost\n10.0.0.5 web01.example.org web01 # eth0\n#10.0.0.6 web01\n"
    assert hosts_gaps("web01", hosts, "10.0.0.5 fd00::5 \n") == []
    assert hosts_gaps("WEB01.example.org", hosts, "10.0.0.5 10.0.0.6\n") == ["10.0.0.6"]
    ip = ("2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n"
          "3: eth1    inet 10.0.0.6/24 brd 10.0.0.255 scope global eth1\n")
    assert hosts_gaps("web01", hosts, ip) == ["10.0.0.6"]  # not the broadcast address
    assert hosts_gaps("db01", hosts, "10.0.0.5") == ["10.0.0.5"]


async def test_sudo_with_the_accounts_password_passes_and_without_sudo_is_refused(
        sshd: Sshd) -> None:
    if shutil.which("sudo") is None:
        missing_backend("sudo", "sudo is not installed (apt-get install sudo)")
    await _fails(sshd, "privileges", username="alice", password=ALICE_PW)
    sshd.sudoers("alice ALL=(ALL) ALL")  # with her password
    p = await _probe(sshd, username="alice", password=ALICE_PW)
    assert p.sudo == "sudo -S -p ''" and ("privileges", "sudo") in p.passed
    sshd.sudoers("alice ALL=(ALL) NOPASSWD: ALL")
    assert (await _probe(sshd, username="alice", password=ALICE_PW)).sudo == "sudo -n"
    assert sshd.files() == []


async def test_no_sftp_subsystem(tmp_path: Path) -> None:
    if why := missing():
        missing_backend("a real sshd", why)
    async with Sshd(tmp_path / "sshd", passwords={"root": ROOT_PW}, sftp=False) as s:
        e = await _fails(s, "sftp", password=ROOT_PW)
        assert "Subsystem sftp" in e.remediation


async def test_port_closed(tmp_path: Path) -> None:
    if why := missing():
        missing_backend("a real sshd", why)
    async with Sshd(tmp_path / "sshd", passwords={"root": ROOT_PW}, listen=False) as s:
        e = await _fails(s, "ssh_port", password=ROOT_PW)
        assert "refuses connections" in e.message


async def test_host_key_changed_refuses_before_any_credential(sshd: Sshd) -> None:
    first = await _probe(sshd, password=ROOT_PW)
    await sshd.stop()
    sshd.new_host_key()  # the machine "was reinstalled"
    await sshd.start()
    assert sshd.host_key != first.host_key
    e = await _fails(sshd, "host_key", password=ROOT_PW, known_host_key=first.host_key)
    assert isinstance(e, HostKeyChanged)
    new = asyncssh.import_public_key(sshd.host_key).get_fingerprint("sha256")
    assert e.recorded == first.fingerprint and e.presented == new
    assert first.fingerprint in str(e) and new in str(e)


async def test_unsupported_os_and_too_little_space(sshd: Sshd) -> None:
    e = await _fails(sshd, "os", password=ROOT_PW,
                     os_check=lambda release, kernel: "distribution 'debian' is not supported")
    assert "Debian GNU/Linux 12" in e.message and "not supported" in e.message
    e = await _fails(sshd, "free_space", password=ROOT_PW, need=1 << 60)
    assert "MiB free under /opt/siterecovery-agent" in e.message


async def test_unreachable_address(sshd: Sshd) -> None:
    sshd.unplug()
    e = await _fails(sshd, "reachability", password=ROOT_PW)
    assert "cannot be reached from the process server" in e.message


async def test_install_then_uninstall_removes_everything(sshd: Sshd, bundle: Bundle) -> None:
    """Prerequisites, then the bundle over SFTP and install.sh as root: the agent lands in
    the target's /opt and its unit in /etc/systemd/system (this target has no systemd:
    said so), in the machine's own root (the Debian tree: its python3.11 runs the agent)
    and nowhere on the host; a second install changes nothing; uninstall leaves no file
    behind, and the upload directory is gone."""
    host = [Path(p) for p in ("/opt/siterecovery-agent", "/etc/siterecovery",
                              "/etc/systemd/system/siterecovery-agent.service")]
    assert not any(p.exists() for p in host)
    t = SshTarget(sshd.host, username="root", password=ROOT_PW, timeout=5)
    p = await check_target(t, bundle_target=bundle.manifest["target"], need_bytes=NEED,
                           os_check=matrix)
    key = asyncssh.import_public_key(p.host_key)
    async with await connect(t, key) as conn:
        done = await install(conn, bundle.path, sudo=p.sudo, python=p.python)
        assert (done.version, done.prefix) == (bundle.manifest["agent_version"],
                                               "/opt/siterecovery-agent")
        assert "does not run systemd" in done.output
        files = sshd.files()
        assert "etc/systemd/system/siterecovery-agent.service" in files
        assert "opt/siterecovery-agent/lib/mobility/standalone.py" in files
        assert {f.split("/")[0] for f in files} == {"etc", "opt"}
        assert not any(p.exists() for p in host)  # none of it on the host
        # the session ran in the machine's root: its marker there, the host's tree not
        seen = await conn.run(f"cat /{MARKER}; test -e {REPO} || echo no-host-tree; cat "
                              "/opt/siterecovery-agent/python", check=True)
        assert str(seen.stdout).split("\n")[:3] == [
            (sshd.tree / MARKER).read_text().strip(), "no-host-tree", "/usr/bin/python3.11"]
        version = await conn.run("/opt/siterecovery-agent/bin/siterecovery-agent version",
                                 check=True)
        assert str(version.stdout).strip() == bundle.manifest["agent_version"]
        assert str((await conn.run("ls -A /var/tmp", check=True)).stdout) == ""

        again = await install(conn, bundle.path, sudo=p.sudo, python=p.python)
        assert "already installed" in again.output
        assert [f for f in sshd.files() if "__pycache__" not in f] == files  # python's own

        assert "removed" in await uninstall(conn, sudo=p.sudo)
        assert sshd.files() == []
        assert "not installed" in await uninstall(conn, sudo=p.sudo)


async def test_install_refused_by_the_bundle_changes_nothing(sshd: Sshd, bundle: Bundle,
                                                            tmp_path: Path) -> None:
    """A bundle whose interpreter does not fit (here: a wrong --python) is refused by its
    own install.sh before anything is written."""
    t = SshTarget(sshd.host, username="root", password=ROOT_PW, timeout=5)
    p = await check_target(t, bundle_target=bundle.manifest["target"], need_bytes=NEED,
                           os_check=matrix)
    async with await connect(t, asyncssh.import_public_key(p.host_key)) as conn:
        with pytest.raises(InstallFailed) as e:
            await install(conn, bundle.path, sudo=p.sudo, python="/bin/false")
    assert "refused" in str(e.value) and "install CPython 3.11" in str(e.value)
    assert sshd.files() == []


async def test_enroll_makes_the_key_on_the_machine(sshd: Sshd, bundle: Bundle,
                                                   tmp_path: Path) -> None:
    """After the install: the agent makes its key on the machine, the CA signs only its
    request, the certificate and CA land next to the key and the agent writes its config;
    uninstall removes all of it."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    requests: list[bytes] = []

    async def sign(csr: bytes) -> tuple[bytes, bytes]:
        requests.append(csr)
        issued = ca.sign_client_csr("web01", csr)
        assert issued.key_pem == b""  # the CA never had the key
        return issued.cert_pem, ca.cert_pem

    t = SshTarget(sshd.host, username="root", password=ROOT_PW, timeout=5)
    p = await check_target(t, bundle_target=bundle.manifest["target"], need_bytes=NEED,
                           os_check=matrix)
    async with await connect(t, asyncssh.import_public_key(p.host_key)) as conn:
        await install(conn, bundle.path, sudo=p.sudo, python=p.python)
        config = await enroll(conn, machine="web01", sign=sign, server=f"{HOST_ADDR}:9443",
                              site_url=f"https://{HOST_ADDR}:9441",
                              disks=[("sda", "/dev/sda")], sudo=p.sudo)
        assert config == "/etc/siterecovery/mobility.toml"
        conf = sshd.root / "etc" / "siterecovery"
        assert (conf / "agent.key").stat().st_mode & 0o077 == 0
        key = conf / "agent.key"
        assert b"PRIVATE KEY" not in b"".join(requests)
        cfg = load(MobilityConfig, conf / "mobility.toml")
        assert (cfg.machine, cfg.server_host, cfg.server_port) == ("web01", HOST_ADDR, 9443)
        assert cfg.tls_key == "/etc/siterecovery/agent.key" and cfg.disks == [
            {"name": "sda", "path": "/dev/sda"}]
        # the certificate the CA issued is for the key made on the machine
        cert = x509.load_pem_x509_certificate((conf / "agent.pem").read_bytes())
        own = serialization.load_pem_private_key(key.read_bytes(), password=None)
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        assert cert.public_key().public_bytes(serialization.Encoding.DER, pub) == \
            own.public_key().public_bytes(serialization.Encoding.DER, pub)

        await uninstall(conn, sudo=p.sudo)
    assert sshd.files() == []


def test_the_ca_signs_only_a_request_for_the_machine(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    csr = request(tmp_path / "agent", "web01")
    assert request(tmp_path / "agent", "web01") != b"" and \
        (tmp_path / "agent" / "agent.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="names \\['web01'\\], not the machine 'db01'"):
        ca.sign_client_csr("db01", csr)
    with pytest.raises(ValueError, match="not a PEM CSR"):
        ca.sign_client_csr("web01", b"junk")
    assert ca.sign_client_csr("web01", csr).subject == "web01"


def test_the_target_tree_resolves_alternatives_and_is_rebuilt_for_another_package_list(
        ) -> None:
    """tests/targetroot.py: of each group of alternatives (a virtual package: its
    providers) the one the tree lists, else the first; another package list is another
    cached tree."""
    out = ("base-files\n  PreDepends: <awk>\n    gawk\n    original-awk\n    mawk\n"
           "init-system-helpers\n |Depends: usrmerge\n  Depends: usr-is-merged\n"
           "    usrmerge\nlibpam-modules\n  PreDepends: libc6\n |PreDepends: debconf\n"
           "  PreDepends: <debconf-2.0>\n    cdebconf\n    debconf\n"
           "  Conflicts: libpam-mkhomedir\n")
    assert choices(out, {"mawk", "usr-is-merged"}) == {"mawk", "usr-is-merged", "libc6",
                                                        "debconf"}
    assert choices(out, set()) == {"gawk", "usrmerge", "libc6", "debconf"}
    assert key() == key(tuple(reversed(PACKAGES))) != key((*PACKAGES, "strace"))
