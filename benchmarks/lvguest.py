"""A libvirt domain for benchmarks: a qcow2 disk written inside QEMU, no guest OS.

``guest(work, raw)`` turns a generated raw image into a qcow2 one (every block
allocated, as the raw one is) and runs a transient domain (``srbench-…``, one virtio
disk ``vda``, no operating system: it waits in its firmware) on ``qemu:///system``.
``churn`` writes into that disk through QEMU's own block layer — ``qemu-io`` through the
monitor (``virsh qemu-monitor-command --hmp``), one interactive ``virsh`` fed the
commands — which is where QEMU's dirty bitmaps see writes, as they see a guest's. A
write fills 64 KiB at a random block with one byte value (``qemu-io write -P``): the
data compresses to nearly nothing, so the process server's share of the work is smaller
than with random bytes; what the tracker reads is the same. Needs root, ``qemu-img``,
``virsh`` and a running libvirtd (the tests start one: ``virtlogd -d``, ``libvirtd -d``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

URI = "qemu:///system"
WRITE = 64 * 1024
DEVICE = "virtio-disk0/virtio-backend"  # the disk's qdev path in QEMU


@dataclass(frozen=True)
class Guest:
    uri: str
    name: str
    image: Path
    socket_dir: Path


def _need() -> None:
    if os.geteuid() != 0:
        raise SystemExit("--tracker libvirt needs root (libvirtd's qemu:///system)")
    for tool in ("qemu-img", "virsh"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--tracker libvirt needs {tool} (apt install qemu-utils "
                             "libvirt-clients libvirt-daemon-system)")
    if subprocess.run(["virsh", "-c", URI, "version"], capture_output=True).returncode:
        raise SystemExit(f"--tracker libvirt needs libvirtd answering on {URI}: start "
                         "'virtlogd -d' then 'libvirtd -d'")


@contextlib.contextmanager
def guest(work: Path, raw: Path) -> Iterator[Guest]:
    """A running transient domain whose disk ``vda`` is ``raw`` converted to qcow2 (the
    raw image is removed); destroyed on exit, its folder removed."""
    _need()
    folder = work / "lv"
    folder.mkdir(exist_ok=True)
    for p in [folder, *folder.parents]:  # the emulator (libvirt-qemu) reaches the image
        if p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o011)
    image = folder / "vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    raw.unlink()
    name = f"srbench-{uuid.uuid4().hex[:8]}"
    xml = folder / "domain.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>""")
    subprocess.run(["virsh", "-q", "-c", URI, "create", str(xml)], check=True,
                   capture_output=True)
    try:
        yield Guest(URI, name, image, folder / "run")
    finally:
        subprocess.run(["virsh", "-q", "-c", URI, "destroy", name], capture_output=True,
                       check=False)
        shutil.rmtree(folder, ignore_errors=True)


def churn(g: Guest, rate: float, seconds: float, seed: int, done: threading.Event) -> int:
    """Random 64 KiB writes inside QEMU at ``rate`` bytes/s for ``seconds``; returns the
    writes made, once QEMU has made every one (``RuntimeError`` if one failed)."""
    rng = random.Random(seed)
    size = int(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(g.image)],
                              check=True, capture_output=True, text=True).stdout
               .split('"virtual-size":')[1].split(",")[0])
    blocks = size // WRITE
    shell = subprocess.Popen(["virsh", "-q", "-c", g.uri], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert shell.stdin is not None and shell.stdout is not None
    failed: list[str] = []

    def read(out: IO[str]) -> None:  # the shell's output read as it comes (a full pipe
        for line in out:  # would stop the shell)
            if "error" in line.lower():
                failed.append(line.strip())

    reader = threading.Thread(target=read, args=(shell.stdout,), daemon=True)
    reader.start()
    n = 0
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate / WRITE) + 1
            while n < due:
                cmd = f"write -P {rng.randrange(256)} {rng.randrange(blocks) * WRITE} {WRITE}"
                shell.stdin.write(f"qemu-monitor-command --hmp {g.name} "
                                  f"'qemu-io -d {DEVICE} \"{cmd}\"'\n")
                n += 1
            shell.stdin.flush()
            time.sleep(0.005)  # pacing the workload, not synchronising anything
    finally:
        shell.stdin.close()  # the shell makes the writes queued, then ends
        shell.wait()
        reader.join()
        done.set()
    if failed:
        raise RuntimeError(f"{len(failed)} write(s) inside QEMU failed: {failed[0]}")
    return n
