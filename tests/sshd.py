"""A real OpenSSH server on "another machine" for the push-install tests.

``Sshd`` starts Debian's /usr/sbin/sshd inside its own network namespace (a veth pair,
the host side 10.219.0.1/30, the target 10.219.0.2/30: outside 192.0.2.0/24 and the
10.213-10.217 subnets of the drill and benchmark networks) and its own mount namespace
(``ip netns exec`` gives one; mounts there never reach the host) with its own host name
(``hostname``: a UTS namespace of its own). Every session it opens
runs chrooted (sshd's ``ChrootDirectory``) in the machine's own root: a minimal Debian 12
tree built from Debian packages (tests/targetroot.py: its python3.11, coreutils, sudo
...), cached and shared, mounted as the lower layer of an overlay whose upper layer is
the test's ``root``, so what an install writes on the machine lands there and nothing of
the host or of the cached tree changes. /proc, /sys and /dev (the host's devices: a disk
``attach_disk`` gives the machine is one of them) are mounted in that root; /run, /tmp
and /var/tmp are its own tmpfs (no systemd runs there). /etc/passwd, /etc/shadow and
/etc/group are the test's (users root and alice, passwords of the test's choosing, alice
without sudo until ``sudoers`` says otherwise: /etc/sudoers is the test's too), both for
sshd's authentication and inside the root, and so is the root's /etc/hosts (``hosts``:
localhost and the target's address for its host name).

Needs root (network and mount namespaces), openssh-server (tests/run.sh installs it) and
what tests/targetroot.py needs to build the tree (once: about 15 s).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from siterecovery.agentbundle import Bundle, build
from tests import targetroot

SSHD = "/usr/sbin/sshd"
HOST_ADDR, TARGET_ADDR = "10.219.0.1", "10.219.0.2"
# Where the machine's root is mounted inside sshd's mount namespace (a tmpfs of mode 755
# over /mnt there: every component of a ChrootDirectory is root's and not writable by
# others, which the test's directories under /tmp are not).
CHROOT = "/mnt/target"


def missing() -> str | None:
    """Why the real sshd cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    if not Path(SSHD).exists():
        return "openssh-server is not installed (apt-get install openssh-server)"
    if shutil.which("openssl") is None or shutil.which("ip") is None:
        return "openssl (password hashes) and iproute2 (ip netns) are needed"
    tools = [t for t in ("losetup", "unshare") if shutil.which(t) is None]
    if tools := targetroot.missing_tools() + tools:
        return f"the machine's root, host name and disk need {', '.join(tools)}"
    return None


_BUNDLES: dict[Path, Bundle] = {}


def agent_bundle(factory: pytest.TempPathFactory) -> Bundle:
    """The agent bundle, built once per test session (it takes 5-15 s) for every module
    that push-installs it."""
    path = factory.getbasetemp() / "agent-bundle" / "agent.tar.gz"
    if path not in _BUNDLES:
        path.parent.mkdir(exist_ok=True)
        _BUNDLES[path] = build(path)
    return _BUNDLES[path]


def _hash(password: str) -> str:
    return subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, text=True,
                          capture_output=True, check=True).stdout.strip()


