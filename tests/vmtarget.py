"""A small Linux VM with systemd and a real sshd, for the push install's end to end
(issue #14).

``VmTarget`` boots Debian's kernel under QEMU (KVM where it really works, else QEMU's
emulation: ``targets.kvm.probe_kvm``) with two virtio disks:

- ``/dev/vda``, the machine's root: an ext4 image of the minimal Debian 12 tree of
  tests/targetroot.py plus openssh-server and systemd, built once and cached (read-only
  to the VM: the guest's writes go to a tmpfs overlaid on it, so the cache never
  changes);
- ``/dev/vdb``, the machine's data disk: an image file of the test's.

Its network is QEMU's user-mode stack: the guest is 10.0.2.15, and the host's loopback is
10.0.2.2 to it (the servers a test runs on 127.0.0.1 are reached there); the guest's
sshd is forwarded from ``127.0.0.1:ssh_port`` on the host. So the tests send no packet
to a VM address and the VM needs no bridge: everything stays inside the QEMU process.

The initramfs (busybox, the modules of a virtio disk and network, ext4, overlay) is made
for each VM, holding that VM's files (/etc/passwd, shadow with the test's passwords,
hosts, sudoers, machine-id, sshd_config, its host key, root's authorized_keys, sshd's
unit enabled); its init mounts the overlay root, configures the network, copies those
files in and hands over to systemd. The journal goes to the serial console too, and
``__aenter__`` returns once sshd's ``Server listening`` is there: the boot is proved on
the console, not by a connection.

Needs root, qemu-system-x86_64, ``mkfs.ext4 -d`` (e2fsprogs), ``openssl`` and
``ssh-keygen``, and what tests/targetroot.py and tests/bootdisk.py need to build (once:
about a minute).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from targets.kvm import probe_kvm
from tests import bootdisk, targetroot
from tests.helpers import REPO
from tests.targetroot import run as _run

VERSION = "1"
CACHE = REPO / ".cache" / "vmtarget"
PACKAGES = (*targetroot.PACKAGES, "openssh-server", "systemd")
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4", "overlay"]
QEMU = "qemu-system-x86_64"
GUEST_ADDR, HOST_ALIAS = "10.0.2.15", "10.0.2.2"  # QEMU's user-mode network
HOSTNAME = "vmtarget"
READY = "Server listening on 0.0.0.0 port 22"  # sshd's, through the journal
BOOT_BOUND = 300.0  # seconds: a guest that has not started sshd by then failed to boot

INIT = bootdisk.INIT_HEAD + """i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro /dev/vda /lower || { echo "siterecovery-vm: no root"; poweroff -f; }
mount -t tmpfs -o mode=755 tmpfs /rw
mkdir /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
cp -a /vm/. /newroot/
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
hostname vmtarget
for d in proc sys dev; do mount --move /$d /newroot/$d; done
echo "siterecovery-vm: root ready"
exec switch_root /newroot /lib/systemd/systemd
"""

SSHD_CONFIG = """# written by tests/vmtarget.py
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
"""


def missing() -> str | None:
    """Why the VM cannot boot here, or None."""
    if os.geteuid() != 0:
        return "needs root (the root image keeps its files' owners)"
    tools = [t for t in (QEMU, "mkfs.ext4", "openssl", "ssh-keygen")
             if shutil.which(t) is None]
    tools += targetroot.missing_tools() + bootdisk.missing_tools()
    if tools:
        return f"the VM needs {', '.join(sorted(set(tools)))}"
    return None


def image() -> Path:
    """The cached directory holding ``root.img``, ``vmlinuz`` and ``base.cpio.gz`` (the
    initramfs without a VM's files), built first if this ``VERSION`` has none."""
    done = CACHE / f"{VERSION}-{targetroot.key(PACKAGES)}"
    if (done / "base.cpio.gz").exists():
        return done
    tree = targetroot.target_root(PACKAGES)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        size = int(_run("du", "-s", "--block-size=1M", tree).split()[0])
        _run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", tree, out / "root.img",
             f"{size * 3 // 2 + 64}M")
        debs, kernel = work / "debs", work / "kernel"
        debs.mkdir()
        _run("apt-get", "download", "-q", bootdisk.kernel_package(), "busybox-static",
             cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run("dpkg-deb", "-x", deb, kernel)
        [vmlinuz] = sorted(kernel.glob("boot/vmlinuz-*"))
        [moddir] = sorted(kernel.glob("lib/modules/*"))
        shutil.copy(vmlinuz, out / "vmlinuz")
        cpio = bootdisk.Cpio()
        for d in ("bin", "dev", "proc", "sys", "modules"):
            cpio.add(d, 0o040755)
        cpio.add("dev/console", 0o020600, rdev=(5, 1))
        cpio.add("bin/busybox", 0o100755, (kernel / "bin" / "busybox").read_bytes())
        cpio.add("init", 0o100755, INIT.encode())
        order = bootdisk.load_order(moddir, MODULES)
        for name, ko in order:
            cpio.add(f"modules/{name}.ko", 0o100644, ko.read_bytes())
        cpio.add("modules.load", 0o100644, "".join(f"{n}\n" for n, _ in order).encode())
        (out / "base.cpio.gz").write_bytes(gzip.compress(cpio.finish(), 6, mtime=0))
        try:
            os.rename(out, done)  # atomic: a concurrent builder's is as good as ours
        except OSError:
            if not (done / "base.cpio.gz").exists():
                raise
    return done


def _hash(password: str) -> str:
    return subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, text=True,
                          capture_output=True, check=True).stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VmTarget:
    """``async with VmTarget(dir, data, passwords={...}) as vm``: vm.ssh_port (on
    127.0.0.1), vm.host_key (OpenSSH public key line), vm.console() (the serial console
    so far). ``data`` is the image file the guest sees as /dev/vdb; ``uuid``, the
    machine's SMBIOS UUID (/sys/class/dmi/id/product_uuid in the guest)."""

    def __init__(self, work: Path, data: Path, *, passwords: dict[str, str],
                 authorized: dict[str, str] | None = None, memory_mib: int = 1024,
                 uuid: str | None = None) -> None:
        self.work, self.data, self.passwords = work, data, passwords
        self.uuid = uuid  # its SMBIOS UUID (QEMU's -uuid): the agent's host id
        self.authorized = authorized or {}
        self.memory_mib = memory_mib
        self.ssh_port = 0
        self.host_key = ""
        self.accel = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._console: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    def console(self) -> str:
        return "".join(self._console)

    def _initrd(self, base: Path) -> Path:
        """The cached initramfs plus a second archive of this VM's files under /vm (the
        kernel unpacks concatenated archives one over the other)."""
        self.work.mkdir(parents=True, exist_ok=True)
        key = self.work / "ssh_host_ed25519_key"
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOSTNAME, "-f", key)
        self.host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        users = {"root": (0, "/root"), "alice": (1500, "/home/alice")}
        files: dict[str, tuple[int, bytes]] = {
            "etc/passwd": (0o644, "".join(
                f"{u}:x:{uid}:{uid}::{home}:/bin/sh\n" for u, (uid, home) in users.items())
                .encode() + b"sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"),
            "etc/group": (0o644, b"root:x:0:\nalice:x:1500:\nnogroup:x:65534:\n"),
            "etc/shadow": (0o600, "".join(
                f"{u}:{_hash(self.passwords[u]) if u in self.passwords else '!'}"
                ":19000:0:99999:7:::\n" for u in users).encode()),
            "etc/hosts": (0o644, f"127.0.0.1\tlocalhost\n{GUEST_ADDR}\t{HOSTNAME}\n"
                          .encode()),
            "etc/hostname": (0o644, f"{HOSTNAME}\n".encode()),
            "etc/machine-id": (0o444, f"{secrets.token_hex(16)}\n".encode()),
            "etc/sudoers": (0o440, b"root ALL=(ALL:ALL) ALL\n"),
            "etc/ssh/sshd_config": (0o644, SSHD_CONFIG.encode()),
            "etc/ssh/ssh_host_ed25519_key": (0o600, key.read_bytes()),
            "root/.ssh/authorized_keys": (0o600, "".join(
                line + "\n" for u, line in self.authorized.items() if u == "root").encode()),
        }
        cpio = bootdisk.Cpio()
        wants = "etc/systemd/system/multi-user.target.wants"
        for d in ("", "/etc", "/etc/ssh", "/etc/systemd", "/etc/systemd/system", f"/{wants}",
                  "/root", "/root/.ssh"):
            cpio.add(f"vm{d}", 0o040700 if d.startswith("/root") else 0o040755)
        for name, (mode, body) in files.items():
            cpio.add(f"vm/{name}", 0o100000 | mode, body)
        # sshd enabled, as its package's maintainer scripts (which never ran) would
        cpio.add(f"vm/{wants}/ssh.service", 0o120777, b"/lib/systemd/system/ssh.service")
        out = self.work / "initrd.gz"
        out.write_bytes((base / "base.cpio.gz").read_bytes() +
                        gzip.compress(cpio.finish(), 6, mtime=0))
        return out

    async def __aenter__(self) -> VmTarget:
        base = await asyncio.to_thread(image)
        initrd = await asyncio.to_thread(self._initrd, base)
        kvm = probe_kvm()
        self.accel = "kvm" if kvm.usable else "tcg"
        self.ssh_port = _free_port()
        argv = [QEMU, "-accel", self.accel, "-cpu", "host" if kvm.usable else "max",
                "-m", str(self.memory_mib), "-smp", "1", "-no-reboot",
                "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-kernel", str(base / "vmlinuz"), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 loglevel=4 systemd.firstboot=off "
                # no udev in the tree: a getty waiting for its device would wait in vain
                "systemd.mask=serial-getty@ttyS0.service "
                "systemd.journald.forward_to_console=1",
                "-drive", f"file={base / 'root.img'},if=virtio,format=raw,readonly=on",
                "-drive", f"file={self.data},if=virtio,format=raw,cache=none",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=n0",
                *(["-uuid", self.uuid] if self.uuid else [])]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        try:
            await self._booted()
        except BaseException:
            await self.__aexit__()
            raise
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _booted(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(BOOT_BOUND):
                while True:
                    line = (await self.proc.stdout.readline()).decode(errors="replace")
                    self._console.append(line)
                    if not line:
                        raise RuntimeError("the VM stopped before its sshd listened:\n"
                                           + self.console()[-4000:])
                    if READY in line:
                        return
        except TimeoutError:
            raise RuntimeError(f"the VM ({self.accel}) did not start its sshd within "
                               f"{BOOT_BOUND:.0f} s:\n{self.console()[-4000:]}") from None

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._console.append(line.decode(errors="replace"))

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._drain is not None:
            await self._drain
        self.proc = None
