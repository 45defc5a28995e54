"""What the modules that recover machines onto libvirt share (a module imports the
fixtures it uses by name): the root tools the boot disk and libvirtd need, libvirtd
itself for the module (``uri``), and the libvirt target's image folder (``images``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import missing_backend, traversable
from tests.bootdisk import missing_tools
from tests.libvirtd import libvirtd_running


def need_root_tools() -> None:
    """Root, the tools that build and check the boot disk, and ``virsh``: else a missing
    backend (a failure in CI, never a skip)."""
    if os.geteuid() != 0:
        missing_backend("root (loop devices, libvirtd)", "run the suite as root")
    for tool in ("losetup", "mount", "umount", "e2fsck", "virsh"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs util-linux, e2fsprogs and libvirt")
    if missing := missing_tools():
        missing_backend(", ".join(missing), "tests/run.sh installs fdisk and e2fsprogs")


@pytest.fixture(scope="module")
def uri() -> Iterator[str]:
    """libvirtd's ``qemu:///system`` for the module (tests/libvirtd.py)."""
    need_root_tools()
    with libvirtd_running() as u:
        yield u


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The libvirt target's image folder; the emulator (libvirt-qemu) must traverse to it
    (and to what else the test keeps in ``tmp_path``). Its name is short: instant
    recovery's NBD sockets go in it, and a UNIX socket's path holds 107 bytes at most
    (pytest's temp folders under xdist are long already)."""
    d = tmp_path / "lv"
    d.mkdir()
    return traversable(d)
