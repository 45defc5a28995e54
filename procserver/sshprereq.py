"""Push-install prerequisites: each checked in order over SSH, none of them changing anything.

Before the agent bundle is copied to a machine, ``check_target`` walks the checks the
seed lists for Linux, one at a time, and stops at the first that fails with
``PrerequisiteFailed`` (the check's name, what is wrong, what to do):

1. ``reachability``  — a TCP connection to the machine's address (unreachable network,
   no route, no answer within the timeout);
2. ``ssh_port``      — something listens on the SSH port and speaks SSH (refused: no
   sshd or a firewall);
3. ``host_key``      — the key the machine presents is the one recorded on first use
   (or in the operator's known_hosts); a changed key refuses with both fingerprints and
   no credential is sent;
4. ``authentication`` — the account's password or key is accepted;
5. ``sftp``          — the SFTP subsystem is enabled (the bundle goes over SFTP);
6. ``privileges``    — the account is root, or may run ``sudo`` (without a password, or
   with the account's password);
7. ``hosts``         — /etc/hosts maps the machine's host name to each of its IPv4
   addresses (``hostname -I``), as the seed asks of a Linux source machine;
8. ``os``            — /etc/os-release and ``uname -r`` read on the machine, judged by the
   caller's support-matrix check (the matrix is the configuration server's: it is
   passed in, this module does not import it);
9. ``python``        — an interpreter the bundle's compiled wheels load in (its MANIFEST
   ``target``);
10. ``free_space``   — enough free space where the agent is installed.

Why one connection after the probes: the host key is fetched on its own first and the
authenticated connection is pinned to exactly that key, so a password never reaches a
machine whose key changed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

REACH_ERRNOS = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ETIMEDOUT)


class PrerequisiteFailed(Exception):
    """A prerequisite of the push install does not hold; nothing on the machine changed."""

    def __init__(self, check: str, message: str, remediation: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check, self.message, self.remediation = check, message, remediation

    def __str__(self) -> str:
        return f"{self.check}: {self.message}\nhint: {self.remediation}"


class HostKeyChanged(PrerequisiteFailed):
    def __init__(self, host: str, recorded: str, presented: str) -> None:
        super().__init__(
            "host_key",
            f"{host} presents host key {presented}, not the recorded {recorded}: the machine "
            "was reinstalled, or something is in the middle; no credential was sent",
            "if the machine was really reinstalled, check the new key's fingerprint on its "
            "console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and forget the old one "
            "in the inventory; otherwise find out who answers at that address")
        self.recorded, self.presented = recorded, presented


@dataclass(frozen=True)
class SshTarget:
    """How to reach one machine: address and port, the account (password and/or private
    key in OpenSSH/PEM text), and the host key recorded for it (OpenSSH public key line;
    empty: trust on first use)."""

    host: str
    username: str
    port: int = 22
    password: str = field(default="", repr=False)
    private_key: str = field(default="", repr=False)
    known_host_key: str = ""
    timeout: float = 10.0


@dataclass
class Probe:
    """What the checks found: the host key (to record on first use), the passed checks
    in order with their detail, and the facts read on the machine."""

    host_key: str = ""
    fingerprint: str = ""
    passed: list[tuple[str, str]] = field(default_factory=list)
    sudo: str = ""  # "" as root, or the sudo prefix the install uses
    os_release: dict[str, str] = field(default_factory=dict)
    kernel: str = ""
    machine: str = ""
    python: str = ""
    free_bytes: int = 0


# The caller's support-matrix judgement: (os_release, kernel) -> None if supported, else why.
OsCheck = Callable[[dict[str, str], str], str | None]


def fingerprint(key_line: str) -> str:
    return str(asyncssh.import_public_key(key_line).get_fingerprint("sha256"))


async def _tcp(t: SshTarget) -> str:
    """Checks 1 and 2: the SSH banner, or ``PrerequisiteFailed``."""
    where = f"{t.host}:{t.port}"
    try:
        async with asyncio.timeout(t.timeout):
            reader, writer = await asyncio.open_connection(t.host, t.port)
    except ConnectionRefusedError:
        raise PrerequisiteFailed(
            "ssh_port", f"{where} refuses connections: no SSH server listens there",
            f"start sshd on the machine (systemctl enable --now ssh) and let the process "
            f"server reach port {t.port} through any firewall; or set the machine's SSH "
            "port") from None
    except (TimeoutError, OSError) as e:
        if not isinstance(e, TimeoutError) and e.errno not in REACH_ERRNOS:
            raise
        why = f"no answer within {t.timeout:g} s" if isinstance(e, TimeoutError) else str(e)
        raise PrerequisiteFailed(
            "reachability", f"{t.host} cannot be reached from the process server ({why})",
            "check the machine's address in the inventory, that it is up, and the route "
            "and firewalls between the process server and it") from None
    try:
        async with asyncio.timeout(t.timeout):
            banner = (await reader.readline()).decode("ascii", "replace").strip()
    except TimeoutError:
        banner = ""
    finally:
        writer.close()
    if not banner.startswith("SSH-"):
        raise PrerequisiteFailed(
            "ssh_port", f"{where} answers, but not as an SSH server ({banner[:40]!r})",
            "point the machine's SSH port at its sshd")
    return banner


async def _host_key(t: SshTarget) -> asyncssh.SSHKey:
    try:
        key = await asyncssh.get_server_host_key(t.host, t.port, config=None)
    except (OSError, asyncssh.Error) as e:
        raise PrerequisiteFailed("host_key", f"cannot read {t.host}'s host key: {e}",
                                 "check that sshd on the machine works ('ssh -v')") from None
    if key is None:
        raise PrerequisiteFailed("host_key", f"{t.host} presented no host key",
                                 "check sshd's HostKey settings")
    if t.known_host_key:
        recorded = fingerprint(t.known_host_key)
        presented = str(key.get_fingerprint("sha256"))
        if recorded != presented:
            raise HostKeyChanged(t.host, recorded, presented)
    return key


async def connect(t: SshTarget, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
    """An authenticated connection pinned to ``key``; ``PrerequisiteFailed`` (check
    ``authentication``) when the account is refused. No agent, no ~/.ssh keys or config
    of the process server's user are used: only the account."""
    keys = [asyncssh.import_private_key(t.private_key)] if t.private_key else []
    try:
        return await asyncssh.connect(
            t.host, t.port, username=t.username, password=t.password or None,
            client_keys=keys, known_hosts=([key], [], []), agent_path=None, config=None,
            preferred_auth=("publickey", "password") if keys else ("password",),
            connect_timeout=t.timeout, login_timeout=t.timeout)
    except asyncssh.PermissionDenied:
        how = "key" if t.private_key else "password"
        raise PrerequisiteFailed(
            "authentication", f"{t.host} refuses the account {t.username!r} with its {how}",
            "check the account's user name and secret ('siterecovery account update'), and "
            f"that sshd allows {how} logins for it (PermitRootLogin, PasswordAuthentication, "
            "authorized_keys)") from None


