"""A real libvirtd for tests: Debian's daemons, started by hand and stopped after.

``libvirtd_running()`` yields the URI ``qemu:///system``. When a libvirtd already answers
there it is used and left running; otherwise ``virtlogd -d`` (the console logs go through
it) and ``libvirtd -d`` are started, and exactly those two processes — by the pids they
wrote — are stopped on exit.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from targets.domainxml import isolated_network_xml
from tests.backends import missing_backend

URI = "qemu:///system"
PIDFILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
START_BOUND = 60.0  # seconds: a daemon that has not answered by then has failed


def _udev_kvm_permissions() -> None:
    """Give ``/dev/kvm`` the group and mode Debian's udev rules give it (root:kvm 0660).

    Containers without udev leave it root:root 0600. libvirt then finds KVM "not
    available now" to the emulator's user after having probed QEMU with it, declares
    its capability cache stale and probes QEMU again on every lookup: 4 s each, ~50 s
    per ``virsh define``. Whether KVM is used stays the target's decision
    (``targets.kvm``)."""
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return  # no kvm group: libvirt-daemon-system is not installed; caught below
    st = kvm.stat()
    if st.st_gid != gid or st.st_mode & 0o060 != 0o060:
        os.chown(kvm, 0, gid)
        os.chmod(kvm, 0o660)


def _answers() -> bool:
    res = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, text=True)
    return res.returncode == 0


def _pid(name: str) -> int | None:
    try:
        pid = int(PIDFILES[name].read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _wait(cond: str, check: Callable[[], bool], bound: float) -> None:
    """Poll ``check`` (a condition on a daemon's state) until it holds or ``bound`` ends."""
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirt test daemons: {cond} within {bound} s")
        time.sleep(0.1)


@contextmanager
def libvirtd_running() -> Iterator[str]:
    for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs libvirt-daemon-system, "
                                  "libvirt-clients and qemu-system-x86")
    if os.geteuid() != 0:
        missing_backend("root (libvirtd for qemu:///system)", "run the suite as root")
    _udev_kvm_permissions()
    if _answers():
        yield URI
        return
    started: list[int] = []
    try:
        for name in ("virtlogd", "libvirtd"):
            if _pid(name) is None:
                subprocess.run([name, "-d"], check=True)
                _wait(f"{name} wrote its pid file", partial(_has_pid, name), START_BOUND)
                pid = _pid(name)
                assert pid is not None
                started.append(pid)
        _wait("libvirtd answers on " + URI, _answers, START_BOUND)
        yield URI
    finally:
        for pid in reversed(started):  # libvirtd first, then virtlogd
            os.kill(pid, signal.SIGTERM)
            _wait(f"pid {pid} exited after SIGTERM", partial(_gone, pid), 60.0)


def _has_pid(name: str) -> bool:
    return _pid(name) is not None


def _gone(pid: int) -> bool:
    # a daemon we started is not our child (it forked away), so it never stays a zombie
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextmanager
def isolated_network(uri: str, name: str, bridge: str, subnet: str) -> Iterator[str]:
    """A transient isolated network (no ``<forward>``: guests send nothing outside), made
    for a test module and destroyed after it.

    A run killed before its teardown, or a libvirtd stopped under an active network,
    leaves the network's dnsmasq holding the host address and its bridge: both are
    removed first, so the next run starts clean. A refused ``net-create`` fails with
    what virsh said."""
    _clear_network(uri, name, bridge)
    xml = isolated_network_xml(name, bridge, ipaddress.IPv4Network(subnet))
    res = subprocess.run(["virsh", "-q", "-c", uri, "net-create", "/dev/stdin"], input=xml,
                         text=True, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"virsh net-create {name} ({subnet} on {bridge}) failed: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["virsh", "-q", "-c", uri, "net-destroy", name], capture_output=True)


def _clear_network(uri: str, name: str, bridge: str) -> None:
    subprocess.run(["virsh", "-q", "-c", uri, "net-destroy", name], capture_output=True)
    conf = f"/var/lib/libvirt/dnsmasq/{name}.conf".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and argv[0].endswith(b"dnsmasq") and any(conf in a for a in argv):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass
            _wait(f"the leftover dnsmasq {proc.name} of {name} exited",
                  partial(_gone, int(proc.name)), 10.0)
    if Path("/sys/class/net", bridge).exists():
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