class Sshd:
    """``async with Sshd(dir, passwords={...}) as s``: s.host, s.port, s.root (what was
    written on the machine: the upper layer of its root), s.tree (the cached Debian tree
    under it), s.host_key (OpenSSH public key line). ``sftp=False`` serves no SFTP
    subsystem; ``listen=False`` starts the namespace without sshd (port closed)."""

    def __init__(self, work: Path, *, passwords: dict[str, str],
                 authorized: dict[str, str] | None = None, sftp: bool = True,
                 listen: bool = True) -> None:
        self.work, self.passwords, self.authorized = work, passwords, authorized or {}
        self.sftp, self.listen = sftp, listen
        self.ns = f"srhj{secrets.token_hex(3)}"
        self.hostname = f"target-{self.ns}"  # its own (a UTS namespace of its own)
        self.host, self.port = TARGET_ADDR, 22
        self.root = work / "target"
        self.tree = Path()
        self.loops: list[str] = []
        self.hosts = work / "etc" / "hosts"  # the target's /etc/hosts (bind-mounted)
        self.sudoers_file = work / "etc" / "sudoers"  # its /etc/sudoers (where sudo is)
        self.proc: asyncio.subprocess.Process | None = None
        self.host_key = ""

    def _files(self) -> Path:
        etc = self.work / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        users = {"root": (0, "/root"), "alice": (1500, "/home/alice")}
        passwd = [f"{u}:x:{uid}:{uid}::{home}:/bin/sh" for u, (uid, home) in users.items()]
        passwd.append("sshd:x:100:65534::/run/sshd:/usr/sbin/nologin")
        (etc / "passwd").write_text("\n".join(passwd) + "\n")
        (etc / "group").write_text("root:x:0:\nalice:x:1500:\nnogroup:x:65534:\n")
        shadow = [f"{u}:{_hash(self.passwords[u]) if u in self.passwords else '!'}:19000:0:"
                  "99999:7:::" for u in users]
        (etc / "shadow").write_text("\n".join(shadow) + "\n")
        (etc / "shadow").chmod(0o600)
        if not self.sudoers_file.exists():
            self.sudoers()
        if not self.hosts.exists():
            self.hosts.write_text(f"127.0.0.1\tlocalhost\n{TARGET_ADDR}\t"
                                  f"{self.hostname}\n")
        keys = self.work / "keys"
        keys.mkdir(exist_ok=True)
        for u, line in self.authorized.items():
            (keys / u).write_text(line + "\n")
        hostkey = self.work / "ssh_host_ed25519_key"
        if not hostkey.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                           check=True)
        self.host_key = " ".join(Path(f"{hostkey}.pub").read_text().split()[:2])
        cfg = self.work / "sshd_config"
        cfg.write_text("\n".join([
            f"ListenAddress {TARGET_ADDR}", "Port 22", f"HostKey {hostkey}",
            f"PidFile {self.work / 'sshd.pid'}", "PermitRootLogin yes",
            "PasswordAuthentication yes", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", f"AuthorizedKeysFile {keys}/%u", "LogLevel VERBOSE",
            f"ChrootDirectory {CHROOT}",
            *(["Subsystem sftp internal-sftp"] if self.sftp else [])]) + "\n")
        return cfg

    def _script(self, cfg: Path) -> str:
        scratch = self.work / "overlay-work"
        shutil.rmtree(scratch, ignore_errors=True)  # an earlier start's: to be empty
        scratch.mkdir(parents=True)
        t, etc = CHROOT, self.work / "etc"
        # sshd authenticates with the test's users (on the host side of the chroot) ...
        mounts = [f"mount --bind {etc / f} /etc/{f}" for f in ("passwd", "shadow", "group")]
        mounts += ["mount -t tmpfs -o mode=755 tmpfs /mnt", f"mkdir {t}",
                   f"mount -t overlay overlay -o lowerdir={self.tree},upperdir={self.root},"
                   f"workdir={scratch} {t}"]
        # ... and the machine's root has them too, with its hosts and sudoers
        mounts += [f"mount --bind {etc / f} {t}/etc/{f}"
                   for f in ("passwd", "shadow", "group", "hosts")]
        mounts += [f"mount --bind {self.sudoers_file} {t}/etc/sudoers",
                   f"mount -t proc proc {t}/proc", f"mount -t sysfs sysfs {t}/sys",
                   f"mount --rbind /dev {t}/dev",
                   f"mount -t tmpfs -o mode=755 tmpfs {t}/run",
                   f"mount -t tmpfs -o mode=1777 tmpfs {t}/tmp",
                   f"mount -t tmpfs -o mode=1777 tmpfs {t}/var/tmp"]
        return " && ".join(["mkdir -p /run/sshd", f"echo {self.hostname} > "
                            "/proc/sys/kernel/hostname", *mounts, f"exec {SSHD} -D -e -f {cfg}"])

    async def __aenter__(self) -> Sshd:
        self.tree = await asyncio.to_thread(targetroot.target_root)
        cfg = self._files()
        a, b = f"{self.ns}a", f"{self.ns}b"
        try:
            self._network(a, b)
            if self.listen:
                await self.start(cfg)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def _network(self, a: str, b: str) -> None:
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                    ["ip", "link", "set", b, "netns", self.ns],
                    ["ip", "addr", "add", f"{HOST_ADDR}/30", "dev", a],
                    ["ip", "link", "set", a, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{TARGET_ADDR}/30",
                     "dev", b],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", b, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)

    async def start(self, cfg: Path | None = None) -> None:
        """Start sshd; returns once it listens (its own log line, not a sleep)."""
        cfg = cfg or self._files()
        self.proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", self._script(cfg),
            stderr=asyncio.subprocess.PIPE)
        assert self.proc.stderr is not None
        log = []
        async with asyncio.timeout(30):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                log.append(line)
                if not line:
                    raise RuntimeError("sshd did not start:\n" + "".join(log))
                if "Server listening on" in line:
                    break
        self._drain = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
            await self._drain
        self.proc = None

    def new_host_key(self) -> None:
        """The machine "was reinstalled": a new host key from the next start."""
        for p in self.work.glob("ssh_host_ed25519_key*"):
            p.unlink()

    def sudoers(self, line: str = "") -> None:
        """The target's /etc/sudoers: root's rule and ``line`` (e.g. 'alice ALL=(ALL) ALL');
        in effect at once, sudo reads it at each call."""
        self.sudoers_file.parent.mkdir(parents=True, exist_ok=True)
        # its timestamps in the target's own /var/tmp, never the host's /run; no lecture
        # remembered in /var/lib
        self.sudoers_file.write_text("Defaults env_reset, lecture=never, timestampdir="
                                     "/var/tmp/sudo-ts\nroot ALL=(ALL:ALL) ALL\n"
                                     + (line + "\n" if line else ""))
        self.sudoers_file.chmod(0o440)

    def files(self) -> list[str]:
        """Every file under the target root (what an install left behind)."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if not p.is_dir())

    def unplug(self) -> None:
        """The machine's network goes away (its link down): its address stops answering."""
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", f"{self.ns}b",
                        "down"], check=True, capture_output=True)

    def attach_disk(self, image: Path, size: int) -> str:
        """A disk of ``size`` zero bytes for the machine: a loop device over ``image``
        (outside its root, as a hypervisor keeps a VM's disk), seen in the machine's /dev;
        its path there. Detached when the namespace goes."""
        with open(image, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        self.loops.append(dev)
        return dev

    def _teardown(self) -> None:
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        self.loops.clear()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.ns}a"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._teardown()