async def run(conn: asyncssh.SSHClientConnection, command: str,
              stdin: str | None = None) -> asyncssh.SSHCompletedProcess:
    return await conn.run(command, input=stdin, check=False)


async def _privileges(conn: asyncssh.SSHClientConnection, t: SshTarget) -> str:
    uid = await run(conn, "id -u")
    if str(uid.stdout).strip() == "0":
        return ""
    if (await run(conn, "sudo -n true")).exit_status == 0:
        return "sudo -n"
    if t.password and (await run(conn, "sudo -S -p '' true",
                                 stdin=t.password + "\n")).exit_status == 0:
        return "sudo -S -p ''"
    raise PrerequisiteFailed(
        "privileges", f"the account {t.username!r} is not root and may not use sudo on "
        f"{t.host}", "use root, or give the account sudo rights "
        f"(e.g. '{t.username} ALL=(ALL) ALL' in /etc/sudoers.d/siterecovery)")


def _ipv4(token: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(token.partition("/")[0]))
    except ValueError:
        return None


def hosts_gaps(name: str, hosts: str, addresses: str) -> list[str]:
    """The machine's IPv4 addresses (``hostname -I``, or ``ip -o addr`` output: the word
    after each ``inet``) that /etc/hosts (``hosts``) does not map to host name ``name``
    (or its first label)."""
    names = {name.lower(), name.lower().split(".")[0]}
    mapped = set()
    for line in hosts.splitlines():
        words = line.partition("#")[0].split()
        if len(words) >= 2 and names & {w.lower() for w in words[1:]}:
            mapped.add(words[0])
    words = addresses.split()
    if "inet" in words:
        words = [w for before, w in itertools.pairwise(words) if before == "inet"]
    have = [a for a in dict.fromkeys(_ipv4(w) for w in words) if a is not None]
    return [a for a in have if a not in mapped and not a.startswith("127.")]


async def _hosts(conn: asyncssh.SSHClientConnection, t: SshTarget) -> str:
    r = await run(conn, "uname -n; echo ---; cat /etc/hosts; echo ---; hostname -I 2>/dev/null"
                        " || ip -o -4 addr show scope global")
    name, _, rest = str(r.stdout).partition("\n---\n")
    hosts, _, addresses = rest.rpartition("---\n")
    name = name.strip()
    if r.exit_status != 0 or not name:
        raise PrerequisiteFailed("hosts", f"cannot read the host name, /etc/hosts and the "
                                 f"addresses of {t.host}: {str(r.stderr).strip()}",
                                 "check that /etc/hosts is readable and 'hostname -I' works")
    if gaps := hosts_gaps(name, hosts, addresses):
        raise PrerequisiteFailed(
            "hosts", f"/etc/hosts on {t.host} does not map its host name {name!r} to "
            f"{', '.join(gaps)}",
            "add to /etc/hosts on the machine: " + "; ".join(f"'{a} {name}'" for a in gaps))
    return name


