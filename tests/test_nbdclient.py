"""The agent's NBD client against QEMU's own NBD server (``qemu-nbd``), no libvirt.

A qcow2 image gets data, then a persistent dirty bitmap, then more writes (``qemu-io``);
``qemu-nbd`` exports it read-only with the bitmap as ``qemu:dirty-bitmap:<name>``, as a
libvirt pull-mode backup does. The client finds the size, the dirty extents (exactly
the writes after the bitmap, in QEMU's 64 KiB granularity) and the allocation, reads
data and holes byte for byte, and reports the server's refusals as ``NbdError``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobility.nbdclient import STATE_DIRTY, STATE_HOLE, NbdClient, NbdError
from tests.backends import missing_backend

SIZE = 8 << 20
BITMAP = "bm0"


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True,
                   capture_output=True)


@pytest.fixture
def export(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """(the socket of ``qemu-nbd`` serving the image as export ``disk``, its content)."""
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if shutil.which(tool) is None:
            missing_backend(tool, "tests/run.sh installs qemu-utils")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                   check=True)
    content = bytearray(SIZE)
    qemu_io(image, "write -P 0x61 0 1M")
    content[0:1 << 20] = b"\x61" * (1 << 20)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), BITMAP], check=True)
    qemu_io(image, "write -P 0x62 3M 100")  # dirty: the 64 KiB cluster around it
    content[3 << 20:(3 << 20) + 100] = b"\x62" * 100
    qemu_io(image, "write -P 0x63 5000000 70000")  # spans two clusters
    content[5000000:5070000] = b"\x63" * 70000
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "qemu-nbd.pid"
    # --fork: qemu-nbd returns once it serves.
    subprocess.run(["qemu-nbd", "--fork", "--pid-file", str(pidfile), "--read-only",
                    "--persistent", "-f", "qcow2", "-x", "disk", "-B", BITMAP, "--socket",
                    str(sock), str(image)], check=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        yield str(sock), bytes(content)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_extents_and_reads_match_what_qemu_wrote(export: tuple[str, bytes]) -> None:
    sock, content = export
    context = f"qemu:dirty-bitmap:{BITMAP}"
    with NbdClient(sock, "disk", ("base:allocation", context)) as c:
        assert c.size == SIZE and set(c.context_ids) == {"base:allocation", context}
        dirty = [(off, ln) for off, ln, fl in c.extents(context) if fl & STATE_DIRTY]
        assert dirty == [(3 << 20, 64 << 10), (4980736, 128 << 10)]
        data = [(off, ln) for off, ln, fl in c.extents("base:allocation")
                if not fl & STATE_HOLE]
        assert data[0] == (0, 1 << 20) and sum(ln for _, ln in data) < SIZE // 2
        got = bytearray(SIZE)
        for pos in range(0, SIZE, 1 << 20):
            for at, piece in c.read(pos, 1 << 20):
                if piece is not None:
                    got[at:at + len(piece)] = piece
        assert got == content
        with pytest.raises(NbdError, match="error"):  # beyond the end: refused
            list(c.read(SIZE - 512, 1024))
    with pytest.raises(NbdError, match="refused"), NbdClient(sock, "no-such-export"):
        pass
    with NbdClient(sock, "disk") as c, pytest.raises(NbdError, match="does not offer"):
        c.block_status(context, 0, SIZE)