def _os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip().strip('"')
    return out


async def _python(conn: asyncssh.SSHClientConnection, target: dict[str, Any]) -> str:
    want = target["python"]
    candidates = [f"python{want}", "python3"] if target.get("python_exact") else ["python3"]
    probe = "import platform,sys;print('%d.%d' % sys.version_info[:2], platform.machine())"
    seen = []
    for c in candidates:
        r = await run(conn, f"command -v {c} && {c} -I -S -c {shlex.quote(probe)}")
        lines = str(r.stdout).split()
        if r.exit_status != 0 or len(lines) != 3:
            seen.append(f"{c}: not found")
            continue
        path, version, machine = lines
        ok = version == want if target.get("python_exact") else \
            tuple(map(int, version.split("."))) >= (3, 11)
        if ok and machine == target["machine"]:
            return path
        seen.append(f"{path}: Python {version} on {machine}")
    raise PrerequisiteFailed(
        "python", f"no interpreter on the machine runs this agent bundle (needs CPython "
        f"{want} on {target['machine']}; found {'; '.join(seen)})",
        f"install CPython {want} from the distribution (apt-get/dnf install python{want}), or "
        "build the agent bundle on this distribution ('siterecovery agent bundle')")


async def _free(conn: asyncssh.SSHClientConnection, install_dir: str) -> int:
    # The nearest existing parent: the install directory itself may not exist yet.
    r = await run(conn, f"d={shlex.quote(install_dir)}; while [ ! -d \"$d\" ]; do "
                        "d=$(dirname \"$d\"); done; df -Pk \"$d\" | tail -n 1")
    parts = str(r.stdout).split()
    if r.exit_status != 0 or len(parts) < 4 or not parts[3].isdigit():
        raise PrerequisiteFailed("free_space", f"cannot read the free space under "
                                 f"{install_dir}: {str(r.stderr).strip()}",
                                 "check that df works on the machine")
    return int(parts[3]) * 1024


async def check_target(t: SshTarget, *, bundle_target: dict[str, Any], need_bytes: int,
                       os_check: OsCheck, install_dir: str = "/opt/siterecovery-agent"
                       ) -> Probe:
    """Run every check in order; the ``Probe`` when all pass, else the first failure as
    ``PrerequisiteFailed``. Reads only: nothing on the machine is written."""
    p = Probe()
    p.passed.append(("ssh_port", await _tcp(t)))
    key = await _host_key(t)
    p.host_key = key.export_public_key("openssh").decode().strip()
    p.fingerprint = str(key.get_fingerprint("sha256"))
    p.passed.append(("host_key", p.fingerprint + ("" if t.known_host_key
                                                  else " (first use: to be recorded)")))
    async with await connect(t, key) as conn:
        p.passed.append(("authentication", t.username))
        try:
            async with conn.start_sftp_client():
                pass
        except (asyncssh.Error, OSError) as e:
            raise PrerequisiteFailed(
                "sftp", f"{t.host} has no SFTP subsystem ({e})",
                "enable it in /etc/ssh/sshd_config ('Subsystem sftp internal-sftp' or "
                "'Subsystem sftp /usr/lib/openssh/sftp-server') and reload sshd") from None
        p.passed.append(("sftp", "enabled"))
        p.sudo = await _privileges(conn, t)
        p.passed.append(("privileges", "root" if not p.sudo else "sudo"))
        p.passed.append(("hosts", f"{await _hosts(conn, t)} mapped to its addresses"))
        facts = await run(conn, "cat /etc/os-release; echo ---; uname -r; uname -m")
        release, _, rest = str(facts.stdout).partition("---")
        p.os_release = _os_release(release)
        p.kernel, p.machine = [*rest.split(), "", ""][:2]
        why = os_check(p.os_release, p.kernel)
        if why is not None:
            raise PrerequisiteFailed("os", f"{t.host} runs {p.os_release.get('PRETTY_NAME', '?')}"
                                     f" (kernel {p.kernel}): {why}",
                                     "protect machines of the support matrix only "
                                     "('siterecovery machine support-matrix')")
        p.passed.append(("os", f"{p.os_release.get('ID')} {p.os_release.get('VERSION_ID')}, "
                               f"kernel {p.kernel}"))
        p.python = await _python(conn, bundle_target)
        p.passed.append(("python", p.python))
        p.free_bytes = await _free(conn, install_dir)
        if p.free_bytes < need_bytes:
            raise PrerequisiteFailed(
                "free_space", f"{p.free_bytes // 2**20} MiB free under {install_dir}, "
                f"the agent needs {need_bytes // 2**20} MiB",
                "free space on that file system")
        p.passed.append(("free_space", f"{p.free_bytes // 2**20} MiB"))
    return p
